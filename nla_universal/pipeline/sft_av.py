"""`nla-universal sft-av`: AV SFT — the injected shared vector → the teacher's z (see `train/sft.py`).

First the AV's input map is fitted (nla/input_map.py) unless the bundle holds one fitted on these
same z. Needs a bundle whose AR went through sft-ar. The bundle is written once training finished;
until then it still records only sft-ar, so nothing downstream mistakes an untrained AV for a trained one.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from ..config import choices, opt
from ..heads import split_head
from ..nla.api import UniversalNLA
from ..nla.input_map import bag_targets, fit_input_map
from ..activations import TagRows
from ..train.loop import LoopConfig
from ..train.sft import train_av
from .training_data import sft_rows
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)
STAGE = "sft-av"


class InputMapMode(enum.StrEnum):
    bag = "bag"  # fit W v + b onto the mean embedding of the explanation's words
    head = "head"  # ... of its head's words only (what the vector determines), the whole z where it has no head
    none = "none"  # inject the shared vector as it is (the AV reads nothing at CPU scale: measured)


@dataclass
class AVSFTConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    loop: LoopConfig = opt(help="optimisation", factory=lambda: LoopConfig(steps=200, batch_size=8, lr=5e-4))
    train_enc: bool = opt(False, "train every enc_M jointly with the AV (the anchor's stays fixed)")
    enc_lr: float = opt(2e-4, "learning rate of enc_M when train_enc")
    val_passages: int = opt(32, "val passages per tag for the validation loss")
    collapse_sample: int = opt(16, "val passages generated at each eval to measure distinct_z")
    collapse_threshold: float = opt(0.5, "warn when the share of distinct explanations falls below this")
    max_new_tokens: int = opt(48, "generation length at eval")
    input_map: InputMapMode = opt(InputMapMode.bag, f"the AV's input map: {choices(InputMapMode)} (bag: a ridge map from "
                                  "the shared vector to the mean token embedding of its explanation's words; head: of "
                                  "the words of its head only, e.g. a token row's own word)")
    train_input_map: bool = opt(False, "train the input map jointly with the AV's LoRA (else it stays as fitted)")
    input_map_lr: float = opt(1e-4, "learning rate of the input map when train_input_map")


def run(cfg: AVSFTConfig) -> dict:
    ws = Workspace(cfg.run)
    st = ws.stage(STAGE, cfg)
    if st.done:
        return st.record
    table = ws.passages(need_z=True)
    nla = ws.open_bundle("sft-ar")
    rows, val = sft_rows(ws, nla, table, cfg.val_passages)
    input_map = ensure_input_map(nla, rows, val, cfg.input_map)
    final = train_av(nla, rows, val, cfg.loop, ws.stage_dir(STAGE), ws.device, train_enc=cfg.train_enc, enc_lr=cfg.enc_lr,
                     collapse_sample=cfg.collapse_sample, collapse_threshold=cfg.collapse_threshold,
                     max_new_tokens=cfg.max_new_tokens, train_input_map=cfg.train_input_map, input_map_lr=cfg.input_map_lr)
    st.save_bundle(nla)
    return st.finish(final=final, input_map=input_map, examples=sum(len(r) for r in rows.values()))


def z_fingerprint(nla: UniversalNLA, rows: dict[str, TagRows], mode: InputMapMode) -> str:
    """Names the (teacher, passages, z, target) a map was fitted on: other z or targets need another map."""
    h = hashlib.sha256(str(nla.meta.teacher_id).encode() + (b"" if mode == InputMapMode.bag else str(mode).encode()))
    for tag in sorted(rows):
        h.update(json.dumps([tag, rows[tag].ids, rows[tag].z]).encode())
    return h.hexdigest()[:16]


def map_targets(explanations: list[str], mode: InputMapMode) -> list[str]:
    """The text whose bag each vector is mapped onto: the whole z, or (head) its head's words if it has a head."""
    if mode == InputMapMode.head:
        return [" ".join(split_head(z)[0]) or z for z in explanations]
    return list(explanations)


def ensure_input_map(nla: UniversalNLA, rows: dict[str, TagRows], val: dict[str, TagRows], mode: InputMapMode) -> dict | None:
    """The AV's input map for these z: kept when the bundle's was fitted on them, else fitted now."""
    if mode == InputMapMode.none:
        nla.set_input_map(None, None)
        return None
    fingerprint = z_fingerprint(nla, rows, mode)
    current = nla.meta.av.input_map or {}
    if current.get("fingerprint") == fingerprint and nla.av.input_map is not None:
        return current

    def stacked(part: dict[str, TagRows]) -> tuple[np.ndarray, np.ndarray]:
        V = np.concatenate([nla.encode(r.H, t).double().numpy() for t, r in part.items()])
        Y = bag_targets(nla.av.tokenizer, nla.av.embedding, map_targets([z for r in part.values() for z in r.z], mode))
        return V, Y

    (V, Y), (V_val, Y_val) = stacked(rows), stacked(val)
    input_map, report = fit_input_map(V, Y, V_val, Y_val)
    report = {"kind": str(mode), "fingerprint": fingerprint, **report}
    log.info("sft-av: input map fitted (%s: val FVE of the bag %.3f; %.3f from other passages' vectors)",
             mode, report["val_fve"], report["val_fve_shuffled"])
    nla.set_input_map(input_map, report)
    return report
