"""Where each architecture keeps its residual stream: decoder blocks, token embedding, final norm.

One table for the families we know, one generic rule for the rest, and multimodal wrappers
unwrapped to their language model. Every other module goes through these functions instead of
probing attributes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NLAError


@dataclass(frozen=True)
class Family:
    """Module names relative to the text base model (`model.transformer`, `model.model`, ...)."""

    layers: str
    embedding: str
    final_norm: str
    returns_tuple: bool = False  # the block's forward returns (hidden, ...) instead of a Tensor
    scaled_embedding: bool = False  # the embedding module multiplies its rows by sqrt(hidden)


_LLAMA_LIKE = Family("layers", "embed_tokens", "norm")
_GEMMA = Family("layers", "embed_tokens", "norm", scaled_embedding=True)

FAMILIES: dict[str, Family] = {
    "gpt2": Family("h", "wte", "ln_f"),
    "bloom": Family("h", "word_embeddings", "ln_f", returns_tuple=True),
    "gpt_neox": Family("layers", "embed_in", "final_layer_norm"),
    "gpt_neo": Family("h", "wte", "ln_f", returns_tuple=True),
    "falcon": Family("h", "word_embeddings", "ln_f", returns_tuple=True),
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "nemotron": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "phi": Family("layers", "embed_tokens", "final_layernorm"),
    "lfm2": Family("layers", "embed_tokens", "embedding_norm"),  # applied after the last block
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}

# Final-norm names the generic rule accepts for families outside the table.
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


def text_config(config):
    """The language-model part of a config (e.g. `config.text_config` of a multimodal wrapper)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if callable(get_text_config) else config


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (peft keeps the blocks, wraps their linears)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_base(model: nn.Module) -> nn.Module:
    """The decoder stack without LM head: `model.model`, `model.transformer`, or a wrapper's language model."""
    base = causal_lm(model)
    for _ in range(4):  # CausalLM → base model → multimodal model → language model
        language_model = getattr(base, "language_model", None)
        if isinstance(language_model, nn.Module) and language_model is not base:
            base = language_model
            continue
        inner = getattr(base, "base_model", base)
        if inner is base:
            return base
        base = inner
    return base


def model_type(model: nn.Module) -> str:
    return text_config(causal_lm(model).config).model_type


def family(model: nn.Module) -> Family | None:
    return FAMILIES.get(model_type(model))


def _submodule(base: nn.Module, name: str, what: str, model: nn.Module) -> nn.Module:
    try:
        return base.get_submodule(name)
    except AttributeError:
        raise NLAError(
            f"{model_type(model)}: no {what} at {type(base).__name__}.{name} (the family table in "
            "nla_universal/models/arch.py expects it there)",
            "this transformers version renamed the module: update the table entry",
        ) from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order."""
    base = text_base(model)
    known = family(model)
    if known is not None:
        return _submodule(base, known.layers, "decoder blocks", model)
    n_layers = text_config(causal_lm(model).config).num_hidden_layers
    found = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise NLAError(
            f"cannot find the decoder blocks of {type(causal_lm(model)).__name__} (model_type "
            f"{model_type(model)!r}): looked for the one nn.ModuleList of length num_hidden_layers="
            f"{n_layers} under {type(base).__name__}, found {[name for name, _ in found] or 'none'}",
            "add the family to FAMILIES in nla_universal/models/arch.py",
        )
    return found[0][1]


def input_embedding(model: nn.Module) -> nn.Module:
    """The token embedding whose output rows enter block 0 (Gemma-style: already scaled)."""
    known = family(model)
    if known is not None:
        return _submodule(text_base(model), known.embedding, "token embedding", model)
    return causal_lm(model).get_input_embeddings()


def embed_scale(model: nn.Module) -> float:
    """The factor the embedding module applies to its rows (sqrt(hidden) for gemma*, else 1.0)."""
    module = input_embedding(model)
    scale = getattr(module, "embed_scale", None)
    known = family(model)
    if known is not None and known.scaled_embedding and scale is None:
        raise NLAError(
            f"{model_type(model)}: the embedding {type(module).__name__} has no embed_scale",
            "transformers moved the Gemma scaling: update embed_scale in nla_universal/models/arch.py",
        )
    return 1.0 if scale is None else float(scale)


def _final_norm_name(model: nn.Module) -> str:
    known = family(model)
    if known is not None:
        return known.final_norm
    children = dict(text_base(model).named_children())
    names = [n for n in _NORM_NAMES if n in children]
    if len(names) != 1:
        raise NLAError(
            f"cannot find the final norm of model_type {model_type(model)!r}: looked for exactly one "
            f"of {_NORM_NAMES} among {sorted(children)}",
            "add the family to FAMILIES in nla_universal/models/arch.py",
        )
    return names[0]


def strip_head(model: nn.Module) -> None:
    """Replace the final norm and the LM head by identities: the model then outputs the residual stream."""
    base = text_base(model)
    name = _final_norm_name(model)
    _submodule(base, name, "final norm", model)
    parent, _, leaf = name.rpartition(".")
    setattr(base.get_submodule(parent) if parent else base, leaf, nn.Identity())
    lm = causal_lm(model)
    lm.set_output_embeddings(nn.Identity())
    # Gemma 2/3/4 squash the head's output with tanh(x / cap) * cap, which would now bend the residual.
    for config in (lm.config, text_config(lm.config)):
        if getattr(config, "final_logit_softcapping", None) is not None:
            config.final_logit_softcapping = None


def block_hidden(output) -> torch.Tensor:
    """The hidden states in a block's output, whether it returns a Tensor or (hidden, ...)."""
    return output[0] if isinstance(output, tuple) else output
