"""Unpadded BERT encoder: every token-wise op and the attention run on packed real tokens.

After "Boosting Distributed Training Performance of the Unpadded BERT Model" (Zeng, Li, Wu et al.,
Baidu, arXiv 2208.08124). A padded batch ``input_ids`` ``(B, L)`` with ``attention_mask``
``(B, L)`` is packed once into ``T = sum(lengths)`` tokens; embeddings, LayerNorms, projections and
the FFN then see ``(T, E)`` only, and attention is :func:`headwise.attention_varlen` over
``cu_seqlens`` (block-diagonal, bidirectional), so no work is spent on padding. The layers are
those of BERT (Devlin et al. 2019); a Hugging Face ``BertModel`` state dict loads by renaming::

    h_0   = LayerNorm(word[id] + position[p] + token_type[s])           (T, E)
    a     = MHA_varlen(h_{l-1}; cu_seqlens)                              (T, E)
    h'    = LayerNorm(h_{l-1} + a)
    h_l   = LayerNorm(h' + W_2 act(W_1 h' + b_1) + b_2)
    pooled = tanh(W_p h_L[first token of each sequence] + b_p)           (B, E)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_bool, check_int, check_real
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.multihead import MultiHeadAttention
from headwise.ops.attention import Packed, pack, unpack
from headwise.ops.attention.varlen import seqlens_from_cu
from headwise.types import Backend

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


@dataclass(frozen=True)
class BertConfig:
    """The hyperparameters of a BERT encoder (field names as in Hugging Face's ``BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            check_int(name, getattr(self, name), minimum=1)
        check_real("layer_norm_eps", self.layer_norm_eps, positive=True)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= check_real(name, getattr(self, name)) < 1:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.pad_token_id is not None:
            check_int("pad_token_id", self.pad_token_id, minimum=0, maximum=self.vocab_size - 1)
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(_ACTIVATIONS)}; got {self.hidden_act!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads must divide hidden_size; got hidden_size="
                f"{self.hidden_size}, num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_hf(cls, hf_config: Any) -> BertConfig:
        """Read the fields from a ``transformers.BertConfig`` (or any object / dict having them).

        Only absolute position embeddings are supported, as in the original BERT.
        """

        def get(name: str) -> Any:
            return hf_config[name] if isinstance(hf_config, dict) else getattr(hf_config, name)

        kind = (
            hf_config.get("position_embedding_type", "absolute")
            if isinstance(hf_config, dict)
            else getattr(hf_config, "position_embedding_type", "absolute")
        )
        if kind != "absolute":
            raise ValueError(f"position_embedding_type must be 'absolute'; got {kind!r}")
        return cls(**{name: get(name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class BertOutput:
    """``last_hidden_state`` ``(T, E)`` packed, ``pooler_output`` ``(B, E)`` (or ``None``), and
    ``packed`` (``cu_seqlens``, and the padded layout when the input was padded)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None
    cu_seqlens: torch.Tensor
    packed: Packed | None = None

    def padded(self) -> torch.Tensor:
        """``last_hidden_state`` back in the input's ``(B, L, E)`` layout, zeros at padding."""
        if self.packed is None:
            raise ValueError("padded() needs a padded input; got a packed one (cu_seqlens)")
        return unpack(self.last_hidden_state, self.packed)


class _Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor
    ) -> torch.Tensor:
        x = self.word_embeddings(ids)
        x = x + self.token_type_embeddings(token_types) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertLayer(nn.Module):
    """One post-LN BERT block on packed tokens ``(T, E)`` with ``cu_seqlens``."""

    def __init__(self, config: BertConfig, backend: Backend = "auto") -> None:
        super().__init__()
        width, eps = config.hidden_size, config.layer_norm_eps
        self.attention = MultiHeadAttention(
            width,
            config.num_attention_heads,
            backend=backend,
            dropout=config.attention_probs_dropout_prob,
        )
        self.attention_norm = nn.LayerNorm(width, eps=eps)
        self.intermediate = nn.Linear(width, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.output = nn.Linear(config.intermediate_size, width)
        self.output_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def reset_parameters(self) -> None:
        """Re-initialize every sublayer (PyTorch's defaults; a loaded checkpoint replaces them)."""
        reset_submodules(self)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        check_input("x", x, self)
        x = self.attention_norm(x + self.dropout(self.attention(x, cu_seqlens=cu_seqlens)))
        return self.output_norm(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class UnpaddedBert(nn.Module):
    """A BERT encoder (``transformers.BertModel``-compatible weights) on packed tokens.

    Args:
        config: a :class:`BertConfig` (``BertConfig.from_hf(hf_model.config)`` for HF models).
        add_pooling_layer: keep BERT's pooler (``tanh`` dense layer on each first token).
        backend: attention backend for :func:`headwise.attention_varlen`.

    Call ``model(input_ids, attention_mask, token_type_ids)`` on a padded ``(B, L)`` batch (real
    tokens anywhere in a row; position ids are the padded column index, as Hugging Face's), or
    ``model(input_ids, cu_seqlens=cu)`` on packed ``(T,)`` ids (positions restart at 0 in each
    sequence). Returns a :class:`BertOutput` whose hidden states are packed ``(T, E)``.
    In ``train()`` the hidden states and the attention probabilities are dropped as in BERT
    (``hidden_dropout_prob``, ``attention_probs_dropout_prob``); in ``eval()`` the model equals
    ``BertModel`` exactly, up to float rounding.
    """

    def __init__(
        self, config: BertConfig, *, add_pooling_layer: bool = True, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        add_pooling_layer = check_bool("add_pooling_layer", add_pooling_layer)
        self.config = config
        self.embeddings = _Embeddings(config)
        self.layers = nn.ModuleList(
            BertLayer(config, backend) for _ in range(config.num_hidden_layers)
        )
        self.pooler = (
            nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        )

    def reset_parameters(self) -> None:
        """Re-initialize every parameter with PyTorch's defaults (embeddings ``N(0, 1)`` with a
        zero padding row, ``nn.Linear`` Kaiming-uniform, LayerNorm ones and zeros), e.g. after
        meta-device construction + ``to_empty`` and before loading a checkpoint."""
        reset_submodules(self)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, backend: Backend = "auto") -> UnpaddedBert:
        """Build from a ``transformers.BertModel`` (or a model holding one as ``.bert``)."""
        inner = getattr(hf_model, "bert", hf_model)
        state = inner.state_dict()
        model = cls(
            BertConfig.from_hf(inner.config),
            add_pooling_layer="pooler.dense.weight" in state,
            backend=backend,
        )
        model.load_hf_state_dict(state)
        return model.to(next(inner.parameters()).dtype)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face ``BertModel`` state dict (a ``bert.`` prefix is accepted).

        Heads of task models (``cls.*``, ``classifier.*``) and ``embeddings.position_ids`` are
        ignored; any other missing or unexpected key raises.
        """
        mapped = {}
        for key, value in state_dict.items():
            key = key.removeprefix("bert.")
            if key.startswith(("cls.", "classifier.")) or key.endswith("position_ids"):
                continue
            mapped[_hf_to_ours(key)] = value
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not fit this BertConfig: missing {missing}, unexpected "
                f"{unexpected}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BertOutput:
        """Encode a padded batch ``(B, L)`` (``attention_mask`` 1 = real token, default all) or
        packed ids ``(T,)`` with ``cu_seqlens``; ``token_type_ids`` and ``position_ids`` in the
        same layout as ``input_ids`` (defaults: zeros; positions as described above)."""
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("packed input_ids (with cu_seqlens) take no attention_mask")
            return self._encode(input_ids, cu_seqlens, token_type_ids, position_ids, None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(
                f"input_ids must be (B, L), or packed (T,) with cu_seqlens; got {shape}"
            )
        _check_ids(input_ids, self.embeddings.word_embeddings.weight)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        packed = pack(input_ids, attention_mask)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
        position_ids = _take(position_ids, packed, "position_ids")
        token_type_ids = (
            None if token_type_ids is None else _take(token_type_ids, packed, "token_type_ids")
        )
        return self._encode(packed.tokens, packed.cu_seqlens, token_type_ids, position_ids, packed)

    def _encode(
        self,
        ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        token_types: torch.Tensor | None,
        positions: torch.Tensor | None,
        packed: Packed | None,
    ) -> BertOutput:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else ids
            raise ValueError(f"with cu_seqlens, input_ids must be packed (T,); got {shape}")
        _check_ids(ids, self.embeddings.word_embeddings.weight)
        total = ids.shape[0]
        lengths = seqlens_from_cu("cu_seqlens", cu_seqlens, total)
        cu = cu_seqlens.to(ids.device)
        if positions is None:
            starts = torch.repeat_interleave(
                cu[:-1].long(), torch.tensor(lengths, device=ids.device), output_size=total
            )
            positions = torch.arange(total, device=ids.device) - starts
        if token_types is None:
            token_types = torch.zeros_like(ids)
        for name, t in (("token_type_ids", token_types), ("position_ids", positions)):
            if t.shape != ids.shape:
                raise ValueError(
                    f"{name} must be shaped like input_ids {tuple(ids.shape)}; got {tuple(t.shape)}"
                )
        x = self.embeddings(ids, positions, token_types)
        for layer in self.layers:
            x = layer(x, cu)
        pooled = None
        if self.pooler is not None:
            # Empty sequences have no first token; their pooled row stays the pooler of zeros.
            first = x.new_zeros(len(lengths), x.shape[-1])
            nonempty = torch.tensor(lengths, device=x.device) > 0
            first[nonempty] = x[cu[:-1][nonempty].long()]
            pooled = torch.tanh(self.pooler(first))
        return BertOutput(x, pooled, cu, packed)


def _check_ids(ids: torch.Tensor, weight: torch.Tensor) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ArgumentTypeError(f"input_ids must hold integer token ids; got {ids.dtype}")
    if ids.device != weight.device:
        raise ValueError(
            f"input_ids must be on {weight.device} (the model's parameters); got {ids.device}"
        )


def _take(t: torch.Tensor, packed: Packed, name: str) -> torch.Tensor:
    if t.shape != (packed.batch, packed.seq_len):
        raise ValueError(
            f"{name} must be (B, L) = ({packed.batch}, {packed.seq_len}); got {tuple(t.shape)}"
        )
    return t.reshape(-1)[packed.indices.to(t.device)]


# Order matters: "attention.output." must be renamed before the FFN's "output.".
_RENAMES = (
    ("encoder.layer.", "layers."),
    ("attention.self.query.", "attention.q_proj."),
    ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.out_proj."),
    ("attention.output.LayerNorm.", "attention_norm."),
    ("intermediate.dense.", "intermediate."),
    ("output.dense.", "output."),
    ("output.LayerNorm.", "output_norm."),
    ("pooler.dense.", "pooler."),
)


def _hf_to_ours(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


__all__ = ["BertConfig", "BertLayer", "BertOutput", "UnpaddedBert"]
