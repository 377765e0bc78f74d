"""Least-squares fits, the adapter files and pool fits on tiny synthetic activation stores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from nla_universal import activations, io
from nla_universal.adapters import AdapterFitConfig, PoolAdapters, fit_encoder
from nla_universal.lstsq import fit_linear, fit_linear_path
from nla_universal.config import ModelSpec, PoolConfig
from nla_universal.corpus import write_passages
from nla_universal.errors import ConfigError, DataError
from nla_universal.metrics import normalize_rows
from nla_universal.pipeline import fit_adapters
from nla_universal.pipeline.workspace import RunConfig

# ---------------------------------------------------------------------------------------------
# Tiny pool: an anchor (d=16), a model linearly related to it (d=24), a held-out one (d=12), all
# driven by the same 6-d latent per passage plus a shared offset, like mean-pooled activations.

DIMS = {"anc": 16, "lin": 24, "ho": 12}


def write_store(root: Path, tag: str, ids: list[str], X: np.ndarray, pool: str = "mean") -> None:
    folder = activations.tag_dir(root, tag)
    folder.mkdir(parents=True, exist_ok=True)
    activations.write_shard(folder, 0, activations.shard_table(ids, X, np.full(len(ids), 7), None))
    io.write_yaml(folder / "meta.yaml", {"tag": tag, "d_model": X.shape[1], "pool": pool, "layer": 1,
                                         "shards": activations.shard_rows(folder)})
    io.mark_success(folder)


def make_pool(root: Path, n: int = 240, seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray], list[str]]:
    """passages.parquet (180 train / 30 val / 30 test) and one activation store per tag."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i:04d}" for i in range(n)]
    splits = np.array(["train"] * 180 + ["val"] * 30 + ["test"] * (n - 210))
    rng.shuffle(splits)
    passages = root / "passages.parquet"
    write_passages(pa.table({"passage_id": ids, "text": [f"text {i}" for i in ids], "split": list(splits)}), passages)
    latent = rng.standard_normal((n, 6))
    stores = {}
    for tag, d in DIMS.items():
        X = latent @ rng.standard_normal((6, d)) + 2.0 * rng.standard_normal(d) + 0.05 * rng.standard_normal((n, d))
        stores[tag] = X.astype(np.float32)
        write_store(root / "activations", tag, ids, stores[tag])
    return root / "activations", passages, stores, list(splits)


def pool_config() -> PoolConfig:
    return PoolConfig(anchor="anc", models=[
        ModelSpec(tag="anc", name="a"), ModelSpec(tag="lin", name="b"),
        ModelSpec(tag="ho", source="random", name="llama", held_out=True),
    ])


def fit_pool(root: Path, fit: AdapterFitConfig, centre: bool = True) -> PoolAdapters:
    """The fit-adapters stage on the run folder `root` (a fresh fit: any earlier record is removed)."""
    io.write_yaml(root / "pool.yaml", dataclasses.asdict(pool_config()))
    (root / "stages" / "fit-adapters.json").unlink(missing_ok=True)
    fit_adapters.run(fit_adapters.FitAdaptersConfig(run=RunConfig(run_dir=str(root), pool=str(root / "pool.yaml")),
                                                    fit=fit, centre=centre))
    return PoolAdapters.load(root / "adapters")


# ---------------------------------------------------------------------------------------------
# fit_linear


def _system(n, d_in, d_out, seed=0, noise=0.01):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d_in)).astype(np.float32)
    W = rng.standard_normal((d_out, d_in))
    return X, (X @ W.T + noise * rng.standard_normal((n, d_out))).astype(np.float32), W


def test_overdetermined_fit_matches_numpy_lstsq():
    X, Y, W = _system(400, 20, 10)
    fit = fit_linear(X, Y)
    ref = np.linalg.lstsq(X.astype(np.float64), Y.astype(np.float64), rcond=None)[0].T
    assert fit.solver == "normal-cholesky-f64" and fit.fallback is None and fit.bias is None
    assert fit.weight.shape == (10, 20) and fit.weight.dtype == torch.float32
    np.testing.assert_allclose(fit.weight.numpy(), ref, rtol=0, atol=1e-6)
    assert np.abs(fit.weight.numpy() - W).max() < 0.01
    assert fit.condition == pytest.approx(np.linalg.cond(X.astype(np.float64)), rel=0.3)


