"""The FVE family, baselines and bootstrap intervals: pure functions on numpy arrays, rows = passages.

Every metric rescales gold and predicted rows to norm √d of their space (DESIGN.md "Normalisation"),
so a prediction's scale never counts — the AR is trained on a scale-free loss. Arithmetic is float64.

Because predictions are rescaled too, the best constant prediction is n(μ), not μ: it scores
`fve_centred = −(√d − ‖μ‖) / (√d + ‖μ‖)` (≤ 0) on the rows μ was taken from. "Better than predicting
the mean" therefore means "above the mean_predictor column", not merely "above 0".
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .errors import DataError

METRICS = ("fve_meannorm", "fve_centred", "cos", "mse_nrm")


def normalize_rows(X: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Each row rescaled to norm `scale` (default √d); zero rows stay zero."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"expected a 2-D array [rows, d], got shape {X.shape}", "pass one row per passage")
    scale = np.sqrt(X.shape[1]) if scale is None else float(scale)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X * np.divide(scale, norms, out=np.zeros_like(norms), where=norms > 0)


def normalised_mean(X: np.ndarray) -> np.ndarray:
    """μ: the per-dimension mean of the rows at √d (pass the TRAIN rows' μ to score the test split)."""
    return normalize_rows(X).mean(axis=0)


def _pair(gold: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gold, pred = np.asarray(gold), np.asarray(pred)
    if gold.shape != pred.shape or gold.ndim != 2:
        raise DataError(f"gold {gold.shape} and prediction {pred.shape} differ", "score one prediction per gold row")
    if gold.shape[0] == 0:
        raise DataError("nothing to score: 0 rows", "check the split holds passages")
    for name, a in (("gold", gold), ("prediction", pred)):
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        if bad:
            raise DataError(f"{bad} of {a.shape[0]} {name} rows hold NaN/inf", "find the stage that produced them")
    return normalize_rows(gold), normalize_rows(pred)


def _mu(g: np.ndarray, mu: np.ndarray | None) -> np.ndarray:
    if mu is None:
        return g.mean(axis=0)
    mu = np.asarray(mu, dtype=np.float64)
    if mu.shape != (g.shape[1],) or not np.isfinite(mu).all():
        raise DataError(f"mu has shape {mu.shape} (or NaN); expected ({g.shape[1]},)", "pass normalised_mean(train rows)")
    return mu


def _nonzero(variance: float) -> float:
    if variance <= 0:
        raise DataError("the gold rows do not vary: an FVE is undefined", "score more than one distinct passage")
    return variance


def fve_meannorm(gold: np.ndarray, pred: np.ndarray) -> float:
    """The seed's FVE: `1 − var(g − p) / var(g)` over the flattened matrix (≈ 2·cos − 1, see B7)."""
    g, p = _pair(gold, pred)
    return float(1.0 - np.var(g - p) / _nonzero(np.var(g)))


def fve_centred(gold: np.ndarray, pred: np.ndarray, mu: np.ndarray | None = None) -> float:
    """`1 − Σ‖g − p‖² / Σ‖g − μ‖²`; μ defaults to the normalised gold rows' own mean."""
    g, p = _pair(gold, pred)
    return float(1.0 - ((g - p) ** 2).sum() / _nonzero(((g - _mu(g, mu)) ** 2).sum()))


def cosine(gold: np.ndarray, pred: np.ndarray) -> float:
    g, p = _pair(gold, pred)
    return float((g * p).sum(axis=1).mean() / g.shape[1])


def mse_nrm(gold: np.ndarray, pred: np.ndarray) -> float:
    """Mean over rows of mean_d (n(g) − n(p))²; equals 2(1 − cos) when no row is zero."""
    g, p = _pair(gold, pred)
    return float(((g - p) ** 2).mean())


def all_metrics(gold: np.ndarray, pred: np.ndarray, mu: np.ndarray | None = None) -> dict[str, float]:
    return {
        "fve_meannorm": fve_meannorm(gold, pred),
        "fve_centred": fve_centred(gold, pred, mu),
        "cos": cosine(gold, pred),
        "mse_nrm": mse_nrm(gold, pred),
    }


def mean_predictor(gold: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The prediction "always μ", one row per gold row."""
    return np.broadcast_to(np.asarray(mu, dtype=np.float64), np.shape(gold)).copy()


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A uniformly drawn permutation with no fixed point: row i is paired with another passage."""
    if n < 2:
        raise DataError(f"cannot pair {n} passage(s) with other passages", "score at least 2 test passages")
    rng = np.random.default_rng(seed)
    while True:  # rejection: about e tries on average
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def shuffled(pred_fn: Callable[[Any], Any], inputs: Sequence[Any] | np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Predictions where row i is predicted from input `permutation[i]` (another passage's z or h)."""
    permutation = np.asarray(permutation)
    if isinstance(inputs, np.ndarray):
        permuted: Any = inputs[permutation]
    else:
        permuted = [inputs[int(j)] for j in permutation]
    return np.asarray(pred_fn(permuted), dtype=np.float64)


def distinct_share(texts: Sequence[str]) -> float:
    """Share of distinct explanations after strip/lower — near 1/N means the AV collapsed."""
    if len(texts) == 0:
        raise DataError("no explanations to count", "generate z for the scored passages first")
    return len({t.strip().lower() for t in texts}) / len(texts)


# Bootstrap: each metric is a ratio of sums of per-row statistics, so a resample is a count vector
# over rows and all resamples are one matrix product (counts [B, N] @ row stats [N, ...]).


def _row_stats(gold: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    g, p = _pair(gold, pred)
    diff = g - p
    return {
        "g": g,
        "err": (diff**2).sum(axis=1),
        "diff_sum": diff.sum(axis=1),
        "g_sq": (g**2).sum(axis=1),
        "g_sum": g.sum(axis=1),
        "dot": (g * p).sum(axis=1),
    }


def _weighted(name: str, s: dict[str, np.ndarray], w: np.ndarray, mu: np.ndarray | None) -> np.ndarray:
    """Metric `name` for each row of weights w [B, N] (row sums = N); w = ones reproduces the point value."""
    n, d = s["g"].shape
    if name == "fve_centred":
        if mu is None:  # μ is re-estimated inside each resample: Σ w‖g − μ_w‖² = Σ w‖g‖² − N‖μ_w‖²
            mu_w = w @ s["g"] / n
            den = w @ s["g_sq"] - n * (mu_w**2).sum(axis=1)
        else:
            den = w @ ((s["g"] - _mu(s["g"], mu)) ** 2).sum(axis=1)
        return 1.0 - (w @ s["err"]) / den
    if name == "fve_meannorm":
        nd = n * d
        var_diff = (w @ s["err"]) / nd - ((w @ s["diff_sum"]) / nd) ** 2
        var_gold = (w @ s["g_sq"]) / nd - ((w @ s["g_sum"]) / nd) ** 2
        return 1.0 - var_diff / var_gold
    if name == "cos":
        return (w @ s["dot"]) / (n * d)
    if name == "mse_nrm":
        return (w @ (s["err"] / d)) / n
    raise ValueError(f"no bootstrap for metric {name!r}; use one of {METRICS}")


def _metric_name(metric: str | Callable) -> str:
    names = {fve_centred: "fve_centred", fve_meannorm: "fve_meannorm", cosine: "cos", mse_nrm: "mse_nrm"}
    return metric if isinstance(metric, str) else names.get(metric, getattr(metric, "__name__", "?"))


def _resample_counts(n: int, n_boot: int, seed: int, chunk: int = 100):
    """Yield count matrices [≤chunk, n]: how often each row is drawn in each resample."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + np.arange(b)[:, None] * n
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _bootstrap(gold, preds, metric, n_boot, seed, mu) -> list[np.ndarray]:
    name = _metric_name(metric)
    stats = [_row_stats(gold, p) for p in preds]
    out: list[list[np.ndarray]] = [[] for _ in preds]
    for w in _resample_counts(stats[0]["g"].shape[0], n_boot, seed):
        for k, s in enumerate(stats):
            out[k].append(_weighted(name, s, w, mu))
    return [np.concatenate(o) for o in out]


def bootstrap_ci(
    gold: np.ndarray,
    pred: np.ndarray,
    metric: str | Callable = "fve_centred",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    mu: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile interval of `metric` over passages resampled with replacement."""
    (samples,) = _bootstrap(gold, [pred], metric, n_boot, seed, mu)
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_diff(
    gold: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    metric: str | Callable = "fve_centred",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    mu: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """metric(a) − metric(b) on all rows, and its interval with a and b scored on the same resamples."""
    a, b = _bootstrap(gold, [pred_a, pred_b], metric, n_boot, seed, mu)
    lo, hi = np.quantile(a - b, [alpha / 2, 1 - alpha / 2])
    ones = np.ones((1, np.shape(gold)[0]))
    name = _metric_name(metric)
    point = _weighted(name, _row_stats(gold, pred_a), ones, mu) - _weighted(name, _row_stats(gold, pred_b), ones, mu)
    return float(point[0]), float(lo), float(hi)
