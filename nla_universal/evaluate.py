"""Scoring predictions per tag on the test split, with baselines and controls beside every number.

`score_tag` is the one place a prediction becomes a score: all metrics, bootstrap intervals and the
paired difference to each control (so "above shuffled_z" comes with an interval). Predictions come
from the NLA path (`UniversalNLA`) or, for the linear ceiling, from the adapters alone; the eval stage
(`pipeline/evaluate.py`) reads the run folder and writes the report.
"""

from __future__ import annotations

import numpy as np

from .adapters import PoolAdapters
from .errors import DataError
from .metrics import all_metrics, bootstrap_ci, distinct_share, mean_predictor, paired_bootstrap_diff
from .nla import path

CI_METRICS = ("fve_centred", "fve_meannorm")


def _check(name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape:
        raise DataError(f"{name} has shape {a.shape}, expected {shape}", f"give {name} one row per gold row")
    bad = int((~np.isfinite(a)).reshape(len(a), -1).any(axis=1).sum()) if a.size else 0
    if bad:
        raise DataError(f"{name}: {bad} of {len(a)} rows hold NaN/inf", f"find the stage that produced {name}")
    return a


def score_tag(
    gold_test: np.ndarray,
    pred_test: np.ndarray,
    train_mean: np.ndarray,
    controls: dict[str, np.ndarray],
    *,
    texts: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Every metric for the prediction and each control, CIs, paired differences to each control.

    `train_mean` is μ of the tag's normalised TRAIN rows (`metrics.normalised_mean`); the
    mean_predictor control is built from it. `controls` adds e.g. shuffled_z and linear_ceiling.
    """
    gold = np.asarray(gold_test, dtype=np.float64)
    if gold.ndim != 2 or len(gold) < 2:
        raise DataError(f"gold test rows have shape {gold.shape}; need ≥ 2 rows", "score a non-empty test split")
    gold = _check("gold", gold, gold.shape)
    pred = _check("prediction", pred_test, gold.shape)
    mu = _check("train_mean", train_mean, gold.shape[1:])
    named = {"mean_predictor": mean_predictor(gold, mu)}
    named.update({name: _check(name, p, gold.shape) for name, p in controls.items()})
    scores: dict = {"N": len(gold), "metrics": all_metrics(gold, pred, mu)}
    scores["ci"] = {m: list(bootstrap_ci(gold, pred, m, n_boot, seed, mu=mu)) for m in CI_METRICS}
    scores["controls"] = {name: all_metrics(gold, p, mu) for name, p in named.items()}
    scores["vs_controls"] = {
        name: dict(zip(("diff", "lo", "hi"), paired_bootstrap_diff(gold, pred, p, "fve_centred", n_boot, seed, mu=mu)))
        for name, p in named.items()
    }
    if texts is not None:
        if len(texts) != len(gold):
            raise DataError(f"{len(texts)} explanations for {len(gold)} rows", "pass one z per scored passage")
        scores["distinct_z"] = distinct_share(texts)
    return scores


def linear_ceiling_predictions(adapters: PoolAdapters, tag: str, h_test: np.ndarray) -> np.ndarray:
    """The reconstruction with no text bottleneck: decode(encode(h))."""
    return path.decode(adapters, tag, path.encode(adapters, tag, h_test)).double().numpy()
