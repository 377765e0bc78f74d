"""What the training stages read from the run folder: each trained tag's train and val rows with z,
and the one-teacher guard between the passages and the bundle."""

from __future__ import annotations

from ..errors import DataError
from ..nla.api import UniversalNLA
from ..activations import TagRows
from .workspace import Workspace


def teacher_of(table) -> str | None:
    if "teacher" not in table.column_names:
        return None
    ids = {t for t in table.column("teacher").to_pylist() if t}
    return ids.pop() if len(ids) == 1 else None


def bundle_teacher_check(nla: UniversalNLA, teacher: str | None) -> None:
    """A bundle trained on one teacher's z must not continue on another's (the seed's v3 failure)."""
    if nla.meta.teacher_id and teacher and nla.meta.teacher_id != teacher:
        raise DataError(
            f"the bundle was trained on z from {nla.meta.teacher_id!r}, the passages hold z from {teacher!r}",
            "mixing teachers is refused: use a new run_dir for the new teacher",
        )
    if teacher and not nla.meta.teacher_id:
        nla.meta.teacher_id = teacher


def sft_rows(ws: Workspace, nla: UniversalNLA, table, val_passages: int) -> tuple[dict[str, TagRows], dict[str, TagRows]]:
    """Train and val rows (with z) of every trained tag, after the one-teacher check."""
    bundle_teacher_check(nla, teacher_of(table))
    tags = ws.pool.trained_tags
    rows = {t: ws.rows(table, t, "train", need_z=True) for t in tags}
    val = {t: ws.rows(table, t, "val", need_z=True, limit=val_passages) for t in tags}
    return rows, val
