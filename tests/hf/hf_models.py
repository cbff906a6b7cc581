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
#: every family the identity test runs: each one the registry serves, with padding where it has text
ALL_FAMILIES = (
    *FAMILIES,
    "mistral",
    "gemma2",
    "qwen2",
    "gpt2",
    "roberta",
    "t5",
)


def _decoder_config(config_class, **extra):
    """A 2-layer decoder whose sliding window (4, where the family has one) is shorter than the
    12-token inputs, so that the window really hides keys."""
    return config_class(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )


def _padded_ids(left: bool = True, low: int = 0):
    """``(2, 12)`` token ids and a mask with 3 padding tokens in row 1 (left or right)."""
    ids = torch.randint(low, 128, (2, 12))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, 9:] = 0
    return ids, mask


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    t = transformers
    if family in ("mistral", "gemma2", "qwen2"):
        if family == "mistral":
            config = _decoder_config(t.MistralConfig, sliding_window=4)
            model = t.MistralForCausalLM(config)
        elif family == "gemma2":
            # softcap 1 (not 50) so that tanh really bends the tiny model's scores; layers
            # alternate sliding window and full attention
            config = _decoder_config(
                t.Gemma2Config,
                head_dim=16,
                sliding_window=4,
                attn_logit_softcapping=1.0,
                query_pre_attn_scalar=24,
            )
            model = t.Gemma2ForCausalLM(config)
            with torch.no_grad():  # scores of order 1, where tanh bends
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(10)
                    layer.self_attn.k_proj.weight.mul_(10)
        else:
            config = _decoder_config(
                t.Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1
            )
            model = t.Qwen2ForCausalLM(config)
        ids, mask = _padded_ids(left=True)
        inputs = {"input_ids": ids, "attention_mask": mask}
    elif family == "gpt2":
        config = t.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        model = t.GPT2LMHeadModel(config)
        ids, mask = _padded_ids(left=False)
        inputs = {"input_ids": ids, "attention_mask": mask}
    elif family == "roberta":
        config = t.RobertaConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            pad_token_id=1,
        )
        model = t.RobertaModel(config)
        ids, mask = _padded_ids(left=False, low=3)
        inputs = {"input_ids": ids, "attention_mask": mask}
    elif family == "t5":
        config = t.T5Config(
            vocab_size=128,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        model = t.T5ForConditionalGeneration(config)
        ids, mask = _padded_ids(left=False, low=1)
        decoder_ids = torch.randint(1, 128, (2, 7))
        decoder_mask = torch.ones_like(decoder_ids)
        decoder_mask[1, 5:] = 0
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": decoder_ids,
            "decoder_attention_mask": decoder_mask,
        }
    elif family == "llama":
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
    if family in ("bert", "roberta", "vit"):
        return output.last_hidden_state
    return output.logits
