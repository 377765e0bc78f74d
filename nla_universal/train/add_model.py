"""Add a model to a trained bundle without touching the trunks (the seed's "new architecture in ~20 min").

extract → enc_M against the anchor (least squares, train split) → dec_M refitted on AR(AV z) → eval.
The model is marked held-out in the bundle and in every report: the AV/AR never trained on it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import io
from ..activations import read_activations
from ..adapters import DEFAULT_RIDGE_GRID, AdapterFitConfig, PoolAdapters, fit_tag
from ..config import ModelSpec, PoolConfig, check_tag, load_pool, opt, validate_pool
from ..corpus import read_passages, split_ids
from ..errors import ConfigError
from ..extract import ExtractConfig, extract_tag, resolve_device
from ..nla.bundle import TagInfo, read_reports
from .data import passages_with_z
from .refit import RefitConfig, refit_tag
from .workspace import RunConfig, open_bundle, save_bundle

log = logging.getLogger(__name__)


@dataclass
class AddModelConfig:
    run: RunConfig = opt(help="run folder (with the trained bundle), pool (for the anchor), device", factory=RunConfig)
    model: ModelSpec = opt(help="the new model: tag, source, name, layer or depth, pool, dtype, …", factory=ModelSpec)
    extract_batch_size: int = opt(16, "passages per forward while extracting")
    fit: AdapterFitConfig = opt(help="the least-squares solves (λ chosen on val)",
                                factory=lambda: AdapterFitConfig(ridge_grid=list(DEFAULT_RIDGE_GRID)))
    train_passages: int = opt(256, "train passages the decoder is fitted on (AV generation is the cost)")
    val_passages: int = opt(64, "val passages the fits are scored on")
    max_new_tokens: int = opt(48, "AV generation length")
    generate_batch_size: int = opt(8, "AV prompts per generate call")


def extended_pool(pool: PoolConfig, spec: ModelSpec) -> PoolConfig:
    if spec.tag in pool.tags:
        raise ConfigError(f"tag {spec.tag!r} is already in the pool", "give the new model its own tag")
    return validate_pool(replace(pool, models=[*pool.models, replace(spec, held_out=True)]))


def fit_new_adapters(run_dir: Path, anchor: str, tag: str, fit_cfg: AdapterFitConfig):
    """enc_M vs the anchor (in the shared space's centring) and the linear-ceiling dec_M, also recorded in
    run_dir/adapters (for eval's control)."""
    table = read_passages(run_dir / "passages.parquet")
    train_ids, val_ids = split_ids(table, "train"), split_ids(table, "val")
    acts, anchor_acts = read_activations(run_dir / "activations", tag), read_activations(run_dir / "activations", anchor)
    linear_dir = run_dir / "adapters"
    linear = PoolAdapters.load(linear_dir)
    enc, dec, enc_report, dec_report = fit_tag(acts, anchor_acts, train_ids, val_ids, fit_cfg, linear.centre)
    linear.add(tag, enc.weight, dec.weight, enc.bias, dec.bias)
    linear.save(linear_dir)
    for kind, report in (("encoder", enc_report), ("decoder", dec_report)):
        io.write_text(linear_dir / f"fit_{kind}_{tag}.json", json.dumps(report, indent=2))
    return enc, dec, enc_report


def run_add_model(cfg: AddModelConfig) -> dict:
    started = time.time()
    run_dir = Path(cfg.run.run_dir)
    spec = replace(cfg.model, held_out=True)
    check_tag(spec.tag)
    pool = extended_pool(load_pool(cfg.run.pool), spec)
    nla = open_bundle(cfg.run, load_pool(cfg.run.pool))
    if spec.tag in nla.meta.tags:
        raise ConfigError(f"the bundle already has tag {spec.tag!r}", "pick another tag (or use a fresh copy of the bundle)")
    device = resolve_device(cfg.run.device)
    ecfg = ExtractConfig(run_dir=str(run_dir), pool=cfg.run.pool, batch_size=cfg.extract_batch_size, cache_dir=cfg.run.cache_dir)
    extract_tag(pool.spec(spec.tag), read_passages(run_dir / "passages.parquet"), ecfg, device)
    enc, dec, enc_report = fit_new_adapters(run_dir, pool.anchor, spec.tag, cfg.fit)
    meta = read_activations(run_dir / "activations", spec.tag).meta
    nla.adapters.add(spec.tag, enc.weight, dec.weight, enc.bias, dec.bias)
    nla.meta.tags[spec.tag] = TagInfo(int(meta["d_model"]), int(meta["layer"]), str(meta["pool"]), held_out=True)
    refit_cfg = RefitConfig(run=cfg.run, train_passages=cfg.train_passages, val_passages=cfg.val_passages,
                            max_new_tokens=cfg.max_new_tokens, generate_batch_size=cfg.generate_batch_size, fit=cfg.fit)
    report = refit_tag(nla, run_dir, passages_with_z(run_dir, need_z=False), spec.tag, refit_cfg)
    nla.reports.update(read_reports(run_dir / "adapters", "adapters/"))
    nla.reports[f"adapters/refit_{spec.tag}.json"] = report
    save_bundle(nla, cfg.run)
    summary = {"tag": spec.tag, "seconds": round(time.time() - started, 1), "enc_val": enc_report.get("val"),
               "dec_val_through_av": report["fits"]["av"]["val_through_av"]}
    log.info("added %s: %s", spec.tag, summary)
    print(json.dumps(summary))
    return summary
