"""`nla-universal add-model`: a new, held-out model joins a trained bundle; the trunks are not touched.

extract → enc_M against the anchor (least squares, train split, in the shared space's centring) →
dec_M refitted on AR(AV z). The model is marked held-out in the bundle and in every report: the
AV/AR never trained on it. Its linear-ceiling pair is added to run_dir/adapters too (eval's control).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from ..adapters import DEFAULT_RIDGE_GRID, AdapterFitConfig, fit_tag
from ..config import ModelSpec, PoolConfig, check_tag, opt, validate_pool
from ..corpus import split_ids
from ..errors import ConfigError
from ..nla.bundle import TagInfo
from .extract import ExtractConfig, check_models, extract_tag
from .refit_dec import RefitConfig, refit_tag
from .workspace import RunConfig, Workspace

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


def fit_new_adapters(ws: Workspace, tag: str, fit_cfg: AdapterFitConfig):
    """enc_M vs the anchor and the linear-ceiling dec_M; also written into run_dir/adapters."""
    table = ws.passages()
    train_ids, val_ids = split_ids(table, "train"), split_ids(table, "val")
    linear = ws.adapters()
    enc, dec, enc_report, dec_report = fit_tag(ws.activations(tag), ws.activations(ws.pool.anchor), train_ids, val_ids,
                                               fit_cfg, linear.centre)
    linear.add(tag, enc.weight, dec.weight, enc.bias, dec.bias)
    reports = {rel.removeprefix("adapters/"): r for rel, r in ws.adapter_reports().items()}
    reports.update({f"fit_encoder_{tag}.json": enc_report, f"fit_decoder_{tag}.json": dec_report})
    ws.write_adapters(linear, reports)
    return enc, dec, enc_report


def run(cfg: AddModelConfig) -> dict:
    ws = Workspace(cfg.run)
    spec = replace(cfg.model, held_out=True)
    check_tag(spec.tag)
    st = ws.stage(f"add-model-{spec.tag}", cfg)
    if st.done:
        return st.record
    pool = extended_pool(ws.pool, spec)
    nla = ws.open_bundle("sft-ar", "sft-av", generate_batch_size=cfg.generate_batch_size)
    if spec.tag in nla.meta.tags:
        raise ConfigError(f"the bundle already has tag {spec.tag!r}", "pick another tag (or use a fresh copy of the bundle)")
    check_models([pool.spec(spec.tag)], ws.run.cache_dir)
    extract_tag(ws, pool.spec(spec.tag), ws.passages(), ExtractConfig(run=cfg.run, batch_size=cfg.extract_batch_size))
    enc, dec, enc_report = fit_new_adapters(ws, spec.tag, cfg.fit)
    meta = ws.activations(spec.tag).meta
    nla.adapters.add(spec.tag, enc.weight, dec.weight, enc.bias, dec.bias)
    nla.meta.tags[spec.tag] = TagInfo(int(meta["d_model"]), int(meta["layer"]), str(meta["pool"]), held_out=True)
    refit_cfg = RefitConfig(run=cfg.run, train_passages=cfg.train_passages, val_passages=cfg.val_passages,
                            max_new_tokens=cfg.max_new_tokens, generate_batch_size=cfg.generate_batch_size, fit=cfg.fit)
    report = refit_tag(nla, ws, ws.passages(), spec.tag, refit_cfg)
    nla.reports.update(ws.adapter_reports())
    nla.reports[f"adapters/refit_{spec.tag}.json"] = report
    st.save_bundle(nla)
    summary = {"tag": spec.tag, "enc_val": enc_report.get("val"), "dec_val_through_av": report["fits"]["av"]["val_through_av"]}
    log.info("added %s: %s", spec.tag, summary)
    print(json.dumps(summary))
    return st.finish(**summary)
