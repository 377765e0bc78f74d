"""The injection on Miles' packed training sequences, through the AV's own injection function.

Miles' FSDP trainer packs a micro-batch into one row `[1, T]` (`--qkv-format thd`): several samples
back to back, so the row holds several markers and `nla.injection.inject` (one marker per row, both
neighbours checked) cannot take it whole. Each sample's marker position comes with the batch
(`nla_vec_positions`, shifted by Miles to the packed offsets), so `inject_packed` cuts a 3-token
window around each position — marker and both neighbours — and hands the windows to `inject` as a
batch of rows: the same checks, the same input map (`AV.input_rows`), the same rescaling to
`injection_scale`; the injected rows are then written back into the packed embedding output.

Why a hook on the embedding module rather than `inputs_embeds` built in `_get_model_inputs_args`:
under FSDP2 the embedding weight is a sharded DTensor (on the CPU with offload) outside the model's
forward. The hook runs inside it, before FSDP's own post-forward hook (`prepend=True`), while the
weight is gathered on the compute device, as `AV.logits` injects through `injecting`.
"""

from __future__ import annotations

import torch

from ..nla.av import AV
from ..nla.injection import InjectionError, inject

FIX = ("let Miles carry each sample's vector and marker position from our data source and generate hook "
       "(nla_vec, nla_vec_positions), with --qkv-format thd")


def inject_packed(embeds: torch.Tensor, input_ids: torch.Tensor, vectors: torch.Tensor, positions: torch.Tensor,
                  av: AV) -> torch.Tensor:
    """A copy of the packed embedding output `[1, T, d]` whose marker rows at `positions` `[n]` hold
    `vectors` `[n, d_shared]` through the AV's input map, at `injection_scale`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InjectionError(f"packed ids of shape {tuple(input_ids.shape)}, expected [1, T]", FIX)
    ids = input_ids[0]
    positions = positions.to(ids.device).long().reshape(-1)
    markers = int((ids == av.marker.token_id).sum())
    if markers != positions.numel() or vectors.shape[0] != positions.numel():
        raise InjectionError(f"the packed micro-batch holds {markers} markers, {positions.numel()} marker positions and "
                             f"{vectors.shape[0]} vectors; each sample needs exactly one of each", FIX)
    if ((positions < 1) | (positions > ids.numel() - 2)).any():
        raise InjectionError(f"marker positions {positions.tolist()} fall outside the packed row of {ids.numel()} tokens", FIX)
    cols = positions[:, None] + torch.arange(-1, 2, device=ids.device)
    windows = inject(embeds[0][cols], ids[cols], av.input_rows(vectors, positions.numel()), av.marker, av.injection_scale)
    out = embeds.clone()
    out[0, positions] = windows[:, 1]
    return out


class PackedInjection:
    """Forward hook on an embedding module: injects the vectors armed for the next forward.

    `arm` is called by `_get_model_inputs_args` right before each policy, reference or training
    forward, and one forward uses what was armed. A forward with nothing armed is refused: an AV
    forward without its vectors would train on prompts that say nothing."""

    def __init__(self, av: AV):
        self.av = av
        self.armed: tuple[torch.Tensor, torch.Tensor] | None = None

    def arm(self, vectors: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        self.armed = None if vectors is None or positions is None else (vectors, positions)

    def attach(self, embedding: torch.nn.Module):
        return embedding.register_forward_hook(self._hook, with_kwargs=True, prepend=True)

    def _hook(self, module, args, kwargs, output):
        if self.armed is None:
            raise InjectionError("an AV forward ran without activation vectors (no nla_vec in the batch)", FIX)
        if self.av.input_map is not None:
            self.av.input_map.to(output.device)  # follows the model between GPU and CPU offload
        input_ids = args[0] if args else next(iter(kwargs.values()))
        armed, self.armed = self.armed, None
        out = inject_packed(output, input_ids, *armed, self.av)
        if torch.is_grad_enabled() and not out.requires_grad:
            # the embedding is frozen: without this, reentrant activation checkpointing
            # (--gradient-checkpointing) would cut the LoRA tensors off from the loss
            out.requires_grad_(True)
        return out
