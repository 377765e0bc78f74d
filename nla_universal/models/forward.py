"""Run a model only up to the block whose output we want; mark the tokens that carry content."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, NLAError
from .arch import block_hidden, decoder_layers


class _ReachedLayer(Exception):
    """Raised by the capture hook to stop the forward right after the wanted block."""


def forward_to_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """[B, T, d] output of block `layer` (= the full model's hidden_states[layer+1] for every block
    but the last, whose HF hidden state also has the final norm applied). Blocks after `layer`, the
    final norm and the LM head never run; gradients flow back through the blocks that did."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer {layer} is not a block of this model (0..{len(blocks) - 1})", "check the pool's layer")
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append(block_hidden(output))
        raise _ReachedLayer

    handle = blocks[layer].register_forward_hook(capture)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _ReachedLayer:
        pass
    finally:
        handle.remove()
    if not captured:
        raise NLAError(
            f"block {layer} of {type(model).__name__} never ran during the forward",
            "the model's forward bypasses its decoder blocks: add the family to nla_universal/models/arch.py",
        )
    return captured[0]


def content_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """[B, T] True at real tokens that are not special (BOS, EOS, pad or any other special id)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)
