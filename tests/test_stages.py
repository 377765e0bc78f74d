"""The supervised stages on tiny random trunks: each must change what it claims to, and resume exactly."""

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file

from nla_universal.config import ModelSpec
from nla_universal.corpus import read_passages, write_passages
from nla_universal.errors import ConfigError, DataError
from nla_universal.nla.av import AV
from nla_universal.pipeline import add_model, evaluate, refit_dec, sft_ar, sft_av
from nla_universal.pipeline.add_model import AddModelConfig
from nla_universal.pipeline.evaluate import EvalConfig
from nla_universal.pipeline.refit_dec import RefitConfig
from nla_universal.pipeline.sft_av import AVSFTConfig
from nla_universal.pipeline.workspace import RunConfig
from nla_universal.rollout import HFRolloutEngine
from nla_universal.train import loop as loop_module
from nla_universal.train.loop import LoopConfig
from nla_universal.train.sft import collapse_alarm, swapped_vectors

from tiny_run import POOL, FAST, ar_sft, av_sft, bundle_tensors, copy_run, run_cfg

run_sft_ar, run_sft_av, run_refit_dec, run_add_model, run_eval = sft_ar.run, sft_av.run, refit_dec.run, add_model.run, evaluate.run

def test_ar_sft_lowers_the_val_loss(prepared, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    record = ar_sft(run, steps=16)
    assert record["final"]["mse_nrm"] < record["before"]["mse_nrm"]
    head = bundle_tensors(run, "ar")["value_head.safetensors:weight"]
    assert not torch.equal(head, torch.eye(head.shape[0])), "the value head must train"


def test_ar_sft_killed_after_a_checkpoint_resumes_to_identical_weights(prepared, tmp_path, monkeypatch):
    clean = copy_run(prepared, tmp_path / "clean")
    ar_sft(clean, steps=6)
    killed = copy_run(prepared, tmp_path / "killed")
    real_save = loop_module.save_checkpoint

    def save_then_die(root, step, *args, **kw):
        real_save(root, step, *args, **kw)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ar_sft(killed, steps=6)
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert not (killed / "stages" / "sft-ar.json").exists()
    ar_sft(killed, steps=6)
    a, b = bundle_tensors(clean, "ar"), bundle_tensors(killed, "ar")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train_enc, input_map, train_map", [(False, "none", False), (True, "none", False), (False, "bag", True)])
def test_av_sft_lowers_loss_and_honours_the_enc_and_map_switches(prepared, tmp_path, train_enc, input_map, train_map):
    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=2)
    before = load_file(str(run / "bundle" / "adapters" / "adapters.safetensors"))
    record = run_sft_av(AVSFTConfig(run=run_cfg(run), loop=LoopConfig(steps=12, lr=3e-3, **FAST), train_enc=train_enc,
                                    enc_lr=1e-2, val_passages=8, collapse_sample=4, max_new_tokens=8, input_map=input_map,
                                    train_input_map=train_map, input_map_lr=1e-2))
    losses = [json.loads(line)["loss"] for line in (run / "sft-av" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert "distinct_z" in record["final"] and np.isfinite(record["final"]["vector_gain"])
    after = load_file(str(run / "bundle" / "adapters" / "adapters.safetensors"))
    assert torch.equal(before["encoders.tiny-llama.weight"], after["encoders.tiny-llama.weight"])
    assert torch.equal(before["encoders.tiny-gpt2.weight"], after["encoders.tiny-gpt2.weight"]) is not train_enc
    meta = yaml.safe_load((run / "bundle" / "nla_meta.yaml").read_text())
    if input_map == "none":
        # exactly 0 would mean the swapped control fed the AV the same vectors
        assert record["final"]["vector_gain"] != 0
        assert meta["av"]["input_map"] is None and not (run / "bundle" / "av" / "input_map.safetensors").exists()
        return
    report = meta["av"]["input_map"]
    assert report["kind"] == "bag" and report == record["input_map"] and report["N"] > 50 and "val_fve_shuffled" in report
    assert torch.isfinite(load_file(str(run / "bundle" / "av" / "input_map.safetensors"))["weight"]).all()
    trained = json.loads(sorted((run / "sft-av" / "checkpoints").glob("step-*/state.json"))[-1].read_text())["names"]
    assert any(n.startswith("input_map.") for n in trained) is train_map


def test_swapped_vectors_stay_within_a_tag_and_move_every_row():
    pairs = [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1), ("c", 0)]
    swapped = swapped_vectors(pairs)
    assert [t for t, _ in swapped] == [t for t, _ in pairs]
    assert all(s != p for s, p in zip(swapped, pairs) if p[0] != "c") and swapped[5] == ("c", 0)
    assert sorted(swapped) == sorted(pairs)


def test_collapse_alarm_fires_on_a_collapsed_generator(caplog):
    with caplog.at_level(logging.WARNING):
        assert collapse_alarm(["The passage describes a function."] * 16, 0.5) == 1 / 16
    assert "AV COLLAPSE" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert collapse_alarm([f"explanation {i}" for i in range(16)], 0.5) == 1.0
    assert "AV COLLAPSE" not in caplog.text


def test_a_second_teacher_is_refused(prepared, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=2)
    table = read_passages(run / "passages.parquet")
    table = table.set_column(table.column_names.index("teacher"), "teacher", pa.array(["other:teacher"] * table.num_rows))
    write_passages(table, run / "passages.parquet")
    with pytest.raises(DataError, match="mixing teachers is refused"):
        run_sft_av(AVSFTConfig(run=run_cfg(run), loop=LoopConfig(steps=2, **FAST)))


def assert_installed_decoder_scores_as_reported(run: Path, tag: str, reported: float) -> None:
    """The decoder the bundle now holds gives the val score refit-dec reported for it (the AV's cached
    explanations, read back by the AR): a refit installed differently from how it was scored fails here."""
    from nla_universal.metrics import fve_centred, normalised_mean
    from nla_universal.nla import UniversalNLA
    from nla_universal.pipeline.workspace import Workspace

    ws = Workspace(run_cfg(run))
    table = ws.passages()
    val, train = ws.rows(table, tag, "val", need_z=False, limit=6), ws.rows(table, tag, "train", need_z=False, limit=24)
    cached = {r["passage_id"]: r["z"] for r in map(json.loads, (run / "explanations" / f"{tag}.jsonl").read_text().splitlines())}
    nla = UniversalNLA.load(run / "bundle")
    pred = nla.decode(nla.shared_from_text([cached[p] for p in val.ids]), tag).double().numpy()
    assert fve_centred(val.H, pred, normalised_mean(train.H)) == pytest.approx(reported, abs=2e-3)  # float32 decoder vs float64 fit


def test_refit_add_model_and_eval(prepared, tmp_path, monkeypatch):
    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=4)
    av_sft(run)
    refit = RefitConfig(run=run_cfg(run), train_passages=24, val_passages=6, max_new_tokens=8)
    refit.fit.min_overlap = 8
    record = run_refit_dec(refit)
    assert set(record["val"]["tiny-gpt2"]) == {"av", "teacher"}
    assert_installed_decoder_scores_as_reported(run, "tiny-gpt2", record["val"]["tiny-gpt2"]["av"]["fve_centred"])
    trunk = {p: p.read_bytes() for part in ("av", "ar") for p in (run / "bundle" / part).iterdir()}
    add = AddModelConfig(run=run_cfg(run), model=ModelSpec(tag="tiny-qwen3", source="random", name="qwen3", layer=1),
                         train_passages=24, val_passages=6, max_new_tokens=8)
    add.fit.min_overlap = 8
    run_add_model(add)
    assert {p: p.read_bytes() for p in trunk} == trunk, "adding a model must not touch the AV/AR"
    before, after = (load_file(str(r / "adapters" / "adapters.safetensors")) for r in (prepared, run / "bundle"))
    assert torch.equal(before["encoders.tiny-llama.bias"], after["encoders.tiny-llama.bias"]), "the centre must not move"
    assert "encoders.tiny-qwen3.bias" in after and "decoders.tiny-qwen3.bias" in after
    meta = yaml.safe_load((run / "bundle" / "nla_meta.yaml").read_text())
    assert meta["tags"]["tiny-qwen3"]["held_out"] is True and meta["tags"]["tiny-gpt2"]["held_out"] is False
    assert (run / "bundle" / "adapters" / "refit_tiny-qwen3.json").is_file()
    batches, scored = spy(monkeypatch, HFRolloutEngine, "_generate_batch", lambda embeds, *_: len(embeds)), \
        spy(monkeypatch, AV, "target_loss", lambda vectors, *_: len(vectors))
    result = run_eval(EvalConfig(run=run_cfg(run), max_new_tokens=8, n_boot=50, test_passages=10,
                                 generate_batch_size=10, vector_gain_passages=5))
    assert max(batches) == 10 and set(scored) == {5}, "eval must generate and score as many as it is told"
    for tag in ("tiny-llama", "tiny-gpt2", "tiny-qwen3"):
        r = result["results"][tag]
        assert {"shuffled_z", "teacher_z", "mean_predictor", "map_alone"} <= set(r["controls"])
        assert np.isfinite(r["vector_gain"]) and r["vector_gain"] != 0
        assert all(np.isfinite(v) for v in r["metrics"].values())
    assert "linear_ceiling" in result["results"]["tiny-qwen3"]["controls"]
    report = json.loads((run / "eval-nla" / "fve_report.json").read_text())
    assert report["tags"]["tiny-qwen3"]["held_out"] is True if "tags" in report else True


