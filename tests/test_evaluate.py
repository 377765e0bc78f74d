"""score_tag, the report files and the linear-ceiling evaluation path."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pytest

from nla_universal import metrics as M
from nla_universal import io
from nla_universal.adapters import AdapterFitConfig
from nla_universal.corpus import write_passages
from nla_universal.errors import DataError
from nla_universal.evaluate import score_tag
from nla_universal.pipeline import evaluate
from nla_universal.pipeline.workspace import RunConfig
from nla_universal.report import write_report
from test_adapters import fit_pool, make_pool


def linear_eval(root, out: str = "eval") -> dict:
    run = RunConfig(run_dir=str(root), pool=str(root / "pool.yaml"))
    return evaluate.run(evaluate.EvalConfig(run=run, predictor="linear", n_boot=100, out=str(root / out)))


def _scored(n: int = 120, d: int = 16, seed: int = 0, texts=None) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    gold = 1.5 * rng.standard_normal(d) + rng.standard_normal((n, d))
    pred = gold + 0.4 * rng.standard_normal((n, d))
    mu = M.normalised_mean(gold[: n // 2])
    arrays = {"gold": gold, "pred": pred, "mu": mu, "shuffled_z": pred[M.derangement(n, 1)],
              "linear_ceiling": gold + 0.1 * rng.standard_normal((n, d))}
    controls = {k: arrays[k] for k in ("shuffled_z", "linear_ceiling")}
    return score_tag(gold, pred, mu, controls, texts=texts, n_boot=200, seed=0), arrays


def test_score_tag_reports_metrics_controls_and_intervals():
    texts = ["a"] * 60 + [f"z{i}" for i in range(60)]
    s, a = _scored(texts=texts)
    assert s["N"] == 120 and s["distinct_z"] == pytest.approx(61 / 120)
    assert s["metrics"] == M.all_metrics(a["gold"], a["pred"], a["mu"])
    assert set(s["controls"]) == {"mean_predictor", "shuffled_z", "linear_ceiling"}
    assert s["controls"]["mean_predictor"]["fve_centred"] == pytest.approx(
        M.fve_centred(a["gold"], np.tile(a["mu"], (120, 1)), a["mu"]))
    for metric in ("fve_centred", "fve_meannorm"):
        lo, hi = s["ci"][metric]
        assert lo < s["metrics"][metric] < hi
    vs = s["vs_controls"]
    assert vs["shuffled_z"]["lo"] > 0  # clearly better than another passage's prediction
    assert vs["linear_ceiling"]["hi"] < 0  # and clearly below the less noisy ceiling
    assert vs["shuffled_z"]["diff"] == pytest.approx(
        s["metrics"]["fve_centred"] - s["controls"]["shuffled_z"]["fve_centred"])


def test_score_tag_refuses_bad_predictions():
    rng = np.random.default_rng(0)
    gold, mu = rng.standard_normal((10, 4)), np.zeros(4)
    bad = gold.copy()
    bad[2] = np.nan
    with pytest.raises(DataError, match="shuffled_z: 1 of 10 rows hold NaN"):
        score_tag(gold, gold, mu, {"shuffled_z": bad}, n_boot=10)
    with pytest.raises(DataError, match="prediction has shape"):
        score_tag(gold, gold[:5], mu, {}, n_boot=10)
    with pytest.raises(DataError, match="need ≥ 2 rows"):
        score_tag(gold[:0], gold[:0], mu, {}, n_boot=10)
    with pytest.raises(DataError, match="3 explanations for 10 rows"):
        score_tag(gold, gold, mu, {}, texts=["a", "b", "c"], n_boot=10)


def test_write_report_separates_trained_and_held_out(tmp_path):
    results = {"m-a": _scored(seed=1)[0], "m-b": _scored(seed=2)[0], "m-c": _scored(seed=3)[0]}
    paths = write_report(results, tmp_path, title="T", held_out={"m-a": False, "m-b": True, "m-c": False},
                         random_weights={"m-c": True}, extra_md="EXTRA NOTE")
    data = json.loads(paths["json"].read_text())
    assert data["tags"]["m-b"]["held_out"] and not data["tags"]["m-a"]["held_out"]
    assert data["tags"]["m-c"]["random_weights"] and not data["tags"]["m-a"]["random_weights"]
    assert data["tags"]["m-a"]["metrics"] == results["m-a"]["metrics"]
    assert data["summary"]["trained"]["n_tags"] == 2 and data["summary"]["held_out"]["n_tags"] == 1
    md = paths["markdown"].read_text()
    trained, held = md.split("## Held-out models")
    assert "| m-a |" in trained and "| m-c (random weights) |" in trained and "m-b" not in trained
    assert "| m-b |" in held and "EXTRA NOTE" in held
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match=r"no held_out flag for tags \['m-c'\]"):
        write_report(results, tmp_path / "x", title="T", held_out={"m-a": False, "m-b": True})


def test_report_without_matplotlib_skips_the_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = write_report({"m-a": _scored()[0]}, tmp_path, title="T", held_out={"m-a": False})
    assert "plot" not in paths and paths["json"].exists() and not (tmp_path / "fve_centred.png").exists()


def test_linear_ceiling_end_to_end(tmp_path):
    make_pool(tmp_path)
    fit_pool(tmp_path, AdapterFitConfig(), centre=False)
    res = linear_eval(tmp_path)["results"]
    assert res["anc"]["metrics"]["fve_centred"] == pytest.approx(1.0, abs=1e-6)  # identity pair
    for tag in ("lin", "ho"):
        assert res[tag]["N"] == 30
        assert res[tag]["metrics"]["fve_centred"] > 0.9
        assert res[tag]["vs_controls"]["shuffled_z"]["lo"] > 0.5
        assert res[tag]["controls"]["mean_predictor"]["fve_centred"] <= 0
    data = json.loads((tmp_path / "eval" / "fve_report.json").read_text())
    assert data["tags"]["ho"]["held_out"] and data["tags"]["ho"]["random_weights"]


def test_linear_ceiling_refuses_missing_pieces(tmp_path):
    make_pool(tmp_path)
    fit_pool(tmp_path, AdapterFitConfig())
    pool = io.read_yaml(tmp_path / "pool.yaml")
    pool["models"][1]["tag"] = "unfitted"
    io.write_yaml(tmp_path / "pool.yaml", pool)
    with pytest.raises(DataError, match=r"lack tags \['unfitted'\]"):
        linear_eval(tmp_path, "e")
    no_test = pa.table({"passage_id": ["p0000", "p0001"], "text": ["a", "b"], "split": ["train", "val"]})
    write_passages(no_test, tmp_path / "passages.parquet")
    with pytest.raises(DataError, match="no test split"):
        linear_eval(tmp_path, "e")
    assert not (tmp_path / "e").exists()
