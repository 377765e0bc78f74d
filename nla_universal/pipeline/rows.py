"""One tag's rows of a split, read from the run folder's passages and activations."""

from __future__ import annotations

import numpy as np

from ..activations import Activations
from ..errors import DataError
from ..metrics import normalize_rows
from ..activations import TagRows


def tag_rows(acts: Activations, table, split: str, *, need_z: bool, limit: int | None = None) -> TagRows:
    """Rows of `split` for `acts.tag` in the corpus's passage order; with need_z, only passages that have a z."""
    tag = acts.tag
    if acts.positions is not None:
        raise DataError(f"{tag}: activations were extracted with pool=positions, whose token positions do not "
                        "correspond across tokenizers",
                        "for per-token vectors build the corpus with corpus.unit=token and extract with pool=last "
                        "(the `tokens` quickstart preset); for passage vectors use pool mean or last")
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
    return TagRows(tag, [p for p, _ in keep], normalize_rows(H).astype(np.float32), [z for _, z in keep])
