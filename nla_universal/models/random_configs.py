"""Tiny random-weight configs, one per architecture family: fast tests of everything model-specific.

Recipe: hidden 64, 3 blocks, 4 heads (2 KV heads where the family has them), MLP 128, the SmolLM2
tokenizer's vocabulary (49,152) and tied embeddings, plus the keys each family needs to build.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import ConfigError

VOCAB_SIZE = 49152

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB_SIZE,
    tie_word_embeddings=True,
)

# Without head_dim these families keep their default of 256 whatever the hidden size.
_HEAD_DIM = dict(head_dim=16)

PER_FAMILY: dict[str, dict] = {
    "gpt2": dict(n_inner=128),
    "bloom": {},
    "gpt_neox": {},
    "gpt_neo": {},
    "qwen2": {},
    "qwen3": _HEAD_DIM,
    "llama": {},
    "mistral": _HEAD_DIM,
    "gemma": _HEAD_DIM,
    "gemma2": dict(_HEAD_DIM, sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(_HEAD_DIM, sliding_window=8, query_pre_attn_scalar=16),
    "phi": {},
    "phi3": {},
    "nemotron": _HEAD_DIM,
    "lfm2": dict(block_auto_adjust_ff_dim=False, block_ff_dim=128),
    "stablelm": {},
    "falcon": dict(new_decoder_architecture=False, multi_query=True),
}

RANDOM_MODEL_TYPES = tuple(PER_FAMILY)


def _alternating(n_layers: int, even: str, odd: str) -> list[str]:
    return [even if i % 2 == 0 else odd for i in range(n_layers)]


def _per_layer_keys(model_type: str, n_layers: int) -> dict:
    """Per-block settings that must match the block count; alternating so both kinds get tested."""
    if model_type == "gpt_neo":
        pairs = [[["global", "local"], n_layers // 2]] if n_layers > 1 else []
        return {"attention_types": pairs + ([[["global"], 1]] if n_layers % 2 else [])}
    if model_type == "gemma3_text":
        return {"layer_types": _alternating(n_layers, "sliding_attention", "full_attention")}
    if model_type == "lfm2":
        return {"layer_types": _alternating(n_layers, "conv", "full_attention")}
    return {}


def random_recipe(model_type: str, overrides: dict | None = None) -> dict:
    """The config keys of a tiny `model_type`, with `overrides` on top (canonical key names)."""
    if model_type not in PER_FAMILY:
        raise ConfigError(
            f"no tiny random recipe for model_type {model_type!r}",
            f"use one of: {', '.join(RANDOM_MODEL_TYPES)}",
        )
    # Canonical names (gpt2: n_layer, not num_hidden_layers) so an override of either alias wins.
    alias = CONFIG_MAPPING[model_type].attribute_map

    def canonical(part: dict) -> dict:
        return {alias.get(k, k): v for k, v in part.items()}

    base = {**canonical(COMMON), **canonical(PER_FAMILY[model_type])}
    extra = canonical(dict(overrides or {}))
    n_layers = {**base, **extra}[alias.get("num_hidden_layers", "num_hidden_layers")]
    return {**base, **_per_layer_keys(model_type, n_layers), **extra}


def random_config(model_type: str, overrides: dict | None = None, token_ids: dict | None = None):
    """A transformers config for a tiny `model_type`; `token_ids` sets bos/eos/pad to the tokenizer's."""
    recipe = random_recipe(model_type, overrides)
    try:
        return AutoConfig.for_model(model_type, **{**(token_ids or {}), **recipe})
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"random {model_type}: the recipe with random_overrides {dict(overrides or {})} is not a valid "
            f"config: {str(exc).splitlines()[0]}",
            "fix or remove the offending random_overrides keys",
        ) from None
