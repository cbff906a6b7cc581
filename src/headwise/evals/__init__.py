"""Evaluations that act on whole models (above the integrations, below the CLI): real text for
them in :mod:`~headwise.evals.text`, real models in :mod:`~headwise.evals.models`, long-context
retrieval in :mod:`~headwise.evals.retrieval` and perplexity in
:mod:`~headwise.evals.perplexity`, each under an attention configuration sized for the evaluated
length (:mod:`~headwise.evals.sized`). Zoology's multi-query associative recall, which trains
every sequence mixer from scratch, is in :mod:`~headwise.evals.mqar`."""

from headwise.evals.models import smollm2_for_eval
from headwise.evals.perplexity import PerplexityScore, perplexity, token_nll
from headwise.evals.retrieval import (
    Question,
    RetrievalContext,
    RetrievalScore,
    answer_matches,
    retrieval_accuracy,
    retrieval_contexts,
)
from headwise.evals.sized import sized_swap
from headwise.evals.text import corpus, licenses, passages, token_stream

__all__ = [
    "PerplexityScore",
    "Question",
    "RetrievalContext",
    "RetrievalScore",
    "answer_matches",
    "corpus",
    "licenses",
    "passages",
    "perplexity",
    "retrieval_accuracy",
    "retrieval_contexts",
    "sized_swap",
    "smollm2_for_eval",
    "token_nll",
    "token_stream",
]
