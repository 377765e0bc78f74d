"""The one injection path: the marker's row of the embedding OUTPUT is replaced by the activation.

Used by every consumer (AV SFT through a forward hook, policy and reference log-probs, rollout prompt
embeddings, inference), so training and serving see the same rows:

- the marker is found by scanning the ids (never by precomputed positions, which break once
  anything reorders or packs), both neighbour ids are checked, and each row holds exactly one;
- the row is replaced, never added to, on a clone, by the vector rescaled to `scale` with its norm
  taken in fp32 (clamped at 1e-12);
- on Gemma-style scaled embeddings the module's output rows already carry √d; the injected row is
  written after that multiply, so it is never scaled and its norm is exactly `scale`.

No model state lives here: the functions take the embedding module or its output.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import DataError
from .markers import MarkerSpec

NORM_EPS = 1e-12


class InjectionError(DataError):
    """A prompt row without exactly one well-placed marker, or an unusable vector."""


def rescale(vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows rescaled to L2 norm `scale`, in fp32 (the norm is always taken in fp32)."""
    v = vectors.float()
    return v / (v.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS) / scale)


def marker_positions(input_ids: torch.Tensor, marker: MarkerSpec) -> torch.Tensor:
    """The marker's column in each row of `[B, T]` ids; raises unless each row has one, between its neighbours."""
    hits = input_ids == marker.token_id
    counts = hits.sum(dim=1)
    wrong = (counts != 1).nonzero().flatten().tolist()
    if wrong:
        row = wrong[0]
        raise InjectionError(
            f"{len(wrong)} of {input_ids.shape[0]} prompt rows hold the marker id {marker.token_id} "
            f"({marker.char!r}) a number of times other than once (row {row}: {int(counts[row])})",
            "build AV inputs with AV.prompt_ids / AV.build_sft_batch, one marker per sequence",
        )
    pos = hits.int().argmax(dim=1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    inside = (pos > 0) & (pos < input_ids.shape[1] - 1)
    left = input_ids[rows, (pos - 1).clamp_min(0)]
    right = input_ids[rows, (pos + 1).clamp_max(input_ids.shape[1] - 1)]
    bad = (~inside | (left != marker.left_id) | (right != marker.right_id)).nonzero().flatten().tolist()
    if bad:
        row = bad[0]
        raise InjectionError(
            f"row {row}: the marker at column {int(pos[row])} sits between ids {int(left[row])} and "
            f"{int(right[row])}, expected {marker.left_id} and {marker.right_id}",
            "the prompt was not rendered with the bundle's template and tokenizer; rebuild it with AV.prompt_ids",
        )
    return pos


def inject(embeds: torch.Tensor, input_ids: torch.Tensor, vectors: torch.Tensor, marker: MarkerSpec, scale: float) -> torch.Tensor:
    """A copy of the embedding output `[B, T, d]` whose marker rows hold `vectors` `[B, d]` at norm `scale`."""
    if vectors.dim() != 2 or vectors.shape != (embeds.shape[0], embeds.shape[2]):
        raise InjectionError(
            f"vectors have shape {tuple(vectors.shape)}, expected [{embeds.shape[0]}, {embeds.shape[2]}] "
            "(one per prompt row, in the trunk's hidden size)",
            "pass one shared-space vector per prompt",
        )
    if not torch.isfinite(vectors).all():
        raise InjectionError("a vector to inject holds NaN or inf", "check the activations and the encoder")
    pos = marker_positions(input_ids, marker)
    out = embeds.clone()
    out[torch.arange(embeds.shape[0], device=embeds.device), pos] = rescale(vectors, scale).to(out.dtype)
    return out


def embed_and_inject(embedding: nn.Module, input_ids: torch.Tensor, vectors: torch.Tensor, marker: MarkerSpec, scale: float) -> torch.Tensor:
    """Prompt embeddings for `inputs_embeds`: the module's output (scaled where it scales), then `inject`."""
    return inject(embedding(input_ids), input_ids, vectors, marker, scale)


@contextlib.contextmanager
def injecting(embedding: nn.Module, vectors: torch.Tensor, marker: MarkerSpec, scale: float) -> Iterator[None]:
    """While active, every call of `embedding` (a forward on `input_ids`) returns `inject`ed rows."""

    def hook(module, args, kwargs, output):
        input_ids = args[0] if args else next(iter(kwargs.values()))
        return inject(output, input_ids, vectors, marker, scale)

    handle = embedding.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as `generate` does), so padding never shifts a sequence."""
    pos = attention_mask.long().cumsum(dim=-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)
