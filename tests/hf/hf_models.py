"""Tiny random-weight transformers models built from config objects (no downloads), and inputs.

Each builder returns ``(model, inputs)`` with the model in eval mode, float32, eager attention;
``logits_of`` reads the tensor that the family's equality tests compare.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "bert", "vit", "clip", "llava")


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    t = transformers
    if family == "llama":
        config = t.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        model = t.LlamaForCausalLM(config)
        ids = torch.randint(0, 128, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        inputs = {"input_ids": ids, "attention_mask": mask}
    elif family == "bert":
        config = t.BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        )
        model = t.BertModel(config)
        ids = torch.randint(0, 128, (2, 10))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0  # right padding
        inputs = {"input_ids": ids, "attention_mask": mask}
    elif family == "vit":
        config = t.ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
        )
        model = t.ViTModel(config)
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    elif family == "clip":
        config = t.CLIPConfig(
            text_config=dict(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=32,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            ),
            vision_config=dict(
                image_size=32,
                patch_size=8,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=32,
        )
        model = t.CLIPModel(config)
        ids = torch.randint(3, 128, (2, 9))
        ids[:, -1] = 2
        inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32)}
    elif family == "llava":
        config = t.LlavaConfig(
            vision_config=t.CLIPVisionConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            text_config=t.LlamaConfig(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
            ),
            image_token_index=100,
            image_seq_length=16,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = t.LlavaForConditionalGeneration(config)
        ids = torch.cat(
            [torch.tensor([[1, 5, 7]]), torch.full((1, 16), 100), torch.tensor([[9, 11, 13, 4]])],
            1,
        )
        inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)}
    else:
        raise ValueError(family)
    model.set_attn_implementation("eager")
    return model.eval(), inputs


def twin(model):
    """A deep copy (same weights) to switch to ``"headwise"`` while ``model`` stays eager."""
    return copy.deepcopy(model)


def logits_of(family: str, output) -> torch.Tensor:
    if family == "clip":
        return torch.cat([output.logits_per_image.flatten(), output.text_embeds.flatten()])
    if family in ("bert", "vit"):
        return output.last_hidden_state
    return output.logits
