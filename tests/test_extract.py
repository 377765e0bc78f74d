import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from nla_universal import activations, io
from nla_universal.config import CorpusConfig, ModelSpec, load_pool
from nla_universal.cli import main
from nla_universal.corpus import build_passages, write_passages
from nla_universal.errors import ConfigError, DataError
from nla_universal.models import content_mask, input_embedding, load_model
from nla_universal.pipeline.extract import ExtractConfig
from nla_universal.pipeline.extract import run as extract
from nla_universal.pipeline.workspace import RunConfig

TINY = [
    {"tag": "tiny-llama", "source": "random", "name": "llama", "layer": 1},
    {"tag": "tiny-bloom", "source": "random", "name": "bloom", "layer": 1},
    {"tag": "tiny-gemma3", "source": "random", "name": "gemma3_text", "layer": 1},
]
SPECIAL = "<|im_start|>Special tokens <|im_end|> must not enter the pooled mean of a passage about foxes."


def write_pool(path: Path, models: list[dict], anchor: str = "tiny-llama") -> str:
    path.write_text(yaml.safe_dump({"anchor": anchor, "models": models}))
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    table = build_passages(CorpusConfig(max_passages=24))
    texts = table.column("text").to_pylist()
    texts[0] = SPECIAL + " " + texts[0]
    table = table.set_column(1, "text", pa.array(texts))
    write_passages(table, run / "passages.parquet")
    return run


def cfg_for(run: Path, pool: str, **kw) -> ExtractConfig:
    return ExtractConfig(run=RunConfig(run_dir=str(run), pool=pool), shard_size=10, batch_size=4, **kw)


def manual_rows(spec: ModelSpec, texts: list[str], pool: str) -> np.ndarray:
    """The straightforward reference: full model, hidden_states[K+1], one passage at a time."""
    lm = load_model(spec)
    rows = []
    for text in texts:
        enc = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=spec.max_length)
        with torch.no_grad():
            hs = lm.model(**enc, output_hidden_states=True).hidden_states[lm.layer + 1][0].float()
        keep = content_mask(enc.input_ids, enc.attention_mask, lm.tokenizer)[0]
        rows.append(hs[keep].mean(0) if pool == "mean" else hs[keep][-1])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_extraction_matches_full_model_hidden_states_over_content_tokens(tmp_path, run_dir, pool):
    models = [dict(m, pool=pool) for m in TINY]
    pool_file = write_pool(tmp_path / "pool.yaml", models)
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
    extract(cfg_for(run, pool_file))
    texts = pq.read_table(run / "passages.parquet").column("text").to_pylist()
    for spec in load_pool(pool_file).models:
        acts = activations.read_activations(run / "activations", spec.tag)
        assert acts.X.shape == (len(texts), 64)
        expected = manual_rows(spec, texts, pool)
        np.testing.assert_allclose(acts.X, expected, rtol=1e-4, atol=1e-5)


