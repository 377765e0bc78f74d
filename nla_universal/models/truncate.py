"""A config for the first n blocks of a model, made before any weight is loaded.

Loading a checkpoint with such a config reads only the kept blocks' tensors: the embedding and
blocks 0..n-1 have exactly the checkpoint's weights, so block n-1 computes what it computes in the
full model.
"""

from __future__ import annotations

from ..errors import ConfigError, NLAError
from .arch import text_config


def _layers_key(config) -> str:
    """The real attribute behind `num_hidden_layers` (gpt2: n_layer, gpt_neo: num_layers)."""
    return config.attribute_map.get("num_hidden_layers", "num_hidden_layers")


def truncation_blocker(config) -> str | None:
    """Why a config cannot be cut to fewer blocks, or None when it can."""
    tc = text_config(config)
    if getattr(tc, "hidden_size_per_layer_input", None):
        return (
            f"{tc.model_type} feeds every block a slice of one per-layer-input embedding sized for all "
            f"{tc.num_hidden_layers} blocks"
        )
    if getattr(tc, "num_kv_shared_layers", 0):
        return f"{tc.model_type}'s last {tc.num_kv_shared_layers} blocks reuse the KV cache of earlier blocks"
    return None


def _cut(d: dict, layers_key: str, num_blocks: int) -> dict:
    """Config dict of one (text) config with per-layer entries cut to the first num_blocks."""
    n_layers = d[layers_key]
    out = dict(d)
    out[layers_key] = num_blocks
    for key, value in d.items():
        # Per-layer lists (layer_types, attention_layers, ...) have one entry per block; a list of
        # token ids or architecture names can only match that length by accident.
        per_layer = key != "architectures" and not key.endswith(("_token_id", "_token_ids"))
        if per_layer and isinstance(value, (list, tuple)) and len(value) == n_layers:
            out[key] = list(value[:num_blocks])
    overrides = d.get("per_layer_config")
    if overrides:
        out["per_layer_config"] = {k: v for k, v in overrides.items() if int(k) < num_blocks}
    if d.get("model_type") == "gpt_neo":
        # gpt_neo derives attention_layers from this run-length form; rebuild it from the kept layers.
        out["attention_types"] = [[[kind], 1] for kind in out["attention_layers"]]
    return out


def truncated_config(config, num_blocks: int):
    """A copy of `config` with only the first `num_blocks` decoder blocks (and their per-layer settings)."""
    tc = text_config(config)
    n_layers = tc.num_hidden_layers
    if not 1 <= num_blocks <= n_layers:
        raise ConfigError(f"cannot keep {num_blocks} blocks of a {n_layers}-block model", f"use 1..{n_layers}")
    blocker = truncation_blocker(config)
    if blocker is not None:
        raise NLAError(f"cannot truncate by config: {blocker}", "load the full model (num_blocks=None)")
    full = config.to_dict()
    if tc is config:
        cut = _cut(full, _layers_key(config), num_blocks)
    else:
        key = next(k for k in full if getattr(config, k, None) is tc)  # usually "text_config"
        cut = dict(full, **{key: _cut(full[key], _layers_key(tc), num_blocks)})
    return type(config).from_dict(cut)
