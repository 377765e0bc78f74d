"""The FVE family pinned on hand-computed cases and on the properties DESIGN.md relies on."""

from __future__ import annotations

import numpy as np
import pytest

from nla_universal import metrics as M
from nla_universal.errors import DataError

SQ2 = np.sqrt(2.0)
GOLD = np.array([[1.0, 0.0], [0.0, 1.0]])  # at √2: [[√2, 0], [0, √2]]
PRED = np.array([[1.0, 1.0], [0.0, 5.0]])  # at √2: [[1, 1], [0, √2]]


def test_hand_computed_values():
    # Σ‖g − p‖² = (√2 − 1)² + 1 = 4 − 2√2 ; μ = (√2/2, √2/2) ; Σ‖g − μ‖² = 2
    assert M.fve_centred(GOLD, PRED) == pytest.approx(SQ2 - 1, abs=1e-12)
    assert M.fve_centred(GOLD, PRED, mu=np.zeros(2)) == pytest.approx(SQ2 / 2, abs=1e-12)  # Σ‖g‖² = 4
    # flattened: var(g) = 1/2, var(g − p) = (10 − 4√2)/16
    assert M.fve_meannorm(GOLD, PRED) == pytest.approx((2 * SQ2 - 1) / 4, abs=1e-12)
    assert M.cosine(GOLD, PRED) == pytest.approx((1 + 1 / SQ2) / 2, abs=1e-12)
    assert M.mse_nrm(GOLD, PRED) == pytest.approx(1 - SQ2 / 2, abs=1e-12)
    assert M.all_metrics(GOLD, PRED) == {
        "fve_meannorm": M.fve_meannorm(GOLD, PRED), "fve_centred": M.fve_centred(GOLD, PRED),
        "cos": M.cosine(GOLD, PRED), "mse_nrm": M.mse_nrm(GOLD, PRED),
    }


def test_normalize_rows():
    X = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    n = M.normalize_rows(X)
    assert n.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), [2.0, 0.0, 2.0])
    np.testing.assert_allclose(n[0], [1.2, 1.6, 0, 0])
    np.testing.assert_allclose(np.linalg.norm(M.normalize_rows(X, scale=5.0), axis=1), [5.0, 0.0, 5.0])


def test_perfect_prediction_is_scale_free():
    rng = np.random.default_rng(0)
    gold = rng.standard_normal((50, 8)) + 2.0
    perfect = M.all_metrics(gold, 3.7 * gold)
    assert perfect["fve_centred"] == pytest.approx(1.0)
    assert perfect["fve_meannorm"] == pytest.approx(1.0)
    assert perfect["cos"] == pytest.approx(1.0)
    assert perfect["mse_nrm"] == pytest.approx(0.0, abs=1e-15)


def test_mean_predictor_scores_at_most_zero_centred_but_high_meannorm():
    # A large common direction (like BOS/sink-inflated mean pools): the seed's metric rewards the
    # constant prediction, the centred one does not (B7).
    rng = np.random.default_rng(1)
    d = 64
    gold = 4.0 * rng.standard_normal(d) + rng.standard_normal((300, d))
    mu = M.normalised_mean(gold)
    const = M.mean_predictor(gold, mu)
    assert const.shape == gold.shape and np.all(const == mu)
    # Predictions are rescaled to √d, so the constant scores exactly −(√d − ‖μ‖)/(√d + ‖μ‖):
    # Σ‖g − n(μ)‖² = Σ‖g − μ‖² + N‖μ − n(μ)‖² and Σ‖g − μ‖² = N(d − ‖μ‖²).
    m = np.linalg.norm(mu)
    assert M.fve_centred(gold, const) == pytest.approx(-(np.sqrt(d) - m) / (np.sqrt(d) + m), rel=1e-10)
    assert M.fve_centred(gold, const) <= 0
    assert M.fve_meannorm(gold, const) > 0.8


def test_meannorm_is_about_two_cos_minus_one():
    # Rows at √d have mean square 1, so var(g) ≈ 1 and var(g − p) ≈ mean‖g − p‖²/d = 2 − 2cos;
    # the approximation needs the flattened means ≈ 0 (true for zero-mean random data, not in general).
    rng = np.random.default_rng(2)
    gold = rng.standard_normal((400, 256))
    pred = gold + 0.8 * rng.standard_normal(gold.shape)
    assert M.fve_meannorm(gold, pred) == pytest.approx(2 * M.cosine(gold, pred) - 1, abs=5e-3)


