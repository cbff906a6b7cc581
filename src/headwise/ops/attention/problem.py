"""Input validation for softmax attention: one place that turns tensors into a checked problem.

Every error is a ``ValueError`` (an ``ArgumentTypeError``, also a ``TypeError``, for a wrong type)
that names the argument and the shapes or values it got, raised before any kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise._checks import ArgumentTypeError, Unsupported, check_bool, check_real
from headwise.ops.attention.dropout import check_dropout, check_seed
from headwise.ops.attention.mods import relative_position_of
from headwise.patterns import Pattern
from headwise.patterns.base import check_pattern
from headwise.types import ScoreMod

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionProblem:
    """Sizes and flags of one validated ``attention`` call (layout ``(B, L, H, D)``)."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device
    pattern: Pattern | None
    has_bias: bool
    bias_needs_grad: bool
    has_score_mod: bool
    #: the score_mod's scores depend on tensors requiring grad that :func:`captured_leaves`
    #: does not find (only when gradients are taken): ``blockwise`` would drop their gradients
    score_mod_unseen_grad: bool
    #: the score_mod is a relative-position table of the pattern (RelativePositionTable)
    relative_position: bool
    return_lse: bool
    needs_grad: bool
    #: attention dropout's rate (0: none) and whether the caller fixed its seed
    dropout_p: float = 0.0
    dropout_seeded: bool = False

    @property
    def score_elements(self) -> int:
        """Number of entries of the full ``(B, H, Lq, Lk)`` score tensor."""
        return self.batch * self.heads * self.q_len * self.kv_len


def check_scale(scale) -> float | None:
    """``scale`` as a finite Python float (``None`` stays ``None``: ``1 / sqrt(D)``); zero and
    negative scales are valid (every backend gives the same answer for them)."""
    return None if scale is None else check_real("scale", scale)


def check_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None,
    bias: torch.Tensor | None,
    score_mod: ScoreMod | None,
    return_lse: bool,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> AttentionProblem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, L, H, D); got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor; got dtype {t.dtype}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(
            f"q, k, v must share the batch size; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k and v must share length and heads; got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape[3] != head_dim:
        raise ValueError(
            f"k must have q's head_dim {head_dim}; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q heads must be a multiple of k/v heads (GQA); got q {heads} heads, k/v {kv_heads}"
        )
    if min(batch, q_len, kv_len, heads, head_dim, v.shape[3]) == 0:
        raise ValueError(
            f"empty tensors are not supported; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if pattern is not None:
        check_pattern(pattern, heads, "heads of q").check_lengths(q_len, kv_len)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ArgumentTypeError(f"bias must be a floating tensor; got {got}")
        target = (batch, heads, q_len, kv_len)
        if bias.dim() > 4 or any(s not in (1, t) for s, t in zip(bias.shape[::-1], target[::-1])):
            raise ValueError(
                f"bias must broadcast to (B, H, Lq, Lk) = {target}; got {tuple(bias.shape)}"
            )
        if bias.device != q.device:
            raise ValueError(f"bias must be on q's device {q.device}; got {bias.device}")
    unseen = False
    if score_mod is not None:
        probed = probe_score_mod(score_mod, batch, heads, q_len, kv_len, q.dtype, q.device)
        unseen = bool(unseen_leaves(score_mod, probed))
    check_bool("return_lse", return_lse)
    dropout_p = check_dropout(dropout_p)
    if dropout_seed is not None:
        check_seed(dropout_seed, "dropout_seed")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias)
    )
    return AttentionProblem(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        value_dim=v.shape[3],
        dtype=q.dtype,
        device=q.device,
        pattern=pattern,
        has_bias=bias is not None,
        bias_needs_grad=bias is not None and bias.requires_grad,
        has_score_mod=score_mod is not None,
        score_mod_unseen_grad=unseen,
        relative_position=relative_position_of(score_mod, pattern) is not None,
        return_lse=return_lse,
        needs_grad=needs_grad,
        dropout_p=dropout_p,
        dropout_seeded=dropout_seed is not None,
    )


def hides_keys(pattern: Pattern | None, bias: torch.Tensor | None, score_mod) -> bool:
    """Whether some row may be kept from seeing some key: a pattern other than full, a bias or a
    ``score_mod`` (either can give ``-inf`` scores). Only then can a non-finite key or value be
    hidden from a row, and only then is it looked for (:func:`headwise.ops.attention.attention`)."""
    return (pattern is not None and not pattern.is_full) or (
        bias is not None or score_mod is not None
    )