def spy(monkeypatch, cls, name: str, measure) -> list:
    """Wrap `cls.name` to record `measure(*args)` of every call."""
    seen, original = [], getattr(cls, name)

    def wrapped(self, *args, **kw):
        seen.append(measure(*args))
        return original(self, *args, **kw)

    monkeypatch.setattr(cls, name, wrapped)
    return seen


def test_verbalize_text_matches_the_stored_activation_of_that_text(prepared, tmp_path):
    from nla_universal.pipeline.use import VerbalizeConfig, verbalize

    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=1)
    av_sft(run)
    table = read_passages(run / "passages.parquet")
    first_test = table.column("split").to_pylist().index("test")
    common = dict(bundle=str(run / "bundle"), tag="tiny-gpt2", run=run_cfg(run), max_new_tokens=6)
    stored = verbalize(VerbalizeConfig(**common, split="test", limit=1))
    expected = json.loads(stored.read_text().splitlines()[0])
    assert expected["passage_id"] == table.column("passage_id")[first_test].as_py()
    text = table.column("text")[first_test].as_py()
    assert verbalize(VerbalizeConfig(**common, text=text)) == expected["explanation"]


def test_bad_inputs_name_the_problem(prepared, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=1)
    # a config whose trunk (anchor) differs from the bundle's
    other = dict(POOL, anchor="tiny-gpt2")
    (run / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="trained on trunk 'tiny-llama'"):
        run_sft_av(AVSFTConfig(run=RunConfig(run_dir=str(run), pool=str(run / "other.yaml")), loop=LoopConfig(steps=1, **FAST)))
    # a corpus without z
    table = read_passages(run / "passages.parquet").drop_columns(["z", "teacher"])
    write_passages(table, run / "passages.parquet")
    with pytest.raises(DataError, match="run `nla-universal teach` first"):
        run_sft_av(AVSFTConfig(run=run_cfg(run), loop=LoopConfig(steps=1, **FAST)))
    assert not (run / "stages" / "sft-av.json").exists()


