"""The bundle: one folder users share (DESIGN.md "Files"), and its `nla_meta.yaml` sidecar.

    nla_meta.yaml     kind, schema_version, d_shared, anchor_tag, tags, av, ar, teacher, stages
    av/               peft adapter (adapter_config.json, adapter_model.safetensors) + input_map.safetensors
    ar/               peft adapter + value_head.safetensors
    adapters/         adapters.safetensors + adapters.json (+ fit reports)
    fve_report.json   optional
    manifest.json     size and sha256 of every other file; written last

safetensors, JSON and YAML only: nothing is written or read with pickle. Writes are atomic (the
whole folder appears at once) and end with the manifest; reads check the manifest against every
file before any model is built, so a bundle cut short, edited or mixed with another's files is
refused by name. `stages` records which training stages produced the weights (a bundle whose AV
never trained is not used as if it had). JSON reports (fit reports under adapters/,
fve_report.json) are read with the bundle and written back when it is saved again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from safetensors import safe_open

from .. import io
from ..config import ModelSpec, check_tag
from ..errors import DataError, NLAError
from .markers import MarkerSpec

KIND = "nla_universal"
SCHEMA_VERSION = 1
META_FILE = "nla_meta.yaml"
MANIFEST_FILE = io.MANIFEST
FVE_REPORT_FILE = "fve_report.json"
REQUIRED_FILES = (
    "av/adapter_config.json",
    "av/adapter_model.safetensors",
    "ar/adapter_config.json",
    "ar/adapter_model.safetensors",
    "ar/value_head.safetensors",
    "adapters/adapters.safetensors",
    "adapters/adapters.json",
)
INPUT_MAP_PATH = "av/input_map.safetensors"
_RESAVE = "re-save the bundle from the run that trained it (or copy the folder again)"


@dataclass
class TagInfo:
    d_model: int
    layer: int
    pool: str
    held_out: bool = False


@dataclass
class AVMeta:
    base: dict  # the trunk's ModelSpec
    prompt_template: str
    marker: MarkerSpec
    injection_scale: float
    input_map: Optional[dict] = None  # how av/input_map.safetensors was fitted; None = vectors injected as they are

    def to_dict(self) -> dict:
        return {"base": self.base, "prompt_template": self.prompt_template, "tokens": self.marker.to_dict(),
                "injection_scale": float(self.injection_scale), "input_map": self.input_map}

    @classmethod
    def from_dict(cls, d: dict) -> "AVMeta":
        return cls(dict(d["base"]), str(d["prompt_template"]), MarkerSpec.from_dict(d["tokens"]), float(d["injection_scale"]),
                   d.get("input_map"))


@dataclass
class ARMeta:
    base: dict  # the trunk's ModelSpec (the AR keeps its blocks 0..num_layers-1)
    num_layers: int  # K + 1
    template: str
    mse_scale: float

    def to_dict(self) -> dict:
        return {"base": self.base, "num_layers": int(self.num_layers), "template": self.template, "mse_scale": float(self.mse_scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "ARMeta":
        return cls(dict(d["base"]), int(d["num_layers"]), str(d["template"]), float(d["mse_scale"]))


@dataclass
class NLAMeta:
    d_shared: int
    anchor_tag: str
    tags: dict[str, TagInfo]
    av: AVMeta
    ar: ARMeta
    teacher_id: Optional[str] = None
    stages: list[dict] = dataclasses.field(default_factory=list)  # [{stage, id}] in training order

    @property
    def stage_names(self) -> list[str]:
        return [s["stage"] for s in self.stages]

    def to_dict(self) -> dict:
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "d_shared": int(self.d_shared),
            "anchor_tag": self.anchor_tag,
            "tags": {t: dataclasses.asdict(info) for t, info in self.tags.items()},
            "av": self.av.to_dict(),
            "ar": self.ar.to_dict(),
            "teacher": {"id": self.teacher_id},
            "stages": [dict(s) for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: Any, path: Path) -> "NLAMeta":
        if not isinstance(d, dict) or d.get("kind") != KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{path} is not an nla-universal sidecar (kind: {kind!r}, expected {KIND!r})", _RESAVE)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise DataError(
                f"{path} has schema_version {d.get('schema_version')!r}; this nla-universal reads {SCHEMA_VERSION}",
                "use the nla-universal version that wrote the bundle, or re-save it with this one",
            )
        try:
            return cls(
                d_shared=int(d["d_shared"]),
                anchor_tag=check_tag(d["anchor_tag"]),
                tags={check_tag(t): TagInfo(int(i["d_model"]), int(i["layer"]), str(i["pool"]), bool(i.get("held_out", False)))
                      for t, i in d["tags"].items()},
                av=AVMeta.from_dict(d["av"]),
                ar=ARMeta.from_dict(d["ar"]),
                teacher_id=(d.get("teacher") or {}).get("id"),
                stages=[{"stage": str(s["stage"]), "id": str(s["id"])} for s in d.get("stages") or []],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path} lacks or mangles a key ({type(exc).__name__}: {exc})", _RESAVE) from None


def spec_to_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict, where: str) -> ModelSpec:
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise DataError(f"{where}: unknown ModelSpec keys {unknown}", "this bundle was written by a newer nla-universal")
    return ModelSpec(**d)


def _check_file(path: Path) -> None:
    """Raise DataError unless `path` exists and parses (safetensors: header and every tensor)."""
    if not path.is_file():
        raise DataError(f"bundle file {path} is missing", _RESAVE)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        else:
            yaml.safe_load(path.read_text())
    except Exception as exc:  # each format raises its own types for corrupt bytes
        raise DataError(f"bundle file {path} is corrupt ({type(exc).__name__}: {str(exc)[:200]})", _RESAVE) from None


def check_manifest(folder: Path) -> None:
    """Every file the bundle was written with is there, unchanged, and nothing else is."""
    problems = io.seal_problems(folder)
    if problems is None:
        raise DataError(
            f"bundle {folder} has no {MANIFEST_FILE}: it was cut short while being written, or written by an older "
            "nla-universal",
            "rerun the stage that wrote it (or copy the bundle folder again, whole)",
        )
    if problems:
        raise DataError(
            f"bundle {folder} is not the one that was written: {'; '.join(problems[:4])}",
            "restore those files from where the bundle came from (copy the folder whole), or rerun the stage that wrote it",
        )


def read_meta(folder: str | Path) -> NLAMeta:
    """The sidecar of a bundle, after checking the manifest and that every bundle file is readable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"bundle folder {folder} does not exist", "pass the folder that holds nla_meta.yaml")
    check_manifest(folder)
    _check_file(folder / META_FILE)
    meta = NLAMeta.from_dict(io.read_yaml(folder / META_FILE), folder / META_FILE)
    for rel in (*REQUIRED_FILES, *((INPUT_MAP_PATH,) if meta.av.input_map else ())):
        _check_file(folder / rel)
    return meta


