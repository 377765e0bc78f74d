"""Scoring predictions per tag on the test split, with baselines and controls beside every number.

`score_tag` is the one place a prediction becomes a score: all metrics, bootstrap intervals and the
paired difference to each control (so "above shuffled_z" comes with an interval). The linear-ceiling
path (`nla-universal eval --predictor linear`) scores dec_M(enc_M(h)) — no text bottleneck — for every
tag; the NLA path reuses `score_tag` and `write_report` with AR predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from .activations import read_activations
from .adapters import PoolAdapters, encode_rows
from .config import PoolConfig
from .corpus import read_passages, split_ids
from .errors import DataError
from .metrics import (
    all_metrics,
    bootstrap_ci,
    derangement,
    distinct_share,
    mean_predictor,
    normalised_mean,
    paired_bootstrap_diff,
    shuffled,
)
from .report import write_report

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
    """dec_M(n(enc_M(n(h)))): the reconstruction with no text bottleneck."""
    v = encode_rows(adapters, tag, h_test)
    with torch.no_grad():
        return adapters.decode(tag, torch.as_tensor(v, dtype=torch.float32)).double().numpy()


def _rows(acts, ids: list[str]) -> np.ndarray:
    index = {p: i for i, p in enumerate(acts.passage_ids)}
    return acts.X[[index[p] for p in ids if p in index]]


def evaluate_linear_ceiling(
    activations_root: str | Path,
    passages: str | Path | pa.Table,
    pool: PoolConfig,
    adapters_folder: str | Path,
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Score the linear ceiling of every pooled tag on the TEST split; write fve_report.* to out_dir.

    Returns {"results": tag → score_tag dict, "files": name → path written}.
    """
    table = passages if isinstance(passages, pa.Table) else read_passages(passages)
    test_ids, train_ids = split_ids(table, "test"), split_ids(table, "train")
    if not test_ids:
        raise DataError("the passages hold no test split", "rebuild passages.parquet with test_fraction > 0")
    adapters = PoolAdapters.load(adapters_folder, expect_tags=pool.tags)
    results = {}
    for tag in tqdm(pool.tags, desc="linear ceiling", unit="tag"):
        acts = read_activations(activations_root, tag)
        if acts.d != adapters.dims[tag]:
            raise DataError(f"{tag}: activations have d={acts.d}, adapters expect {adapters.dims[tag]}",
                            "refit the adapters on these activations")
        gold, train = _rows(acts, test_ids), _rows(acts, train_ids)
        if len(gold) < 2 or len(train) == 0:
            raise DataError(f"{tag}: {len(gold)} test and {len(train)} train rows have activations",
                            f"extract {tag} on the same passages.parquet")
        predict = lambda h, tag=tag: linear_ceiling_predictions(adapters, tag, h)  # noqa: E731
        control = shuffled(predict, gold, derangement(len(gold), seed))
        results[tag] = score_tag(gold, predict(gold), normalised_mean(train), {"shuffled_z": control},
                                 n_boot=n_boot, seed=seed)
    note = ("Predictor: the linear ceiling dec_M(enc_M(h)) through the anchor's space, no text bottleneck. "
            "Here `shuffled_z` is the same map applied to another passage's activation.")
    files = write_report(
        results, out_dir,
        title="Linear ceiling — test split",
        held_out={m.tag: m.held_out for m in pool.models},
        random_weights={m.tag: m.source == "random" for m in pool.models},
        extra_md=note,
    )
    return {"results": results, "files": files}
