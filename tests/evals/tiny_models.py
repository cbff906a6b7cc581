"""A tiny random Llama attached to headwise, for the evaluation harness's mechanics tests."""

import pytest
import torch

from headwise.hf import attach

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # logits far apart: teacher forcing and greedy decoding then never split on a near-tie
        initializer_range=0.2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    attach(model)
    return model