def test_underdetermined_fit_is_minimum_norm():
    X, Y, _ = _system(30, 60, 5)
    fit = fit_linear(X, Y)
    assert fit.solver == "dual-cholesky-f64"
    np.testing.assert_allclose(fit.weight.numpy(), (np.linalg.pinv(X.astype(np.float64)) @ Y).T, atol=1e-5)


def test_bias_recovers_an_intercept():
    X, Y, W = _system(300, 12, 4, noise=0.0)
    b = np.array([5.0, -3.0, 0.5, 2.0])
    plain, with_bias = fit_linear(X, Y + b), fit_linear(X, Y + b, bias=True)
    np.testing.assert_allclose(with_bias.bias.numpy(), b, atol=1e-4)
    np.testing.assert_allclose(with_bias.weight.numpy(), W, atol=1e-4)
    np.testing.assert_allclose(with_bias.predict(X), Y + b, atol=1e-3)
    assert np.abs(plain.predict(X) - (Y + b)).max() > 0.1


def test_ridge_matches_closed_form_in_primal_and_dual():
    for n, d in ((200, 30), (20, 30)):
        X, Y, _ = _system(n, d, 3, seed=n)
        X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
        lam = 0.1 * (X64**2).sum() / d
        ref = np.linalg.solve(X64.T @ X64 + lam * np.eye(d), X64.T @ Y64).T
        fit = fit_linear(X, Y, ridge=0.1)
        assert fit.solver == "ridge-cholesky-f64"
        np.testing.assert_allclose(fit.weight.numpy(), ref, atol=1e-5)


def test_ridge_path_equals_separate_fits():
    X, Y, _ = _system(150, 40, 6, noise=0.5)
    path = fit_linear_path(X, Y, [0.0, 1e-2, 1.0], bias=True)
    for fit, ridge in zip(path, (0.0, 1e-2, 1.0)):
        single = fit_linear(X, Y, ridge=ridge, bias=True)
        torch.testing.assert_close(fit.weight, single.weight)
        torch.testing.assert_close(fit.bias, single.bias)
    assert path[2].weight.norm() < path[1].weight.norm() < path[0].weight.norm()
    with pytest.raises(ConfigError, match="≥ 0"):
        fit_linear(X, Y, ridge=-1.0)


def test_duplicate_columns_fall_back_to_svd_and_say_so():
    X, Y, _ = _system(200, 10, 3)
    Xd = np.concatenate([X, X[:, :3]], axis=1)  # rank 10 of 13 columns: XᵀX singular
    fit = fit_linear(Xd, Y)
    assert fit.solver == "gelsd-f64" and "SVD least squares" in fit.fallback
    ref = np.linalg.lstsq(Xd.astype(np.float64), Y.astype(np.float64), rcond=None)[0].T
    np.testing.assert_allclose(fit.weight.numpy(), ref, atol=1e-5)  # the minimum-norm solution
    np.testing.assert_allclose(fit.predict(Xd), Xd @ ref.T, atol=1e-4)


