"""The ``auto`` rule: which backend serves a problem, and why the others do not.

Priority (first backend with no reasons against it wins):

* CUDA: ``sdpa`` (dense / plain causal; FlashAttention-class kernels) -> ``flex`` (any pattern,
  compiled, block-sparse) -> ``blockwise`` -> ``reference``.
* CPU and other devices: ``sdpa`` -> ``native`` (headwise's C tile kernel on CPU, computing
  in float32: any pattern without bias or ``score_mod``, forward and backward) ->
  ``blockwise`` (any pattern, any dtype, forward and backward, no compilation) ->
  ``reference``. ``flex`` runs on CPU only
  for inference without LSE and pays a compilation per shape, so it is used on CPU only when
  asked for by name.

While ``torch.compile`` traces, a backend whose call would break the graph
(:meth:`~headwise.ops.attention.backends.Backend.breaks_graph`: ``sdpa`` with dropout or a bias
gradient where keys can be hidden, or off CPU) goes after those that would not.

``reference`` is the last resort and is refused by ``auto`` above ``REFERENCE_AUTO_LIMIT`` score
entries: a large problem never silently falls back to the L x L path.

That priority is the fixed rule. Unless ``HEADWISE_AUTOTUNE=0``, ``auto`` (and a tuple of names)
then picks, among the backends with no reasons against them, the one measured fastest for the
call's class of problem (:mod:`headwise.ops.attention.autotune`); the fixed rule stays the order
until a class is timed, and the answer wherever timing does not apply. A choice taken from a
timed class is remembered per exact problem and candidates (:meth:`TimesTable.recall
<headwise.ops.attention.autotune.TimesTable.recall>`), so a repeated call skips the backends'
reasons and the class key: the same answer, a dictionary lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headwise._checks import ArgumentTypeError
from headwise.ops.attention import autotune
from headwise.ops.attention.backends import BACKENDS, REFERENCE_AUTO_LIMIT
from headwise.ops.attention.problem import AttentionProblem

_CUDA_ORDER = ("sdpa", "flex", "blockwise", "reference")
_OTHER_ORDER = ("sdpa", "native", "blockwise", "reference")


@dataclass(frozen=True)
class Explanation:
    """The outcome of dispatch: ``backend`` chosen and, per backend, the reasons it was not.

    ``times``: median seconds per timed backend (empty unless measured). ``source``: where the
    choice came from: ``"requested"`` (a backend named by the caller), ``"fixed"`` (the fixed
    priority rule; ``note`` says why it applies), ``"measured"`` (timed during this call),
    ``"cached"`` (timed before, in this process or stored in the disk cache), ``"shorter"``
    (too large to time: the times of the same class at shorter lengths, named in ``note``).
    """

    backend: str | None
    considered: tuple[str, ...]
    reasons: dict[str, list[str]] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    source: str = "fixed"
    note: str = ""

    def __str__(self) -> str:
        how = self.source if self.source != "fixed" else "fixed rule"
        how += f": {self.note}" if self.note else ""
        lines = [f"backend: {self.backend or 'none'} ({how})"]
        for name in self.considered:
            why = "; ".join(self.reasons.get(name, []))
            timed = f"{self.times[name] * 1e3:.3g} ms" if name in self.times else ""
            if name == self.backend:
                mark = f"chosen, {timed}" if timed else "chosen"
            else:
                mark = why or timed or "lower priority"
            lines.append(f"  {name:<10} {mark}")
        return "\n".join(lines)


def priority(problem: AttentionProblem) -> tuple[str, ...]:
    return _CUDA_ORDER if problem.device.type == "cuda" else _OTHER_ORDER


def choose(
    problem: AttentionProblem, backend: str | tuple[str, ...], call: autotune.Call
) -> Explanation:
    """Pick a backend for ``problem``; ``backend`` is ``"auto"``, a name, or a tuple of names.
    ``call`` (the call's own tensors) is what candidates are timed on when the class is new."""
    if not isinstance(backend, str | tuple) or (
        isinstance(backend, tuple) and not all(isinstance(name, str) for name in backend)
    ):
        raise ArgumentTypeError(
            f"backend must be 'auto', one of {sorted(BACKENDS)} or a tuple of them; got {backend!r}"
        )
    if isinstance(backend, str) and backend != "auto":
        _check_names((backend,))
        why = BACKENDS[backend].reasons(problem)
        if why:
            raise ValueError(f"backend={backend!r} cannot serve this call: " + "; ".join(why))
        return Explanation(backend, (backend,), {}, source="requested")
    if isinstance(backend, str):
        candidates = priority(problem)
    else:
        _check_names(tuple(backend))
        candidates = tuple(backend)
    tuning = autotune.enabled()
    if tuning and not autotune.why_not_now(problem):
        remembered = autotune.TABLE.recall((problem, candidates, torch.get_num_threads()))
        if remembered is not None:
            backend, reasons, times = remembered  # copied: the caller may change its own
            reasons = {name: list(why) for name, why in reasons.items()}
            return Explanation(backend, candidates, reasons, dict(times), "cached")
    reasons: dict[str, list[str]] = {}
    viable: list[str] = []
    for name in candidates:
        why = list(BACKENDS[name].reasons(problem))
        if name == "reference" and problem.score_elements > REFERENCE_AUTO_LIMIT:
            why.append(
                f"{problem.score_elements:,} score entries exceed the auto limit "
                f"{REFERENCE_AUTO_LIMIT:,} for the L x L reference"
            )
        if why:
            reasons[name] = why
            continue
        viable.append(name)
    if not viable:
        return Explanation(None, candidates, reasons)
    note = ""
    if torch.compiler.is_compiling():
        # a graph break costs more than a slower backend, and fails fullgraph=True
        breaking = [name for name in viable if BACKENDS[name].breaks_graph(problem)]
        if breaking and len(breaking) < len(viable):
            viable = [name for name in viable if name not in breaking] + breaking
            note = f"under torch.compile, {' and '.join(breaking)} would break the graph"
    if not tuning:  # the fixed rule: the first backend that can serve
        return Explanation(viable[0], candidates, reasons, note=note or f"{autotune.ENV}=0")
    tuned = autotune.tune(problem, tuple(viable), call)
    if note and tuned.source == "fixed":
        tuned = tuned._replace(note=f"{tuned.note}; {note}")
    if tuned.source in ("measured", "cached"):
        # the class's times are in the table now: the same problem gets this answer again
        answer = (tuned.backend, {name: list(why) for name, why in reasons.items()}, tuned.times)
        autotune.TABLE.remember((problem, candidates, torch.get_num_threads()), answer)
    return Explanation(tuned.backend, candidates, reasons, tuned.times, tuned.source, tuned.note)


def _check_names(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(
            f"backend must be 'auto', one of {sorted(BACKENDS)} or a tuple of them; got {names}"
        )
