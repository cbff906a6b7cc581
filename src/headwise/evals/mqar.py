"""Multi-query associative recall (MQAR): Zoology's recall benchmark for every headwise mixer.

Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models"
(ICLR 2024, arXiv 2312.04927); official code HazyResearch/zoology. This module holds

- :func:`mqar_data`: Zoology's generator (``zoology/data/multiquery_ar.py``), drawn the same way
  from the same NumPy stream: ``K`` distinct keys from ``[1, V/2)`` and ``K`` distinct values from
  ``[V/2, V)`` per example, the context ``k_1 v_1 ... k_K v_K``, then each key queried once at the
  even offset ``2 g`` of the query region, gaps ``g`` drawn without replacement with probability
  ``~ (g + 1)^(a - 1)`` (``a = 0.01``); the label at a query is its value, ``-100`` elsewhere;
- :class:`MQARModel`: Zoology's 2-layer language model (``zoology/model.py``): token (+ optional
  learned position) embeddings with dropout 0.1, pre-LN residual blocks ``residual += mixer(LN
  residual)`` followed by the state mixer on ``LN residual`` (identity in Figure 2, or an MLP),
  a final LayerNorm and an LM head tied to the token embedding; init normal(0.02), output
  projections normal(0.02 / sqrt(2 n_layers));
- :data:`MIXERS`: every causal headwise sequence mixer by name, plus Zoology's BaseConv
  (``zoology/mixers/base_conv.py``: ``y = conv(u) * (W u + b) + u``, short kernel 3 in layer 0,
  an implicit long convolution in layer 1) and its Based hybrid;
- :func:`train_run` / :func:`sweep`: AdamW (weight decay 0.1), cosine annealing per epoch to 0,
  early stop once test accuracy >= 0.99, accuracy over labelled positions only, the best over a
  learning-rate sweep (Figure 2 protocol); :func:`plot_sweep` draws Figure 2 (accuracy vs width,
  one panel per length).

Mixers that cannot be causal are refused (:data:`REFUSED`): a mixer that sees the answer
after the query solves MQAR without recall. So is GAAM, which mixes no tokens along the feature
axis (no context reaches a query) and is non-causal along the sequence axis.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headwise import patterns
from headwise._checks import check_int, check_real
from headwise.layers import (
    BasedAttention,
    CombinerAttention,
    LightningAttention,
    MoAAttention,
    MoHAttention,
    MultiHeadAttention,
    RelativeConvAttention,
    S2Attention,
    SelectiveMultiHeadAttention,
)
from headwise.measure import progress
from headwise.ops.linear import linear_attention

IGNORE = -100
#: Zoology's early-stopping threshold on test accuracy
EARLY_STOP = 0.99

# --------------------------------------------------------------------------- data


def mqar_data(
    vocab_size: int,
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    seed: int,
    *,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's MQAR examples ``(inputs, labels)``, both ``(num_examples, seq_len)`` int64.

    The draws follow ``zoology/data/multiquery_ar.py`` call for call on
    ``np.random.RandomState(seed)`` (what ``np.random.seed(seed)`` sets): every example's keys,
    then every example's values, then every example's gaps. ``random_non_queries`` replaces the
    zero fillers by uniform tokens of the whole vocabulary (from ``torch.Generator`` seeded with
    ``seed``; Zoology uses torch's global generator); Figure 2 sets it off.
    """
    vocab_size = check_int("vocab_size", vocab_size, minimum=4)
    num_examples = check_int("num_examples", num_examples, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=2)
    num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs, minimum=1)
    seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
    power_a = check_real("power_a", power_a, positive=True)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even; got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len; got {vocab_size} and {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs must satisfy 4 * num_kv_pairs <= seq_len; got {num_kv_pairs} and "
            f"{seq_len}"
        )
    if num_kv_pairs >= vocab_size // 2:
        raise ValueError(f"num_kv_pairs must be below vocab_size // 2; got {num_kv_pairs}")
    rng = np.random.RandomState(seed)
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    key_choices, value_choices = np.arange(1, half), np.arange(half, vocab_size)
    keys = np.stack(
        [rng.choice(key_choices, replace=False, size=num_kv_pairs) for _ in range(num_examples)]
    )
    values = np.stack(
        [rng.choice(value_choices, replace=False, size=num_kv_pairs) for _ in range(num_examples)]
    )
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    slots = np.arange(space)
    gaps = np.stack(
        [rng.choice(slots, replace=False, p=p, size=num_kv_pairs) for _ in range(num_examples)]
    )
    examples = np.zeros((num_examples, seq_len + 1), dtype=np.int64)
    examples[:, 0:context:2], examples[:, 1:context:2] = keys, values
    np.put_along_axis(examples[:, context:], gaps * 2, keys, axis=1)
    labels = np.full((num_examples, seq_len + 1), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context + 1, values, axis=1)
    inputs, targets = torch.from_numpy(examples[:, :-1].copy()), torch.from_numpy(labels[:, 1:])
    if random_non_queries:
        noise = torch.randint(
            vocab_size, inputs.shape, generator=torch.Generator().manual_seed(seed)
        )
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets.contiguous()


