"""`nla-universal sft-av`: AV SFT — the injected shared vector → the teacher's z (see `train/sft.py`).

Needs a bundle whose AR went through sft-ar. The bundle is written once training finished; until
then it still records only sft-ar, so nothing downstream mistakes an untrained AV for a trained one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..train.loop import LoopConfig
from ..train.sft import train_av
from .training_data import sft_rows
from .workspace import RunConfig, Workspace

STAGE = "sft-av"


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


def run(cfg: AVSFTConfig) -> dict:
    ws = Workspace(cfg.run)
    st = ws.stage(STAGE, cfg)
    if st.done:
        return st.record
    table = ws.passages(need_z=True)
    nla = ws.open_bundle("sft-ar")
    rows, val = sft_rows(ws, nla, table, cfg.val_passages)
    final = train_av(nla, rows, val, cfg.loop, ws.stage_dir(STAGE), ws.device, train_enc=cfg.train_enc, enc_lr=cfg.enc_lr,
                     collapse_sample=cfg.collapse_sample, collapse_threshold=cfg.collapse_threshold,
                     max_new_tokens=cfg.max_new_tokens)
    st.save_bundle(nla)
    return st.finish(final=final, examples=sum(len(r) for r in rows.values()))
