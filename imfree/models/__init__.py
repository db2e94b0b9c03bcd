"""open_clip backbones: loading, the tiny test configs, global and dense features."""

from imfree.models.backbones import TINY_MODELS, Backbone, Preprocess, load_backbone
from imfree.models.features import (
    TextFeatures,
    encode_image_dense,
    encode_prompt_embeddings,
    encode_text_tokens,
)

__all__ = [
    "TINY_MODELS",
    "Backbone",
    "Preprocess",
    "TextFeatures",
    "encode_image_dense",
    "encode_prompt_embeddings",
    "encode_text_tokens",
    "load_backbone",
]