def split_seeds(seed: int) -> tuple[int, int]:
    """Zoology's train and test seeds: from ``seed``, one draw in ``[0, 2^31)`` and one in
    ``[2^31, 2^32)``, so train and test never share a stream."""
    rng = np.random.RandomState(check_int("seed", seed, minimum=0, maximum=2**32 - 1))
    return int(rng.randint(0, 2**31)), int(rng.randint(2**31, 2**32, dtype=np.int64))


# --------------------------------------------------------------------------- BaseConv


class _CausalDepthwiseConv(torch.autograd.Function):
    """``y_t = b + sum_j w_j * x_(t - k + 1 + j)`` per channel (zeros before the start), i.e.
    ``Conv1d(groups=C, padding=k - 1)`` cut to the first ``L`` outputs, on ``x: (B, L, C)``
    with ``w: (C, k)`` as ``k`` shifted multiply-adds. Backward: ``dx_t = sum_j w_j dy_(t + k -
    1 - j)``, ``dw_j = sum_(b, t) dy_t x_(t - k + 1 + j)``, ``db = sum_(b, t) dy_t``. (The
    convolution's depthwise backward in oneDNN is 4x this at MQAR's shapes.)"""

    @staticmethod
    def forward(ctx, x, weight, bias):
        last = weight.shape[1] - 1
        y = torch.addcmul(bias, x, weight[:, last])
        for shift in range(1, min(last + 1, x.shape[1])):
            y[:, shift:].addcmul_(x[:, :-shift], weight[:, last - shift])
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        last = weight.shape[1] - 1
        grad_x = grad_y * weight[:, last]
        grad_w = torch.zeros_like(weight)
        grad_w[:, last] = (grad_y * x).sum((0, 1))
        for shift in range(1, min(last + 1, x.shape[1])):
            grad_x[:, :-shift].addcmul_(grad_y[:, shift:], weight[:, last - shift])
            grad_w[:, last - shift] = (grad_y[:, shift:] * x[:, :-shift]).sum((0, 1))
        return grad_x, grad_w, grad_y.sum((0, 1))


