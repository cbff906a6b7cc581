"""Long-context retrieval on real text, as MoA measures a sparse plan (Fu et al., "MoA: Mixture
of Sparse Attention for Automatic Large Language Model Compression", 2024, §5): retrieval
accuracy at fixed lengths, scored by exact match of the greedy answer.

Two tasks, both seeded and built to an exact token count:

- ``"passkey"`` (Mohtashami & Jaggi, "Landmark Attention", 2023): five-digit pass keys, each
  stated once, on a line of its own (``The pass key for <label> is <number>. Remember it.``)
  inside real English filler (:func:`headwise.evals.token_stream`, Python's help topics), at
  the line start nearest before a controlled depth; the question asks for one label's key.
- ``"lines"`` (LongChat's LongEval, the task MoA reports): a record of lines ``line <name>:
  REGISTER_CONTENT is <number>``; the question asks for one line's number.

Work is shared: one context holds several needles (distinct labels) and is prefilled once;
each question is a short continuation from that prefix cache (cropped back after it). A question
is scored by **teacher forcing**: one forward of ``question + answer`` and a check that every
answer token is the argmax of the logits before it. Greedy decoding produces the answer's
``k`` tokens iff that holds: by induction, if greedy emitted ``a_1..a_{i-1}``, step ``i`` sees
exactly the teacher-forced prefix, so it emits ``a_i`` iff ``a_i`` is the argmax there (ties
resolve to the first index in both). Under a swapped pattern the question and answer tokens
attend with the same fixed-length pattern as the prefill (see
:func:`headwise.evals.sized.sized_swap`), i.e. the masked-dense pattern a decode step would get,
not MoA's per-token decode ring buffer.

Depths are spread evenly over all needles of one length: needle ``k`` of context ``j`` (of
``J`` contexts with ``K`` needles each) sits near depth ``(k J + j + 1/2) / (J K)`` of the
context.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headwise._checks import check_bool, check_choice, check_int
from headwise.evals.sized import sized_swap
from headwise.evals.text import corpus, token_stream
from headwise.hf.swap import SwapPattern

TASKS = ("passkey", "lines")

_PASSKEY_HEAD = (
    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
_LINES_HEAD = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line "
    "index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. "
    "For each line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the "
    "record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line "
    "index. Now the record start:\n\n"
)
# how far back (in tokens) a pass key may move to start a line
_SNAP = 48


@dataclass(frozen=True)
class Question:
    """One question about a context: ``prompt`` ``(q,)`` ids follow the context (the question
    and the answer's lead-in), ``answer`` ``(a,)`` ids are what the model must produce;
    ``depth`` is the needle's first token index divided by the context length."""

    prompt: torch.Tensor
    answer: torch.Tensor
    depth: float


@dataclass(frozen=True)
class RetrievalContext:
    """``ids`` ``(length - reserve,)`` context tokens shared by its ``questions``; ``length`` is
    the evaluated length: context + prompt + answer fits in it for every question."""

    ids: torch.Tensor
    questions: tuple[Question, ...]
    length: int


@dataclass(frozen=True)
class RetrievalScore:
    """Per question, in order: exact match of the greedy answer and the needle's depth."""

    correct: tuple[bool, ...]
    depths: tuple[float, ...]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _turn(tokenizer, chat: bool) -> tuple[str, str]:
    """The text before and after a user message: the chat template's, else nothing and a
    newline."""
    if not chat:
        return "", "\n"
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True needs a tokenizer with a chat template; pass chat=False")
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    before, after = text.split(marker)
    return before, after


def _words() -> list[str]:
    return sorted({w for w in corpus().split() if w.isalpha() and w.islower() and 4 <= len(w) <= 9})


def _labels(rng: random.Random, words: list[str], count: int) -> list[str]:
    """``count`` distinct LongEval-style names (``word-word``) absent from the corpus."""
    text, labels = corpus(), []
    while len(labels) < count:
        label = f"{rng.choice(words)}-{rng.choice(words)}"
        if label not in labels and label not in text:
            labels.append(label)
    return labels


def _numbers(rng: random.Random, count: int, avoid: str) -> list[int]:
    """``count`` distinct five-digit numbers none of which occurs in ``avoid``."""
    numbers: list[int] = []
    while len(numbers) < count:
        n = rng.randint(10000, 99999)
        if n not in numbers and str(n) not in avoid:
            numbers.append(n)
    return numbers


def _snap(tokenizer, filler: torch.Tensor, at: int) -> int:
    """The nearest index ``<= at`` (at most ``_SNAP`` back) at the start of a line (the filler's
    start follows the instructions' blank line), else ``at``."""
    for i in range(at, max(at - _SNAP, 0) - 1, -1):
        if i == 0 or tokenizer.decode(filler[i - 1 : i]).endswith("\n"):
            return i
    return at


def _depths(context: int, contexts: int, questions: int) -> list[float]:
    return [(k * contexts + context + 0.5) / (contexts * questions) for k in range(questions)]


def _passkey(tokenizer, size, index, contexts, questions, rng, words, before, after, seed):
    labels = _labels(rng, words, questions)
    head = _ids(tokenizer, before + _PASSKEY_HEAD)
    needles = [
        _ids(tokenizer, f"The pass key for {lab} is 00000. Remember it.\n") for lab in labels
    ]
    fill = size - len(head) - sum(len(n) for n in needles)
    if fill < questions:
        raise ValueError(f"length is too short for {questions} pass keys; got {size} tokens")
    filler = token_stream(tokenizer, fill, seed)[0]
    numbers = _numbers(rng, questions, tokenizer.decode(filler))
    needles = [
        _ids(tokenizer, f"The pass key for {lab} is {n}. Remember it.\n")
        for lab, n in zip(labels, numbers)
    ]
    if sum(len(n) for n in needles) != size - len(head) - fill:
        raise ValueError("the tokenizer splits five-digit numbers unevenly; use task='lines'")
    parts, starts, previous = [head], [], 0
    for depth, needle in zip(_depths(index, contexts, questions), needles):
        cut = max(_snap(tokenizer, filler, int(depth * fill)), previous)
        parts.append(filler[previous:cut])
        starts.append(sum(len(p) for p in parts))
        parts.append(needle)
        previous = cut
    parts.append(filler[previous:])
    asked = [
        (
            _ids(tokenizer, f"\n\nWhat is the pass key for {lab}?{after}The pass key for {lab} is"),
            _ids(tokenizer, f" {n}"),
            start,
        )
        for lab, n, start in zip(labels, numbers, starts)
    ]
    return torch.cat(parts), asked


def _lines(tokenizer, size, index, contexts, questions, rng, words, before, after, seed):
    head = _ids(tokenizer, _LINES_HEAD)
    records, used = [], len(_ids(tokenizer, before)) + len(head)
    labels = iter(_labels(rng, words, size // 8))
    numbers = iter(_numbers(rng, size // 8, ""))
    while True:
        name, number = next(labels), next(numbers)
        line = _ids(tokenizer, f"line {name}: REGISTER_CONTENT is <{number}>\n")
        if used + len(line) > size:
            break
        records.append((name, number, line))
        used += len(line)
    # the few tokens short of a whole line: the start of a real-text passage before the
    # instructions, so that the context has exactly `size` tokens
    lead = token_stream(tokenizer, size - used, seed)[0] if size > used else head[:0]
    prefix = torch.cat([_ids(tokenizer, before), lead, head])
    starts, at = [], len(prefix)
    for _, _, line in records:
        starts.append(at)
        at += len(line)
    asked = []
    for depth in _depths(index, contexts, questions):
        i = min(int(depth * len(records)), len(records) - 1)
        name, number, _ = records[i]
        question = (
            f"Now the record is over. Tell me what is the <REGISTER_CONTENT> in line {name}? "
            f"I need the number.{after}The <REGISTER_CONTENT> in line {name} is <"
        )
        asked.append((_ids(tokenizer, question), _ids(tokenizer, str(number)), starts[i]))
    return torch.cat([prefix, *(line for _, _, line in records)]), asked


def retrieval_contexts(
    tokenizer,
    length: int,
    *,
    task: str = "passkey",
    contexts: int = 10,
    questions: int = 10,
    seed: int = 0,
    reserve: int = 64,
    chat: bool = True,
) -> list[RetrievalContext]:
    """``contexts`` seeded retrieval contexts of exactly ``length - reserve`` tokens, each with
    ``questions`` questions about needles at evenly spread depths (see the module docstring),
    for a Hugging Face ``tokenizer``. ``reserve`` tokens are left for a question and its
    answer; ``chat`` wraps the context and question in the tokenizer's chat template (one user
    turn, the answer's lead-in in the assistant turn). Context ``j`` takes its filler from
    :func:`headwise.evals.token_stream` with seed ``seed + j``."""
    check_int("length", length, minimum=1)
    check_choice("task", task, TASKS)
    check_int("contexts", contexts, minimum=1)
    check_int("questions", questions, minimum=1)
    check_int("seed", seed)
    check_int("reserve", reserve, minimum=1)
    check_bool("chat", chat)
    if reserve >= length:
        raise ValueError(f"reserve must be < length={length}; got {reserve}")
    before, after = _turn(tokenizer, chat)
    words, build = _words(), (_passkey if task == "passkey" else _lines)
    rng = random.Random(f"{task}-{length}-{seed}")
    out = []
    for j in range(contexts):
        ids, asked = build(
            tokenizer, length - reserve, j, contexts, questions, rng, words, before, after, seed + j
        )
        for prompt, answer, _ in asked:
            if len(prompt) + len(answer) > reserve:
                raise ValueError(
                    f"reserve must hold a question and its answer "
                    f"({len(prompt) + len(answer)} tokens); got {reserve}"
                )
        out.append(
            RetrievalContext(
                ids,
                tuple(Question(p, a, start / len(ids)) for p, a, start in asked),
                length,
            )
        )
    return out


def answer_matches(model: nn.Module, cache, prompt: torch.Tensor, answer: torch.Tensor) -> bool:
    """Whether greedy decoding after the cached context and ``prompt`` produces ``answer``
    (teacher forcing, see the module docstring); ``cache`` (a transformers ``Cache``) holds the
    context and is left as it was."""
    ids = torch.cat([prompt, answer])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0]
    cache.crop(-ids.shape[1])
    predicted = logits[len(prompt) - 1 : -1].argmax(-1)
    return bool(torch.equal(predicted, answer))


def retrieval_accuracy(
    model: nn.Module,
    contexts: Sequence[RetrievalContext],
    config: SwapPattern | None = None,
    progress=None,
) -> RetrievalScore:
    """Exact-match accuracy of ``model`` (a transformers causal LM) on the questions of
    ``contexts`` under ``config`` (an MoA plan, a pattern, or ``None`` for dense; sized per
    context length by :func:`headwise.evals.sized.sized_swap`): each context is prefilled
    once, each question is a continuation of that prefix cache. ``progress`` (e.g. a tqdm
    bar) is advanced by one per context."""
    from transformers import DynamicCache

    correct, depths = [], []
    for context in contexts:
        cache = DynamicCache(config=model.config)
        with sized_swap(model, config, context.length), torch.no_grad():
            model(input_ids=context.ids[None], cache=cache, use_cache=True, logits_to_keep=1)
            for q in context.questions:
                correct.append(answer_matches(model, cache, q.prompt, q.answer))
                depths.append(q.depth)
        if progress is not None:
            progress.update()
    return RetrievalScore(tuple(correct), tuple(depths))
