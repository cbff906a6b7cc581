"""VHD and VHR (He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
Divergence", ACL 2025): the vision-aware head divergence of each head, and Vision-aware Head
Reinforcement, which scales the heads that diverge most by ``alpha``.

Notation: ``o[l,h,i]`` per-head outputs before the output projection. The faithful,
layer-synchronous algorithm is :class:`VHRReinforcement` (:func:`vision_head_reinforcement`,
:func:`vhr_generate`); :func:`reinforce_heads` is the two-pass approximation of third-party
ports. Interventions are context managers: the model is unchanged after the block.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from headwise.hf.ablation import gate_heads
from headwise.hf.capture import capture
from headwise.hf.registry import language_sites, select_sites
from headwise.hooks import Call, Hook, Layers, hooked


def vision_head_divergence(
    model: nn.Module,
    inputs: Mapping,
    text_only_inputs: Mapping,
    layers: Layers = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """VHD (He et al., 2025) of every head at the last position, and the text-only norm ``TA``.

    ``VHD[l,h] = ||o[l,h,last](image + text) - o[l,h,last](text only)||_2`` and
    ``TA[l,h] = ||o[l,h,last](text only)||^2``, averaged over the batch. Both inputs must end on
    the same token. Returns ``(vhd, ta)``, ``(H,)`` per site.
    """
    outs = []
    for batch in (inputs, text_only_inputs):
        with torch.no_grad(), capture(model, layers=layers, rows=[-1], what=("z",)) as cache:
            model(**batch)
        outs.append(cache)
    vhd, ta = {}, {}
    for site in select_sites(model, layers):
        name = f"{site.name}.z"
        if name not in outs[0]:
            continue  # a tower the text-only input never runs (the vision tower)
        with_img, text = outs[0][name][:, 0].float(), outs[1][name][:, 0].float()  # (B, H, D)
        vhd[site.name] = (with_img - text).norm(dim=-1).mean(0)
        ta[site.name] = text.pow(2).sum(-1).mean(0)
    return vhd, ta


def vhr_select(vhd: torch.Tensor, ta: torch.Tensor) -> list[int]:
    """VHR's head choice in one layer: drop outliers (``VHD > mu + sigma`` and ``TA > mu +
    sigma``: heads that surge without the image), then keep heads with ``VHD > median``."""
    vhd = vhd.clone().float()
    ta = ta.float()
    outlier = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
    vhd[outlier] = 0
    return torch.nonzero(vhd > vhd.median()).flatten().tolist()


@contextmanager
def reinforce_heads(
    model: nn.Module,
    inputs: Mapping,
    text_only_inputs: Mapping,
    alpha: float = 2.0,
    layers: Layers = None,
) -> Iterator[dict[str, list[int]]]:
    """VHR, **two-pass approximation** (third-party ports): heads are chosen per layer from
    VHD/TA of one pass with and one without the image (:func:`vision_head_divergence`), both
    unreinforced, then scaled by ``alpha`` (default 2) at every position while the block runs;
    yields the chosen heads.

    Not the paper's algorithm: there, the VHD of layer ``l`` is measured on states that layers
    ``< l`` have already reinforced (see :func:`vhr_generate` and
    :func:`vision_head_reinforcement`, the faithful version). This one costs two calibration
    passes and then steers any later call with fixed heads.
    """
    vhd, ta = vision_head_divergence(model, inputs, text_only_inputs, layers)
    chosen = {name: vhr_select(vhd[name], ta[name]) for name in vhd}
    sites = {s.name: s for s in select_sites(model, list(chosen))}
    gates = {}
    for name, heads in chosen.items():
        gate = torch.ones(sites[name].heads)
        gate[heads] = alpha
        gates[name] = gate
    with gate_heads(model, gates):
        yield chosen


class VHRReinforcement(Hook):
    """VHR (He et al., ACL 2025, Algorithm 1), layer-synchronous: the hook behind
    :func:`vision_head_reinforcement` and :func:`vhr_generate`.

    Expects at step 0 a batch of 2 rows, row 0 the image branch and row 1 the text-only branch,
    ending on the same token (see :func:`vhr_inputs`). The first call of each chosen site is
    step 0: from both rows' head outputs ``o[l,h,last]`` (before ``o_proj``) it computes

        VHD[l,h] = ||o_img[l,h,last] - o_txt[l,h,last]||_2,   TA[l,h] = ||o_txt[l,h,last]||^2,

    keeps ``H_l = vhr_select(VHD, TA)`` (outliers zeroed, then ``VHD > median``) and scales
    ``o[l,h] <- alpha * o[l,h]`` for ``h in H_l`` in both rows before the layer goes on, so
    layer ``l + 1`` is measured on reinforced states. Later calls (decode steps) reuse ``H_l``
    unchanged (the KV cache holds keys computed with it) and scale every row and position.
    ``scale_prompt=False`` scales only the last position at step 0 (the paper does not say;
    third-party code scales the whole pass, the default).

    ``chosen``/``vhd``/``ta`` map site names to the heads, ``(H,)`` VHD and ``(H,)`` TA of step
    0; :meth:`reset` forgets them so that the next call is a step 0 again.
    """

    def __init__(self, names: Sequence[str], alpha: float = 2.0, scale_prompt: bool = True):
        self.names = set(names)
        self.alpha, self.scale_prompt = alpha, scale_prompt
        self.chosen: dict[str, list[int]] = {}
        self.vhd: dict[str, torch.Tensor] = {}
        self.ta: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.chosen, self.vhd, self.ta = {}, {}, {}

    def edit_output(self, call: Call) -> None:
        name = call.site.name
        if name not in self.names:
            return
        out = call.out
        first = name not in self.chosen
        if first:
            if out.shape[0] != 2:
                raise ValueError(
                    f"VHR's step 0 needs a batch of 2 rows (image, text only) at {name}; "
                    f"got batch {out.shape[0]} (build it with vhr_inputs)"
                )
            last = out[:, -1].detach().float()  # (2, H, D)
            self.vhd[name] = (last[0] - last[1]).norm(dim=-1)
            self.ta[name] = last[1].pow(2).sum(-1)
            self.chosen[name] = vhr_select(self.vhd[name], self.ta[name])
        gate = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
        gate[self.chosen[name]] = self.alpha
        if first and not self.scale_prompt:
            call.out = torch.cat([out[:, :-1], out[:, -1:] * gate[:, None]], 1)
        else:
            call.out = out * gate[:, None]


@contextmanager
def vision_head_reinforcement(
    model: nn.Module,
    alpha: float = 2.0,
    layers: Layers = None,
    scale_prompt: bool = True,
) -> Iterator[VHRReinforcement]:
    """Install VHR's layer-synchronous hook (:class:`VHRReinforcement`) for the block; yields it.

    Run the model on :func:`vhr_inputs` (batch of 2: image branch, text-only branch) for step 0,
    then decode with the KV cache (both rows, or row 0 only after
    ``cache.batch_select_indices``): the heads chosen at step 0 stay reinforced. ``layers``
    (default: every layer of the language model) picks sites as in
    :func:`~headwise.hf.select_sites`; sites outside the language model (the vision
    tower, which the text-only branch never runs) are left out. Paper: ``alpha=2``; LLaVA-1.5-7B
    and LLaVA-NeXT-7B layers ``[1, 18..31]`` (layer 1 and the last 14), InstructBLIP-7B the
    last 18.
    """
    language = language_sites(model)
    sites = language
    if layers is not None:
        sites = [s for s in select_sites(model, layers) if s.tower == language[0].tower]
        if not sites:
            raise ValueError(f"layers={layers!r} selects no layer of the language model")
    with hooked(model, VHRReinforcement([s.name for s in sites], alpha, scale_prompt)) as hook:
        yield hook


def vhr_inputs(inputs: Mapping, text_only_inputs: Mapping, pad_token_id: int = 0) -> dict:
    """VHR's step-0 batch: row 0 ``inputs`` (image branch), row 1 ``text_only_inputs``.

    Both must hold one sequence (``input_ids`` ``(1, L)``, optional ``attention_mask``) ending
    on the same token; the shorter is left-padded with ``pad_token_id`` and
    ``position_ids = cumsum(attention_mask) - 1`` (0 on padding) give each row the positions it
    has alone. Every other entry of ``inputs`` (``pixel_values``, ...) is passed on as is: the
    one image belongs to row 0, the only row with image tokens.
    """
    ids = [inputs["input_ids"], text_only_inputs["input_ids"]]
    if any(t.dim() != 2 or t.shape[0] != 1 for t in ids):
        shapes = [tuple(t.shape) for t in ids]
        raise ValueError(f"input_ids must be (1, L) in both inputs; got {shapes}")
    masks = [
        b.get("attention_mask", torch.ones_like(t)) for b, t in zip((inputs, text_only_inputs), ids)
    ]
    length = max(t.shape[1] for t in ids)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (length - t.shape[1], 0), value=value)

    mask = torch.cat([pad(m, 0) for m in masks])
    batch = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    batch["input_ids"] = torch.cat([pad(t, pad_token_id) for t in ids])
    batch["attention_mask"] = mask
    batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return batch


@dataclass
class VHRResult:
    """Result of :func:`vhr_generate`: the new ``tokens`` ``(1, T)``, each step's ``logits``
    ``(T, V)`` (image branch), and step 0's ``heads``/``vhd``/``ta`` per site name."""

    tokens: torch.Tensor
    logits: torch.Tensor
    heads: dict[str, list[int]]
    vhd: dict[str, torch.Tensor]
    ta: dict[str, torch.Tensor]


