"""Batches of the training stages: examples drawn across tags from each tag's rows."""

from __future__ import annotations

import torch

from ..activations import TagRows


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
