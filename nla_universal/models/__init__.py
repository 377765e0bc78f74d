"""Pooled models: load any source, find the residual stream, run only the blocks that are needed."""

from .arch import FAMILIES, decoder_layers, embed_scale, input_embedding, strip_head, text_config
from .forward import content_mask, forward_to_layer
from .loading import LoadedModel, describe_model, load_model, load_tokenizer, resolve_layer
from .random_configs import RANDOM_MODEL_TYPES
from .sources import PACKAGED, model_folder
from .truncate import truncated_config

__all__ = [
    "FAMILIES",
    "PACKAGED",
    "RANDOM_MODEL_TYPES",
    "LoadedModel",
    "content_mask",
    "decoder_layers",
    "describe_model",
    "embed_scale",
    "forward_to_layer",
    "input_embedding",
    "load_model",
    "load_tokenizer",
    "model_folder",
    "resolve_layer",
    "strip_head",
    "text_config",
    "truncated_config",
]
