"""The softmax-attention backends and what each can serve.

Each backend is a small class (after xFormers' operator classes) with

* ``reasons(problem) -> list[str]``: why it cannot serve this problem (empty = it can);
* ``run(q, k, v, pattern, scale, bias, score_mod, dropout) -> (out, lse)``: ``out``
  ``(B, Lq, H, Dv)`` in the input dtype and ``lse`` ``(B, H, Lq)`` (``None`` when the backend
  cannot produce it); ``dropout`` is a :class:`~headwise.ops.attention.dropout.Dropout` or
  ``None`` (no dropout: exactly the path without it).

The dispatcher in :mod:`headwise.ops.attention.dispatch` walks them in priority order.
"""

from __future__ import annotations

import functools

import torch

from headwise.ops.attention.blockwise import blockwise_attention
from headwise.ops.attention.native import available as native_available
from headwise.ops.attention.native import native_attention
from headwise.ops.attention.native import why_not as native_why_not
from headwise.ops.attention.problem import AttentionProblem, bias_4d
from headwise.ops.attention.reference import reference_attention
from headwise.ops.attention.sdpa import sdpa_attention
from headwise.patterns import Pattern

#: the reference backend materializes B*H*Lq*Lk scores; ``auto`` refuses it above this size
REFERENCE_AUTO_LIMIT = 1 << 24
try:
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # torch < 2.9
    _AuxRequest = None

#: distinct compiled FlexAttention graphs (patterns x shapes) before a call raises
FLEX_RECOMPILE_LIMIT = 256


class Backend:
    name = ""
    #: one line for ``explain`` and the README
    summary = ""
    #: whether ``run`` applies the non-finite rule itself (else :func:`attention` does)
    screens_non_finite = False
    #: whether its dropout draws its own mask from torch's generator (no keep_mask seed)
    draws_own_mask = False

    def reasons(self, problem: AttentionProblem) -> list[str]:
        raise NotImplementedError

    def breaks_graph(self, problem: AttentionProblem) -> bool:
        """Whether a call of ``problem`` breaks a ``torch.compile`` graph (Python looks at
        tensor values). ``auto`` tries the backends that do not first while tracing."""
        return False

    def run(self, q, k, v, pattern, scale, bias, score_mod, dropout):
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    summary = "plain PyTorch, float32 accumulation, materializes B*H*Lq*Lk scores (the oracle)"

    def reasons(self, problem):
        return []

    def run(self, q, k, v, pattern, scale, bias, score_mod, dropout):
        return reference_attention(
            q, k, v, pattern, scale=scale, bias=bias, score_mod=score_mod, dropout=dropout
        )


def _sdpa_causal_kind(pattern: Pattern | None) -> str | None:
    """``"none"``, ``"top_left"`` or ``"bottom_right"`` for patterns SDPA takes natively."""
    if pattern is None or pattern.is_full:
        return "none"
    return pattern.causal_align


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "torch.nn.functional.scaled_dot_product_attention (dense or plain causal)"
    # in its custom operator on CPU, where torch.compile does not trace (.sdpa)
    screens_non_finite = True
    draws_own_mask = True

    def reasons(self, problem):
        reasons = []
        kind = _sdpa_causal_kind(problem.pattern)
        if kind is None:
            reasons.append(f"pattern {problem.pattern!r} is not full or plain causal")
        elif (
            kind == "bottom_right"
            and problem.q_len > problem.kv_len
            and problem.device.type != "cpu"
        ):
            reasons.append("causal rows without keys (Lq > Lk) give NaN in SDPA's GPU kernels")
        if problem.has_score_mod:
            reasons.append("score_mod is not supported by SDPA")
        if problem.return_lse:
            reasons.append("SDPA does not return the log-sum-exp")
        if problem.dropout_p > 0 and problem.dropout_seeded:
            reasons.append(
                "SDPA draws its own dropout mask from torch's generator and cannot follow "
                "dropout_seed"
            )
        return reasons

    def breaks_graph(self, problem):
        # outside its CPU operators (.sdpa: no dropout, no bias gradient) a call that can hide
        # keys looks for non-finite values in Python
        hides = problem.has_bias or _sdpa_causal_kind(problem.pattern) != "none"
        return hides and (
            problem.device.type != "cpu"
            or problem.dropout_p > 0
            or (problem.bias_needs_grad and problem.needs_grad)
        )

    def run(self, q, k, v, pattern, scale, bias, score_mod, dropout):
        kind = _sdpa_causal_kind(pattern)
        diagonal = {"none": None, "top_left": 0}.get(kind, k.shape[1] - q.shape[1])
        out = sdpa_attention(
            q,
            k,
            v,
            diagonal,
            q.shape[-1] ** -0.5 if scale is None else scale,
            bias,
            0.0 if dropout is None else dropout.p,
        )
        return out, None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one compiled graph per shape; a new sequence length compiles once and is
    # then served from the cache (see the README's "recompilation" notes).
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend(Backend):
    name = "flex"
    summary = "torch FlexAttention, compiled, with the pattern's BlockMask (block 128)"
    block_size = 128

    def reasons(self, problem):
        reasons = []
        if problem.device.type == "cpu":
            if problem.needs_grad:
                reasons.append("FlexAttention has no backward on CPU")
            if problem.return_lse:
                reasons.append("compiled FlexAttention cannot return the LSE on CPU")
        elif problem.device.type != "cuda":
            reasons.append(f"FlexAttention is not compiled for device {problem.device.type}")
        if problem.head_dim > 256 or problem.value_dim > 256:
            reasons.append(f"head_dim > 256 ({problem.head_dim}, {problem.value_dim})")
        if problem.dtype == torch.float64:
            reasons.append("float64 is not supported by compiled FlexAttention")
        if problem.dropout_p > 0:
            reasons.append("FlexAttention has no attention dropout")
        return reasons

    def run(self, q, k, v, pattern, scale, bias, score_mod, dropout):
        if q.device.type == "cpu":
            # torch refuses CPU inputs that require grad even under no_grad; reasons() already
            # made sure no gradient is needed here.
            q, k, v = q.detach(), k.detach(), v.detach()
            bias = bias.detach() if bias is not None else None
        # Each (pattern, score_mod, shape) is one compiled graph. Past dynamo's default limit of 8
        # torch would silently run FlexAttention unfused (L x L memory); raise the limit and make
        # hitting it an error instead.
        with torch._dynamo.config.patch(
            recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
        ):
            return flex_call(
                _compiled_flex(),
                q,
                k,
                v,
                pattern,
                scale,
                bias,
                score_mod,
                want_lse=q.device.type != "cpu",
                block_size=self.block_size,
            )


