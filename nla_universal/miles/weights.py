"""The AV's LoRA under Miles' FSDP actor: what SGLang receives after each update, and what the bundle keeps.

SGLang serves the plain trunk (`--hf-checkpoint`), so Miles' weight updater must send it plain Hugging
Face tensors: `MergedLoraView` is what the updater reads as `self.model` — every LoRA-adapted weight
merged (W + scaling·B·A, transposed for fan-in-fan-out layers like GPT-2's Conv1D), LoRA tensors left
out, peft's names mapped back to the trunk's. It is lazy (one merged tensor at a time, gathered from
the FSDP shards on every rank in the same order, as the updater's own gathers are).

The bundle keeps the adapter itself: `save_gathered_adapter` gathers the LoRA tensors on every rank
and writes, from rank 0, the folder `nla.lora.save_adapter` would write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from ..errors import ConfigError
from ..nla.lora import save_adapter

PREFIX = "base_model.model."


def hf_name(peft_name: str) -> str:
    """`base_model.model.X.base_layer.weight` -> `X.weight` (the trunk's own parameter name)."""
    return peft_name.removeprefix(PREFIX).replace(".base_layer.", ".")


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (possibly FSDP-sharded) parameter; a collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    from miles.backends.fsdp_utils.dtensor import gather_full_param

    return gather_full_param(tensor)


class _Items:
    """A state dict read once, lazily: what `UpdateWeight.update_weights` iterates with `.items()`."""

    def __init__(self, produce: Callable[[], Iterator[tuple[str, torch.Tensor]]]):
        self.produce = produce

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.produce()


class MergedLoraView:
    """`state_dict()`, `config` and `_fsdp_sync_dtypes` of the trunk with the adapter merged (see the module docstring)."""

    def __init__(self, model: PeftModel, adapter: str = "default"):
        self.model, self.adapter = model, adapter
        self.config = model.config
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        dora = [n for n, m in self.layers.items() if m.use_dora.get(adapter)]
        if dora:
            raise ConfigError(f"the AV adapter uses DoRA ({dora[0]}): its merged weight is not W + scaling·B·A",
                              "train the AV with plain LoRA (nla_universal.nla.lora.LoraSettings)")
        sync = getattr(model, "_fsdp_sync_dtypes", None)
        self._fsdp_sync_dtypes = None if sync is None else {hf_name(k): v for k, v in sync.items() if not _is_lora(k)}

    def state_dict(self) -> _Items:
        return _Items(self._merged)

    def _merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            if _is_lora(name):
                continue
            owner = name.removesuffix(".base_layer.weight")
            if owner != name and owner in self.layers:
                tensor = self._merge(self.layers[owner], tensor)
            yield hf_name(name), tensor

    def _merge(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        full = local(weight)
        a = local(layer.lora_A[self.adapter].weight).float()
        b = local(layer.lora_B[self.adapter].weight).float()
        delta = (b @ a) * layer.scaling[self.adapter]
        if layer.fan_in_fan_out:
            delta = delta.T
        return (full.float() + delta.to(full.device)).to(full.dtype)


def save_gathered_adapter(model: PeftModel, folder: str | Path, write: bool, adapter: str = "default") -> None:
    """The adapter's tensors gathered on every rank (call on all of them); the rank with `write` saves the folder."""
    state = {k: local(v).detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    if write:
        save_adapter(model, adapter, folder, state=state)
