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

``reference`` is the last resort and is refused by ``auto`` above ``REFERENCE_AUTO_LIMIT`` score
entries: a large problem never silently falls back to the L x L path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headwise._checks import ArgumentTypeError
from headwise.ops.attention.backends import BACKENDS, REFERENCE_AUTO_LIMIT
from headwise.ops.attention.problem import AttentionProblem

_CUDA_ORDER = ("sdpa", "flex", "blockwise", "reference")
_OTHER_ORDER = ("sdpa", "native", "blockwise", "reference")


@dataclass(frozen=True)
class Explanation:
    """The outcome of dispatch: ``backend`` chosen and, per backend, the reasons it was not."""

    backend: str | None
    considered: tuple[str, ...]
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend or 'none'}"]
        for name in self.considered:
            why = self.reasons.get(name, [])
            mark = "chosen" if name == self.backend else ("; ".join(why) or "lower priority")
            lines.append(f"  {name:<10} {mark}")
        return "\n".join(lines)


def priority(problem: AttentionProblem) -> tuple[str, ...]:
    return _CUDA_ORDER if problem.device.type == "cuda" else _OTHER_ORDER


def choose(problem: AttentionProblem, backend: str | tuple[str, ...] = "auto") -> Explanation:
    """Pick a backend for ``problem``; ``backend`` is ``"auto"``, a name, or a tuple of names."""
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
        return Explanation(backend, (backend,), {})
    if isinstance(backend, str):
        candidates = priority(problem)
    else:
        _check_names(tuple(backend))
        candidates = tuple(backend)
    reasons: dict[str, list[str]] = {}
    for name in candidates:
        why = list(BACKENDS[name].reasons(problem))
        if name == "reference" and problem.score_elements > REFERENCE_AUTO_LIMIT:
            why.append(
                f"{problem.score_elements:,} score entries exceed the auto limit "
                f"{REFERENCE_AUTO_LIMIT:,} for the L x L reference"
            )
        if not why:
            return Explanation(name, candidates, reasons)
        reasons[name] = why
    return Explanation(None, candidates, reasons)


def _check_names(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise ValueError(
            f"backend must be 'auto', one of {sorted(BACKENDS)} or a tuple of them; got {names}"
        )
