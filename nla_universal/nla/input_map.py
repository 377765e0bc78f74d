"""The AV's input map: a shared vector v → the row injected at the marker, `W v + b` in the trunk's
token-embedding space.

Why: injected raw, a vector is a point the embedding layer never produces, and a small AV trained
for tens of steps learns to ignore it (vector_gain ≈ 0, measured: README, "Why, measured"). Mapped
by ridge least squares onto the mean embedding of its explanation's words (the "bag"), it lands
where the embedding layer already means something, and the trunk reads it from the first steps.
The map is applied on the trainer side before injection (`AV.input_rows`), so every engine that
takes prompt embeddings serves it unchanged; held-out models reach it through their own enc_M.
Its λ is chosen on val with the project's solver; the fit report says how much of the bag it explains
(val FVE, true vs shuffled vectors) — part of the reading is the map's, hence the map-alone control.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import io
from ..errors import DataError
from ..heads import WORD
from ..lstsq import fit_linear_path
from ..metrics import derangement

log = logging.getLogger(__name__)

INPUT_MAP_FILE = "input_map.safetensors"
# × mean(diag VᵀV): v has ~d features and a few hundred train rows. It reaches 100 because the default
# quickstart's passage vectors chose 10, the top of the earlier grid (val FVE −0.03 at 1, +0.012 at 10).
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


class InputMap(nn.Module):
    """`W v + b`: [d_shared] → [d_embed]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight.float())
            self.linear.bias.copy_(bias.float())

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.linear(v.to(self.linear.weight.dtype))

    def save(self, folder: str | Path) -> None:
        tensors = {"weight": self.linear.weight.detach().float().cpu().contiguous(),
                   "bias": self.linear.bias.detach().float().cpu().contiguous()}
        with io.atomic_path(Path(folder) / INPUT_MAP_FILE) as tmp:
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, folder: str | Path, d_shared: int, d_embed: int) -> "InputMap":
        path = Path(folder) / INPUT_MAP_FILE
        fix = "re-save the bundle from its training run (or copy the folder again, whole)"
        try:
            state = load_file(str(path))
            weight, bias = state["weight"], state["bias"]
        except FileNotFoundError:
            raise DataError(f"{path} is missing, but nla_meta.yaml records an input map", fix) from None
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise DataError(f"corrupt input map {path}: {type(exc).__name__}: {exc}", fix) from None
        if tuple(weight.shape) != (d_embed, d_shared) or tuple(bias.shape) != (d_embed,):
            raise DataError(f"{path}: weight {tuple(weight.shape)}, bias {tuple(bias.shape)}; expected ({d_embed}, {d_shared})",
                            fix)
        return cls(weight, bias)


def words(text: str) -> list[str]:
    """The distinct words of a text (lower-case, 3+ characters), sorted: the bag's vocabulary."""
    return sorted(set(WORD.findall(text.lower())))


def bag_embedding(tokenizer, embedding: nn.Module, text: str) -> torch.Tensor:
    """Mean output row of the embedding module (scaled where it scales) over the tokens of `text`'s words."""
    ids = [i for w in words(text) for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
    ids = ids or tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"explanation {text!r} has no tokens", "drop empty explanations before fitting the input map")
    device = next(embedding.parameters()).device
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=device)).float().mean(0).cpu()


def bag_targets(tokenizer, embedding: nn.Module, texts: Sequence[str]) -> np.ndarray:
    return torch.stack([bag_embedding(tokenizer, embedding, t) for t in texts]).double().numpy()


def _fve(Y: np.ndarray, P: np.ndarray, mu: np.ndarray) -> float:
    return float(1.0 - ((Y - P) ** 2).sum() / ((Y - mu) ** 2).sum())


def fit_input_map(V: np.ndarray, Y: np.ndarray, V_val: np.ndarray, Y_val: np.ndarray,
                  ridge_grid: Sequence[float] = RIDGE_GRID) -> tuple[InputMap, dict]:
    """Ridge least squares Y ≈ V Wᵀ + b (intercept), λ chosen by val FVE of the bag; report with the
    shuffled-vector control (val bags predicted from other passages' vectors)."""
    if len(V) < 8 or len(V_val) < 2:
        raise DataError(f"{len(V)} train and {len(V_val)} val explanations to fit the AV's input map",
                        "give the corpus more train passages and a val split")
    fits = fit_linear_path(V, Y, list(ridge_grid), bias=True)
    mu = Y.mean(0)
    scores = [_fve(Y_val, f.predict(V_val), mu) for f in fits]
    best = int(np.argmax(scores))
    if best == len(ridge_grid) - 1 and len(ridge_grid) > 1:  # the val optimum may lie beyond the grid
        log.warning("input map: val chose the largest ridge of the grid (%g); a larger one may fit better", ridge_grid[best])
    fit = fits[best]
    shuffled = _fve(Y_val, fit.predict(V_val[derangement(len(V_val))]), mu)
    report = {"N": len(V), "N_val": len(V_val), "ridge": ridge_grid[best], "ridge_grid": list(ridge_grid),
              "at_top": best == len(ridge_grid) - 1,
              "val_fve_by_ridge": scores, "val_fve": scores[best], "val_fve_shuffled": shuffled,
              "train_fve": _fve(Y, fit.predict(V), mu), "solver": fit.solver}
    return InputMap(fit.weight, fit.bias), report


def nearest_words(rows: torch.Tensor, vocabulary: Sequence[str], tokenizer, embedding: nn.Module, k: int) -> list[str]:
    """The map alone, read without the AV: for each mapped row, the `k` words of `vocabulary` whose bag
    embedding is nearest (cosine), as a text — the control that shows what the AV adds to the map."""
    bags = torch.stack([bag_embedding(tokenizer, embedding, w) for w in vocabulary])
    sims = nn.functional.normalize(rows.detach().float().cpu(), dim=-1) @ nn.functional.normalize(bags, dim=-1).T
    top = sims.topk(min(k, len(vocabulary)), dim=-1).indices
    return [" ".join(vocabulary[int(j)] for j in row) for row in top]
