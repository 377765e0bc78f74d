"""The bundle and `UniversalNLA`: exact round trip, no pickle, every load-time check, bad inputs, end to end."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from nla_universal.adapters import PoolAdapters
from nla_universal.config import ModelSpec
from nla_universal.errors import DataError, NLAError
from nla_universal.metrics import METRICS
from nla_universal.nla import ARConfig, TagInfo, UniversalNLA
from nla_universal import io
from nla_universal.nla.bundle import MANIFEST_FILE, META_FILE, REQUIRED_FILES

TRUNK = ModelSpec(tag="tiny-llama", source="random", name="llama", layer=1)
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"}


pytestmark = pytest.mark.usefixtures("one_thread")


def pool_adapters(d_shared: int, anchor: str, other_d: int = 32) -> PoolAdapters:
    adapters = PoolAdapters(d_shared, anchor)
    adapters.add(anchor, torch.eye(d_shared), torch.eye(d_shared))
    g = torch.Generator().manual_seed(1)
    adapters.add("other", torch.randn(d_shared, other_d, generator=g) / 6, torch.randn(other_d, d_shared, generator=g) / 6)
    return adapters


def tags_for(anchor: str, d_shared: int, layer: int, other_d: int = 32) -> dict:
    return {anchor: TagInfo(d_shared, layer, "mean"), "other": TagInfo(other_d, 2, "mean", held_out=True)}


def perturb(nla: UniversalNLA) -> None:
    """Move every trainable tensor away from its initial value, so a lost tensor shows."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in (nla.av.model, nla.ar):
            for name, p in module.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for p in nla.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


@pytest.fixture(scope="module")
def nla():
    torch.manual_seed(0)
    model = UniversalNLA.create(TRUNK, pool_adapters(64, TRUNK.tag), tags_for(TRUNK.tag, 64, 1), teacher_id="test-teacher",
                                reports={"adapters/fit_summary.json": {"tags": {"other": {"val": 0.5}}}})
    perturb(model)
    model.meta.stages = [{"stage": "sft-ar", "id": "a1"}, {"stage": "sft-av", "id": "b2"}]
    return model


@pytest.fixture(scope="module")
def saved(nla, tmp_path_factory) -> Path:
    return nla.save(tmp_path_factory.mktemp("bundles") / "bundle", fve_report={"other": {"fve_centred": 0.1}})


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "bundle"))


def reseal(folder: Path) -> None:
    """Rewrite the manifest, as a tool that wrote a whole (but wrong) bundle would."""
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": io.manifest(folder, skip=(MANIFEST_FILE,))}))