def kill_after_first_checkpoint(monkeypatch):
    real_save = loop_module.save_checkpoint

    def save_then_die(root, step, *args, **kw):
        real_save(root, step, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(loop_module, "save_checkpoint", real_save)


def test_a_killed_sft_ar_leaves_no_bundle_to_evaluate(prepared, tmp_path, monkeypatch):
    run = copy_run(prepared, tmp_path / "run")
    restore = kill_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ar_sft(run, steps=4)
    restore()
    assert not (run / "bundle").exists(), "an untrained bundle must never be written"
    with pytest.raises(DataError, match="no bundle in") as err:
        run_eval(EvalConfig(run=run_cfg(run), max_new_tokens=4, n_boot=10))
    assert "sft-ar" in err.value.fix


def test_a_killed_sft_av_is_never_evaluated_verbalized_or_refitted(prepared, tmp_path, monkeypatch):
    from nla_universal.nla import UniversalNLA
    from nla_universal.pipeline.use import VerbalizeConfig, verbalize

    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=2)
    restore = kill_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        av_sft(run, steps=4, train_enc=False)
    restore()
    for attempt in (lambda: run_eval(EvalConfig(run=run_cfg(run), max_new_tokens=4, n_boot=10)),
                    lambda: run_refit_dec(RefitConfig(run=run_cfg(run), train_passages=8, val_passages=4, max_new_tokens=4))):
        with pytest.raises(DataError, match="has not been through sft-av") as err:
            attempt()
        assert "nla-universal sft-av" in err.value.fix
    with pytest.raises(DataError, match="was never trained"):
        verbalize(VerbalizeConfig(bundle=str(run / "bundle"), tag="tiny-gpt2", run=run_cfg(run), max_new_tokens=4))
    with pytest.raises(DataError, match="was never trained"):
        UniversalNLA.load(run / "bundle")
    av_sft(run, steps=4, train_enc=False)  # the rerun resumes and completes; now the bundle serves
    assert UniversalNLA.load(run / "bundle").meta.stage_names == ["sft-ar", "sft-av"]


def test_rerunning_an_upstream_stage_makes_its_dependants_stale(prepared, tmp_path):
    run = copy_run(prepared, tmp_path / "run")
    ar_sft(run, steps=2)
    av_sft(run)
    refit = RefitConfig(run=run_cfg(run), train_passages=16, val_passages=4, max_new_tokens=4)
    refit.fit.min_overlap = 8
    run_refit_dec(refit)
    assert yaml.safe_load((run / "bundle" / "nla_meta.yaml").read_text())["stages"][-1]["stage"] == "refit-dec"
    av_sft(run, steps=2)  # other settings: sft-av runs again, and the decoders fitted on the old AV are stale
    stages = [s["stage"] for s in yaml.safe_load((run / "bundle" / "nla_meta.yaml").read_text())["stages"]]
    assert stages == ["sft-ar", "sft-av"]
    with pytest.raises(DataError, match="has not been through refit-dec"):
        run_eval(EvalConfig(run=run_cfg(run), max_new_tokens=4, n_boot=10))
