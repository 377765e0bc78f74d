"""Which torch device a run uses, named once for every stage and layer."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available", "use device=cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", "use cpu, cuda, cuda:N or auto") from None


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls run natively (GPU support, or a CPU with avx512_bf16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
