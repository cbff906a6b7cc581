"""A Hugging Face model run context-parallel on 2 gloo processes equals the single-process model."""

from __future__ import annotations

import pytest
import torch

from headwise.distributed import launch

transformers = pytest.importorskip("transformers")

SEQ_LEN = 12  # divisible by 2 * world: no padding, which HF inputs cannot carry through a ring


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _worker(rank, world):
    from headwise import hf
    from headwise.distributed import hf_context_parallel, shard_positions, shard_sequence

    model = _tiny_llama()
    hf.attach(model)
    ids = torch.randint(0, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        positions = shard_positions(SEQ_LEN, world, rank)
        with hf_context_parallel(model, seq_len=SEQ_LEN):
            local = model(
                input_ids=shard_sequence(ids), position_ids=positions[None].expand(2, -1)
            ).logits
    return float((local - full[:, positions]).abs().max())


def test_llama_context_parallel_equals_single_process():
    results = launch(_worker, 2, group_timeout=60, timeout=180)
    errors = [r.value for r in results]
    assert max(errors) < 1e-5, errors