def check_adapters_match(meta: NLAMeta, adapters) -> None:
    """The adapters hold exactly the sidecar's tags, widths, anchor and d_shared."""
    fix = ("nla_meta.yaml and adapters/ come from different bundles (or one was edited): restore both from the "
           "bundle's origin, copying the folder whole")
    if adapters.d_shared != meta.d_shared or adapters.anchor != meta.anchor_tag:
        raise DataError(
            f"the sidecar and the adapters disagree: nla_meta.yaml says d_shared={meta.d_shared}, anchor "
            f"{meta.anchor_tag!r}; adapters/adapters.safetensors maps to d_shared={adapters.d_shared}, anchor "
            f"{adapters.anchor!r}",
            fix,
        )
    if set(adapters.tags) != set(meta.tags):
        raise DataError(
            f"adapters hold tags {sorted(adapters.tags)}, nla_meta.yaml lists {sorted(meta.tags)}",
            fix,
        )
    for tag, info in meta.tags.items():
        if adapters.dims[tag] != info.d_model:
            raise DataError(f"{tag}: adapters expect d_model={adapters.dims[tag]}, nla_meta.yaml says {info.d_model}", fix)


def check_d_shared(meta: NLAMeta, hidden_size: int, role: str) -> None:
    if hidden_size != meta.d_shared:
        raise NLAError(
            f"the {role} trunk has hidden size {hidden_size}, but the bundle's d_shared is {meta.d_shared}",
            f"load the bundle with the trunk named under {role.lower()}.base in nla_meta.yaml",
        )


def read_reports(folder: str | Path, prefix: str = "") -> dict[str, Any]:
    """The JSON reports in `folder` (its own *.json and adapters/*.json, not adapters.json), keyed by
    path relative to `folder` with `prefix` in front (a fit folder read with prefix "adapters/")."""
    folder = Path(folder)
    found: dict[str, Any] = {}
    for path in sorted([*folder.glob("*.json"), *(folder / "adapters").glob("*.json")]):
        if path.name in ("adapters.json", MANIFEST_FILE):  # PoolAdapters' own metadata; the folder's manifest
            continue
        rel = prefix + path.relative_to(folder).as_posix()
        _check_file(path)
        found[rel] = json.loads(path.read_text())
    return found


def write_bundle(folder: str | Path, meta: NLAMeta, av, ar, adapters, reports: dict[str, Any] | None = None) -> Path:
    """Write every part (and each report at its relative path), then the manifest, into a temporary
    folder that replaces `folder` only when complete."""
    folder = Path(folder)
    with io.atomic_dir(folder) as tmp:
        av.save(tmp / "av")
        ar.save(tmp / "ar")
        adapters.save(tmp / "adapters")
        for rel, report in (reports or {}).items():
            io.write_text(tmp / rel, json.dumps(report, indent=2))
        io.write_yaml(tmp / META_FILE, meta.to_dict())
        io.seal(tmp)
    return folder
