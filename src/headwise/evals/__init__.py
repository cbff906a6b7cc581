"""Evaluations that act on whole models (above the integrations, below the CLI): real text for
them in :mod:`~headwise.evals.text`, real models in :mod:`~headwise.evals.models`."""

from headwise.evals.models import smollm2_for_eval
from headwise.evals.text import corpus, passages, token_stream

__all__ = ["corpus", "passages", "smollm2_for_eval", "token_stream"]