class _ShortConv(nn.Module):
    """Depthwise causal convolution with kernel ``k`` (Zoology ``ShortConvolution``): the
    parameters and init of its ``nn.Conv1d``, run as shifted multiply-adds."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CausalDepthwiseConv.apply(x, self.conv.weight[:, 0], self.conv.bias)


#: longest sequence the implicit long convolution runs as a Toeplitz product. Forward+backward
#: vs the FFTs, one thread: (C, B) = (64, 64): 0.35x at L = 64, 0.73x at 128, 1.4x at 256, 2.4x
#: at 512; (256, 16): 1.03x at 64, 2.9x at 128, 7.2x at 512 (the paper preset's L = 512, d = 512
#: would also hold a 512 MB Toeplitz tensor)
TOEPLITZ_MAX_LENGTH = 64


class _ToeplitzConv(torch.autograd.Function):
    """``y = h * x + x`` for a causal filter given as its Toeplitz matrices ``T: (C, L, L)``
    (``T[c, t, s] = h_c[t - s]``, 0 for ``s > t``) on ``x: (B, L, C)``: one batched matrix
    product over channels, ``y_c = x_c + x_c T_c^T``, in float32. Backward: ``dx_c = dy_c +
    dy_c T_c``, ``dT_c = dy_c^T x_c``."""

    @staticmethod
    def forward(ctx, x, toeplitz):
        u = x.permute(2, 0, 1).float().contiguous()  # (C, B, L)
        ctx.save_for_backward(u, toeplitz)
        ctx.x_dtype = x.dtype
        return torch.baddbmm(u, u, toeplitz.mT).permute(1, 2, 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        u, toeplitz = ctx.saved_tensors
        g = grad_y.permute(2, 0, 1).float().contiguous()
        grad_x = torch.baddbmm(g, g, toeplitz).permute(1, 2, 0).to(ctx.x_dtype)
        return grad_x, g.mT @ u


class _ImplicitLongConv(nn.Module):
    """Zoology's ``ImplicitLongConvolution``: a causal ``L``-long filter per channel generated by
    an MLP with sine activations from positional features ``[t, cos, sin]``, modulated by
    ``exp(-t |delta_c|)``; ``y = h * x + x`` as Zoology's ``fft_conv`` (an FFT of size ``2 L``,
    i.e. the causal linear convolution). Up to :data:`TOEPLITZ_MAX_LENGTH` tokens it is computed
    as a product with the filter's ``L x L`` Toeplitz matrix, which there costs less than the
    FFTs and their backward; longer sequences take the FFTs (the Toeplitz work grows as ``L^2``).
    """

    def __init__(self, dim: int, max_len: int, order: int = 16) -> None:
        super().__init__()
        t = torch.linspace(0, 1, max_len)[None, :, None]
        w = 2 * math.pi * torch.arange(max_len, dtype=torch.float32)[None, :, None] / max_len
        z = torch.exp(-1j * torch.tensor([1e-4])[None, None] * w)
        self.register_buffer("z", torch.cat([t, z.real, z.imag], dim=-1), persistent=False)
        self.register_buffer("t", t, persistent=False)
        self.freq = nn.Parameter(torch.ones(1, order))
        self.filter_in = nn.Linear(3, order)
        self.filter_hidden = nn.ModuleList(nn.Linear(order, order) for _ in range(2))
        self.filter_out = nn.Linear(order, dim, bias=False)
        decay = math.log(1e-2)
        self.register_buffer(
            "deltas", torch.linspace(decay / 1.5, decay / 0.3, dim)[None, None], persistent=False
        )

    def filter(self, length: int) -> torch.Tensor:
        """The filter ``h: (C, length)``."""
        h = torch.sin(self.freq * self.filter_in(self.z[:, :length]))
        for layer in self.filter_hidden:
            h = torch.sin(self.freq * layer(h))
        return (self.filter_out(h) * torch.exp(-self.t[:, :length] * self.deltas.abs()))[0].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.filter(length).float()
        if length > TOEPLITZ_MAX_LENGTH:
            n = 2 * length
            k_f = torch.fft.rfft(h, n=n) / n
            u = x.transpose(1, 2).float()
            y = torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n, norm="forward")[..., :length]
            return (y + u).transpose(1, 2).to(x.dtype)
        # r[c, i] = h[c, L - 1 - i] (zero for i >= L), so T[c, t, s] = r[c, L - 1 - t + s]
        r = torch.cat([h.flip(-1), h.new_zeros(h.shape[0], length - 1)], dim=-1)
        return _ToeplitzConv.apply(x, r.unfold(-1, length, 1).flip(1))


class BaseConv(nn.Module):
    """Zoology's BaseConv gated convolution: ``y = conv(u) * (W u + b) + u``.

    ``kernel_size > 0`` is a depthwise causal short convolution; ``-1`` the implicit long
    convolution over ``max_len`` tokens (Zoology Figure 2 uses ``[3, -1]`` by layer).
    """

    def __init__(self, dim: int, max_len: int, kernel_size: int = 3) -> None:
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("max_len", max_len, minimum=1)
        if kernel_size != -1:
            check_int("kernel_size", kernel_size, minimum=1)
        self.projection = nn.Linear(dim, dim)
        self.conv = (
            _ImplicitLongConv(dim, max_len) if kernel_size == -1 else _ShortConv(dim, kernel_size)
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.conv(u) * self.projection(u) + u


class _LinearAttention(nn.Module):
    """Normalized causal linear attention with a named feature map (Katharopoulos et al. 2020):
    ``o_t = phi(q_t) S_t / (phi(q_t) . z_t)`` with one head, ``q, k`` projected to ``qk_dim``
    (default ``d``; Based's 8 for the Taylor map, whose features grow as ``qk_dim^2``), ``v``
    to ``d``, then ``out_proj``; ``identity`` is left unnormalized (its scores can be
    negative)."""

    def __init__(self, dim: int, feature_map: str, qk_dim: int | None = None) -> None:
        super().__init__()
        self.feature_map, self.qk_dim = feature_map, qk_dim or dim
        self.qk = nn.Linear(dim, 2 * self.qk_dim)
        self.v = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k = self.qk(x).view(b, n, 2, 1, self.qk_dim).unbind(2)
        v = self.v(x).view(b, n, 1, d)
        o = linear_attention(
            q, k, v, feature_map=self.feature_map, normalize=self.feature_map != "identity"
        )
        return self.out_proj(o.reshape(b, n, d))


class _Output(nn.Module):
    """Wraps a layer whose forward returns a named tuple, keeping its ``output`` field."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).output


# --------------------------------------------------------------------------- mixers


@dataclass(frozen=True)
class MixerContext:
    """What a mixer builder gets: width ``dim``, this layer's index, the stack depth, the
    sequence length, and the attention dropout (passed to layers that take ``dropout``)."""

    dim: int
    layer_idx: int
    num_layers: int
    seq_len: int
    dropout: float


def takes_dropout(cls: type[nn.Module]) -> bool:
    """Whether ``cls(..., dropout=p)`` is accepted: ``dropout`` is a parameter of its
    ``__init__``, or of a base class's that its ``**kwargs`` reach (S2 and MoA pass theirs on to
    :class:`MultiHeadAttention`)."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is nn.Module:
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters
        if "dropout" in parameters:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def _with_dropout(cls: type[nn.Module], ctx: MixerContext, *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)``, with ``dropout=ctx.dropout`` when ``cls`` takes it."""
    if takes_dropout(cls):
        kwargs["dropout"] = ctx.dropout
    return cls(*args, **kwargs)


def _heads(dim: int, wanted: int) -> int:
    return math.gcd(dim, wanted)


def _linear(feature_map: str, qk_dim: int | None = None) -> Callable[[MixerContext], nn.Module]:
    return lambda c: _LinearAttention(c.dim, feature_map, qk_dim)


#: name -> (builder, uses position embeddings); Zoology gives position embeddings to attention only
MIXERS: dict[str, tuple[Callable[[MixerContext], nn.Module], bool]] = {
    "attention": (lambda c: _with_dropout(MultiHeadAttention, c, c.dim, 1, causal=True), True),
    "sliding_window": (
        lambda c: _with_dropout(
            MultiHeadAttention, c, c.dim, 1, pattern=patterns.sliding_window(c.seq_len // 4)
        ),
        True,
    ),
    "moh": (
        lambda c: _Output(
            _with_dropout(
                MoHAttention, c, c.dim, _heads(c.dim, 4), num_shared=1, top_k=2, causal=True
            )
        ),
        True,
    ),
    "moa": (
        lambda c: _with_dropout(
            MoAAttention,
            c,
            c.dim,
            _heads(c.dim, 4),
            alphas=(8.0, 16.0, 32.0, float(c.seq_len))[: _heads(c.dim, 4)],
            betas=(0.0,) * _heads(c.dim, 4),
            block=8,
            sink_size=8,
            min_cache=8,
            max_new_tokens=0,
        ),
        True,
    ),
    "s2": (
        lambda c: _with_dropout(
            S2Attention,
            c,
            c.dim,
            _heads(c.dim, 4),
            block_size=4,
            local_blocks=4,
            vert_stride=2,
            causal=True,
        ),
        True,
    ),
    "combiner": (
        lambda c: _with_dropout(
            CombinerAttention, c, c.dim, _heads(c.dim, 4), segment_len=8, causal=True
        ),
        True,
    ),
    "rcmha": (
        lambda c: _with_dropout(
            RelativeConvAttention, c, c.dim, _heads(c.dim, 4), max_len=c.seq_len
        ),
        False,
    ),
    "selective": (
        lambda c: _with_dropout(SelectiveMultiHeadAttention, c, c.dim, _heads(c.dim, 4)),
        True,
    ),
    "lightning": (
        lambda c: LightningAttention(
            c.dim, _heads(c.dim, 4), layer_idx=c.layer_idx, num_layers=c.num_layers
        ),
        False,
    ),
    "based": (
        lambda c: (
            BaseConv(c.dim, c.seq_len, 3)
            if c.layer_idx % 2 == 0
            else BasedAttention(c.dim, 1, feature_dim=8, window_size=0)
        ),
        False,
    ),
    "base_conv": (lambda c: BaseConv(c.dim, c.seq_len, (3, -1)[c.layer_idx % 2]), False),
    "linear_identity": (_linear("identity"), False),
    "linear_elu": (_linear("elu+1"), False),
    "linear_relu": (_linear("relu"), False),
    "linear_taylor": (_linear("taylor", 8), False),
}

#: mixers of headwise refused here, and why: each sees the whole sequence or mixes no tokens
REFUSED: dict[str, str] = {
    "agent": "AgentAttention pools agent tokens over the whole sequence (non-causal)",
    "inline": "InLineAttention's weights use the mean key over the whole sequence (non-causal)",
    "linear_inline": "the inline feature map is sequence-level (non-causal)",
    "gaussian": "GAAM along the feature axis re-weights each token's own features and mixes no "
    "tokens, so no context can reach a query; along the sequence axis it is non-causal",
    "gaussian_sequence": "GAAM along the sequence axis uses whole-sequence statistics",
}


def list_mixers() -> tuple[str, ...]:
    """The mixer names :class:`MQARModel` accepts, in benchmark order."""
    return tuple(MIXERS)


def check_mixer(name: str) -> str:
    """``name`` if it is a known causal mixer; a ``ValueError`` naming why not otherwise."""
    if name in REFUSED:
        raise ValueError(f"mixer {name!r} cannot be used for MQAR: {REFUSED[name]}")
    if name not in MIXERS:
        raise ValueError(f"mixer must be one of {list(MIXERS)}; got {name!r}")
    return name


# --------------------------------------------------------------------------- model


class _Block(nn.Module):
    """Zoology's ``TransformerBlock`` (pre-LN, residual stream carried beside the output)."""

    def __init__(self, mixer: nn.Module, dim: int, dropout: float, mlp: bool) -> None:
        super().__init__()
        self.sequence_mixer = mixer
        self.dropout = nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.state_mixer = _MLP(dim) if mlp else nn.Identity()

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dropped = self.dropout(hidden)
        residual = dropped if residual is None else dropped + residual
        mixed = self.sequence_mixer(self.norm1(residual))
        residual = mixed + residual
        return self.state_mixer(self.norm2(residual)), residual


class _MLP(nn.Module):
    """Zoology's MLP state mixer: ``fc2(GELU(fc1 x))`` with hidden width ``4 d``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MQARModel(nn.Module):
    """Zoology's language model for MQAR: ``logits = E^T LN_f(blocks(E[x] + P))``.

    Embedding dropout 0.1 before the first block (Zoology ``embed_dropout``), no residual
    dropout, position embeddings for mixers that use them (:data:`MIXERS`), tied LM head.
    Init: every ``nn.Linear`` and ``nn.Embedding`` weight normal(0, 0.02), biases 0, and
    ``out_proj``/``fc2`` weights normal(0, 0.02 / sqrt(2 n_layers)) (Zoology ``_init_weights``).
    Shapes: ``forward(tokens: (B, L)) -> (B, L, vocab_size)``.
    """

    def __init__(
        self,
        mixer: str,
        *,
        vocab_size: int,
        dim: int,
        seq_len: int,
        num_layers: int = 2,
        embed_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        mlp: bool = False,
    ) -> None:
        super().__init__()
        builder, positions = MIXERS[check_mixer(mixer)]
        self.seq_len = check_int("seq_len", seq_len, minimum=1)
        self.tokens = nn.Embedding(check_int("vocab_size", vocab_size, minimum=2), dim)
        self.positions = nn.Embedding(seq_len, dim) if positions else None
        contexts = [
            MixerContext(dim, i, num_layers, seq_len, attention_dropout)
            for i in range(check_int("num_layers", num_layers, minimum=1))
        ]
        self.layers = nn.ModuleList(
            _Block(builder(c), dim, embed_dropout if c.layer_idx == 0 else 0.0, mlp)
            for c in contexts
        )
        self.norm = nn.LayerNorm(dim)
        self._init_weights(num_layers)

    def _init_weights(self, num_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if "out_proj.weight" in name or "fc2.weight" in name:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * num_layers))

    def forward(self, tokens: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, L, V)``; with a boolean ``where: (B, L)`` only the logits of the
        selected positions ``(N, V)`` (MQAR's loss and accuracy need only the labelled ones,
        and the LM head is most of the cost of a small model)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"tokens must be (B, L <= {self.seq_len}); got {tuple(tokens.shape)}")
        hidden = self.tokens(tokens)
        if self.positions is not None:
            hidden = hidden + self.positions.weight[: tokens.shape[1]]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden = hidden + residual
        if where is not None:
            if where.shape != tokens.shape or where.dtype != torch.bool:
                raise ValueError(
                    f"where must be a bool tensor of shape {tuple(tokens.shape)}; got "
                    f"{where.dtype} {tuple(where.shape)}"
                )
            hidden = hidden[where]
        return self.norm(hidden) @ self.tokens.weight.t()


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting. ``lrs`` are tried in order; later ones are skipped once one reaches
    :data:`EARLY_STOP` (the reported accuracy is the best over the lrs run). ``patience``
    (not Zoology's: ``None`` there) also ends a run once its best test accuracy has not risen
    by 0.01 over that many epochs, which bounds the time a mixer that cannot learn recall
    spends at its plateau."""

    vocab_size: int = 512
    seq_len: int = 64
    num_kv_pairs: int = 4
    dim: int = 64
    num_train: int = 20_000
    num_test: int = 1_000
    batch_size: int = 512
    max_epochs: int = 24
    lrs: tuple[float, ...] = (3e-3, 1e-3)
    weight_decay: float = 0.1
    attention_dropout: float = 0.1
    num_layers: int = 2
    mlp: bool = False
    patience: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_kv_pairs", "dim", "num_train", "num_test"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("batch_size", "max_epochs", "num_layers"):
            check_int(name, getattr(self, name), minimum=1)
        if self.patience is not None:
            check_int("patience", self.patience, minimum=1)
        if not self.lrs:
            raise ValueError("lrs must hold at least one learning rate; got ()")
        for lr in self.lrs:
            check_real("lrs", lr, positive=True)
        check_real("weight_decay", self.weight_decay, minimum=0.0)
        if not 0.0 <= check_real("attention_dropout", self.attention_dropout) < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1); got {self.attention_dropout}")


#: ``--preset cpu``: the issue's CPU setting, batch 64 (313 steps per epoch of 20k examples;
#: at Figure 2's batch 512 the 40 steps per epoch leave attention at the 1/K plateau for all 24
#: epochs) and no plateau patience (recall is learned in a jump after a plateau: attention sits
#: at 0.25 for eight epochs, then reaches 0.99 at the tenth). ``paper``: Zoology Figure 2 (one
#: config per (L, K) and width; batch 512 for L <= 128, 256 for 256, 128 for 512).
PRESETS: dict[str, tuple[MQARConfig, ...]] = {
    "cpu": (MQARConfig(batch_size=64),),
    "paper": tuple(
        MQARConfig(
            vocab_size=8192,
            seq_len=seq_len,
            num_kv_pairs=pairs,
            dim=dim,
            num_train=100_000,
            num_test=3_000,
            batch_size={256: 256, 512: 128}.get(seq_len, 512),
            max_epochs=64,
            lrs=tuple(float(x) for x in np.logspace(-4, -2, 4)),
        )
        for seq_len, pairs in ((64, 4), (128, 8), (256, 16), (512, 64))
        for dim in (64, 128, 256, 512)
    ),
}


@dataclass
class Run:
    """One training run: its setting, lr, per-epoch curve and outcome."""

    mixer: str
    seq_len: int
    dim: int
    lr: float
    #: per epoch: ``{"epoch", "loss", "accuracy", "seconds"}`` (loss: mean train loss)
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return max((p["accuracy"] for p in self.curve), default=0.0)

    @property
    def seconds(self) -> float:
        return sum(p["seconds"] for p in self.curve)


def accuracy(model: MQARModel, inputs: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Argmax accuracy of ``model`` over the labelled positions (``labels != -100``) only."""
    hits, total = 0, 0
    with torch.no_grad():
        for xb, yb in zip(inputs.split(batch), labels.split(batch)):
            where = yb != IGNORE
            hits += (model(xb, where).argmax(-1) == yb[where]).sum().item()
            total += int(where.sum())
    return hits / total


def _data(config: MQARConfig) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    train_seed, test_seed = split_seeds(config.seed)
    common = (config.vocab_size, config.seq_len, config.num_kv_pairs)
    return (
        mqar_data(common[0], config.num_train, common[1], common[2], train_seed),
        mqar_data(common[0], config.num_test, common[1], common[2], test_seed),
    )


def _plateaued(curve: list[dict[str, float]], patience: int | None) -> bool:
    """Whether the best accuracy of the last ``patience`` epochs is within 0.01 of the best
    before them."""
    if patience is None or len(curve) <= patience:
        return False
    before = max(p["accuracy"] for p in curve[:-patience])
    return max(p["accuracy"] for p in curve[-patience:]) < before + 0.01


def train_run(
    mixer: str,
    config: MQARConfig,
    lr: float,
    *,
    device: torch.device | str = "cpu",
    data: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None,
    show_progress: bool = True,
) -> Run:
    """Train :class:`MQARModel` with ``mixer`` on ``config`` at ``lr``, Zoology's way.

    AdamW (``weight_decay``), cross-entropy over labelled positions, cosine annealing of the lr
    to 0 over ``max_epochs`` stepped per epoch, test accuracy after each epoch, stop once it
    reaches :data:`EARLY_STOP`. The model is seeded with ``config.seed``.
    """
    check_mixer(mixer)
    device = torch.device(device)
    (x, y), (x_test, y_test) = _data(config) if data is None else data
    x_test, y_test = x_test.to(device), y_test.to(device)
    torch.manual_seed(config.seed)
    model = MQARModel(
        mixer,
        vocab_size=config.vocab_size,
        dim=config.dim,
        seq_len=config.seq_len,
        num_layers=config.num_layers,
        attention_dropout=config.attention_dropout,
        mlp=config.mlp,
    ).to(device)
    # one fused kernel for all parameters (CPU and CUDA): the for-each loop over ~30 small
    # tensors is a measurable part of a step this small
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=config.weight_decay, fused=True
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.max_epochs, 0.0)
    order = torch.Generator().manual_seed(config.seed)
    run = Run(mixer, config.seq_len, config.dim, lr)
    bar = (
        progress(config.max_epochs, f"{mixer} L={config.seq_len} d={config.dim} lr={lr:g}")
        if show_progress
        else None
    )
    for epoch in range(config.max_epochs):
        start = time.perf_counter()
        model.train()
        total, steps = 0.0, 0
        for idx in torch.randperm(len(x), generator=order).split(config.batch_size):
            tokens, labels = x[idx].to(device), y[idx].to(device)
            where = labels != IGNORE
            loss = F.cross_entropy(model(tokens, where), labels[where])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        model.eval()
        acc = accuracy(model, x_test, y_test, config.batch_size)
        seconds = time.perf_counter() - start
        run.curve.append(
            {"epoch": epoch + 1, "loss": total / steps, "accuracy": acc, "seconds": seconds}
        )
        if bar is not None:
            bar.set_postfix(loss=f"{total / steps:.3f}", acc=f"{acc:.3f}")
            bar.update()
        if acc >= EARLY_STOP or _plateaued(run.curve, config.patience):
            break
        schedule.step()
    if bar is not None:
        bar.close()
    return run


def sweep_one(
    mixer: str,
    config: MQARConfig,
    *,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> list[Run]:
    """Every lr of ``config`` for ``mixer`` in turn, stopping after the first that reaches
    :data:`EARLY_STOP`."""
    data = _data(config)
    runs = []
    for lr in config.lrs:
        runs.append(
            train_run(mixer, config, lr, device=device, data=data, show_progress=show_progress)
        )
        if runs[-1].accuracy >= EARLY_STOP:
            break
    return runs


def _sweep_job(job: tuple[int, str, MQARConfig, str, bool]) -> tuple[int, list[Run]]:
    index, mixer, config, device, show = job
    return index, sweep_one(mixer, config, device=device, show_progress=show)


def _start_worker(parent: int) -> None:
    """A pool worker: one torch thread, and gone within a second of its parent (a parent killed
    by a signal runs no clean-up, and would leave its workers training)."""
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def sweep(
    mixers: Sequence[str],
    configs: Sequence[MQARConfig],
    *,
    device: torch.device | str = "cpu",
    workers: int = 1,
    show_progress: bool = True,
    on_done: Callable[[list[Run], int, int], None] | None = None,
) -> list[Run]:
    """:func:`sweep_one` for every mixer and config (configs outer, mixers inner). With
    ``workers > 1`` (CPU only) the jobs run in that many processes of one torch thread each, in
    that order, each taking the next job when it finishes one. ``on_done(runs, done, total)``
    is called after each (mixer, config) job with the runs finished so far, in job order (e.g.
    to write partial results). The runs are returned in job order."""
    for name in mixers:
        check_mixer(name)
    workers = check_int("workers", workers, minimum=1)
    if workers > 1 and torch.device(device).type != "cpu":
        raise ValueError(f"workers > 1 needs device cpu; got {device}")
    jobs = [
        (i, mixer, config, str(device), show_progress)
        for i, (config, mixer) in enumerate(itertools.product(configs, mixers))
    ]
    finished: dict[int, list[Run]] = {}

    def done(index: int, runs: list[Run]) -> None:
        finished[index] = runs
        if on_done is not None:
            on_done([r for i in sorted(finished) for r in finished[i]], len(finished), len(jobs))

    if workers == 1:
        for job in jobs:
            done(*_sweep_job(job))
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, _start_worker, (os.getpid(),)) as pool:
            for index, runs in pool.imap_unordered(_sweep_job, jobs):
                done(index, runs)
    return [r for i in sorted(finished) for r in finished[i]]


def best(runs: Sequence[Run]) -> dict[tuple[str, int, int], Run]:
    """The run with the highest accuracy per ``(mixer, seq_len, dim)`` (max over the lr sweep)."""
    out: dict[tuple[str, int, int], Run] = {}
    for run in runs:
        key = (run.mixer, run.seq_len, run.dim)
        if key not in out or run.accuracy > out[key].accuracy:
            out[key] = run
    return out


def runs_as_dicts(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The runs as JSON-ready dictionaries (curves included)."""
    return [{**asdict(r), "accuracy": r.accuracy, "seconds": r.seconds} for r in runs]


def plot_sweep(runs: Sequence[Run], path: Path) -> Path:
    """Figure 2 of Zoology: best accuracy vs model width, one line per mixer, one panel per
    sequence length; below each, the test accuracy per epoch of every mixer's best run at the
    smallest width (with one width, as in the CPU preset, the top panel is a column of points and
    the curves show how each mixer got there). Each mixer keeps one color and marker in every
    panel. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = best(runs)
    lengths = sorted({k[1] for k in top})
    mixers = list(dict.fromkeys(k[0] for k in top))
    colors = plt.get_cmap("tab20").colors
    style = {
        mixer: {"color": colors[i % len(colors)], "marker": "os^vDP*Xhp<>"[i % 12]}
        for i, mixer in enumerate(mixers)
    }
    fig, axes = plt.subplots(2, len(lengths), figsize=(4 * len(lengths) + 2, 6.4), squeeze=False)
    for column, length in enumerate(lengths):
        widths = sorted({k[2] for k in top if k[1] == length})
        width_ax, curve_ax = axes[0][column], axes[1][column]
        for mixer in mixers:
            points = sorted((k[2], r.accuracy) for k, r in top.items() if k[:2] == (mixer, length))
            if points:
                width_ax.plot(*zip(*points), label=mixer, **style[mixer])
            run = top.get((mixer, length, widths[0]))
            if run is not None and run.curve:
                epochs = [p["epoch"] for p in run.curve]
                accuracies = [p["accuracy"] for p in run.curve]
                curve_ax.plot(epochs, accuracies, markersize=3, label=mixer, **style[mixer])
        width_ax.set(
            title=f"L = {length}", xlabel="model width d", ylabel="MQAR accuracy", ylim=(0, 1.02)
        )
        width_ax.set_xscale("log", base=2)
        width_ax.set_xticks(widths, [str(w) for w in widths])
        curve_ax.set(
            title=f"L = {length}, d = {widths[0]}: best lr per mixer",
            xlabel="epoch",
            ylabel="test accuracy",
            ylim=(0, 1.02),
        )
    handles, labels = axes[0][0].get_legend_handles_labels()
    right = 1 - 1.7 / fig.get_figwidth()  # the legend's column
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(right, 0.5))
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "EARLY_STOP",
    "MIXERS",
    "PRESETS",
    "REFUSED",
    "BaseConv",
    "MQARConfig",
    "MQARModel",
    "MixerContext",
    "Run",
    "accuracy",
    "best",
    "check_mixer",
    "list_mixers",
    "mqar_data",
    "plot_sweep",
    "runs_as_dicts",
    "split_seeds",
    "sweep",
    "sweep_one",
    "takes_dropout",
    "train_run",
]