def flex_call(fn, q, k, v, pattern, scale, bias, score_mod, *, want_lse, block_size):
    """Run ``fn`` (FlexAttention, compiled or not) on ``(B, L, H, D)`` inputs; ``(out, lse)``."""
    block_mask = None
    if pattern is not None:
        # the cached mask (read, never written): the same mask_mod object, no recompilation
        block_mask = pattern._shared_block_mask(
            q.shape[1], k.shape[1], block_size=block_size, device=q.device
        )
    mod = _with_bias(score_mod, bias, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    kwargs = {}
    if want_lse:
        # torch >= 2.9 asks for auxiliary outputs with AuxRequest; older releases take return_lse.
        if _AuxRequest is not None:
            kwargs["return_aux"] = _AuxRequest(lse=True)
        else:
            kwargs["return_lse"] = True
    result = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
        **kwargs,
    )
    if not want_lse:
        return result.transpose(1, 2), None
    out, aux = result
    return out.transpose(1, 2), aux.lse if _AuxRequest is not None else aux


def _with_bias(score_mod, bias, batch, heads, q_len, kv_len):
    if bias is None:
        return score_mod
    full_bias = bias_4d(bias).expand(batch, heads, q_len, kv_len)

    def mod(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return score + full_bias[b, h, q_idx, kv_idx].to(score.dtype)

    return mod


class BlockwiseBackend(Backend):
    name = "blockwise"
    summary = "PyTorch row blocks that skip empty key blocks; exact, forward+backward anywhere"
    screens_non_finite = True  # blockwise_attention applies the rule itself

    def reasons(self, problem):
        if problem.score_mod_unseen_grad:
            return [
                "score_mod depends on tensors requiring grad that blockwise cannot see (reached "
                "through other functions): their gradients would be missing"
            ]
        return []

    def run(self, q, k, v, pattern, scale, bias, score_mod, dropout):
        return blockwise_attention(
            q, k, v, pattern, scale=scale, bias=bias, score_mod=score_mod, dropout=dropout
        )


class NativeBackend(Backend):
    name = "native"
    summary = (
        "headwise's C tile kernel (CPU; reads float32/bfloat16/float16, computes in float32): "
        "tiles of 16 or 8 queries, only the keys they may see; own backward and dropout"
    )
    screens_non_finite = True  # inside its custom operator, where torch.compile does not trace

    def reasons(self, problem):
        reasons = []
        if problem.device.type != "cpu":
            reasons.append(f"the native tile kernel runs on CPU, not {problem.device.type}")
        if problem.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reasons.append(
                f"the native tile kernel computes in float32: {problem.dtype} inputs would lose "
                "precision"
            )
        if problem.bias_needs_grad:
            reasons.append("the native tile kernel computes no bias gradient")
        if problem.has_score_mod and not problem.relative_position:
            reasons.append(
                "score_mod (but a neighborhood's relative-position table) is not supported by "
                "the native tile kernel"
            )
        if not reasons and not native_available():
            reasons.append(f"the native tile kernel is not available: {native_why_not()}")
        return reasons

    def run(self, q, k, v, pattern, scale, bias, score_mod, dropout):
        # half precision is read by the kernel as it is and computed in float32 (no float32
        # copies of q, k, v); dropout regenerates keep_mask's bits in the kernel
        return native_attention(
            q,
            k,
            v,
            pattern,
            scale=scale,
            bias=bias,
            score_mod=score_mod,
            dropout_p=0.0 if dropout is None else dropout.p,
            seed=None if dropout is None else dropout.seed,
        )


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (SdpaBackend(), FlexBackend(), NativeBackend(), BlockwiseBackend(), ReferenceBackend())
}