def test_mse_is_exactly_two_one_minus_cos():
    rng = np.random.default_rng(3)
    gold, pred = rng.standard_normal((100, 32)), rng.standard_normal((100, 32))
    assert M.mse_nrm(gold, pred) == pytest.approx(2 * (1 - M.cosine(gold, pred)), abs=1e-12)


def test_bad_inputs_are_data_errors():
    gold = np.ones((3, 4)) + np.eye(3, 4)
    bad = gold.copy()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="1 of 3 prediction rows"):
        M.fve_centred(gold, bad)
    with pytest.raises(DataError, match="differ"):
        M.cosine(gold, gold[:2])
    with pytest.raises(DataError, match="do not vary"):
        M.fve_centred(np.ones((3, 4)), gold)
    with pytest.raises(DataError, match="mu has shape"):
        M.fve_centred(gold, gold, mu=np.zeros(3))


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 10, 101):
        for seed in range(5):
            perm = M.derangement(n, seed)
            assert sorted(perm) == list(range(n))
            assert not np.any(perm == np.arange(n))
    with pytest.raises(DataError):
        M.derangement(1)


def test_shuffled_pairs_each_row_with_another_input():
    perm = np.array([2, 0, 1])
    texts = ["a", "b", "c"]
    table = {"a": [1.0, 0.0], "b": [2.0, 0.0], "c": [3.0, 0.0]}
    out = M.shuffled(lambda zs: [table[z] for z in zs], texts, perm)
    np.testing.assert_array_equal(out[:, 0], [3.0, 1.0, 2.0])
    arr = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(M.shuffled(lambda h: 2 * h, arr, perm), 2 * arr[perm])


def test_distinct_share():
    assert M.distinct_share(["A cat ", "a cat", "a dog", "x"]) == pytest.approx(0.75)
    with pytest.raises(DataError):
        M.distinct_share([])


def _noisy(n: int, d: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    gold = rng.standard_normal((n, d)) + 1.0
    return gold, gold + noise * rng.standard_normal((n, d))


@pytest.mark.parametrize("metric", ["fve_centred", "fve_meannorm", "cos", "mse_nrm"])
@pytest.mark.parametrize("mu_kind", ["own", "train"])
def test_vectorised_bootstrap_matches_naive_resampling(metric, mu_kind):
    gold, pred = _noisy(60, 8, 0.7, 4)
    mu = None if mu_kind == "own" else M.normalised_mean(gold[:30]) + 0.05
    fn = {"fve_centred": lambda g, p: M.fve_centred(g, p, mu), "fve_meannorm": M.fve_meannorm,
          "cos": M.cosine, "mse_nrm": M.mse_nrm}[metric]
    n_boot = 80  # one chunk: the same draws as the loop below
    idx = np.random.default_rng(7).integers(0, 60, size=(n_boot, 60))
    naive = np.quantile([fn(gold[i], pred[i]) for i in idx], [0.025, 0.975])
    np.testing.assert_allclose(M.bootstrap_ci(gold, pred, metric, n_boot=n_boot, seed=7, mu=mu), naive, rtol=1e-9)


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (100, 1600):
        gold, pred = _noisy(n, 16, 1.0, 5)
        point = M.fve_centred(gold, pred)
        lo, hi = M.bootstrap_ci(gold, pred, M.fve_centred, n_boot=300, seed=0)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ≈ 1/√16 of it


def test_paired_difference():
    gold, good = _noisy(200, 16, 0.5, 6)
    perm = M.derangement(200, 0)
    point, lo, hi = M.paired_bootstrap_diff(gold, good, good[perm], "fve_centred", n_boot=300)
    assert point == pytest.approx(M.fve_centred(gold, good) - M.fve_centred(gold, good[perm]))
    assert 0 < lo < point < hi
    assert M.paired_bootstrap_diff(gold, good, good, "fve_centred", n_boot=50) == (0.0, 0.0, 0.0)
