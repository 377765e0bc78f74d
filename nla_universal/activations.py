"""The activation store: `activations/<tag>/part-NNNNN.parquet` + `meta.yaml` + `_SUCCESS`.

Writers (pipeline/extract.py) write each shard atomically, then `meta.yaml` with the row count of
every shard, then `_SUCCESS`. Readers refuse a folder without `_SUCCESS`, and one whose shards no
longer match the record (a shard deleted, added or cut short after the folder was completed), and
name any row that holds NaN/inf by tag, file and passage id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import io
from .errors import DataError


@dataclass
class Activations:
    """One tag's pooled activations, rows aligned with `passage_ids`."""

    tag: str
    passage_ids: list[str]
    X: np.ndarray  # [N, d] float32
    n_tokens: np.ndarray  # [N] int32
    meta: dict
    positions: np.ndarray | None = None  # [N] int32, pool=positions only

    @property
    def d(self) -> int:
        return int(self.X.shape[1])


@dataclass
class TagRows:
    """One tag's rows of a split, aligned: passage ids, n(h) at √d_M, and the teacher's z (or None)."""

    tag: str
    ids: list[str]
    H: np.ndarray  # [N, d_M] float32, rows at √d_M
    z: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


def tag_dir(root: str | Path, tag: str) -> Path:
    return Path(root) / tag


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:05d}.parquet"


def shard_table(passage_ids: list[str], X: np.ndarray, n_tokens: np.ndarray, positions: np.ndarray | None) -> pa.Table:
    X = np.ascontiguousarray(X, dtype=np.float32)
    d = X.shape[1]
    cols = {
        "passage_id": pa.array(passage_ids, pa.string()),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), d),
        "n_tokens": pa.array(np.asarray(n_tokens, np.int32), pa.int32()),
    }
    if positions is not None:
        cols["position"] = pa.array(np.asarray(positions, np.int32), pa.int32())
    return pa.table(cols)


def write_shard(folder: Path, index: int, table: pa.Table) -> None:
    with io.atomic_path(shard_path(folder, index)) as tmp:
        pq.write_table(table, tmp)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def shard_rows(folder: Path) -> dict[str, int]:
    """{shard file name: rows}, from the parquet footers (no data read): what the record keeps."""
    return {p.name: pq.read_metadata(p).num_rows for p in shard_files(folder)}


def _check_record(folder: Path, meta: dict, tag: str) -> None:
    """The shards on disk are exactly the ones the completed folder recorded, with their row counts."""
    redo = f"re-extract it: nla-universal extract run.run_dir={folder.parent.parent} \"tags=[{tag}]\" overwrite=true"
    recorded = meta.get("shards")
    if not isinstance(recorded, dict):
        raise DataError(f"{folder}/meta.yaml has no shard record (written by an older nla-universal)", redo)
    present = {p.name for p in shard_files(folder)}
    for name in sorted(set(recorded) - present):
        raise DataError(f"{tag}: shard {folder / name} is missing ({recorded[name]} rows recorded)", redo)
    for name in sorted(present - set(recorded)):
        raise DataError(f"{tag}: {folder / name} is not one of the shards this folder was completed with", f"remove it, or {redo}")
    for name, rows in recorded.items():
        try:
            found = pq.read_metadata(folder / name).num_rows
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"corrupt activation shard {folder / name}: {exc}", redo) from None
        if found != rows:
            raise DataError(f"{tag}: shard {folder / name} holds {found} rows, its record says {rows}", redo)


def _check_finite(tag: str, shard: Path, table: pa.Table, X: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(bad):
        ids = table.column("passage_id").to_pylist()
        raise DataError(
            f"{tag}: {len(bad)} activation row(s) in {shard} hold NaN/inf, e.g. passage {ids[bad[0]]}",
            "re-extract with dtype float32 or bfloat16 (float16 overflows at sink channels), or with "
            "drop_nonfinite=true to skip such passages",
        )


def read_activations(root: str | Path, tag: str) -> Activations:
    """All rows of a complete tag folder; a clear error for a missing, incomplete or corrupt one."""
    folder = tag_dir(root, tag)
    if not folder.is_dir():
        raise DataError(f"no activations for tag {tag!r} under {root}", f"run `nla-universal extract` for {tag}")
    if not io.is_complete(folder):
        raise DataError(
            f"activations for {tag!r} in {folder} are incomplete (no _SUCCESS)",
            "rerun `nla-universal extract`; it resumes where it stopped",
        )
    meta = io.read_yaml(folder / "meta.yaml")
    _check_record(folder, meta, tag)
    d = int(meta["d_model"])
    tables, blocks = [], []
    for shard in shard_files(folder):
        try:
            table = pq.read_table(shard)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"corrupt activation shard {shard}: {exc}", f"delete {folder} and rerun extract") from None
        X = table.column("activation").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, d)
        _check_finite(tag, shard, table, X)
        tables.append(table)
        blocks.append(X.astype(np.float32, copy=False))
    if not tables:
        raise DataError(f"{folder} holds no shards", f"delete {folder} and rerun extract")
    table = pa.concat_tables(tables)
    X = np.concatenate(blocks)
    positions = table.column("position").to_numpy() if "position" in table.column_names else None
    return Activations(
        tag=tag,
        passage_ids=table.column("passage_id").to_pylist(),
        X=X,
        n_tokens=table.column("n_tokens").to_numpy(),
        meta=meta,
        positions=positions,
    )

