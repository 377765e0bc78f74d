"""An explanation's head: a few words that the activation itself determines, written before the sentence.

Why: the AV reads coarse, vector-determined content first (a class, a token, the words the input
map predicts: README, "Why, measured"), while the teacher's free sentence depends on the passage's
fine detail. A head of the passage's most telling words — its top tf-idf words, idf over the train
split — gives the AV a target it can read early and the AR words that carry the passage. The head is
extractive (computed here from the text), so it costs no teacher call and never drifts in format.

    Keywords: pickle, protocol, unpickler. The passage explains how ...
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from typing import Sequence

PREFIX = "Keywords: "
# A word, as heads, the input map's bags and token rows all count it: a letter, then 2+ letters, digits or _.
WORD = re.compile(r"[a-z][a-z0-9_]{2,}", re.I)
_HEAD = re.compile(r"^Keywords:\s*([^.]*)\.\s*", re.I)


class HeadKind(enum.StrEnum):
    none = "none"  # the teacher's sentence alone
    keywords = "keywords"  # "Keywords: a, b, c." then the sentence


def idf(texts: Sequence[str]) -> dict[str, float]:
    """Inverse document frequency of every word of `texts` (the train split's)."""
    df = Counter(w for t in texts for w in set(WORD.findall(t.lower())))
    return {w: math.log(len(texts) / n) for w, n in df.items()}


def keywords(text: str, idf_of: dict[str, float], k: int) -> list[str]:
    """The `k` words of `text` with the highest tf-idf (unseen words count as the rarest), ties by the word."""
    tf = Counter(WORD.findall(text.lower()))
    rarest = max(idf_of.values(), default=0.0)
    return sorted(tf, key=lambda w: (-tf[w] * idf_of.get(w, rarest), w))[:k]


def with_head(sentence: str, words: Sequence[str]) -> str:
    return f"{PREFIX}{', '.join(words)}. {sentence}" if words else sentence


def split_head(explanation: str) -> tuple[list[str], str]:
    """(head words, the rest); no head → ([], explanation)."""
    found = _HEAD.match(explanation)
    if not found:
        return [], explanation
    return [w.strip().lower() for w in found.group(1).split(",") if w.strip()], explanation[found.end():]