def test_svd_failure_falls_back_to_ridge(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated LAPACK failure")

    monkeypatch.setattr(torch.linalg, "lstsq", broken)
    X, Y, _ = _system(100, 8, 2)
    fit = fit_linear(np.concatenate([X, X], axis=1), Y)
    assert fit.solver == "ridge-fallback-f64"
    assert "simulated LAPACK failure" in fit.fallback and "ridge" in fit.fallback
    assert np.isfinite(fit.weight.numpy()).all()


def test_non_finite_inputs_are_refused():
    X, Y, _ = _system(50, 4, 2)
    X[3, 1] = np.inf
    with pytest.raises(DataError, match="X holds NaN/inf"):
        fit_linear(X, Y)


# ---------------------------------------------------------------------------------------------
# PoolAdapters files


def _adapters(bias: bool = False) -> PoolAdapters:
    rng = np.random.default_rng(0)
    ad = PoolAdapters(4, "anc")
    ad.add("anc", torch.eye(4), torch.eye(4))
    ad.add("m-x", torch.tensor(rng.standard_normal((4, 6))), torch.tensor(rng.standard_normal((6, 4))),
           enc_bias=torch.ones(4) if bias else None)
    return ad


def test_save_load_round_trip_with_the_contract_keys(tmp_path):
    ad = _adapters(bias=True)
    ad.save(tmp_path)
    state = load_file(str(tmp_path / "adapters.safetensors"))
    assert state["encoders.m-x.weight"].shape == (4, 6) and state["decoders.m-x.weight"].shape == (6, 4)
    assert "encoders.m-x.bias" in state and "decoders.m-x.bias" not in state
    back = PoolAdapters.load(tmp_path, expect_tags=["anc", "m-x"], expect_d_shared=4)
    assert back.dims == {"anc": 4, "m-x": 6} and back.anchor == "anc"
    h = torch.randn(3, 6)
    torch.testing.assert_close(back.encode("m-x", h), h @ ad.encoders["m-x"].weight.T + 1.0)
    torch.testing.assert_close(back.decode("m-x", torch.randn(3, 4) * 0), torch.zeros(3, 6))
    assert not list(tmp_path.glob("*.tmp"))


def test_load_refuses_bad_files(tmp_path):
    _adapters().save(tmp_path)
    with pytest.raises(DataError, match=r"lack tags \['other'\]"):
        PoolAdapters.load(tmp_path, expect_tags=["anc", "other"])
    with pytest.raises(DataError, match="d_shared=4, expected 8"):
        PoolAdapters.load(tmp_path, expect_d_shared=8)
    meta = json.loads((tmp_path / "adapters.json").read_text())
    meta["dims"]["m-x"] = 7
    (tmp_path / "adapters.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"encoders.m-x.weight is \(4, 6\), expected \(4, 7\)"):
        PoolAdapters.load(tmp_path)
    (tmp_path / "adapters.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="corrupt adapters"):
        PoolAdapters.load(tmp_path)
    with pytest.raises(DataError, match="adapters missing"):
        PoolAdapters.load(tmp_path / "nowhere")


def test_add_and_encode_check_shapes_and_tags():
    ad = _adapters()
    with pytest.raises(DataError, match="do not fit d_shared=4"):
        ad.add("m-y", torch.zeros(4, 5), torch.zeros(4, 4))
    with pytest.raises(DataError, match="no adapter for tag 'm-z'"):
        ad.encode("m-z", torch.zeros(1, 6))
    with pytest.raises(DataError, match="input width 5"):
        ad.encode("m-x", torch.zeros(1, 5))


# ---------------------------------------------------------------------------------------------
# Pool fits


def test_fit_adapters_writes_everything_and_generalises(tmp_path):
    make_pool(tmp_path)
    out = tmp_path / "adapters"
    ad = fit_pool(tmp_path, AdapterFitConfig(), centre=False)
    assert ad.tags == ["anc", "lin", "ho"] and ad.dims == DIMS and ad.centre is None
    torch.testing.assert_close(ad.encoders["anc"].weight, torch.eye(16))
    torch.testing.assert_close(ad.decoders["anc"].weight, torch.eye(16))
    assert PoolAdapters.load(out, expect_tags=["anc", "lin", "ho"]).dims == DIMS
    for tag in ("lin", "ho"):
        for kind in ("encoder", "decoder"):
            report = json.loads((out / f"fit_{kind}_{tag}.json").read_text())
            assert report["N"] == 180 and report["val"]["N"] == 30
            assert {"d_in", "d_out", "solver", "seconds", "condition", "in_sample"} <= set(report)
            assert report["val"]["fve_centred"] > 0.9, (tag, kind, report["val"])
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["tags"]["ho"]["held_out"] is True and summary["tags"]["anc"]["encoder"] == "identity"
    assert summary["centre"] is False


def test_the_shared_space_is_centred_on_the_anchors_train_mean(tmp_path):
    _, _, stores, splits = make_pool(tmp_path)
    out = tmp_path / "adapters"
    ad = fit_pool(tmp_path, AdapterFitConfig())
    train = np.array(splits) == "train"
    np.testing.assert_allclose(ad.centre, normalize_rows(stores["anc"][train]).mean(0), atol=1e-5)
    torch.testing.assert_close(ad.encoders["anc"].weight, torch.eye(16))
    for tag in ("anc", "lin", "ho"):
        with torch.no_grad():
            v = ad.encode(tag, torch.as_tensor(normalize_rows(stores[tag][train])).float())
        # every model's train rows land around 0 of the shared space, not around μ
        assert float(v.mean(0).norm()) < 0.02 * float(v.norm(dim=1).mean()), tag
        assert ad.decoders[tag].bias is not None
    report = json.loads((out / "fit_decoder_anc.json").read_text())
    assert report["val"]["fve_centred"] > 0.9  # the anchor's ceiling through the centred, renormalised space
    np.testing.assert_allclose(PoolAdapters.load(out).centre, ad.centre)
    assert json.loads((out / "fit_summary.json").read_text())["tags"]["anc"]["encoder"] == "identity − μ"


def test_test_split_never_reaches_a_fit(tmp_path):
    acts, _, stores, splits = make_pool(tmp_path)
    first = fit_pool(tmp_path, AdapterFitConfig())
    test_rows = np.array(splits) == "test"
    garbage = stores["lin"].copy()
    garbage[test_rows] = 1e3 * np.random.default_rng(9).standard_normal((test_rows.sum(), DIMS["lin"]))
    write_store(acts, "lin", [f"p{i:04d}" for i in range(len(splits))], garbage)
    second = fit_pool(tmp_path, AdapterFitConfig())
    torch.testing.assert_close(first.encoders["lin"].weight, second.encoders["lin"].weight)
    torch.testing.assert_close(first.decoders["lin"].weight, second.decoders["lin"].weight)


def test_encoder_needs_enough_overlap_and_finite_rows(tmp_path):
    acts, _, stores, splits = make_pool(tmp_path)
    ids = [f"p{i:04d}" for i in range(len(splits))]
    train = [p for p, s in zip(ids, splits) if s == "train"]
    anchor = activations.read_activations(acts, "anc")
    few = activations.Activations("lin", ids[:20], stores["lin"][:20], np.ones(20, np.int32), {})
    with pytest.raises(DataError, match=r"only \d+ train passages shared with anchor anc"):
        fit_encoder(few, anchor, train, [], AdapterFitConfig())
    bad = stores["lin"].copy()
    bad[[ids.index(p) for p in train[:3]]] = np.nan
    broken = activations.Activations("lin", ids, bad, np.ones(len(ids), np.int32), {})
    with pytest.raises(DataError, match="lin: 3 of 180 activation rows hold NaN/inf"):
        fit_encoder(broken, anchor, train, [], AdapterFitConfig())
    per_token = activations.Activations("lin", ids + ids[:1], np.vstack([stores["lin"], stores["lin"][:1]]),
                                        np.ones(len(ids) + 1, np.int32), {"pool": "positions"})
    with pytest.raises(DataError, match="several rows per passage"):
        fit_encoder(per_token, anchor, train, [], AdapterFitConfig())


def test_ridge_grid_is_chosen_on_val(tmp_path):
    # 40 train passages for a 24-d input: plain least squares overfits, a ridge generalises better
    acts, _, stores, splits = make_pool(tmp_path)
    ids = [f"p{i:04d}" for i in range(len(splits))]
    train = [p for p, s in zip(ids, splits) if s == "train"][:40]
    val = [p for p, s in zip(ids, splits) if s == "val"]
    noisy = stores["lin"] + 0.5 * np.random.default_rng(3).standard_normal(stores["lin"].shape).astype(np.float32)
    model = activations.Activations("lin", ids, noisy, np.ones(len(ids), np.int32), {})
    anchor = activations.read_activations(acts, "anc")
    grid = [0.0, 1e-3, 1e-2, 1e-1, 1.0]
    fit, report = fit_encoder(model, anchor, train, val, AdapterFitConfig(ridge_grid=grid))
    scores = report["ridge_selection"]["val_fve_centred"]
    assert report["ridge"] == grid[int(np.argmax(scores))] != 0.0
    assert report["val"]["fve_centred"] == pytest.approx(max(scores))
    assert max(scores) > scores[0] + 0.02
    assert report["ridge_selection"]["at_top"] == (report["ridge"] == grid[-1])
    short = grid[:grid.index(report["ridge"]) + 1]  # a grid that stops at the val optimum is flagged
    _, edge = fit_encoder(model, anchor, train, val, AdapterFitConfig(ridge_grid=short))
    assert edge["ridge"] == short[-1] and edge["ridge_selection"]["at_top"]
    with pytest.raises(DataError, match="ridge_grid needs val rows"):
        fit_encoder(model, anchor, train, [], AdapterFitConfig(ridge_grid=grid))


def test_bias_option_is_stored_and_used(tmp_path):
    _, _, stores, _ = make_pool(tmp_path)
    ad = fit_pool(tmp_path, AdapterFitConfig(bias=True), centre=False)
    assert ad.encoders["lin"].bias is not None and ad.encoders["anc"].bias is None
    back = PoolAdapters.load(tmp_path / "adapters")
    h = torch.as_tensor(normalize_rows(stores["lin"][:5])).float()
    torch.testing.assert_close(back.encode("lin", h), ad.encode("lin", h))
