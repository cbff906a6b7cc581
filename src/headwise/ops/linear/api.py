"""Linear attention's entry points: :func:`linear_attention` (parallel and chunked, dense or
packed) and :func:`linear_attention_step` (one decoding step), with TransNormerLLM's decay schedule
:func:`tnl_decay`; validation, backend choice and the variable-length handling live here, the
algorithms in ``naive.py``, ``chunk.py`` and ``triton_chunk.py``.
"""

from __future__ import annotations

import torch

from headwise._checks import check_bool, check_choice, check_int, check_real
from headwise.ops.attention.mods import alibi_slopes
from headwise.ops.attention.varlen import seqlens_from_cu
from headwise.ops.linear import naive, triton_chunk
from headwise.ops.linear.chunk import DecayedLinearAttention, chunk_forward, compute_dtype
from headwise.ops.linear.feature_maps import (
    FeatureMapLike,
    get_feature_map,
    taylor_similarity,
)
from headwise.ops.linear.parallel import (
    ParallelFeatureLinearAttention,
    ParallelLinearAttention,
    decay_mask,
)

BACKENDS = ("auto", "chunk", "triton", "naive", "recurrent")
_DEFAULT_CHUNK = 64
#: Longest sequence for which ``auto`` takes the quadratic form with a feature map's closed-form
#: ``similarity`` (Taylor: ``O(L D)`` per token instead of the chunked ``O(C D'^2)`` work on
#: ``D' = 1 + D + D^2`` features): Based's "parallel" training view.
PARALLEL_MAX_LENGTH = 512
#: For feature maps without a closed form, ``auto`` takes the quadratic form on the features
#: ``phi(q) phi(k)^T`` while ``L <= PARALLEL_BREAK_EVEN * F E / (F + E)`` (``F`` features,
#: ``E`` value columns, ``+1`` when normalized): there its ``L^2 (F + E)`` work costs less than
#: the chunked path (measured on CPU, forward and backward: 0.3x the chunked time at ``L = 64``,
#: ``F = E = 64``, 0.8x at ``F = E = 16``; break-even near the bound).
PARALLEL_BREAK_EVEN = 8


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMapLike = None,
    causal: bool = True,
    decay: torch.Tensor | float | None = None,
    normalize: bool = False,
    eps: float = 1e-12,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-head (decayed) linear attention.

    With ``phi`` the feature map and ``lam_h`` the per-head decay (1 when ``decay`` is None)::

        causal:      S_t = lam_h S_{t-1} + phi(k_t)^T v_t,     o_t = phi(q_t) S_t
        non-causal:  o_i = sum_j lam_h^|i-j| (phi(q_i) . phi(k_j)) v_j
        normalize:   o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),  z_t = lam_h z_{t-1} + phi(k_t)

    No softmax, no ``1/sqrt(D)`` scale (Lightning Attention-2, Qin et al. arXiv 2401.04658;
    TransNormerLLM arXiv 2307.14995; normalized form as in Katharopoulos et al. 2020 and Based).

    Args:
        q, k: ``(B, L, H, D)``, or ``(T, H, D)`` packed when ``cu_seqlens`` is given.
        v: ``(B, L, H, E)`` or ``(T, H, E)``. All three share dtype, device and head count.
        feature_map: a name (``identity``, ``elu+1``, ``relu``, ``taylor``, ``inline``), a
            callable applied to q and k, or an object with ``query``/``key`` methods.
        causal: causal recurrence, or every query sees every key of its sequence.
        decay: ``lam`` in ``(0, 1]``: a float or a tensor of shape ``(H,)`` (or ``()``); it
            receives a gradient when it requires one. A Python float is taken at the compute
            precision (float64 for float64 inputs, else float32), a tensor as it is given.
            TransNormerLLM's schedule: :func:`tnl_decay`.
        normalize: divide by the decayed key sum as above (``eps`` is Based's 1e-12).
        chunk_size: tokens per chunk for ``chunk``/``triton`` (default 64).
        initial_state: ``(B, H, D', E)`` (``E + 1`` with normalize; ``B`` = number of sequences
            for packed input); causal only. Splitting a sequence and carrying the state is exact.
        return_state: also return the final state (float32, float64 for float64 inputs).
        cu_seqlens: int32/int64 ``(N + 1,)`` offsets of packed sequences: starts at 0,
            non-decreasing, ends at ``T``. Empty sequences are allowed.
        backend: ``auto`` (Triton on CUDA when installed, else ``chunk``; but up to
            ``PARALLEL_MAX_LENGTH`` tokens, without state or packing, the quadratic form when the
            feature map has a closed-form ``similarity``, as ``taylor`` does, or when the
            sequence is short for its widths: ``PARALLEL_BREAK_EVEN``), ``chunk``,
            ``triton``, ``naive`` (quadratic reference) or ``recurrent`` (token loop reference).

    Returns:
        ``o`` shaped like ``v`` (``(B, L, H, E)`` or ``(T, H, E)``), and the final state when
        ``return_state``.
    """
    fmap = get_feature_map(feature_map)
    varlen = cu_seqlens is not None
    _check_qkv(q, k, v, varlen)
    heads = q.shape[-2]
    lam = _check_decay(decay, heads, q.device, compute_dtype(q.dtype))
    causal = check_bool("causal", causal)
    normalize = check_bool("normalize", normalize)
    return_state = check_bool("return_state", return_state)
    eps = check_real("eps", eps, minimum=0.0)
    check_choice("backend", backend, BACKENDS)
    if chunk_size is not None and check_int("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    if not causal and (initial_state is not None or return_state):
        raise ValueError(
            "initial_state and return_state need causal=True; a non-causal output depends on "
            "the whole sequence, so there is no state to carry"
        )
    if not getattr(fmap, "tokenwise", True):
        if causal:
            raise ValueError(f"feature_map {fmap!r} is sequence-level and needs causal=False")
        if varlen:
            raise ValueError(f"feature_map {fmap!r} is sequence-level; cu_seqlens unsupported")
    lengths = list(seqlens_from_cu("cu_seqlens", cu_seqlens, q.shape[0])) if varlen else None

    similarity = getattr(fmap, "similarity", None)
    parallel = (
        backend == "auto"
        and not varlen
        and initial_state is None
        and not return_state
        and q.shape[1] <= PARALLEL_MAX_LENGTH
    )
    if parallel and similarity is not None:
        return _finish_parallel(q, k, v, lam, causal, normalize, eps, similarity)

    qf, kf = fmap.query(q), fmap.key(k)
    if qf.shape[-1] != kf.shape[-1]:
        raise ValueError(
            f"feature_map gave query features {tuple(qf.shape)} and key features "
            f"{tuple(kf.shape)}; the last dims must match"
        )
    features, columns = qf.shape[-1], v.shape[-1] + normalize
    if parallel and q.shape[1] * (features + columns) <= PARALLEL_BREAK_EVEN * features * columns:
        return _finish_parallel(qf, kf, v, lam, causal, normalize, eps)
    vv = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v
    batch = len(lengths) if varlen else q.shape[0]
    if initial_state is not None:
        _check_state(initial_state, (batch, heads, qf.shape[-1], vv.shape[-1]), q)

    if varlen:
        index, max_len = _left_pad_index(lengths, q.device)
        qf, kf, vv = (_left_pad(x, index, len(lengths), max_len) for x in (qf, kf, vv))
        o, state = _run(qf, kf, vv, lam, causal, None, return_state, backend, chunk_size)
        if initial_state is not None:
            o, state = _add_initial_state(o, state, qf, initial_state, lam, lengths, max_len)
        o = o.reshape(-1, *o.shape[2:])[index]
    else:
        o, state = _run(qf, kf, vv, lam, causal, initial_state, return_state, backend, chunk_size)

    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    o = o.to(v.dtype)
    if return_state:
        return o, state.to(compute_dtype(q.dtype))
    return o


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    feature_map: FeatureMapLike = None,
    decay: torch.Tensor | float | None = None,
    normalize: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token with O(1) state: ``S <- lam S + phi(k)^T v``, ``o = phi(q) S``.

    ``q, k: (B, H, D)``, ``v: (B, H, E)``, ``state: (B, H, D', E)`` (``E + 1`` with normalize;
    ``None`` = zeros). Returns ``(o: (B, H, E), new_state)``; the state is float32 (float64 for
    float64 inputs) and is the same object :func:`linear_attention` returns with
    ``return_state=True``, so prefill then step equals the parallel form.
    """
    fmap = get_feature_map(feature_map)
    if not getattr(fmap, "tokenwise", True):
        raise ValueError(f"feature_map {fmap!r} is sequence-level and cannot decode step by step")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be (B, H, {'E' if name == 'v' else 'D'}); got {got}")
    _check_qkv(q[:, None], k[:, None], v[:, None], varlen=False)
    dtype = compute_dtype(q.dtype)
    lam = _check_decay(decay, q.shape[1], q.device, dtype)
    normalize = check_bool("normalize", normalize)
    eps = check_real("eps", eps, minimum=0.0)
    qf = fmap.query(q[:, None])[:, 0].to(dtype)
    kf = fmap.key(k[:, None])[:, 0].to(dtype)
    vv = v.to(dtype)
    if normalize:
        vv = torch.cat([vv, torch.ones_like(vv[..., :1])], dim=-1)
    shape = (q.shape[0], q.shape[1], qf.shape[-1], vv.shape[-1])
    if state is None:
        state = qf.new_zeros(shape)
    else:
        _check_state(state, shape, q, name="state")
    decay_factor = 1.0 if lam is None else lam.to(dtype).reshape(-1, 1, 1)
    state = decay_factor * state.to(dtype) + kf[..., :, None] * vv[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", qf, state)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o.to(v.dtype), state


def tnl_decay(
    num_heads: int, layer_idx: int = 0, num_layers: int = 1, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """TransNormerLLM per-head decay ``lam_h = exp(-s_h (1 - l / (N_layers - 1) + 1e-5))``.

    ``s_h`` are :func:`alibi_slopes` (:mod:`headwise.ops.attention.mods`); ``l`` is the 0-based
    layer index. The first layer decays fastest, the last almost not at all (TNL HF modeling
    code; arXiv 2307.14995). With a single layer the factor is ``1 + 1e-5``. Returns ``(H,)`` in
    ``(0, 1)``, computed in float64 and rounded once to ``dtype`` (pass ``torch.float64`` for a
    float64 model).
    """
    num_layers = check_int("num_layers", num_layers, minimum=1)
    layer_idx = check_int("layer_idx", layer_idx, minimum=0, maximum=num_layers - 1)
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    slopes = alibi_slopes(num_heads, dtype=torch.float64)
    return torch.exp(-slopes * (1.0 - depth + 1e-5)).to(dtype)


# --------------------------------------------------------------------------- dispatch


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor | None,
    causal: bool,
    initial_state: torch.Tensor | None,
    return_state: bool,
    backend: str,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense ``(B, L, H, .)`` inputs after feature map; returns ``(o, state)``."""
    if backend in ("naive", "recurrent"):
        ref = (
            naive.quadratic_linear_attention
            if backend == "naive"
            else naive.recurrent_linear_attention
        )
        return ref(q, k, v, lam, causal=causal, initial_state=initial_state)
    forward_fn, chunk = _select(backend, q, v, chunk_size)
    if q.shape[1] == 0:
        state = q.new_zeros(
            q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=compute_dtype(q.dtype)
        )
        if initial_state is not None:
            state = state + initial_state
        return v.new_zeros(v.shape), state
    gamma = _log_decay(lam, q)

    def causal_fn(qq, kk, vv, s0, want_state):
        o, state = DecayedLinearAttention.apply(
            qq, kk, vv, gamma, s0, forward_fn, chunk, want_state
        )
        return o, (state if want_state else None)

    if causal:
        return causal_fn(q, k, v, initial_state, return_state)
    if lam is None:
        kv = torch.einsum("blhd,blhe->bhde", k.to(gamma.dtype), v.to(gamma.dtype))
        return torch.einsum("blhd,bhde->blhe", q.to(gamma.dtype), kv).to(v.dtype), None
    # lam^|i-j| = causal part + strictly anti-causal part; the diagonal is counted twice.
    forward, _ = causal_fn(q, k, v, None, False)
    backward, _ = causal_fn(q.flip(1), k.flip(1), v.flip(1), None, False)
    diagonal = (q * k).sum(-1, keepdim=True) * v
    return forward + backward.flip(1) - diagonal, None


def _finish_parallel(q, k, v, lam, causal, normalize, eps, similarity=None):
    """The quadratic form's output in ``v``'s dtype (:mod:`headwise.ops.linear.parallel`) from
    the features ``q, k``, or from raw ``q, k`` and the feature map's closed-form
    ``similarity`` (Taylor's with its own backward); a decay that takes a gradient goes through
    autograd instead."""
    dtype = compute_dtype(v.dtype)
    weight = None if lam is None else decay_mask(lam, v.shape[1], causal, dtype)
    if weight is not None and weight.requires_grad:
        q, k = q.to(dtype), k.to(dtype)
        scores = torch.einsum("blhf,bshf->bhls", q, k) if similarity is None else similarity(q, k)
        vv = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v
        o = torch.einsum("bhts,bshe->bthe", scores * weight, vv.to(dtype))
        if normalize:
            o = o[..., :-1] / (o[..., -1:] + eps)
    elif similarity is None or similarity is taylor_similarity:
        taylor = similarity is not None
        args = (q, k, v, weight, causal, normalize, eps, dtype, taylor)
        o = ParallelFeatureLinearAttention.apply(*args)
    else:
        scores = similarity(q.to(dtype), k.to(dtype))
        o = ParallelLinearAttention.apply(scores, v, weight, causal, normalize, eps)
    return o.to(v.dtype)


def _select(backend: str, q: torch.Tensor, v: torch.Tensor, chunk_size: int | None):
    """Pick the forward routine and chunk size for ``chunk``/``triton``/``auto``."""
    if backend == "auto":
        backend = (
            "triton" if q.is_cuda and triton_chunk.supports(q, v, chunk_size) is None else "chunk"
        )
    if backend == "triton":
        reason = triton_chunk.supports(q, v, chunk_size)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        return triton_chunk.triton_forward, chunk_size or _DEFAULT_CHUNK
    return chunk_forward, chunk_size or _DEFAULT_CHUNK


def _log_decay(lam: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(q.dtype)
    if lam is None:
        return torch.zeros(q.shape[2], dtype=dtype, device=q.device)
    return torch.log(lam.to(dtype)).expand(q.shape[2])


# --------------------------------------------------------------------------- varlen


def _left_pad_index(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """Flat positions in an ``(N, L_max)`` grid where each packed token lands, right-aligned.

    Left padding keeps a zero state zero through the padding, so a padded causal run is exact;
    an initial state is added afterwards in closed form (:func:`_add_initial_state`).
    """
    max_len = max(lengths, default=0)
    counts = torch.tensor(lengths, device=device)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), device=device) - starts[seq]
    return seq * max_len + (max_len - counts[seq]) + local, max_len


def _left_pad(x: torch.Tensor, index: torch.Tensor, n_seq: int, max_len: int) -> torch.Tensor:
    padded = x.new_zeros(n_seq * max_len, *x.shape[1:])
    padded = padded.index_put((index,), x)
    return padded.view(n_seq, max_len, *x.shape[1:])


def _add_initial_state(
    o: torch.Tensor,
    state: torch.Tensor | None,
    q: torch.Tensor,
    initial_state: torch.Tensor,
    lam: torch.Tensor | None,
    lengths: list[int],
    max_len: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``o_t += lam^(t+1) q_t S_0`` and ``S_final += lam^n S_0`` for sequences of length ``n``."""
    dtype = compute_dtype(q.dtype)
    s0 = initial_state.to(dtype)
    n = torch.tensor(lengths, device=q.device, dtype=dtype)
    pos = torch.arange(max_len, device=q.device, dtype=dtype)
    local = (pos[None, :] - (max_len - n[:, None])).clamp(min=0)  # (N, L_max); pads clamp to 0
    carried = torch.einsum("nlhd,nhde->nlhe", q.to(dtype), s0)
    if lam is None:
        o = o + carried
        return o, (None if state is None else state + s0)
    g = torch.log(lam.to(dtype)).expand(q.shape[2])
    o = o + carried * torch.exp(g * (local[..., None] + 1))[..., None]
    if state is not None:
        state = state + torch.exp(g[None, :] * n[:, None])[..., None, None] * s0
    return o, state


# --------------------------------------------------------------------------- validation


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool) -> None:
    layout = "(T, H, {})" if varlen else "(B, L, H, {})"
    rank = 3 if varlen else 4
    for name, x, last in (("q", q, "D"), ("k", k, "D"), ("v", v, "E")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(x).__name__}")
        if x.dim() != rank:
            hint = " (packed input because cu_seqlens is given)" if varlen else ""
            raise ValueError(f"{name} must be {layout.format(last)}{hint}; got {_shape(x)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name} must match q's dtype and device; got {x.dtype} on {x.device}, "
                f"q is {q.dtype} on {q.device}"
            )
    for name, x in (("k", k), ("v", v)):
        if x.shape[-2] != q.shape[-2]:
            raise ValueError(
                f"{name} must have as many heads as q (grouped K/V heads are not supported); "
                f"got {name} {_shape(x)}, q {_shape(q)}"
            )
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {_shape(q)}; got {_shape(k)}")
    if v.shape[:-1] != q.shape[:-1]:
        what = "T, H" if varlen else "B, L, H"
        raise ValueError(f"v must share ({what}) with q {_shape(q)}; got {_shape(v)}")


def _check_decay(
    decay: torch.Tensor | float | None, heads: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Return ``lam`` as a tensor of shape ``(H,)`` or ``(1,)`` (keeps the autograd graph).

    A Python number becomes a tensor of the compute ``dtype``: building it in torch's default
    float32 would round a float64 call's decay (0.9 -> 0.899999976) and with it every output."""
    if decay is None:
        return None
    if not isinstance(decay, torch.Tensor):
        lam = torch.tensor([check_real("decay", decay)], dtype=dtype, device=device)
    else:
        if decay.shape not in ((), (heads,)):
            raise ValueError(f"decay must have shape ({heads},) or (); got {_shape(decay)}")
        if not decay.is_floating_point():
            raise ValueError(f"decay must be floating point; got {decay.dtype}")
        if decay.device != device:
            raise ValueError(f"decay must be on {device}; got {decay.device}")
        lam = decay.reshape(-1)
    bad = ~((lam > 0) & (lam <= 1))
    if bool(bad.any()):
        raise ValueError(f"decay values must lie in (0, 1]; got {lam.detach().cpu().tolist()}")
    return lam


def _check_state(
    state: torch.Tensor, expected: tuple[int, ...], q: torch.Tensor, name: str = "initial_state"
) -> None:
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(state).__name__}")
    if _shape(state) != expected:
        raise ValueError(
            f"{name} must be (B, H, D', E) = {expected} (E + 1 columns with normalize); "
            f"got {_shape(state)}"
        )
    if not state.is_floating_point() or state.device != q.device:
        raise ValueError(
            f"{name} must be floating point on {q.device}; got {state.dtype} on {state.device}"
        )
