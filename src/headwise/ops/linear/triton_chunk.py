"""Lightning Attention-2 chunked forward as a Triton kernel (optional dependency).

One program per (batch, head, block of value columns) walks the chunks left to right, keeping the
``D x BLOCK_E`` state in float32 registers; per chunk it computes the same three terms as
:func:`headwise.ops.linear.chunk.chunk_forward` (intra-chunk masked product, inter-chunk product
with the carried state, state update with the ``a_j = j + 1`` convention). The backward reuses
this kernel three times through :class:`headwise.ops.linear.chunk.DecayedLinearAttention`.

Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (slowly; for tests on tiny shapes).
``triton`` is imported only when this backend is first used.
"""

from __future__ import annotations

import functools
import os

import torch

from headwise.ops.linear.chunk import compute_dtype

_MAX_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _triton():
    """The ``triton`` module, or ``None`` when it cannot be imported."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def supports(q: torch.Tensor, v: torch.Tensor, chunk_size: int | None) -> str | None:
    """``None`` when the Triton backend can run this call, else the reason it cannot."""
    if _triton() is None:
        return "the triton package is not installed (pip install 'headwise[triton]')"
    if not q.is_cuda and not _interpreting():
        return f"inputs are on {q.device}; Triton needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} is not one of {_DTYPES}"
    if q.shape[-1] > _MAX_DIM or v.shape[-1] > _MAX_DIM:
        return f"feature dims D={q.shape[-1]}, E={v.shape[-1]} exceed {_MAX_DIM}"
    if chunk_size is not None and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        return f"chunk_size must be a power of two >= 16; got {chunk_size}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernel(interpret: bool):
    """Build the kernel; ``triton.jit`` reads TRITON_INTERPRET as it decorates: one per mode."""
    del interpret  # only the cache key
    triton = _triton()
    tl = triton.language

    @triton.jit
    def chunk_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, s0_ptr, sf_ptr, gamma_ptr,
        length, heads, dim, dim_v,
        stride_qb, stride_ql, stride_qh,
        stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_ob, stride_ol, stride_oh,
        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_S0: tl.constexpr, STORE_SF: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_e = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        gamma = tl.load(gamma_ptr + h).to(tl.float32)

        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_d = offs_d < dim
        mask_e = offs_e < dim_v
        # States are contiguous (B, H, D, E) float32.
        state_offs = (pid_bh * dim + offs_d[:, None]) * dim_v + offs_e[None, :]
        state_mask = mask_d[:, None] & mask_e[None, :]
        if HAS_S0:
            state = tl.load(s0_ptr + state_offs, mask=state_mask, other=0.0).to(tl.float32)
        else:
            state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=tl.float32)

        diff = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
        intra = tl.where(diff >= 0, tl.exp(gamma * tl.maximum(diff, 0.0)), 0.0)
        query_decay = tl.exp(gamma * (offs_c + 1).to(tl.float32))

        q_base = q_ptr + b * stride_qb + h * stride_qh
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        o_base = o_ptr + b * stride_ob + h * stride_oh
        for start in range(0, length, CHUNK):
            rows = start + offs_c
            mask_t = rows < length
            mask_qk = mask_t[:, None] & mask_d[None, :]
            mask_v = mask_t[:, None] & mask_e[None, :]
            q = tl.load(
                q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=mask_qk, other=0.0
            )
            k = tl.load(
                k_base + rows[:, None] * stride_kl + offs_d[None, :], mask=mask_qk, other=0.0
            )
            v = tl.load(
                v_base + rows[:, None] * stride_vl + offs_e[None, :], mask=mask_v, other=0.0
            )

            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra
            out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
            q_decayed = q.to(tl.float32) * query_decay[:, None]
            out += tl.dot(q_decayed, state, input_precision=PRECISION)
            tl.store(o_base + rows[:, None] * stride_ol + offs_e[None, :], out, mask=mask_v)

            m = tl.minimum(length - start, CHUNK).to(tl.float32)
            key_decay = tl.exp(gamma * tl.maximum(m - 1.0 - offs_c.to(tl.float32), 0.0))
            k_decayed = k.to(tl.float32) * key_decay[:, None]
            state = state * tl.exp(gamma * m) + tl.dot(
                tl.trans(k_decayed), v.to(tl.float32), input_precision=PRECISION
            )
        if STORE_SF:
            tl.store(sf_ptr + state_offs, state, mask=state_mask)

    return chunk_fwd_kernel


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    return_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`headwise.ops.linear.chunk.chunk_forward`, computed by Triton."""
    triton = _triton()
    dtype = compute_dtype(q.dtype)
    # Backward calls mix an upcast gradient with saved inputs: run all three in one dtype.
    common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if not q.is_cuda:
        # The CPU interpreter of triton 3.9 returns garbage for bfloat16 kernels; it only
        # checks the algorithm, so it runs in float32.
        common = torch.float32
    q, k, v = (x.to(common) for x in (q, k, v))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    batch, length, heads, dim = q.shape
    dim_v = v.shape[-1]
    o = torch.empty(batch, length, heads, dim_v, device=q.device, dtype=dtype)
    final = torch.empty(batch, heads, dim, dim_v, device=q.device, dtype=torch.float32)
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    block_d = max(16, triton.next_power_of_2(dim))
    block_e = max(16, min(64, triton.next_power_of_2(dim_v)))
    grid = (batch * heads, triton.cdiv(dim_v, block_e))
    _kernel(_interpreting())[grid](
        q, k, v, o, s0 if s0 is not None else final, final, gamma.to(torch.float32).contiguous(),
        length, heads, dim, dim_v,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        CHUNK=chunk_size, BLOCK_D=block_d, BLOCK_E=block_e,
        HAS_S0=s0 is not None, STORE_SF=return_state,
        PRECISION="ieee" if common == torch.float32 else "tf32",
    )  # fmt: skip
    return o, (final.to(dtype) if return_state else None)
