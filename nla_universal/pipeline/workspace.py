"""The run folder: where every stage reads and writes, and the records that say what finished.

    run_dir/passages.parquet        corpus (+ teacher z)       one file, replaced atomically
    run_dir/activations/<tag>/      extract                    shard record in meta.yaml, then _SUCCESS
    run_dir/adapters/               fit-adapters               written whole, manifest.json last
    run_dir/bundle/                 sft-ar … rl                written whole, manifest.json last, stage history
    run_dir/explanations/<tag>.jsonl  the AV's own explanations (refit-dec, eval), cached
    run_dir/<stage>/                a stage's checkpoints and metrics.jsonl
    run_dir/stages/<stage>.json     a finished stage's record: settings, id, seconds, results

A stage's output counts only once its record exists and the artifact it wrote verifies: readers
refuse anything else with a message naming the stage to rerun. The bundle carries the ids of the
stage runs that wrote it; a stage that rewrites it drops the entries of the stages that depended on
what it changed (rerunning sft-av makes refit-dec and rl stale).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..activations import Activations, read_activations
from ..adapters import PoolAdapters
from ..config import PoolConfig, default_cache_dir, load_pool, opt
from ..corpus import read_passages
from ..device import resolve_device
from ..errors import ConfigError, DataError
from ..nla.api import UniversalNLA
from ..nla.bundle import NLAMeta, read_reports, write_bundle
from ..teacher import check_single_teacher
from .rows import TagRows, tag_rows

log = logging.getLogger(__name__)

# Which bundle stages each bundle stage's result depends on: rewriting one makes these stale.
DEPENDS_ON = {
    "sft-ar": (),
    "sft-av": (),
    "refit-dec": ("sft-ar", "sft-av"),
    "add-model": ("sft-ar", "sft-av"),
    "rl": ("sft-ar", "sft-av", "refit-dec"),
}


@dataclass
class RunConfig:
    """Where a stage reads and writes, and on what device."""

    run_dir: str = opt("runs/demo", "run folder (passages, activations, adapters, bundle, stage outputs)")
    pool: str = opt("demo", "pool YAML path, or the name of one shipped in nla_universal/configs/pools/")
    device: str = opt("cpu", "cpu | cuda | cuda:N | auto")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models and teacher replies are cached")


def settings(*configs) -> dict:
    """The JSON form of stage configs, as a record keeps them (Enums as their values)."""
    return json.loads(json.dumps({type(c).__name__: asdict(c) for c in configs}, default=str))


def _family(stage: str) -> str:
    return "add-model" if stage.startswith("add-model") else stage


class Workspace:
    """One run folder. Stages get their inputs here and record their outputs through `stage()`."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.root = Path(run.run_dir)

    # ------------------------------------------------------------------ places

    @property
    def passages_path(self) -> Path:
        return self.root / "passages.parquet"

    @property
    def activations_root(self) -> Path:
        return self.root / "activations"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def record_path(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    @cached_property
    def pool(self) -> PoolConfig:
        return load_pool(self.run.pool)

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.run.device)

    # ------------------------------------------------------------------ inputs

    def passages(self, need_z: bool = False):
        """passages.parquet; with need_z, it must hold explanations from exactly one teacher."""
        table = read_passages(self.passages_path)
        if need_z:
            if "z" not in table.column_names:
                raise DataError(f"{self.passages_path} has no teacher explanations (column z)", "run `nla-universal teach` first")
            check_single_teacher(table)
        return table

    def activations(self, tag: str) -> Activations:
        return read_activations(self.activations_root, tag)

    def rows(self, table, tag: str, split: str, *, need_z: bool, limit: int | None = None) -> TagRows:
        return tag_rows(self.activations(tag), table, split, need_z=need_z, limit=limit)

    def adapters(self) -> PoolAdapters:
        """The fitted adapters of fit-adapters (and add-model), checked against their manifest."""
        folder = self.adapters_dir
        problems = io.seal_problems(folder)
        if problems is None:
            raise DataError(f"no complete fitted adapters in {folder}", "run `nla-universal fit-adapters` (it writes them whole)")
        if problems:
            raise DataError(f"{folder} is not what fit-adapters wrote: {'; '.join(problems[:4])}", "rerun `nla-universal fit-adapters`")
        return PoolAdapters.load(folder)

    def adapter_reports(self) -> dict[str, Any]:
        return read_reports(self.adapters_dir, "adapters/")

    def write_adapters(self, adapters: PoolAdapters, reports: dict[str, dict]) -> None:
        """The adapters folder, written whole with its manifest (a kill leaves the old one or nothing)."""
        with io.atomic_dir(self.adapters_dir) as tmp:
            adapters.save(tmp)
            for name, report in reports.items():
                io.write_text(tmp / name, json.dumps(report, indent=2))
            io.seal(tmp)

    # ------------------------------------------------------------------ records

    def record(self, stage: str) -> dict | None:
        path = self.record_path(stage)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise DataError(f"stage record {path} is corrupt", f"delete it and rerun `nla-universal {_family(stage)}`") from None

    def bundle_stage_names(self) -> list[str]:
        """The stages the run's bundle records (none when there is no bundle yet)."""
        path = self.bundle_dir / "nla_meta.yaml"
        return [s["stage"] for s in (io.read_yaml(path) or {}).get("stages", [])] if path.is_file() else []

    def stage(self, name: str, *configs) -> "StageRun":
        return StageRun(self, name, settings(*configs))

    def open_bundle(self, *require: str, parts=("av", "ar"), generate_batch_size: int = 8) -> UniversalNLA:
        """The run's bundle, after checking that each required stage finished and wrote it; its AV
        generates `generate_batch_size` prompts at a time."""
        if not (self.bundle_dir / "nla_meta.yaml").is_file():
            first = require[0] if require else "sft-ar"
            raise DataError(f"no bundle in {self.bundle_dir}", f"run `nla-universal {first}` first (sft-ar creates the bundle)")
        nla = UniversalNLA.load(self.bundle_dir, cache_dir=self.run.cache_dir, parts=parts, trained=False,
                                generate_batch_size=generate_batch_size)
        self.check_bundle_stages(nla.meta, require)
        if nla.meta.anchor_tag != self.pool.anchor:
            raise ConfigError(
                f"the bundle in {self.bundle_dir} was trained on trunk {nla.meta.anchor_tag!r}, the pool's anchor is {self.pool.anchor!r}",
                "use the pool the bundle was made with, or another run_dir",
            )
        return nla.to(self.device)

    def check_bundle_stages(self, meta: NLAMeta, require) -> None:
        """Each required stage wrote the bundle, and its record in run_dir/stages/ is that run's."""
        by_stage = {s["stage"]: s["id"] for s in meta.stages}
        for stage in require:
            record = self.record(stage)
            if stage not in by_stage:
                raise DataError(
                    f"the bundle in {self.bundle_dir} has not been through {stage} (it records: "
                    f"{', '.join(meta.stage_names) or 'no stage'}); a stage killed before it finished leaves the "
                    "bundle as it was",
                    f"run `nla-universal {_family(stage)}` (resumes from its last checkpoint)",
                )
            if record is None or record.get("id") != by_stage[stage]:
                raise DataError(
                    f"the bundle's {stage} entry ({by_stage[stage]}) has no matching record in {self.record_path(stage)}",
                    f"rerun `nla-universal {_family(stage)}`",
                )


