"""`nla-universal sft-ar`: AR SFT — teacher z → the passage's shared vector, for every trained tag.

Creates the bundle when the run has none (fresh LoRAs, identity value head, the fitted adapters), in
memory: it is written only once training finished, so a killed run never leaves a bundle that looks
trained. Checkpoints in run_dir/sft-ar/ make a rerun continue where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import opt
from ..nla.api import UniversalNLA
from ..nla.ar import ARConfig
from ..nla.av import AVConfig
from ..nla.bundle import TagInfo
from ..train.loop import LoopConfig
from ..train.sft import train_ar
from .workspace import RunConfig, Workspace
from .training_data import sft_rows, teacher_of

log = logging.getLogger(__name__)
STAGE = "sft-ar"


@dataclass
class BundleInitConfig:
    """Used once, when sft-ar creates the bundle."""

    av: AVConfig = opt(help="the AV", factory=AVConfig)
    ar: ARConfig = opt(help="the AR", factory=ARConfig)
    seed: int = opt(0, "seed of the fresh LoRA weights (same seed, same starting bundle)")


@dataclass
class ARSFTConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    init: BundleInitConfig = opt(help="AV/AR settings if this stage creates the bundle", factory=BundleInitConfig)
    loop: LoopConfig = opt(help="optimisation", factory=lambda: LoopConfig(steps=200, batch_size=8, lr=2e-4))
    val_passages: int = opt(48, "val passages per tag scored at each eval")


def tag_infos(ws: Workspace) -> dict[str, TagInfo]:
    infos = {}
    for spec in ws.pool.models:
        meta = ws.activations(spec.tag).meta
        infos[spec.tag] = TagInfo(int(meta["d_model"]), int(meta["layer"]), str(meta["pool"]), spec.held_out)
    return infos


def new_bundle(ws: Workspace, init: BundleInitConfig, teacher: str | None) -> UniversalNLA:
    """Fresh LoRAs (seeded), identity value head, the run's fitted adapters; not saved."""
    adapters = ws.adapters()
    with torch.random.fork_rng():
        torch.manual_seed(init.seed)
        nla = UniversalNLA.create(ws.pool.spec(ws.pool.anchor), adapters, tag_infos(ws), av=init.av, ar=init.ar,
                                  teacher_id=teacher, cache_dir=ws.run.cache_dir, reports=ws.adapter_reports())
    log.info("new bundle (trunk %s, %d tags), written once sft-ar finishes", ws.pool.anchor, len(ws.pool.tags))
    return nla.to(ws.device)


def run(cfg: ARSFTConfig) -> dict:
    ws = Workspace(cfg.run)
    st = ws.stage(STAGE, cfg)
    if st.done:
        return st.record
    table = ws.passages(need_z=True)
    if (ws.bundle_dir / "nla_meta.yaml").is_file():
        nla = ws.open_bundle()
    else:
        nla = new_bundle(ws, cfg.init, teacher_of(table))
    rows, val = sft_rows(ws, nla, table, cfg.val_passages)
    result = train_ar(nla, rows, val, cfg.loop, ws.stage_dir(STAGE), ws.device)
    st.save_bundle(nla)
    return st.finish(**result)
