"""Text around the vectors: the AV prompt, its target and parser, the AR template, padding.

AV prompt: the trunk's chat template when it has one (one user message, generation prompt added),
rendered to text and tokenised once without adding special tokens, so BOS appears once; trunks
without a chat template get a raw template tokenised with `add_special_tokens=True` (keeps BOS).
AR input: a raw string template tokenised with `add_special_tokens=True` (dropping BOS cut Gemma's
FVE 0.77 → 0.31 in the NLA library).
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError

MARKER_SLOT = "{marker}"
TAG_SLOT = "{tag}"
EXPLANATION_SLOT = "{explanation}"

# Short on purpose: every AV forward (SFT, RL, rollout) pays for each prompt token.
DEFAULT_AV_TEMPLATE = (
    "Activation of {tag} on a passage: <concept>{marker}</concept>\n"
    "What was the passage about? Answer in <explanation></explanation> tags."
)
DEFAULT_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
# For trunks without a chat template: the message, then a blank line where the answer starts.
RAW_AV_WRAPPER = "{message}\n\n"

_EXPLANATION_RE = re.compile(r"<explanation>(.*?)</explanation>", re.DOTALL)
_OPEN_TAG = "<explanation>"


def check_av_template(template: str) -> str:
    for slot in (MARKER_SLOT, TAG_SLOT):
        if template.count(slot) != 1:
            raise ConfigError(
                f"the AV prompt template holds {slot} {template.count(slot)} times: {template!r}",
                f"write {slot} exactly once (the marker is where the activation goes; the tag names the model)",
            )
    return template


def check_ar_template(template: str) -> str:
    if template.count(EXPLANATION_SLOT) != 1:
        raise ConfigError(
            f"the AR template holds {EXPLANATION_SLOT} {template.count(EXPLANATION_SLOT)} times: {template!r}",
            f"write {EXPLANATION_SLOT} exactly once, before a fixed suffix (the AR reads its last token), "
            f"e.g. {DEFAULT_AR_TEMPLATE!r}",
        )
    return template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def av_message(template: str, tag: str, marker_char: str) -> str:
    # replace, not str.format: templates may hold other braces.
    return check_av_template(template).replace(TAG_SLOT, tag).replace(MARKER_SLOT, marker_char)


def render_av_prompt(tokenizer, template: str, tag: str, marker_char: str) -> list[int]:
    """Token ids of the AV prompt for `tag` with the marker character in place."""
    message = av_message(template, tag, marker_char)
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(RAW_AV_WRAPPER.format(message=message), add_special_tokens=True)["input_ids"])


def av_target(z: str) -> str:
    """The AV's SFT target for explanation `z` (the trunk's EOS token follows it)."""
    return f"<explanation>\n{z}\n</explanation>"


def parse_explanation(text: str) -> tuple[str, bool]:
    """(explanation, parsed): the text inside the first <explanation> tags, else a stripped fallback."""
    found = _EXPLANATION_RE.search(text)
    if found:
        return found.group(1).strip(), True
    opened = text.find(_OPEN_TAG)
    # A completion cut at max_new_tokens opens the tag without closing it: keep what follows it.
    return (text[opened + len(_OPEN_TAG):] if opened >= 0 else text).strip(), False


def ar_text(template: str, explanation: str) -> str:
    return check_ar_template(template).replace(EXPLANATION_SLOT, explanation)


def pad_ids(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` ids padded on `side` ("left" | "right") with `pad_id`, and the mask of real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is always masked out, so any id serves)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)
