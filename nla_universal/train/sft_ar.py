"""AR SFT: teach the reconstructor to map a teacher explanation z back to enc_M(n(h_M)).

Input: z in the AR template. Target: enc_M(n(h_M)) rescaled to √d_shared, for every trained tag
(batches mix tags). Loss: `nla.loss.mse_nrm` (= 2(1 − cos)). enc_M is frozen here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import opt
from ..extract import resolve_device
from ..nla.injection import rescale
from ..nla.loss import mse_nrm
from .data import TagRows, example_index, mark_stage_done, stage_done
from .loop import LoopConfig, named_trainable, train
from .workspace import BundleInitConfig, RunConfig, save_bundle, settings, sft_inputs

log = logging.getLogger(__name__)
STAGE = "sft-ar"


@dataclass
class ARSFTConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    init: BundleInitConfig = opt(help="AV/AR settings if this stage creates the bundle", factory=BundleInitConfig)
    loop: LoopConfig = opt(help="optimisation", factory=lambda: LoopConfig(steps=200, batch_size=8, lr=2e-4))
    val_passages: int = opt(48, "val passages per tag scored at each eval")


def shared_targets(nla, rows: TagRows) -> torch.Tensor:
    """enc_M(n(h_M)) at √d_shared: the AR's regression target and the AV's input direction."""
    with torch.no_grad():
        v = nla.adapters.encode(rows.tag, torch.from_numpy(rows.H))
    return rescale(v, math.sqrt(nla.meta.d_shared))


def ar_val_metrics(nla, val: dict[str, TagRows], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    losses, cos = [], []
    for tag, rows in val.items():
        pred = nla.ar.reconstruct(rows.z)
        gold = targets[tag]
        losses.append(mse_nrm(pred, gold))
        cos.append(torch.nn.functional.cosine_similarity(pred, gold, dim=-1))
    return {"mse_nrm": float(torch.cat(losses).mean()), "cos": float(torch.cat(cos).mean())}


def run_sft_ar(cfg: ARSFTConfig) -> dict:
    run_dir = Path(cfg.run.run_dir)
    record = stage_done(run_dir, STAGE, settings(cfg))
    if record:
        log.info("%s: done already (%s)", STAGE, record.get("final"))
        return record
    started = time.time()
    inputs = sft_inputs(cfg.run, cfg.val_passages, cfg.init)
    nla, rows, val = inputs.nla, inputs.rows, inputs.val
    targets = {t: shared_targets(nla, r) for t, r in rows.items()}
    val_targets = {t: shared_targets(nla, r) for t, r in val.items()}
    examples = example_index(rows)
    log.info("%s: %d examples over %d tags", STAGE, len(examples), len(rows))
    before = ar_val_metrics(nla, val, val_targets)
    device = resolve_device(cfg.run.device)
    nla.ar.train()

    def loss_fn(idx: np.ndarray):
        pairs = [examples[i] for i in idx]
        pred = nla.ar([rows[t].z[i] for t, i in pairs])
        gold = torch.stack([targets[t][i] for t, i in pairs]).to(pred.device)
        return mse_nrm(pred.float(), gold).mean(), {}

    def eval_fn(step: int) -> dict[str, float]:
        metrics = ar_val_metrics(nla, val, val_targets)
        nla.ar.train()
        return metrics

    named = named_trainable([("ar", nla.ar)])
    final = train(out_dir=run_dir / STAGE, named_params=named, param_groups=[{"params": list(named.values())}],
                  n_examples=len(examples), loss_fn=loss_fn, eval_fn=eval_fn, cfg=cfg.loop, device=device, desc=STAGE)
    final = final or ar_val_metrics(nla, val, val_targets)
    save_bundle(nla, cfg.run)
    return mark_stage_done(run_dir, STAGE, settings(cfg), started, before=before, final=final, examples=len(examples))
