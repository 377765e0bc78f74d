"""dec_M refit: least squares from the AR's outputs to n(h_M), on the train split.

Two sources of AR inputs: `av` — the AV's own explanations, i.e. exactly what the pipeline is scored
on (default) — and `teacher` — the teacher's z (the seed's way, which fits on other inputs than it is
scored on). Both fits are scored on val through the AV path and reported side by side.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import DEFAULT_RIDGE_GRID, AdapterFitConfig, fit_decoder
from ..config import load_pool, opt
from ..errors import ConfigError
from ..explanations import explain_rows
from ..metrics import fve_centred, fve_meannorm, normalised_mean, normalize_rows
from ..nla.api import UniversalNLA
from ..nla.injection import rescale
from ..rollout import SamplingParams
from .data import mark_stage_done, passages_with_z, stage_done, tag_rows
from .workspace import RunConfig, open_bundle, save_bundle, settings

log = logging.getLogger(__name__)
STAGE = "refit-dec"
SOURCES = ("av", "teacher")


@dataclass
class RefitConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    source: str = opt("av", "AR inputs the decoder is fitted on: av (the AV's explanations, as scored) | teacher (teacher z)")
    tags: list[str] = opt(help="refit only these tags (default: every tag of the bundle)", factory=list)
    refit_anchor: bool = opt(
        True,
        "also refit the anchor's dec (its enc stays fixed): the AR's outputs do not live where the anchor's "
        "pooled activations do (and in a centred shared space the dec must add μ back)",
    )
    train_passages: int = opt(256, "train passages per tag the decoder is fitted on")
    val_passages: int = opt(64, "val passages per tag the fits are scored on")
    max_new_tokens: int = opt(48, "AV generation length")
    generate_batch_size: int = opt(8, "AV prompts per generate call")
    fit: AdapterFitConfig = opt(help="the least-squares solve (λ chosen on the val passages' AV path)",
                                factory=lambda: AdapterFitConfig(ridge_grid=list(DEFAULT_RIDGE_GRID)))


def ar_shared(nla: UniversalNLA, texts: list[str]) -> np.ndarray:
    """n(AR(z)) at √d_shared: the decoder's input."""
    return rescale(nla.ar.reconstruct(texts), math.sqrt(nla.meta.d_shared)).double().numpy()


def sampling_for(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(greedy=True, max_new_tokens=max_new_tokens)


def refit_tag(nla: UniversalNLA, run_dir: Path, table, tag: str, cfg: RefitConfig) -> dict:
    """Fit dec_M for one tag; installs the chosen fit into nla.adapters and returns the report."""
    has_z = "z" in table.column_names
    train = tag_rows(run_dir, table, tag, "train", need_z=cfg.source == "teacher", limit=cfg.train_passages)
    val = tag_rows(run_dir, table, tag, "val", need_z=False, limit=cfg.val_passages)
    sampling = sampling_for(cfg.max_new_tokens)
    z_av, _ = explain_rows(nla, run_dir, tag, train.ids, train.H, sampling, cfg.generate_batch_size)
    z_val, _ = explain_rows(nla, run_dir, tag, val.ids, val.H, sampling, cfg.generate_batch_size)
    V_val = ar_shared(nla, z_val)
    inputs = {"av": ar_shared(nla, z_av)}
    if has_z and all(train.z):
        inputs["teacher"] = ar_shared(nla, [str(z) for z in train.z])
    mu = normalised_mean(train.H)
    report: dict = {"tag": tag, "source": cfg.source, "N_train": len(train), "N_val": len(val), "fits": {}}
    chosen = None
    for source, V in inputs.items():
        fit, fit_report = fit_decoder(V, train.H, tag=tag, cfg=cfg.fit, V_val=V_val, h_val=val.H, kind=f"decoder_from_{source}")
        pred = normalize_rows(fit.predict(V_val))
        fit_report["val_through_av"] = {"fve_centred": fve_centred(val.H, pred, mu), "fve_meannorm": fve_meannorm(val.H, pred)}
        report["fits"][source] = fit_report
        if source == cfg.source:
            chosen = fit
    if chosen is None:
        raise ConfigError(f"{tag}: refit source {cfg.source!r} needs teacher z on the train passages", "use source=av")
    with torch.no_grad():
        nla.adapters.decoders[tag].weight.copy_(chosen.weight.float())
        if chosen.bias is not None and nla.adapters.decoders[tag].bias is not None:
            nla.adapters.decoders[tag].bias.copy_(chosen.bias.float())
    return report


def run_refit_dec(cfg: RefitConfig, nla: UniversalNLA | None = None) -> dict:
    if cfg.source not in SOURCES:
        raise ConfigError(f"unknown refit source {cfg.source!r}", f"use one of {SOURCES}")
    run_dir = Path(cfg.run.run_dir)
    record = stage_done(run_dir, STAGE, settings(cfg))
    if record and nla is None:
        return record
    started = time.time()
    pool = load_pool(cfg.run.pool)
    table = passages_with_z(run_dir, need_z=cfg.source == "teacher")
    nla = nla or open_bundle(cfg.run, pool)
    tags = cfg.tags or [t for t in nla.meta.tags if cfg.refit_anchor or t != nla.meta.anchor_tag]
    reports = {}
    for tag in tags:
        reports[tag] = refit_tag(nla, run_dir, table, tag, cfg)
        chosen = reports[tag]["fits"][cfg.source]["val_through_av"]
        log.info("%s %s: val fve_centred %.3f (source %s)", STAGE, tag, chosen["fve_centred"], cfg.source)
    for tag, report in reports.items():
        nla.reports[f"adapters/refit_{tag}.json"] = report
    save_bundle(nla, cfg.run)
    summary = {t: {s: r["val_through_av"] for s, r in rep["fits"].items()} for t, rep in reports.items()}
    return mark_stage_done(run_dir, STAGE, settings(cfg), started, val=summary)
