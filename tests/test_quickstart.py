"""The smoke preset end to end on the real packaged models, and an interrupted run that resumes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nla_universal.config import resolve_config_path
from nla_universal.errors import ConfigError
from nla_universal.pipeline.quickstart import load_preset
from nla_universal.pipeline.quickstart_report import diagnostics_markdown

pytestmark = pytest.mark.slow


def load_preset_text(name: str) -> str:
    return resolve_config_path(name, "presets").read_text()

METRICS = {"fve_centred", "fve_meannorm", "cos", "mse_nrm"}
CONTROLS = {"mean_predictor", "shuffled_z", "teacher_z", "linear_ceiling"}


def quickstart(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nla_universal.cli", "quickstart", "--preset", "smoke", "--out", str(out), "device=cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc = quickstart(out)
    log, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, log[-3000:]
    return out


def test_smoke_writes_every_artifact_with_finite_metrics(smoke_run):
    for name in ("report.md", "fve_report.json", "timings.json", "eval/fve_centred.png", "bundle/nla_meta.yaml",
                 "bundle/av/adapter_model.safetensors", "bundle/ar/value_head.safetensors", "bundle/adapters/adapters.safetensors"):
        assert (smoke_run / name).is_file(), name
    report = json.loads((smoke_run / "fve_report.json").read_text())
    assert set(report["tags"]) == {"smollm2-135m", "random-gpt2", "gemma3-270m"}
    assert report["tags"]["gemma3-270m"]["held_out"] and not report["tags"]["smollm2-135m"]["held_out"]
    assert report["tags"]["random-gpt2"]["random_weights"]
    for tag, r in report["tags"].items():
        assert METRICS <= set(r["metrics"]) and all(math.isfinite(v) for v in r["metrics"].values()), tag
        assert CONTROLS <= set(r["controls"]), tag
        assert all(math.isfinite(v) for c in r["controls"].values() for v in c.values()), tag
        assert r["ci"]["fve_centred"][0] <= r["metrics"]["fve_centred"] <= r["ci"]["fve_centred"][1]
    text = (smoke_run / "report.md").read_text()
    assert "random weights" in text and "Held-out models" in text and "## Stage timings" in text
    gain = json.loads((smoke_run / "stages" / "sft-av.json").read_text())["final"]["vector_gain"]
    assert "## Training diagnostics" in text and f"{gain:+.4f}" in text
    stages = [row["stage"] for row in json.loads((smoke_run / "timings.json").read_text())]
    assert stages == ["corpus", "extract", "teach", "fit-adapters", "sft-ar", "sft-av", "refit-dec", "add-model", "eval-sft",
                      "rl", "eval"]
    assert "## Before and after RL (test split)" in text and "| rl | reward" in text
    before = json.loads((smoke_run / "eval-sft" / "fve_report.json").read_text())
    assert set(before["tags"]) == set(report["tags"])
    meta_stages = [s["stage"] for s in yaml.safe_load((smoke_run / "bundle" / "nla_meta.yaml").read_text())["stages"]]
    assert meta_stages[-1] == "rl" and "add-model-gemma3-270m" in meta_stages


@pytest.mark.parametrize("gain, verdict", [(0.0004, "does not read the injected vector"), (0.05, "depends on the vector")])
def test_diagnostics_verdict_follows_vector_gain(tmp_path, gain, verdict):
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "sft-ar.json").write_text(json.dumps({"before": {"cos": -0.01}, "final": {"cos": 0.2}}))
    (stages / "sft-av.json").write_text(json.dumps({"final": {"vector_gain": gain, "distinct_z": 0.5}}))
    text = diagnostics_markdown(tmp_path)
    assert verdict in text and f"{gain:+.4f}" in text and "-0.010 → 0.200" in text


def test_killed_run_resumes_to_the_same_report(smoke_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # Reuse the finished run's text, teacher z and activations; retrain everything after them.
    shutil.copy(smoke_run / "passages.parquet", out / "passages.parquet")
    shutil.copytree(smoke_run / "activations", out / "activations")
    proc = quickstart(out)
    deadline = time.time() + 900
    while not list((out / "explanations").glob("*.jsonl")):  # refit-dec is generating: AV and AR are trained
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "fve_report.json").exists() and not (out / "stages" / "refit-dec.json").exists()
    proc = quickstart(out)
    log, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, log[-3000:]
    assert json.loads((out / "fve_report.json").read_text())["tags"] == json.loads((smoke_run / "fve_report.json").read_text())["tags"]
    timings = {row["stage"]: row for row in json.loads((out / "timings.json").read_text())}
    # The killed run's finished stages keep their time; the resumed run only checked them.
    assert timings["sft-av"]["runs"] == 2 and timings["sft-av"]["seconds"] > 1.0
    assert timings["refit-dec"]["runs"] == 1


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "nla_universal" / "configs" / "presets").glob("*.yaml")))
def test_every_shipped_preset_loads(name):
    preset = load_preset(name)
    assert preset.pool.anchor in preset.pool.tags and preset.add_model.model.tag not in preset.pool.tags


def test_a_token_preset_with_a_pooled_entry_is_refused_before_anything_runs(tmp_path):
    preset = yaml.safe_load(load_preset_text("tokens"))
    preset["add_model"]["model"]["pool"] = "mean"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(preset))
    with pytest.raises(ConfigError, match=r"\['gemma3-270m'\] do not use pool=last"):
        load_preset(str(path))
