"""Per-token rows: passage prefixes that end at a word, so one row is one token's vector in every model.

Why prefixes: in a causal LM the hidden state at token t depends only on tokens ≤ t, so the last
token of `text[:end]` (pool=last) carries exactly the vector that token has inside the whole passage.
A character offset at a word's end is a token boundary in every tokenizer, so the rows correspond
across models by construction, which is what the enc_M fits need; sampled token positions
(pool=positions) do not correspond across tokenizers. A row keeps its passage's split, so no test
token shares a passage with a training row.

The explanation of a token row is extractive (teacher.backend=context): the word as the head, then
the words that lead up to it —

    Keywords: pickle. It reads "objects are serialised with the pickle".
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .heads import WORD, with_head


def row_id(passage_id: str, end: int) -> str:
    return f"{passage_id}@{end}"


def word_ends(text: str, min_context_words: int) -> list[int]:
    """Character offsets just after each word of 3+ characters, skipping the first `min_context_words`."""
    return [m.end() for m in WORD.finditer(text)][min_context_words:]


def sample_ends(passage_id: str, text: str, k: int, min_context_words: int) -> list[int]:
    """`k` word ends of `text`, the same on every machine (seeded by the passage id), in text order."""
    ends = word_ends(text, min_context_words)
    rng = np.random.default_rng(int(passage_id, 16))
    picked = rng.choice(len(ends), size=min(k, len(ends)), replace=False) if ends else []
    return sorted(ends[int(i)] for i in picked)


def token_rows(ids: list[str], texts: list[str], splits: list[str], k: int,
               min_context_words: int) -> Iterator[tuple[str, str, str, str]]:
    """(row id, prefix text, split, source passage id) for `k` word ends per passage."""
    for pid, text, split in zip(ids, texts, splits):
        for end in sample_ends(pid, text, k, min_context_words):
            yield row_id(pid, end), text[:end], split, pid


def context_explanation(prefix: str, context_words: int) -> str:
    """The token row's target: its last word as the head, then the last `context_words` words quoted."""
    found = list(WORD.finditer(prefix))
    if not found or found[-1].end() != len(prefix):
        raise ValueError(f"a token row must end with a word of 3+ characters: {prefix[-40:]!r}")
    context = " ".join(prefix.split()[-context_words:])
    return with_head(f'It reads "{context}".', [found[-1].group().lower()])