def test_special_tokens_are_excluded_from_the_mean(run_dir, tmp_path):
    pool_file = write_pool(tmp_path / "pool.yaml", TINY[:1])
    extract(cfg_for(run_dir, pool_file, tags=["tiny-llama"]))
    acts = activations.read_activations(run_dir / "activations", "tiny-llama")
    lm = load_model(load_pool(pool_file).models[0])
    text = pq.read_table(run_dir / "passages.parquet").column("text")[0].as_py()
    enc = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
    keep = content_mask(enc.input_ids, enc.attention_mask, lm.tokenizer)[0]
    assert (~keep).sum() >= 2, "the passage must contain special tokens for this test to mean anything"
    with torch.no_grad():
        hs = lm.model(**enc, output_hidden_states=True).hidden_states[2][0]
    row = acts.X[0]
    np.testing.assert_allclose(row, hs[keep].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(row, hs.mean(0).numpy(), atol=1e-3)
    assert acts.n_tokens[0] == int(keep.sum())


def test_positions_pooling_is_deterministic_and_on_content_tokens(tmp_path, run_dir):
    models = [dict(TINY[0], pool="positions", positions_per_passage=3)]
    pool_file = write_pool(tmp_path / "pool.yaml", models)
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
        extract(cfg_for(run, pool_file))
        runs.append(activations.read_activations(run / "activations", "tiny-llama"))
    a, b = runs
    assert a.positions is not None and np.array_equal(a.positions, b.positions) and np.array_equal(a.X, b.X)
    assert len(a.passage_ids) == 3 * len(set(a.passage_ids))
    assert (a.positions >= 0).all() and (a.positions < a.n_tokens.max() + 2).all()


def test_rerun_skips_complete_tags_and_config_change_is_refused(tmp_path, run_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
    pool_file = write_pool(tmp_path / "pool.yaml", TINY[:1])
    extract(cfg_for(run, pool_file))
    shard = activations.shard_path(run / "activations" / "tiny-llama", 0)
    stamp = shard.stat().st_mtime_ns
    extract(cfg_for(run, pool_file))
    assert shard.stat().st_mtime_ns == stamp
    # A changed layer must not mix with the old rows: the incomplete folder is refused...
    (run / "activations" / "tiny-llama" / io.SUCCESS).unlink()
    pool2 = write_pool(tmp_path / "pool2.yaml", [dict(TINY[0], layer=2)])
    with pytest.raises(DataError, match="layer: 1 → 2"):
        extract(cfg_for(run, pool2))
    # ...or discarded on request.
    extract(cfg_for(run, pool2, overwrite=True))
    assert activations.read_activations(run / "activations", "tiny-llama").meta["layer"] == 2


def _slow_pool(tmp_path: Path) -> str:
    big = {"hidden_size": 384, "num_hidden_layers": 6, "intermediate_size": 1536, "num_attention_heads": 6, "num_key_value_heads": 2}
    return write_pool(tmp_path / "slow.yaml", [dict(TINY[0], layer=4, random_overrides=big)])


def test_kill_and_resume_gives_the_same_shards(tmp_path):
    table = build_passages(CorpusConfig(max_passages=96))
    runs = {}
    for name in ("killed", "clean"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        write_passages(table, runs[name] / "passages.parquet")
    pool_file = _slow_pool(tmp_path)
    args = [sys.executable, "-m", "nla_universal.cli", "extract", f"run.pool={pool_file}", "shard_size=8", "batch_size=4"]
    extract(ExtractConfig(run=RunConfig(run_dir=str(runs["clean"]), pool=pool_file), shard_size=8, batch_size=4))
    folder = runs["killed"] / "activations" / "tiny-llama"
    proc = subprocess.Popen(args + [f"run.run_dir={runs['killed']}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not activations.shard_path(folder, 1).exists():
        assert proc.poll() is None and time.time() < deadline, "extraction ended before it could be interrupted"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not io.is_complete(folder)
    n_before = len(activations.shard_files(folder))
    assert 2 <= n_before < 12
    with pytest.raises(DataError, match="incomplete"):
        activations.read_activations(runs["killed"] / "activations", "tiny-llama")
    assert subprocess.run(args + [f"run.run_dir={runs['killed']}"], capture_output=True).returncode == 0
    a = activations.read_activations(runs["killed"] / "activations", "tiny-llama")
    b = activations.read_activations(runs["clean"] / "activations", "tiny-llama")
    assert a.passage_ids == b.passage_ids and np.array_equal(a.X, b.X)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "models, message",
    [
        ([dict(TINY[0], tag="Tiny.Llama")], "invalid tag"),
        ([dict(TINY[0], tag="tiny/llama")], "invalid tag"),
        ([TINY[0], TINY[0]], "duplicate tag"),
        ([dict(TINY[0], layer=3)], "layer"),
    ],
)
def test_bad_pool_entries_fail_clearly_and_write_nothing(tmp_path, run_dir, capsys, models, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
    pool_file = write_pool(tmp_path / "pool.yaml", models, anchor=models[0]["tag"])
    assert main(["extract", f"run.run_dir={run}", f"run.pool={pool_file}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert not any(io.is_complete(p) for p in (run / "activations").glob("*")) if (run / "activations").exists() else True


def test_unknown_tag_and_missing_passages(tmp_path, run_dir):
    pool_file = write_pool(tmp_path / "pool.yaml", TINY[:1])
    with pytest.raises(ConfigError, match="unknown tag"):
        extract(cfg_for(run_dir, pool_file, tags=["nope"]))
    with pytest.raises(DataError, match="corpus"):
        extract(cfg_for(tmp_path / "empty", pool_file))


def test_inf_forward_names_tag_and_passages_unless_dropped(tmp_path, run_dir):
    # A local hf folder whose weights overflow in the forward: the hf source on a real folder, too.
    lm = load_model(ModelSpec(**TINY[0]))
    with torch.no_grad():
        input_embedding(lm.model).weight.fill_(float("inf"))
    lm.model.save_pretrained(tmp_path / "inf-model")
    lm.tokenizer.save_pretrained(tmp_path / "inf-model")
    models = [{"tag": "tiny-inf", "source": "hf", "name": str(tmp_path / "inf-model"), "layer": 1}]
    pool_file = write_pool(tmp_path / "pool.yaml", models, anchor="tiny-inf")
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
    with pytest.raises(DataError, match=r"tiny-inf: non-finite activations .*dtype"):
        extract(cfg_for(run, pool_file))
    assert not io.is_complete(run / "activations" / "tiny-inf")
    assert not activations.shard_files(run / "activations" / "tiny-inf")
    extract(cfg_for(run, pool_file, drop_nonfinite=True))
    meta = io.read_yaml(run / "activations" / "tiny-inf" / "meta.yaml")
    assert meta["dropped_nonfinite"] == 24 and meta["n_rows"] == 0


@pytest.mark.slow
def test_real_packaged_models_extract_finite_activations_on_the_builtin_corpus(tmp_path):
    run = tmp_path / "run"
    write_passages(build_passages(CorpusConfig(max_passages=12)), run / "passages.parquet")
    extract(ExtractConfig(run=RunConfig(run_dir=str(run), pool="demo"), batch_size=4))
    dims = {"smollm2-135m": 576, "gemma3-270m": 640}
    for tag, d in dims.items():
        acts = activations.read_activations(run / "activations", tag)
        assert acts.X.shape == (12, d) and np.isfinite(acts.X).all()
        assert acts.meta["layer"] == round(0.5 * (acts.meta["num_layers"] - 1))
        assert (acts.n_tokens > 0).all()


def test_a_bad_entry_fails_before_any_model_is_extracted(tmp_path, run_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
    pool_file = write_pool(tmp_path / "pool.yaml", [TINY[0], dict(TINY[1], layer=999)])
    with pytest.raises(ConfigError, match=r"nothing was extracted: tiny-bloom: layer 999 is outside"):
        extract(cfg_for(run, pool_file))
    assert not (run / "activations" / "tiny-llama").exists()


def test_a_typo_inside_a_pool_entry_names_the_file_the_entry_and_its_keys(tmp_path):
    pool_file = write_pool(tmp_path / "pool.yaml", [TINY[0], {**TINY[1], "layr": 1}])
    with pytest.raises(ConfigError) as err:
        load_pool(pool_file)
    assert "pool.yaml" in err.value.problem and "'tiny-bloom'" in err.value.problem and "'layr'" in err.value.problem
    assert "did you mean 'layer'" in err.value.fix and "positions_per_passage" in err.value.fix


@pytest.fixture()
def complete_run(tmp_path, run_dir) -> tuple[Path, str]:
    run = tmp_path / "run"
    run.mkdir()
    (run / "passages.parquet").write_bytes((run_dir / "passages.parquet").read_bytes())
    pool_file = write_pool(tmp_path / "pool.yaml", TINY[:1])
    extract(cfg_for(run, pool_file))
    return run, pool_file


def test_a_shard_removed_from_a_complete_folder_is_named_and_overwrite_really_re_extracts(complete_run):
    run, pool_file = complete_run
    folder = run / "activations" / "tiny-llama"
    before = activations.read_activations(run / "activations", "tiny-llama")
    activations.shard_path(folder, 1).unlink()
    with pytest.raises(DataError, match=r"part-00001.parquet is missing \(10 rows recorded\)") as err:
        activations.read_activations(run / "activations", "tiny-llama")
    assert "overwrite=true" in err.value.fix and '"tags=[tiny-llama]"' in err.value.fix
    extract(cfg_for(run, pool_file))  # complete by its marker: a plain rerun keeps it (and the error stays)
    with pytest.raises(DataError, match="is missing"):
        activations.read_activations(run / "activations", "tiny-llama")
    extract(cfg_for(run, pool_file, overwrite=True))
    after = activations.read_activations(run / "activations", "tiny-llama")
    assert after.passage_ids == before.passage_ids and np.array_equal(after.X, before.X)


def test_an_extra_or_short_shard_is_named(complete_run):
    run, _ = complete_run
    folder = run / "activations" / "tiny-llama"
    table = pq.read_table(activations.shard_path(folder, 0))
    pq.write_table(table, folder / "part-00009.parquet")
    with pytest.raises(DataError, match="part-00009.parquet is not one of the shards"):
        activations.read_activations(run / "activations", "tiny-llama")
    (folder / "part-00009.parquet").unlink()
    pq.write_table(table.slice(0, 3), activations.shard_path(folder, 0))
    with pytest.raises(DataError, match=r"part-00000.parquet holds 3 rows, its record says 10"):
        activations.read_activations(run / "activations", "tiny-llama")


def test_a_nan_row_is_named_by_tag_file_and_passage(complete_run):
    run, _ = complete_run
    folder = run / "activations" / "tiny-llama"
    path = activations.shard_path(folder, 1)
    table = pq.read_table(path)
    X = np.stack(table.column("activation").to_pylist()).astype(np.float32)
    X[4, 7] = np.nan
    ids = table.column("passage_id").to_pylist()
    pq.write_table(activations.shard_table(ids, X, table.column("n_tokens").to_numpy(), None), path)
    with pytest.raises(DataError, match=rf"tiny-llama: 1 activation row\(s\) in .*part-00001.parquet hold NaN/inf, e.g. passage {ids[4]}"):
        activations.read_activations(run / "activations", "tiny-llama")