def score_indices(
    batch: int, heads: int, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors ``b, h, q, kv`` broadcastable to ``(B, H, len(q_idx), len(kv_idx))``."""
    device = q_idx.device
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        q_idx.view(1, 1, -1, 1),
        kv_idx.view(1, 1, 1, -1),
    )


#: what torch says when Python control flow meets a tensor of several elements
_CONTROL_FLOW = ("Boolean value of Tensor", "only one element tensors can be converted")


def apply_score_mod(
    score_mod: ScoreMod,
    scores: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
) -> torch.Tensor:
    """``score_mod(scores, b, h, q_idx, kv_idx)`` on a block of scores ``(B, H, rows, keys)``,
    checked: backends call it on whole blocks of different sizes, so it must return a tensor of
    the block's own shape (a broadcast result would mean something else on each backend)."""
    try:
        result = score_mod(scores, b, h, q_idx, kv_idx)
    except RuntimeError as err:
        if not any(text in str(err) for text in _CONTROL_FLOW):
            raise
        raise ValueError(
            "score_mod is called on whole blocks of scores and indices (tensors), so Python "
            "control flow on them (if/and/or/float()) cannot work: write it with tensor "
            "operations, e.g. torch.where(q_idx >= kv_idx, score, -inf); got: " + str(err)
        ) from err
    if not isinstance(result, torch.Tensor) or result.shape != scores.shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise ValueError(
            f"score_mod must return a tensor shaped like its score argument "
            f"{tuple(scores.shape)}; got {got}"
        )
    return result


def probe_score_mod(score_mod, batch, heads, q_len, kv_len, dtype, device) -> torch.Tensor:
    """Call ``score_mod`` once on a small block (at most 2 x 2 scores per batch element and head),
    so that a broken one fails here with a clear message on every backend, before any kernel;
    its output, with the autograd graph of the tensors it used when gradients are on (for
    :func:`unseen_leaves`)."""
    if not callable(score_mod):
        raise ArgumentTypeError(f"score_mod must be callable; got {type(score_mod).__name__}")
    rows, keys = min(q_len, 2), min(kv_len, 2)
    dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the backends' scores
    scores = torch.zeros(batch, heads, rows, keys, dtype=dtype, device=device)
    q_idx, kv_idx = torch.arange(rows, device=device), torch.arange(keys, device=device)
    return apply_score_mod(score_mod, scores, *score_indices(batch, heads, q_idx, kv_idx))


def captured_leaves(fn: object) -> tuple[torch.Tensor, ...]:
    """Tensors requiring grad that ``fn`` closes over or names as globals (e.g. learnable ALiBi
    slopes or a relative position table), including the parameters of such an ``nn.Module``.
    Their gradients are computed block by block in the backward pass."""
    if fn is None:
        return ()
    found: dict[int, torch.Tensor] = {}
    owners = [getattr(fn, "__self__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            owners.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    code, names = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    owners += [names[name] for name in (code.co_names if code else ()) if name in names]
    for owner in owners:
        if isinstance(owner, torch.Tensor):
            tensors = [owner]
        elif isinstance(owner, torch.nn.Module):
            tensors = list(owner.parameters())
        else:
            continue
        for t in tensors:
            if t.requires_grad:
                found[id(t)] = t
    return tuple(found.values())


def _leaves(roots) -> dict[int, torch.Tensor]:
    """The leaf tensors (``AccumulateGrad`` nodes) the autograd graphs of ``roots`` reach."""
    seen, stack, found = set(), [node for node in roots if node is not None], {}
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found[id(variable)] = variable
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found


def unseen_leaves(score_mod: ScoreMod, probed: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``score_mod``'s scores depend on but
    :func:`captured_leaves` does not reach (e.g. through a helper function it calls): the
    autograd graph of its output ``probed`` (:func:`probe_score_mod`, gradients on) walked to
    the leaves, less the captured tensors' own leaves. None without gradients."""
    if probed.grad_fn is None:
        return []
    captured = captured_leaves(score_mod)
    covered = _leaves([t.grad_fn for t in captured if not t.is_leaf])
    covered.update((id(t), t) for t in captured if t.is_leaf)
    return [t for key, t in _leaves([probed.grad_fn]).items() if key not in covered]


def unseen_message(missing: list[torch.Tensor]) -> str:
    shapes = ", ".join(str(tuple(t.shape)) for t in missing)
    return (
        f"score_mod depends on {len(missing)} tensor(s) requiring grad ({shapes}) that the "
        "blockwise backend cannot see: it finds those the score_mod closes over or names as "
        "globals (and such modules' parameters), not those reached through other functions, so "
        "their gradients would be missing. Close over them in the score_mod, or use "
        "backend='reference'"
    )


def refuse_double_backward(what: str) -> None:
    """Raise :class:`Unsupported` when called in a backward pass that builds a graph
    (``create_graph=True``): ``what``'s hand-written backward is not itself differentiable, and
    its gradients would be taken as constants, so second derivatives would come out wrong."""
    if torch.is_grad_enabled():
        raise Unsupported(
            f"double backward (create_graph=True, second derivatives) is not supported by "
            f"{what}: its backward pass is hand-written and not differentiable; use "
            f"backend='reference' (or 'sdpa' where it serves the call) for second derivatives"
        )


def bias_4d(bias: torch.Tensor) -> torch.Tensor:
    """View a broadcastable bias as 4-D ``(B|1, H|1, Lq|1, Lk|1)``."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
