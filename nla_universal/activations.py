"""The activation store: `activations/<tag>/part-NNNNN.parquet` + `meta.yaml` + `_SUCCESS`.

Writers (extract.py) append shards atomically; readers refuse a folder without `_SUCCESS`.
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


def complete_shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


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
    tables = []
    for shard in complete_shards(folder):
        try:
            tables.append(pq.read_table(shard))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"corrupt activation shard {shard}: {exc}", f"delete {folder} and rerun extract") from None
    if not tables:
        raise DataError(f"{folder} holds no shards", f"delete {folder} and rerun extract")
    table = pa.concat_tables(tables)
    d = int(meta["d_model"])
    flat = table.column("activation").combine_chunks()
    X = flat.values.to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)
    positions = table.column("position").to_numpy() if "position" in table.column_names else None
    return Activations(
        tag=tag,
        passage_ids=table.column("passage_id").to_pylist(),
        X=X,
        n_tokens=table.column("n_tokens").to_numpy(),
        meta=meta,
        positions=positions,
    )

