"""PatternCache: a KV cache that follows the pattern equals the masked-dense reference
(``swap_pattern`` with transformers' DynamicCache) at every step, after its buffers wrap many
times, with GQA and left padding, and holds exactly the keys a later query can see."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

import headwise.patterns as P
from headwise._checks import Unsupported
from headwise.hf import attach, swap_pattern
from headwise.layers import MoAPlan
from headwise.layers.moa import MoASpan

transformers = pytest.importorskip("transformers")
from headwise.hf.cache import PatternCache  # noqa: E402  (needs transformers)

HEADS, KV_HEADS, LAYERS, VOCAB = 6, 2, 3, 96
PROMPT, STEPS = 20, 44
#: sinks + windows of 3-6 keys, different within the second GQA group: ragged kept sets
SINKS, WINDOWS = 2, (3, 3, 3, 5, 6, 4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    attach(model)
    return model


def prompt(batch: int, pad: int = 0, seed: int = 1):
    """Token ids ``(batch, PROMPT)`` and a mask with ``pad`` left-padding tokens in row 1."""
    ids = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :pad] = 0
    return ids, mask


def step(model, ids, mask, cache, pattern):
    """Logits of one call with ``cache`` (under ``swap_pattern(pattern)`` unless ``None``)."""
    swap = nullcontext() if pattern is None else swap_pattern(model, pattern)
    with torch.no_grad(), swap:
        return model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits


def compare(model, batch, pad, cache, reference, check_kept=None, steps=STEPS):
    """Prefill and ``steps`` greedy steps (the reference's tokens fed to both); the largest
    logit difference on real tokens. ``reference(step)``: the swap pattern of step ``step``
    (0 = prefill); ``check_kept(t)`` runs after every call whose last position is ``t``."""
    ids, mask = prompt(batch, pad)
    dense = transformers.DynamicCache(config=model.config)
    want = step(model, ids, mask, dense, reference(0))
    got = step(model, ids, mask, cache, None)
    real = mask.bool()
    worst = float((got[real] - want[real]).abs().max())
    for i in range(1, steps + 1):
        if check_kept is not None:
            check_kept(mask.shape[1] - 1)
        token = want[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        want = step(model, token, mask, dense, reference(i))
        got = step(model, token, mask, cache, None)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def windows_pattern():
    return P.per_head([P.sinks(SINKS) | P.sliding_window(w) for w in WINDOWS])


def expected_kept(t: int, heads_rule) -> list[set[int]]:
    """Per KV head, the union over its query heads of ``heads_rule(h, t)``."""
    group = HEADS // KV_HEADS
    return [
        set().union(*(heads_rule(h, t) for h in range(g * group, (g + 1) * group)))
        for g in range(KV_HEADS)
    ]


def window_keys(h: int, t: int) -> set[int]:
    """Keys query ``t + 1`` of head ``h`` sees among positions ``0..t``."""
    return set(range(min(SINKS, t + 1))) | set(range(max(0, t + 1 - WINDOWS[h]), t + 1))


def kept_checker(cache, rule):
    def check(t):
        want = expected_kept(t, rule)
        for layer in range(LAYERS):
            got = [set(p.tolist()) for p in cache.kept(layer)]
            assert got == want, f"layer {layer} after position {t}: kept {got}, want {want}"

    return check


@pytest.mark.parametrize(("batch", "pad"), [(1, 0), (2, 5)], ids=["unpadded", "left-padded"])
def test_windows_equal_reference_every_step_and_keep_only_visible_keys(tiny, batch, pad):
    pattern = windows_pattern()
    cache = PatternCache(tiny, pattern)
    worst = compare(tiny, batch, pad, cache, lambda i: pattern, kept_checker(cache, window_keys))
    assert worst <= 1e-5, f"max |cache - reference| over {STEPS} steps = {worst:.3g}"
    last = PROMPT + STEPS - 1
    assert cache.get_seq_length() == last + 1
    sizes = [len(window_keys(h, last)) for h in range(HEADS)]
    assert [len(k) for k in cache.kept(0)] == [max(sizes[:3]), max(sizes[3:])] == [5, 8]
    # B x kept x D floats for K and V, every layer
    assert cache.nbytes() == LAYERS * batch * (5 + 8) * 8 * 2 * 4


def test_bfloat16_cache_errs_no_more_than_the_bfloat16_reference(tiny):
    """In bfloat16 the cache and the masked reference round differently (they reduce over other
    key sets), so both are held against the float32 reference: the cache's error is at most
    twice the bfloat16 reference's own, plus bfloat16's rounding of the logits."""
    import copy

    model = copy.deepcopy(tiny).to(torch.bfloat16)
    pattern = windows_pattern()
    ids, mask = prompt(1)
    runs = {}
    for name, net, cache in (
        ("fp32", tiny, transformers.DynamicCache(config=tiny.config)),
        ("bf16", model, transformers.DynamicCache(config=model.config)),
        ("cache", model, PatternCache(model, pattern)),
    ):
        swap = None if name == "cache" else pattern
        step_ids, step_mask, logits = ids, mask, []
        for i in range(12):
            out = step(net, step_ids, step_mask, cache, swap)[:, -1].float()
            logits.append(out)
            step_ids = ids[:, i : i + 1]  # the same tokens fed to all three
            step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], 1)
        runs[name] = torch.stack(logits)
    error = {n: float((runs[n] - runs["fp32"]).abs().max()) for n in ("bf16", "cache")}
    rounding = float(runs["fp32"].abs().max()) * 2**-8
    assert error["cache"] <= 2 * error["bf16"] + 2 * rounding, error


def test_moa_plan_prefill_spans_then_decode_rule(tiny):
    """Prefill with each head's block-granular ``MoASpan(length=N)``, decoding with MoA's
    token-granular ``sinks(sink) | sliding_window(local - 1)``, each against its own mask."""
    betas = [
        (0.1, 0.1, 0.1, 0.2, 0.1, 0.3),
        (0.2, 0.2, 0.2, 0.1, 0.1, 0.1),
        (0.1, 0.3, 0.1, 0.1, 0.1, 0.1),
    ]
    plan = MoAPlan(
        ((0.0,) * HEADS,) * LAYERS,
        tuple(betas),
        block=4,
        sink_size=4,
        min_cache=8,
        max_new_tokens=STEPS,
    )
    total = PROMPT + STEPS
    sizes = [plan.cache_sizes(total, layer) for layer in range(LAYERS)]
    assert {size for layer in sizes for size in layer} == {(4, 4), (4, 8), (4, 16)}
    names = [f"blocks.{layer}.attn" for layer in range(LAYERS)]
    prefill = {n: plan.pattern(HEADS, total, layer=i) for i, n in enumerate(names)}
    decode = {
        n: P.per_head([P.sinks(s) | P.sliding_window(loc - 1) for s, loc in sizes[i]])
        for i, n in enumerate(names)
    }
    cache = PatternCache(tiny, plan)

    def check(t):
        for layer in range(LAYERS):
            group = HEADS // KV_HEADS
            want = [
                set().union(
                    *(
                        set(range(sizes[layer][h][0]))
                        | set(range(max(0, t + 2 - sizes[layer][h][1]), t + 1))
                        for h in range(g * group, (g + 1) * group)
                    )
                )
                for g in range(KV_HEADS)
            ]
            got = [set(p.tolist()) for p in cache.kept(layer)]
            assert got == want, f"layer {layer} after position {t}: kept {got}, want {want}"

    worst = compare(tiny, 2, 3, cache, lambda i: decode if i else prefill, check)
    assert worst <= 1e-5, f"max |cache - reference| = {worst:.3g}"


@pytest.mark.parametrize(("batch", "pad"), [(1, 0), (2, 4)], ids=["unpadded", "left-padded"])
def test_s2_shards_with_window(tiny, batch, pad):
    """S2-Attention: head ``h`` sees the key blocks of its shard plus a local window (shards
    are not causal by themselves: without padding the model's implied causal mask must hold)."""
    shards = P.per_head([P.strided(3, h % 3, block=2) | P.sliding_window(3) for h in range(HEADS)])
    cache = PatternCache(tiny, shards)

    def rule(h, t):
        shard = {j for j in range(t + 1) if (j // 2) % 3 == h % 3}
        return shard | set(range(max(0, t - 2), t + 1))

    worst = compare(tiny, batch, pad, cache, lambda i: shards, kept_checker(cache, rule))
    assert worst <= 1e-5, f"max |cache - reference| = {worst:.3g}"


def test_chosen_layers_keep_the_others_dense(tiny):
    pattern = P.sinks(1) | P.sliding_window(2)
    cache = PatternCache(tiny, {"blocks.1.attn": pattern})
    worst = compare(tiny, 2, 2, cache, lambda i: {"blocks.1.attn": pattern}, steps=12)
    assert worst <= 1e-5
    last = PROMPT + 12 - 1
    assert [len(p) for p in cache.kept(0)] == [last + 1] * KV_HEADS
    assert [set(p.tolist()) for p in cache.kept(1)] == [{0, last - 1, last}] * KV_HEADS


@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam-search"])
def test_generate_gives_the_reference_tokens(tiny, beams):
    """``generate`` with the cache: greedy, and beam search (which reorders the cache)."""
    pattern = windows_pattern()
    ids, mask = prompt(2, pad=5)
    settings = dict(
        max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0, num_beams=beams
    )
    with torch.no_grad():
        with swap_pattern(tiny, pattern):
            want = tiny.generate(input_ids=ids, attention_mask=mask, **settings)
        cache = PatternCache(tiny, pattern)
        got = tiny.generate(input_ids=ids, attention_mask=mask, cache=cache, **settings)
    assert torch.equal(got, want)
    assert [len(k) for k in cache.kept(2)] == [5, 8]
    assert cache.layers[2].group_keys[0].shape[0] == 2 * beams


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (P.documents([10, 10]), "may show a key"),
        (P.block_sparse(torch.ones(2, 2, dtype=torch.bool), 16), "may show a key"),
        (P.sliding_window(4, align="top_left"), "top-left"),
        (P.sinks(2) | MoASpan(0.0, 0.5, block=4, sink_size=4, min_cache=8), "elastic"),
    ],
    ids=["documents", "block_sparse", "top_left", "elastic-moa"],
)
def test_refuses_patterns_it_cannot_follow(tiny, pattern, why):
    with pytest.raises(ValueError, match=why):
        PatternCache(tiny, pattern)


def test_refuses_crop_a_model_without_layer_idx_and_a_detached_model(tiny):
    cache = PatternCache(tiny, P.sliding_window(3))
    ids, mask = prompt(1)
    step(tiny, ids, mask, cache, None)
    assert not cache.is_croppable
    with pytest.raises(Unsupported, match="cannot crop"):
        cache.crop(-1)
    module = tiny.model.layers[1].self_attn
    index = module.layer_idx
    del module.layer_idx
    try:
        with pytest.raises(Unsupported, match="no layer_idx"):
            PatternCache(tiny, P.sliding_window(3))
    finally:
        module.layer_idx = index
    tiny.set_attn_implementation("sdpa")
    try:
        with pytest.raises(Unsupported, match="headwise attention"):
            step(tiny, ids, mask, PatternCache(tiny, P.sliding_window(3)), None)
    finally:
        attach(tiny)


def test_refuses_keys_the_model_changed_after_the_cache(tiny):
    from headwise.hf.registry import attention_forward

    cache = PatternCache(tiny, P.sliding_window(3))
    states = torch.randn(1, KV_HEADS, 4, 8)
    keys, values = cache.update(states, states.clone(), 0)
    query = torch.randn(1, HEADS, 4, 8)
    module = tiny.model.layers[0].self_attn
    with pytest.raises(Unsupported, match="other key/value tensors"):
        attention_forward(module, query, keys.clone(), values, None)


def test_refuses_hooks_and_attention_weights_once_keys_are_dropped(tiny):
    """Hooks and attention weights index keys by position; after a drop the attention runs over
    kept slots, so both are refused (a swap nested in the cache once gave wrong logits)."""
    from headwise.hf import capture

    ids, mask = prompt(1)
    cache = PatternCache(tiny, P.sinks(2) | P.sliding_window(4))
    step(tiny, ids, mask, cache, None)  # the prefill keeps every key until it is done
    token = ids[:, -1:]
    mask = torch.cat([mask, torch.ones_like(token)], 1)
    with pytest.raises(Unsupported, match="hooks"):
        step(tiny, token, mask, cache, P.strided(3) | P.sliding_window(0))
    cache = PatternCache(tiny, P.sinks(2) | P.sliding_window(4))
    step(tiny, ids, mask[:, :-1], cache, None)
    with pytest.raises(Unsupported, match="output_attentions"), torch.no_grad():
        tiny(input_ids=token, attention_mask=mask, cache=cache, output_attentions=True)
    cache = PatternCache(tiny, P.sinks(2) | P.sliding_window(4))
    step(tiny, ids, mask[:, :-1], cache, None)
    with pytest.raises(Unsupported, match="hooks"), capture(tiny, what=["pattern"]):
        step(tiny, token, mask, cache, None)


def test_refuses_a_chunked_prefill_of_an_moa_plan(tiny):
    """An MoA plan is sized for prompt + max_new_tokens at the first call: a second
    multi-token call would follow spans sized for the first chunk only."""
    plan = MoAPlan.uniform(LAYERS, HEADS, 0.0, 0.5, block=4, sink_size=4, min_cache=8)
    ids, mask = prompt(1)
    cache = PatternCache(tiny, plan)
    step(tiny, ids[:, :10], mask[:, :10], cache, None)
    with pytest.raises(Unsupported, match="whole prompt in one call"):
        step(tiny, ids[:, 10:], mask, cache, None)
    fixed = PatternCache(tiny, P.sinks(2) | P.sliding_window(4))  # a pattern: chunks are fine
    step(tiny, ids[:, :10], mask[:, :10], fixed, None)
    step(tiny, ids[:, 10:], mask, fixed, None)


def test_an_update_left_behind_is_refused_once(tiny):
    """An update that never reached attention (an interrupted call) is refused once, then the
    next call starts afresh; a new cache voids it at once."""
    cache = PatternCache(tiny, P.sliding_window(3))
    states = torch.randn(1, KV_HEADS, 4, 8)
    cache.update(states, states.clone(), 0)  # nothing attends: left behind
    with pytest.raises(Unsupported, match="never reached"):
        cache.update(states, states.clone(), 1)
    ids, mask = prompt(1)
    step(tiny, ids, mask, transformers.DynamicCache(config=tiny.config), None)
    cache.update(states, states.clone(), 0)
    step(tiny, ids, mask, PatternCache(tiny, P.sliding_window(3)), None)


def test_lazy_export_without_warning():
    import headwise.hf

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert headwise.hf.PatternCache is PatternCache


@pytest.mark.real_model
def test_smollm2_sinks_window_generate_equals_reference(smollm2):
    """SmolLM2: 24 greedy tokens after ~200 tokens of real text, sinks(4) | window(63): the
    swap reference's tokens, and every KV head of every layer holds 4 + 63 keys."""
    from headwise.evals import token_stream

    model, tokenizer = smollm2
    before = model.config._attn_implementation
    attach(model)
    try:
        pattern = P.sinks(4) | P.sliding_window(63)
        ids = token_stream(tokenizer, 200, seed=14)
        settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
        with torch.no_grad():
            with swap_pattern(model, pattern):
                want = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **settings
                )
            cache = PatternCache(model, pattern)
            got = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **settings
            )
    finally:
        model.set_attn_implementation(before)
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    last = 200 + 24 - 2  # the last generated token is never fed back
    want_kept = set(range(4)) | set(range(last - 62, last + 1))
    for layer in range(layers):
        assert [set(p.tolist()) for p in cache.kept(layer)] == [want_kept] * 3
    assert cache.nbytes() == layers * 3 * (4 + 63) * 64 * 2 * 4
