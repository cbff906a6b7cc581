"""Retrieval harness mechanics: contexts have exact token lengths, each answer stated once at the
planned depth; teacher-forced exact match equals greedy generation's; a plan sized for the
evaluated length gives a cached continuation the rows of the full forward."""

from __future__ import annotations

import pytest
import torch

from headwise.evals import (
    Question,
    RetrievalContext,
    answer_matches,
    retrieval,
    retrieval_accuracy,
    retrieval_contexts,
    sized_swap,
)
from headwise.hf import swap_pattern
from headwise.layers import MoAPlan

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402  (needs transformers)

# heterogeneous spans on 8-token blocks: a 96-token sequence really hides keys
PLAN = MoAPlan(
    alphas=((0.0, 0.0, 16.0, 0.0), (0.0, 8.0, 0.0, 0.0)),
    betas=((0.1, 0.3, 0.0, 1.0), (0.2, 0.0, 0.5, 0.1)),
    block=8,
    sink_size=8,
    min_cache=8,
    max_new_tokens=0,
)


def greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    # no end-of-sequence token: nothing stops or suppresses (min_new_tokens would) a token
    out = model.generate(
        ids[None],
        attention_mask=torch.ones_like(ids[None]),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :]


# ------------------------------------------------------------------ case construction (tokenizer)


@pytest.mark.real_model
@pytest.mark.parametrize("length", [512, 1024])
def test_passkey_contexts_exact_once_at_depth(smollm2, length):
    _, tokenizer = smollm2
    contexts = retrieval_contexts(tokenizer, length, contexts=3, questions=4, seed=7, reserve=48)
    before, _ = retrieval._turn(tokenizer, True)
    head = len(retrieval._ids(tokenizer, before + retrieval._PASSKEY_HEAD))
    for j, context in enumerate(contexts):
        assert context.length == length and context.ids.shape == (length - 48,)
        text = tokenizer.decode(context.ids)
        needles = []
        for q in context.questions:
            assert len(q.prompt) + len(q.answer) <= 48
            number = tokenizer.decode(q.answer).strip()
            assert len(number) == 5 and number.isdigit()
            assert text.count(number) == 1, f"{number} must be stated exactly once"
            label = tokenizer.decode(q.prompt).split("pass key for ")[1].split("?")[0]
            assert text.count(label) == 1
            start = round(q.depth * len(context.ids))
            needle = f"The pass key for {label} is {number}. Remember it.\n"
            assert tokenizer.decode(context.ids[start : start + 40]).startswith(needle)
            assert start == head or tokenizer.decode(context.ids[start - 1 : start]) == "\n"
            needles.append((start, len(retrieval._ids(tokenizer, needle))))
        # needle k sits at filler depth (4 k + j + 1/2) / 12, moved back to a line start by at
        # most 48 tokens
        fill = len(context.ids) - head - sum(n for _, n in needles)
        for k, (start, _) in enumerate(needles):
            filler_before = start - head - sum(n for _, n in needles[:k])
            planned = int((3 * k + j + 0.5) / 12 * fill)
            assert planned - 48 <= filler_before <= planned, (filler_before, planned)


@pytest.mark.real_model
def test_lines_contexts_exact_and_asked_at_depth(smollm2):
    _, tokenizer = smollm2
    (context,) = retrieval_contexts(tokenizer, 1024, task="lines", contexts=1, questions=5)
    assert context.ids.shape == (1024 - 64,)
    text = tokenizer.decode(context.ids)
    for q in context.questions:
        number = tokenizer.decode(q.answer)
        assert text.count(number) == 1
        start = round(q.depth * len(context.ids))
        line = tokenizer.decode(context.ids[start : start + 24])
        assert line.startswith("line ") and f"is <{number}>" in line
        name = line[5 : line.index(":")]
        assert f"in line {name}?" in tokenizer.decode(q.prompt)
    assert sorted(q.depth for q in context.questions) == [q.depth for q in context.questions]


@pytest.mark.real_model
def test_contexts_are_seeded(smollm2):
    _, tokenizer = smollm2
    a, b, c = (retrieval_contexts(tokenizer, 512, contexts=1, seed=s)[0] for s in (3, 3, 4))
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert all(torch.equal(x.answer, y.answer) for x, y in zip(a.questions, b.questions))