class StageRun:
    """One run of a stage: `done` when a record with the same settings exists and its output still
    verifies; otherwise the stage works, saves through `save_bundle` (if it writes the bundle) and
    `finish`es, which writes the record last."""

    def __init__(self, ws: Workspace, name: str, settings: dict):
        self.ws = ws
        self.name = name
        self.settings = settings
        self.id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.record = self._finished()
        self.done = self.record is not None
        if self.done:
            log.info("%s: done already (record %s)", name, self.ws.record_path(name))

    def _finished(self) -> dict | None:
        record = self.ws.record(self.name)
        if record is None or record.get("settings") != self.settings:
            return None
        if _family(self.name) in DEPENDS_ON:
            meta_path = self.ws.bundle_dir / "nla_meta.yaml"
            stages = (io.read_yaml(meta_path) or {}).get("stages", []) if meta_path.is_file() else []
            if {"stage": self.name, "id": record.get("id")} not in stages:
                return None  # the bundle no longer holds what this run wrote
        return record

    def save_bundle(self, nla: UniversalNLA) -> None:
        """Save the bundle with this run in its history (and without the entries it makes stale)."""
        nla.eval()
        self.write_bundle(nla.meta, nla.av, nla.ar, nla.adapters, nla.reports)

    def write_bundle(self, meta: NLAMeta, av, ar, adapters, reports: dict) -> None:
        """`save_bundle` for parts that live elsewhere (`av`/`ar`: anything with `save(folder)`)."""
        stale = {self.name} | {s for s, deps in DEPENDS_ON.items() if _family(self.name) in deps}
        meta.stages = [s for s in meta.stages if s["stage"] not in stale and _family(s["stage"]) not in stale]
        meta.stages.append({"stage": self.name, "id": self.id})
        write_bundle(self.ws.bundle_dir, meta, av, ar, adapters, reports)

    def finish(self, **results) -> dict:
        record = {"stage": self.name, "id": self.id, "settings": self.settings,
                  "seconds": round(time.time() - self.started, 1), **results}
        io.write_text(self.ws.record_path(self.name), json.dumps(record, indent=2, default=str))
        self.record = record
        return record
