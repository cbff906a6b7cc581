"""Whole models built from headwise layers (e.g. an unpadded BERT encoder)."""

from headwise.models.bert import BertConfig, BertLayer, BertOutput, UnpaddedBert
from headwise.models.vision import (
    VisionBackbone,
    available_mixers,
    register_mixer,
    vision_backbone,
)

__all__ = [
    "BertConfig",
    "BertLayer",
    "BertOutput",
    "UnpaddedBert",
    "VisionBackbone",
    "available_mixers",
    "register_mixer",
    "vision_backbone",
]