@pytest.mark.real_model
@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"task": "needle"}, ValueError),
        ({"reserve": 512}, ValueError),
        ({"reserve": 8}, ValueError),  # no room for the question
        ({"contexts": 0}, ValueError),
        ({"chat": 1}, TypeError),
        ({"questions": 2.0}, TypeError),
    ],
)
def test_contexts_refuse_bad_arguments(smollm2, kwargs, error):
    _, tokenizer = smollm2
    with pytest.raises(error):
        retrieval_contexts(tokenizer, 512, **({"contexts": 1, "questions": 2} | kwargs))


# ------------------------------------------------------------------ scoring (tiny random Llama)


@pytest.mark.parametrize("config, other", [(None, PLAN), (PLAN, None)])
def test_teacher_forcing_equals_greedy_generation(config, other):
    """The teacher-forced check agrees with ``generate``'s greedy tokens under the same sized
    pattern. Per context, answers 0-1 are greedy continuations under ``config`` (must match),
    answer 2 one under the other configuration (may not), answer 3 random (must not)."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    length, contexts = 96, []
    for _ in range(4):
        ids = torch.randint(0, 64, (80,), generator=gen)
        questions = []
        for k in range(4):
            prompt = torch.randint(0, 64, (6,), generator=gen)
            with sized_swap(model, config if k < 2 else other, length), torch.no_grad():
                answer = greedy(model, torch.cat([ids, prompt]), 4)
            if k == 3:
                answer = (answer + 1) % 64
            questions.append(Question(prompt, answer, 0.5))
        contexts.append(RetrievalContext(ids, tuple(questions), length))
    score = retrieval_accuracy(model, contexts, config)
    expected = []
    for context in contexts:
        for q in context.questions:
            with sized_swap(model, config, length), torch.no_grad():
                got = greedy(model, torch.cat([context.ids, q.prompt]), len(q.answer))
            expected.append(bool(torch.equal(got, q.answer)))
    assert list(score.correct) == expected
    assert score.accuracy == sum(expected) / 16
    assert [expected[i] for i in range(16) if i % 4 != 2] == [True, True, False] * 4


def test_answer_matches_leaves_the_cache_as_it_was():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 40))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    keys = cache.layers[0].keys.clone()
    answer_matches(model, cache, torch.tensor([1, 2, 3]), torch.tensor([4, 5]))
    assert cache.get_seq_length() == 40 and torch.equal(cache.layers[0].keys, keys)


def test_sized_plan_continuation_equals_full_forward():
    """Under ``sized_swap`` a cached continuation computes the last rows of the full forward;
    an elastic plan would size the prefill's spans for the prefill's own length instead."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 96))

    def continuation(swap):
        cache = transformers.DynamicCache(config=model.config)
        with swap, torch.no_grad():
            model(input_ids=ids[:, :72], cache=cache, use_cache=True)
            return model(input_ids=ids[:, 72:], cache=cache, use_cache=True).logits

    with sized_swap(model, PLAN, 96), torch.no_grad():
        full = model(input_ids=ids).logits[:, 72:]
    sized = continuation(sized_swap(model, PLAN, 96))
    assert torch.allclose(sized, full, atol=1e-5), (sized - full).abs().max()
    with torch.no_grad():
        dense = model(input_ids=ids).logits[:, 72:]
    assert (full - dense).abs().max() > 1e-2, "the plan must hide keys here"
    # the prefill of an elastic plan sizes its spans for 72 keys, not 96
    elastic = continuation(swap_pattern(model, PLAN))
    assert (elastic - full).abs().max() > 1e-3


def test_sized_swap_refuses_a_plan_of_other_depth():
    model = tiny_llama()
    with pytest.raises(ValueError, match="chooses 2 sites"):
        with sized_swap(model, MoAPlan.uniform(3, 4, alpha=0, beta=0.5), 64):
            pass
    with pytest.raises(ValueError, match="length"):
        with sized_swap(model, PLAN, 0):
            pass
