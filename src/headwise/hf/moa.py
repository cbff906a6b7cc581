"""MoA on a Hugging Face causal LM: calibration, influence profiling and the plan, end to end.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv 2406.14909), §3.3-3.4; official code thu-nics/MoA. :func:`moa_calibration` builds chat
prompts of real text plus an instruction whose answers the dense model regenerates ("model
alignment": the loss is on the model's own response tokens), :func:`moa_profile` records the
attention probabilities of every layer through the hook engine and turns them and their
gradients into influence tiles (:func:`headwise.moa.attention_influence`), and
:func:`moa_plan` runs both at several lengths and searches the plan
(:func:`headwise.moa.search_plan`). Apply the plan with :func:`headwise.hf.swap_pattern`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, Unsupported, check_bool, check_int
from headwise.hf.registry import attach
from headwise.hooks import Call, Hook, Request, hooked
from headwise.layers.moa import BLOCK, MoAPlan
from headwise.moa import attention_influence, candidate_grid, search_plan

#: the calibration task: the dense model's own summary of the text it reads
INSTRUCTION = "Summarize the text above in a few sentences."
_SLOT = "\x00TEXT\x00"


def _encode(tokenizer: object, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def moa_calibration(
    model: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    length: int,
    *,
    samples: int = 2,
    answer_tokens: int = 64,
    instruction: str = INSTRUCTION,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``samples`` calibration sequences of exactly ``length`` tokens (MoA §3.3, "model
    alignment").

    Each is the tokenizer's chat template around one user turn, ``<text>\\n\\n<instruction>``,
    where ``<text>`` is a stretch of ``texts`` (joined by blank lines) starting at a seeded
    paragraph boundary and cut to fill the length, followed by ``answer_tokens`` tokens of the
    answer the model itself gives, greedily (end-of-sequence is suppressed until then so every
    sequence has the same length and the profiles of all samples align). Returns dicts of
    ``input_ids`` and ``labels`` ``(1, length)``; ``labels`` are ``-100`` on the prompt, so the
    loss is on the response only.
    """
    check_int("length", length, minimum=2)
    check_int("samples", samples, minimum=1)
    check_int("answer_tokens", answer_tokens, minimum=1)
    check_int("seed", seed)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise ArgumentTypeError(f"texts must be a non-empty list of str; got {texts!r}")
    if not all(isinstance(t, str) for t in texts):
        raise ArgumentTypeError("texts must be a non-empty list of str")
    messages = [{"role": "user", "content": f"{_SLOT}\n\n{instruction}"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.count(_SLOT) != 1:
        raise Unsupported("the tokenizer's chat template does not keep the user text verbatim")
    head, tail = rendered.split(_SLOT)
    head_ids, tail_ids = _encode(tokenizer, head), _encode(tokenizer, tail)
    text_tokens = length - len(head_ids) - len(tail_ids) - answer_tokens
    if text_tokens < 1:
        raise ValueError(
            f"length={length} leaves no room for text: the template takes "
            f"{len(head_ids) + len(tail_ids)} tokens and the answer {answer_tokens}"
        )
    joined = "\n\n".join(texts)
    chars = 8 * text_tokens  # English runs about 4 characters a token: twice that is ample
    starts = [0] + [i + 2 for i in range(len(joined)) if joined.startswith("\n\n", i)]
    starts = [s + len(joined[s:]) - len(joined[s:].lstrip(" ")) for s in starts]
    starts = [s for s in starts if s + chars <= len(joined) and joined[s : s + 1].isalnum()]
    if not starts:
        raise ValueError(
            f"texts hold {len(joined)} characters: too short for {text_tokens} text tokens "
            f"(needs about {chars} after a paragraph start)"
        )
    rng = random.Random(seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    device = next(model.parameters()).device
    out = []
    for _ in range(samples):
        start = rng.choice(starts)
        ids = _encode(tokenizer, joined[start : start + chars])[:text_tokens]
        if len(ids) < text_tokens:
            raise ValueError(
                f"a passage of {chars} characters gave fewer than {text_tokens} tokens"
            )
        prompt = torch.tensor([head_ids + ids + tail_ids], device=device)
        with torch.no_grad():
            full = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=answer_tokens,
                min_new_tokens=answer_tokens,
                do_sample=False,
                num_beams=1,
                # greedy means argmax: no penalty the model's generation config may carry
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                pad_token_id=pad,
            )
        labels = full.clone()
        labels[:, : prompt.shape[1]] = -100
        out.append({"input_ids": full, "labels": labels})
    return out


class _KeepProbs(Hook):
    """Every head's attention probabilities, kept in the autograd graph: the layer's output is
    recomputed from them (``probs @ v``), so ``dLoss/dA`` reaches them."""

    def __init__(self) -> None:
        self.probs: dict[str, torch.Tensor] = {}

    def request(self, call: Call) -> Request:
        return Request()

    def edit_probs(self, call: Call) -> bool:
        if call.site.name in self.probs:
            raise Unsupported(f"{call.site.name} ran twice in one profiling forward")
        # the softmax of the explicit scores (equal to the engine's exp(s - lse)) keeps the
        # gradient out of the fast path's log-sum-exp
        call.probs = torch.softmax(call.scores, -1)
        self.probs[call.site.name] = call.probs
        return True


def _keep(tiles: dict, name: str, probs, block: int, absolute: bool, grad) -> None:
    """Backward hook on one layer's probabilities: its tiles, formed as ``G`` arrives (one
    head at a time: the float64 temporaries of the influence stay one head's size)."""
    tiles[name] = torch.cat(
        [
            attention_influence(
                probs[:, h : h + 1], grad[:, h : h + 1], block=block, absolute=absolute
            )
            for h in range(probs.shape[1])
        ]
    )


def moa_profile(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    block: int = BLOCK,
    absolute: bool = True,
) -> list[torch.Tensor]:
    """MoA influence tiles ``(H, n, n)`` (float64, ``n = ceil(L / block)``) of every decoder
    layer of a causal LM, averaged over ``batches`` (MoA §3.3).

    Each batch (``input_ids`` and ``labels`` ``(1, L)``, e.g. from :func:`moa_calibration`;
    all of one length) runs once with every head's probabilities ``A`` formed explicitly
    through the hook engine (the model is attached with :func:`headwise.hf.attach`); the loss
    is the model's own (``labels``), and ``G = dLoss/dA`` comes back layer by layer during one
    backward pass, where each layer's tiles are formed at once and ``G`` freed
    (:func:`headwise.moa.attention_influence`; ``absolute`` as there). The gradient is taken
    to the input embeddings, so the model's ``.grad`` stay untouched. Memory: ``A`` of all
    layers, ``4 * layers * H * L^2`` bytes, plus one layer's transient.
    """
    check_int("block", block, minimum=1)
    absolute = check_bool("absolute", absolute)
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or not batches:
        raise ArgumentTypeError(f"batches must be a non-empty list of dicts; got {batches!r}")
    sites = attach(model)  # again: something may have switched the implementation since
    if any(s.kind != "attn" for s in sites):
        raise Unsupported(f"moa_profile needs a decoder-only model; got sites {sites}")
    names = [s.name for s in sites]
    embed = model.get_input_embeddings()
    shape = None
    total = [0.0] * len(sites)
    for index, batch in enumerate(batches):
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.dim() != 2 or ids.shape[0] != 1 or labels.shape != ids.shape:
            raise ValueError(
                f"batches[{index}] must hold input_ids and labels of shape (1, L); got "
                f"{tuple(ids.shape)} and {tuple(labels.shape)}"
            )
        if shape is not None and ids.shape != shape:
            raise ValueError(
                f"all batches must have one length; got {tuple(ids.shape)} and {shape}"
            )
        shape = ids.shape
        tiles: dict[str, torch.Tensor] = {}
        recorder = _KeepProbs()
        with torch.enable_grad(), hooked(model, recorder):
            embeds = embed(ids).detach().requires_grad_()
            loss = model(inputs_embeds=embeds, labels=labels, use_cache=False).loss
        if set(recorder.probs) != set(names):
            raise Unsupported(f"the forward ran {sorted(recorder.probs)}, not every site {names}")
        for name, probs in recorder.probs.items():
            probs.register_hook(partial(_keep, tiles, name, probs.detach(), block, absolute))
        recorder.probs.clear()
        torch.autograd.grad(loss, embeds)
        del loss, embeds
        total = [t + tiles[name] for t, name in zip(total, names)]
    return [t / len(batches) for t in total]


def _kv_group(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv, int) or heads % kv:
        raise Unsupported(f"cannot tell the KV group of {type(model).__name__}: pass group=")
    return heads // kv


def moa_plan(
    model: nn.Module,
    tokenizer: object,
    texts: Sequence[str],
    budget: float,
    *,
    lengths: Sequence[int] = (1024, 2048),
    constraint_lengths: Sequence[int] | None = None,
    samples: int = 2,
    answer_tokens: int = 64,
    alpha_step: int = 128,
    group: int | None = None,
    max_spans: int = 2,
    lower: float = 0.9,
    max_new_tokens: int = 0,
    time_limit: float | None = None,
    seed: int = 0,
) -> MoAPlan:
    """A MoA plan for ``model`` at mean KV density ``budget``, from real ``texts``, in one call.

    Calibrates (:func:`moa_calibration`, ``samples`` per length), profiles at every length of
    ``lengths`` (:func:`moa_profile`) and searches (:func:`headwise.moa.search_plan`) with
    MoA's constraints: at most ``max_spans`` distinct spans per layer, mean density in
    ``[lower * budget, budget]`` at every length of ``constraint_lengths`` (default
    ``lengths``), one span per GQA group (``group``: the model's query heads per KV head, so
    the KV cache shrinks), candidates of :func:`headwise.moa.candidate_grid` with
    ``alpha_step`` (MoA's grid has 1024, too coarse for spans of 1k-4k tokens; 128 is two
    blocks). ``max_new_tokens`` is stored in the plan (the runtime sizes spans for
    ``N = kv_len + max_new_tokens``; ``0`` keeps the density at the evaluated length).
    """
    if isinstance(lengths, int | str) or not lengths:
        raise ArgumentTypeError(f"lengths must be a non-empty list of ints; got {lengths!r}")
    lengths = sorted(check_int("lengths", n, minimum=2) for n in lengths)
    limits = lengths if constraint_lengths is None else list(constraint_lengths)
    group = _kv_group(model) if group is None else group
    profiles = [
        moa_profile(
            model,
            moa_calibration(
                model, tokenizer, texts, n, samples=samples, answer_tokens=answer_tokens, seed=seed
            ),
        )
        for n in lengths
    ]
    span = (min(lengths + limits), max(lengths + limits))
    return search_plan(
        profiles,
        lengths,
        budget,
        candidates=candidate_grid(span[1], alpha_step=alpha_step, min_length=span[0]),
        max_new_tokens=max_new_tokens,
        group=group,
        max_spans=max_spans,
        lower=lower,
        constraint_lengths=limits,
        time_limit=time_limit,
    )


__all__ = ["INSTRUCTION", "moa_calibration", "moa_plan", "moa_profile"]
