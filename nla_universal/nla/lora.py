"""LoRA on a trunk, with target modules resolved per architecture.

Default targets: every linear layer inside the decoder blocks, found by walking the blocks, so one
rule covers the families whose names differ (Llama-family q,k,v,o,gate,up,down; GPT-2 c_attn,
c_proj, c_fc; GPT-NeoX query_key_value, dense, ...). The embedding and the LM head are never
targeted (vLLM's CPU LoRA path breaks on an adapted embedding, rollout-engines.md §1.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import io
from ..config import opt
from ..errors import ConfigError, DataError
from ..models import decoder_layers


@dataclass
class LoraSettings:
    """A LoRA adapter on a trunk."""

    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = opt(0.05, "dropout on the LoRA input")
    target_modules: Optional[list[str]] = opt(
        None,
        "module names to adapt; None = every linear layer inside the decoder blocks "
        "(q,k,v,o,gate,up,down on Llama-family trunks; c_attn,c_proj,c_fc on GPT-2)",
    )


def block_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the decoder blocks, sorted."""
    names = {name.rpartition(".")[2] for name, m in decoder_layers(model).named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    return sorted(names)


def attach_lora(model: nn.Module, settings: LoraSettings, task_type: str | None) -> PeftModel:
    """`model` wrapped with a fresh LoRA adapter (B = 0, so it starts as the identity update)."""
    present = block_linear_names(model)
    targets = list(settings.target_modules) if settings.target_modules else present
    unknown = sorted(set(targets) - set(present))
    if unknown or not targets:
        raise ConfigError(
            f"LoRA target modules {unknown or targets} are not linear layers of this trunk's decoder blocks",
            f"choose among {present}, or leave target_modules unset",
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in decoder_layers(model).modules()),
    )
    return get_peft_model(model, config)


def load_lora(model: nn.Module, folder: str | Path, trainable: bool = True) -> PeftModel:
    """`model` wrapped with the adapter saved in `folder` (adapter_config.json + adapter_model.safetensors)."""
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
    except Exception as exc:  # peft raises ValueError/KeyError/RuntimeError for a bad adapter
        raise DataError(
            f"cannot load the LoRA adapter in {folder}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
            "the adapter does not fit this trunk: load the bundle with the trunk named in nla_meta.yaml",
        ) from None


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model: PeftModel, name: str, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """One named adapter of a (possibly multi-adapter) model as a standalone peft folder.

    peft's own save writes every adapter, the non-default ones into subfolders; a bundle keeps one per part.
    `state` replaces the model's own adapter tensors (the full ones gathered from FSDP shards)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    with io.atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    model.peft_config[name].save_pretrained(str(folder))  # adapter_config.json, small: written in place


def add_saved_adapter(model: PeftModel, folder: str | Path, name: str, layers: list[int] | None = None) -> None:
    """Add the adapter saved in `folder` to `model` under `name`, optionally only on blocks `layers`
    (an AR adapter saved on a K+1-block trunk, added to the full trunk that also serves the AV)."""
    folder = Path(folder)
    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as exc:  # peft/safetensors raise several types for a bad adapter
        raise DataError(f"cannot read the LoRA adapter in {folder}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                        "re-save the bundle from its training run") from None
    if layers is not None:
        config.layers_to_transform = list(layers)
    config.inference_mode = False
    model.add_adapter(name, config)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if missing:
        raise DataError(f"the adapter in {folder} does not cover {len(missing)} LoRA tensors of this trunk (e.g. {missing[0]})",
                        "load the bundle with the trunk named in nla_meta.yaml")
