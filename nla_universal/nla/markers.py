"""The marker token: one rare character whose embedding row the activation replaces.

Chosen per tokenizer (the first character of a rare Unicode block that is one dedicated token and
stays one token inside the prompt), recorded with the ids of both neighbours in the canonical
prompt, and re-checked against the live tokenizer whenever a bundle is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import NLAError

# Searched in order. The first block is the NLA library's (Qwen ㈎, Gemma-3 ㈜, Llama-3.3 ㎡);
# the others hold symbols that ordinary prose never uses, for tokenizers without CJK symbols.
MARKER_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x3200, 0x33FF, "enclosed CJK letters and months, CJK compatibility"),
    (0x2460, 0x24FF, "enclosed alphanumerics"),
    (0x2700, 0x27BF, "dingbats"),
    (0x2600, 0x26FF, "miscellaneous symbols"),
    (0x2580, 0x259F, "block elements"),
    (0x25A0, 0x25FF, "geometric shapes"),
    (0xAC00, 0xD7A3, "Hangul syllables"),
)

Render = Callable[[str], list[int]]  # marker char → ids of the canonical prompt holding it


@dataclass(frozen=True)
class MarkerSpec:
    """The marker character, its token id and the ids right before and after it in the prompt."""

    char: str
    token_id: int
    left_id: int
    right_id: int

    def to_dict(self) -> dict:
        # The NLA library's sidecar key names, so its tooling reads ours.
        return {
            "injection_char": self.char,
            "injection_token_id": self.token_id,
            "injection_left_neighbor_id": self.left_id,
            "injection_right_neighbor_id": self.right_id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MarkerSpec":
        return cls(
            char=str(d["injection_char"]),
            token_id=int(d["injection_token_id"]),
            left_id=int(d["injection_left_neighbor_id"]),
            right_id=int(d["injection_right_neighbor_id"]),
        )


def single_token_id(tokenizer, char: str) -> int | None:
    """The id of `char` when it is exactly one ordinary (non-UNK, non-special) token of its own."""
    ids = tokenizer.encode(char, add_special_tokens=False)
    if len(ids) != 1:
        return None
    token_id = int(ids[0])
    if token_id == tokenizer.unk_token_id or token_id in set(tokenizer.all_special_ids):
        return None
    return token_id if tokenizer.decode([token_id]).strip() == char else None


def neighbours(ids: list[int], token_id: int) -> tuple[int, int] | None:
    """(left id, right id) around the one occurrence of `token_id`; None unless it occurs exactly once inside."""
    hits = [i for i, t in enumerate(ids) if t == token_id]
    if len(hits) != 1 or not 0 < hits[0] < len(ids) - 1:
        return None
    return int(ids[hits[0] - 1]), int(ids[hits[0] + 1])


def choose_marker(tokenizer, render: Render) -> MarkerSpec:
    """The first character of MARKER_RANGES that is one token alone and one token inside the prompt."""
    for start, end, _ in MARKER_RANGES:
        for code in range(start, end + 1):
            char = chr(code)
            token_id = single_token_id(tokenizer, char)
            if token_id is None:
                continue
            around = neighbours(render(char), token_id)
            if around is not None:
                return MarkerSpec(char, token_id, *around)
    blocks = ", ".join(f"U+{s:04X}–U+{e:04X} ({name})" for s, e, name in MARKER_RANGES)
    raise NLAError(
        f"this tokenizer cannot host a single-token marker: no character of {blocks} is one token of its "
        "own that stays one token inside the AV prompt",
        "use a trunk whose tokenizer has such a token (most multilingual tokenizers do)",
    )


def check_marker(tokenizer, marker: MarkerSpec, render: Render) -> None:
    """Raise unless the live tokenizer gives the recorded token id and both recorded neighbour ids."""
    fix = ("this bundle was made for another tokenizer: load it with the trunk named under av.base in "
           "nla_meta.yaml (and its own tokenizer)")
    ids = tokenizer.encode(marker.char, add_special_tokens=False)
    if ids != [marker.token_id]:
        raise NLAError(
            f"marker {marker.char!r} (U+{ord(marker.char):04X}): the bundle records token id {marker.token_id}, "
            f"the live tokenizer encodes it as {ids}",
            fix,
        )
    prompt = render(marker.char)
    count = prompt.count(marker.token_id)
    if count != 1:
        raise NLAError(f"the canonical AV prompt holds the marker id {marker.token_id} {count} times, expected once", fix)
    left, right = neighbours(prompt, marker.token_id) or (None, None)
    for side, recorded, live in (("left", marker.left_id, left), ("right", marker.right_id, right)):
        if recorded != live:
            raise NLAError(
                f"the marker's {side} neighbour id differs: the bundle records {recorded}, the live tokenizer "
                f"gives {live} in the canonical AV prompt",
                fix,
            )