def edit_meta(folder: Path, change, sealed: bool = True) -> None:
    meta = yaml.safe_load((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(yaml.safe_dump(meta))
    if sealed:
        reseal(folder)


def trainable_state(nla: UniversalNLA) -> dict[str, torch.Tensor]:
    state = {f"av.{n}": p for n, p in nla.av.model.named_parameters() if p.requires_grad}
    state.update({f"ar.{n}": p for n, p in nla.ar.named_parameters() if p.requires_grad})
    state.update({f"adapters.{k}": v for k, v in nla.adapters.state_dict().items()})
    return state


def test_layout_and_sidecar(saved):
    for rel in (META_FILE, *REQUIRED_FILES):
        assert (saved / rel).is_file(), rel
    meta = yaml.safe_load((saved / META_FILE).read_text())
    assert (meta["kind"], meta["schema_version"], meta["d_shared"], meta["anchor_tag"]) == ("nla_universal", 1, 64, "tiny-llama")
    assert meta["tags"]["other"] == {"d_model": 32, "layer": 2, "pool": "mean", "held_out": True}
    assert meta["av"]["base"]["name"] == "llama" and meta["ar"]["num_layers"] == 2
    assert set(meta["av"]["tokens"]) == {"injection_char", "injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id"}
    assert meta["av"]["injection_scale"] > 0 and meta["ar"]["mse_scale"] == 8.0
    assert "{explanation}" in meta["ar"]["template"] and meta["teacher"] == {"id": "test-teacher"}
    assert not list(saved.parent.glob(".*.tmp"))  # no temporary folder left behind


def test_round_trip_is_exact(nla, saved):
    again = UniversalNLA.load(saved)
    before, after = trainable_state(nla), trainable_state(again)
    assert set(before) == set(after)
    assert any("value_head" in k for k in before) and any("lora_B" in k for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert again.meta.to_dict() == nla.meta.to_dict()
    assert again.reports == nla.reports == {"adapters/fit_summary.json": {"tags": {"other": {"val": 0.5}}},
                                            "fve_report.json": {"other": {"fve_centred": 0.1}}}
    h = torch.randn(3, 32)
    assert again.verbalize(h, "other", max_new_tokens=6) == nla.verbalize(h, "other", max_new_tokens=6)
    assert torch.equal(again.reconstruct(["a cat", "two dogs"], "other"), nla.reconstruct(["a cat", "two dogs"], "other"))


def test_no_file_in_a_bundle_is_a_pickle(saved):
    files = [p for p in saved.rglob("*") if p.is_file()]
    assert files
    for path in files:
        head = path.read_bytes()[:4]
        assert path.suffix not in PICKLE_SUFFIXES, path
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{path} is a pickle"
        assert head != b"PK\x03\x04", f"{path} is a zip (torch.save) archive"


@pytest.mark.parametrize("key, message", [
    ("injection_token_id", "(?s)token id.*another tokenizer"),
    ("injection_left_neighbor_id", "(?s)left neighbour id differs.*another tokenizer"),
])
def test_a_bundle_for_another_tokenizer_is_refused(copy, key, message):
    edit_meta(copy, lambda m: m["av"]["tokens"].__setitem__(key, m["av"]["tokens"][key] + 1))
    with pytest.raises(NLAError, match=message):
        UniversalNLA.load(copy)


@pytest.mark.parametrize("rel", ["ar/value_head.safetensors", "av/adapter_model.safetensors", "adapters/adapters.safetensors"])
def test_a_missing_file_is_named(copy, rel):
    (copy / rel).unlink()
    with pytest.raises(DataError, match=f"{rel} is missing"):
        UniversalNLA.load(copy)


@pytest.mark.parametrize("rel", ["ar/adapter_model.safetensors", "ar/value_head.safetensors", "av/adapter_config.json", META_FILE])
def test_a_corrupt_file_is_named(copy, rel):
    data = (copy / rel).read_bytes()
    (copy / rel).write_bytes(data[: len(data) // 2] + b"\x00{[")
    with pytest.raises(DataError, match=f"{rel} changed since it was written"):
        UniversalNLA.load(copy)
    reseal(copy)  # a bundle written whole with a broken file in it
    with pytest.raises(DataError, match=f"{rel}.*corrupt|corrupt.*{rel}"):
        UniversalNLA.load(copy)


def test_a_bundle_without_manifest_or_with_a_stray_file_is_refused(copy):
    (copy / "av" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(DataError, match="av/extra.safetensors is not part of it"):
        UniversalNLA.load(copy)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match="has no manifest.json: it was cut short"):
        UniversalNLA.load(copy)


def test_an_edited_d_shared_says_the_sidecar_and_the_adapters_disagree(copy):
    edit_meta(copy, lambda m: m.__setitem__("d_shared", 65), sealed=False)
    with pytest.raises(DataError, match="nla_meta.yaml changed since it was written") as err:
        UniversalNLA.load(copy)
    assert "restore" in err.value.fix
    reseal(copy)
    with pytest.raises(DataError, match="the sidecar and the adapters disagree: nla_meta.yaml says d_shared=65") as err:
        UniversalNLA.load(copy)
    assert "adapters/adapters.safetensors" in err.value.problem and "restore" in err.value.fix


def test_an_untrained_part_is_refused_unless_asked_for(copy):
    edit_meta(copy, lambda m: m.__setitem__("stages", [{"stage": "sft-ar", "id": "a1"}]))
    with pytest.raises(DataError, match=r"(?s)the AV of bundle .* was never trained .*stages: sft-ar") as err:
        UniversalNLA.load(copy)
    assert "nla-universal sft-av" in err.value.fix
    assert UniversalNLA.load(copy, parts=("ar",)).ar is not None
    assert UniversalNLA.load(copy, trained=False).av is not None


def test_parts_load_alone(saved):
    ar_only = UniversalNLA.load(saved, parts=("ar",))
    assert ar_only.reconstruct(["a cat"], "other").shape == (1, 32)
    with pytest.raises(NLAError, match="loaded without its AV"):
        ar_only.verbalize(torch.randn(32), "other")
    av_only = UniversalNLA.load(saved, parts=("av",))
    with pytest.raises(NLAError, match="loaded without its AR"):
        av_only.reconstruct(["a cat"], "other")


def test_schema_version_and_kind_are_checked(copy):
    edit_meta(copy, lambda m: m.__setitem__("schema_version", 2))
    with pytest.raises(DataError, match="schema_version 2"):
        UniversalNLA.load(copy)
    edit_meta(copy, lambda m: m.update(schema_version=1, kind="nla_model"))
    with pytest.raises(DataError, match="not an nla-universal sidecar"):
        UniversalNLA.load(copy)


def test_tags_must_match_the_adapters(copy):
    edit_meta(copy, lambda m: m["tags"].pop("other"))
    with pytest.raises(DataError, match="adapters hold tags"):
        UniversalNLA.load(copy)


def test_d_shared_must_match_the_trunk(copy):
    edit_meta(copy, lambda m: m["av"]["base"]["random_overrides"].update(hidden_size=32))
    with pytest.raises(NLAError, match="hidden size 32.*d_shared is 64"):
        UniversalNLA.load(copy)


def test_a_failed_save_leaves_the_old_bundle_whole(nla, copy, monkeypatch):
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    def broken(folder):
        raise OSError("disk full")

    monkeypatch.setattr(nla.ar, "save", broken)
    with pytest.raises(OSError):
        nla.save(copy)
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before
    assert not list(copy.parent.glob(".*.tmp"))


def test_api_end_to_end_on_a_tiny_trunk(nla):
    h = torch.randn(4, 32)
    texts = nla.verbalize(h, "other", max_new_tokens=8)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert len(nla.verbalize(h[0], "other", max_new_tokens=4)) == 1
    recon = nla.reconstruct(texts, "other")
    assert recon.shape == (4, 32) and torch.isfinite(recon).all()
    report = nla.roundtrip(h, "other", max_new_tokens=8)
    assert set(METRICS) <= set(report) and len(report["explanations"]) == 4
    assert -1.0 <= report["cos"] <= 1.0
    # scale-free: a rescaled activation gives the same explanation
    assert nla.verbalize(h * 7.0, "other", max_new_tokens=8) == texts


def test_bad_inputs_get_clear_errors(nla):
    with pytest.raises(NLAError, match=r"expected \[N, 32\] or \[32\]"):
        nla.verbalize(torch.randn(2, 64), "other")
    with pytest.raises(NLAError, match="NaN or inf"):
        nla.verbalize(torch.tensor([[float("nan")] * 32]), "other")
    with pytest.raises(NLAError, match="(?s)unknown tag 'gpt5'.*tiny-llama, other"):
        nla.verbalize(torch.randn(32), "gpt5")
    with pytest.raises(NLAError, match="unknown tag"):
        nla.reconstruct(["text"], "gpt5")
    with pytest.raises(NLAError, match="non-empty list of strings"):
        nla.reconstruct([], "other")


def test_create_refuses_a_template_without_placeholder():
    with pytest.raises(NLAError, match="explanation"):
        UniversalNLA.create(TRUNK, pool_adapters(64, TRUNK.tag), tags_for(TRUNK.tag, 64, 1), ar=ARConfig(template="no slot"))


@pytest.mark.slow
def test_api_end_to_end_on_the_real_smollm2_trunk(tmp_path):
    trunk = ModelSpec(tag="smollm2-135m", source="packaged", name="smollm2-135m-instruct", depth=0.5)
    model = UniversalNLA.create(trunk, pool_adapters(576, trunk.tag), tags_for(trunk.tag, 576, 14))
    model.meta.stages = [{"stage": "sft-ar", "id": "a1"}, {"stage": "sft-av", "id": "b2"}]
    assert model.meta.ar.num_layers == 15
    h = torch.randn(2, 32)
    texts = model.verbalize(h, "other", max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    recon = model.reconstruct(texts, "other")
    assert recon.shape == (2, 32) and torch.isfinite(recon).all()
    assert set(METRICS) <= set(model.roundtrip(h, "other", max_new_tokens=8))
    again = UniversalNLA.load(model.save(tmp_path / "smol"))
    assert again.meta.av.marker == model.meta.av.marker
    assert torch.allclose(again.reconstruct(texts, "other"), recon, atol=1e-5)


def test_verbalize_and_reconstruct_commands(saved, tmp_path):
    from nla_universal import activations, io
    from nla_universal.corpus import write_passages
    from nla_universal.pipeline.use import ReconstructConfig, VerbalizeConfig, reconstruct, verbalize
    from nla_universal.pipeline.workspace import RunConfig

    run = tmp_path / "run"
    ids = [f"p{i}" for i in range(6)]
    splits = ["test", "train", "test", "val", "test", "test"]
    write_passages(pa.table({"passage_id": ids, "text": [f"text {i}" for i in ids], "split": splits}), run / "passages.parquet")
    folder = run / "activations" / "other"
    folder.mkdir(parents=True)
    X = torch.randn(len(ids), 32).numpy()
    activations.write_shard(folder, 0, activations.shard_table(ids, X, [10] * len(ids), None))
    io.write_yaml(folder / "meta.yaml", {"tag": "other", "d_model": 32, "shards": activations.shard_rows(folder)})
    io.mark_success(folder)
    out = verbalize(VerbalizeConfig(bundle=str(saved), tag="other", run=RunConfig(run_dir=str(run)), split="test", limit=3,
                                    max_new_tokens=5))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in lines] == [0, 2, 4] and all(r["passage_id"] == ids[r["row"]] for r in lines)
    summary = reconstruct(ReconstructConfig(bundle=str(saved), tag="other", run=RunConfig(run_dir=str(run))))
    assert summary["n"] == 3 and set(METRICS) <= set(summary)
    back = pq.read_table(summary["output"])
    assert back.column("passage_id").to_pylist() == ["p0", "p2", "p4"] and len(back.column("activation")[0]) == 32
