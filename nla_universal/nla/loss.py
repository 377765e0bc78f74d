"""The one reconstruction loss: MSE between vectors rescaled to a common norm (= 2(1 − cos) at √d).

AR SFT trains on it, RL turns it into the reward, evaluation reports it; all call these functions.
"""

from __future__ import annotations

import math

import torch

from .injection import rescale

FAILED_SAMPLE_PENALTY = -2.0  # reward of a sample whose explanation could not be parsed or was truncated


def mse_nrm(pred: torch.Tensor, gold: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Per-row mean squared error of the rows rescaled to `scale` (default √d): [N]."""
    if pred.shape != gold.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(gold.shape)} differ in shape")
    s = math.sqrt(gold.shape[-1]) if scale is None else scale
    return (rescale(pred, s) - rescale(gold, s)).pow(2).mean(dim=-1)


def reward(pred: torch.Tensor, gold: torch.Tensor, ok: torch.Tensor | None = None) -> torch.Tensor:
    """−mse_nrm per sample; samples with ok=False get the fixed penalty."""
    r = -mse_nrm(pred, gold)
    return r if ok is None else torch.where(ok.to(r.device), r, torch.full_like(r, FAILED_SAMPLE_PENALTY))
