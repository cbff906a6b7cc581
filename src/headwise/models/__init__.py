"""Whole models built from headwise layers (e.g. an unpadded BERT encoder)."""

from headwise.models.bert import BertConfig, BertLayer, BertOutput, UnpaddedBert

__all__ = ["BertConfig", "BertLayer", "BertOutput", "UnpaddedBert"]
