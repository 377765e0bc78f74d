"""What the supervised stages read: per tag, the passages of a split with their activations and z."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..activations import read_activations
from ..config import PoolConfig
from ..corpus import read_passages
from ..errors import DataError
from ..metrics import normalize_rows
from ..teacher import check_single_teacher

log = logging.getLogger(__name__)


@dataclass
class TagRows:
    """One tag's rows of a split, aligned: passage ids, n(h) at √d_M, and the teacher's z (or None)."""

    tag: str
    ids: list[str]
    H: np.ndarray  # [N, d_M] float32, rows at √d_M
    z: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


def passages_with_z(run_dir: Path, need_z: bool = True):
    """passages.parquet; with need_z, it must hold teacher explanations from exactly one teacher."""
    table = read_passages(run_dir / "passages.parquet")
    if need_z:
        if "z" not in table.column_names:
            raise DataError(f"{run_dir / 'passages.parquet'} has no teacher explanations (column z)", "run `nla-universal teach` first")
        check_single_teacher(table)
    return table


def teacher_of(table) -> str | None:
    if "teacher" not in table.column_names:
        return None
    ids = {t for t in table.column("teacher").to_pylist() if t}
    return ids.pop() if len(ids) == 1 else None


def tag_rows(run_dir: Path, table, tag: str, split: str, *, need_z: bool, limit: int | None = None) -> TagRows:
    """Rows of `split` for `tag` (passage order of the corpus); with need_z, only passages that have a z."""
    acts = read_activations(run_dir / "activations", tag)
    if acts.positions is not None:
        raise DataError(f"{tag}: activations were extracted with pool=positions", "the NLA stages read one row per passage: use mean or last")
    index = {p: i for i, p in enumerate(acts.passage_ids)}
    ids = table.column("passage_id").to_pylist()
    splits = table.column("split").to_pylist()
    zs = table.column("z").to_pylist() if "z" in table.column_names else [None] * len(ids)
    keep = [(p, z) for p, s, z in zip(ids, splits, zs) if s == split and p in index and (z or not need_z)]
    if limit is not None:
        keep = keep[:limit]
    if not keep:
        raise DataError(
            f"{tag}: no {split} passages with activations{' and a teacher z' if need_z else ''}",
            "check that extract and teach ran on this run_dir's passages",
        )
    H = acts.X[[index[p] for p, _ in keep]]
    if not np.isfinite(H).all():
        raise DataError(f"{tag}: non-finite activation rows in the {split} split", "re-extract with drop_nonfinite=true")
    return TagRows(tag, [p for p, _ in keep], normalize_rows(H).astype(np.float32), [z for _, z in keep])


def trained_tags(pool: PoolConfig) -> list[str]:
    return [m.tag for m in pool.models if not m.held_out]


def example_index(rows: dict[str, TagRows]) -> list[tuple[str, int]]:
    """(tag, row) for every example of every tag: the flat list batches are drawn from, mixing tags."""
    return [(tag, i) for tag, r in rows.items() for i in range(len(r))]


def gather(rows: dict[str, TagRows], pairs: list[tuple[str, int]]) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Group a batch's (tag, row) pairs by tag: positions in the batch and the n(h) rows."""
    by_tag: dict[str, tuple[list[int], list[int]]] = {}
    for pos, (tag, i) in enumerate(pairs):
        by_tag.setdefault(tag, ([], []))
        by_tag[tag][0].append(pos)
        by_tag[tag][1].append(i)
    return {tag: (pos, torch.from_numpy(rows[tag].H[idx])) for tag, (pos, idx) in by_tag.items()}


# --- stage bookkeeping --------------------------------------------------------------------------


def stage_marker(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / f"{stage}.json"


def stage_done(run_dir: Path, stage: str, settings: dict) -> dict | None:
    """The record of a finished stage run with the same settings, else None (the stage runs/resumes)."""
    path = stage_marker(run_dir, stage)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == json.loads(json.dumps(settings, default=str)) else None


def mark_stage_done(run_dir: Path, stage: str, settings: dict, started: float, **results) -> dict:
    record = {"stage": stage, "settings": settings, "seconds": round(time.time() - started, 1), **results}
    io.write_text(stage_marker(run_dir, stage), json.dumps(record, indent=2, default=str))
    return record
