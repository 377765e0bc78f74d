"""What the training stages train on, in memory: per tag, aligned passage ids, n(h) rows and z."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TagRows:
    """One tag's rows of a split, aligned: passage ids, n(h) at √d_M, and the teacher's z (or None)."""

    tag: str
    ids: list[str]
    H: np.ndarray  # [N, d_M] float32, rows at √d_M
    z: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)


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