@torch.no_grad()
def vhr_generate(
    model: nn.Module,
    inputs: Mapping,
    text_only_inputs: Mapping,
    max_new_tokens: int = 32,
    alpha: float = 2.0,
    layers: Layers = None,
    scale_prompt: bool = True,
    pad_token_id: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
) -> VHRResult:
    """VHR (He et al., ACL 2025), the paper's Algorithm 1, with greedy decoding (the paper's).

    Step 0 runs the image branch and the text-only branch as one batch of 2
    (:func:`vhr_inputs`) under :class:`VHRReinforcement`: at each chosen layer, in order, VHD/TA
    of the last position pick the heads, which are scaled by ``alpha`` in both rows before the
    next layer runs. The text-only row is then dropped from the KV cache and decoding goes on
    with the image branch alone, the step-0 heads reinforced at every step. Stops after
    ``max_new_tokens`` or on ``eos_token_id`` (default: never early). One extra row at step 0
    is all VHR costs. For a model with 1-D positions (LLaVA, Llama); ``layers``, ``alpha`` and
    ``scale_prompt`` as in :func:`vision_head_reinforcement`.
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    batch = vhr_inputs(inputs, text_only_inputs, pad_token_id)
    tokens, logits = [], []
    cache = {_cache_name(model): DynamicCache()}
    with vision_head_reinforcement(model, alpha, layers, scale_prompt) as hook:
        out = model(**batch, **cache, use_cache=True)
        for c in cache.values():  # the text-only row has done its job
            c.batch_select_indices(torch.tensor([0], device=batch["input_ids"].device))
        mask = batch["attention_mask"][:1]
        position = batch["position_ids"][:1, -1:]
        step_logits = out.logits[:1, -1]
        for step in range(max_new_tokens):
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits[0])
            if int(token) in stops or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            position = position + 1
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=position,
                **cache,
                use_cache=True,
            )
            step_logits = out.logits[:, -1]
    return VHRResult(torch.cat(tokens, 1), torch.stack(logits), hook.chosen, hook.vhd, hook.ta)


def _cache_name(model: nn.Module) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before (now a deprecated alias)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
