"""Evaluations that act on whole models (above the integrations, below the CLI): real text for
them in :mod:`~headwise.evals.text`."""

from headwise.evals.text import corpus, passages, token_stream

__all__ = ["corpus", "passages", "token_stream"]
