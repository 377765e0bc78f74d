"""`nla-universal refit-dec`: dec_M by least squares from the AR's outputs to n(h_M), on the train split.

Two sources of AR inputs: `av` — the AV's own explanations, i.e. exactly what the pipeline is scored
on (default) — and `teacher` — the teacher's z (the seed's way, which fits on other inputs than it is
scored on). Both fits are scored on val through the AV path and reported side by side.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace


from ..adapters import DEFAULT_RIDGE_GRID, AdapterFitConfig, fit_decoder
from ..config import choices, opt
from ..errors import ConfigError
from ..metrics import fve_centred, fve_meannorm, normalised_mean, normalize_rows
from ..nla.api import UniversalNLA
from ..rollout import SamplingParams
from .explanations import explain_rows
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)
STAGE = "refit-dec"


class RefitSource(enum.StrEnum):
    av = "av"  # the AV's own explanations (what is scored)
    teacher = "teacher"  # the teacher's z (the seed's way)


@dataclass
class RefitConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    source: RefitSource = opt(RefitSource.av, f"AR inputs the decoder is fitted on: {choices(RefitSource)} "
                              "(av: the AV's explanations, as scored; teacher: the teacher's z)")
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


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(greedy=True, max_new_tokens=max_new_tokens)


def refit_tag(nla: UniversalNLA, ws: Workspace, table, tag: str, cfg: RefitConfig) -> dict:
    """Fit dec_M for one tag; installs the chosen fit into the bundle's adapters and returns the report."""
    train = ws.rows(table, tag, "train", need_z=cfg.source == RefitSource.teacher, limit=cfg.train_passages)
    val = ws.rows(table, tag, "val", need_z=False, limit=cfg.val_passages)
    sampling = greedy(cfg.max_new_tokens)
    z_av, _ = explain_rows(nla, ws.root, tag, train.ids, train.H, sampling, cfg.generate_batch_size)
    z_val, _ = explain_rows(nla, ws.root, tag, val.ids, val.H, sampling, cfg.generate_batch_size)
    V_val = nla.shared_from_text(z_val).double().numpy()
    inputs = {"av": nla.shared_from_text(z_av).double().numpy()}
    if all(train.z):
        inputs["teacher"] = nla.shared_from_text([str(z) for z in train.z]).double().numpy()
    mu = normalised_mean(train.H)
    # In a centred shared space dec_M is affine: without an intercept, W alone would have to produce the
    # model's mean, and the old bias would then add it a second time.
    fit_cfg = replace(cfg.fit, bias=nla.adapters.decoder_has_bias(tag))
    report: dict = {"tag": tag, "source": str(cfg.source), "N_train": len(train), "N_val": len(val), "fits": {}}
    chosen = None
    for source, V in inputs.items():
        fit, fit_report = fit_decoder(V, train.H, tag=tag, cfg=fit_cfg, V_val=V_val, h_val=val.H, kind=f"decoder_from_{source}")
        pred = normalize_rows(fit.predict(V_val))
        fit_report["val_through_av"] = {"fve_centred": fve_centred(val.H, pred, mu), "fve_meannorm": fve_meannorm(val.H, pred)}
        report["fits"][source] = fit_report
        if source == cfg.source:
            chosen = fit
    if chosen is None:
        raise ConfigError(f"{tag}: refit source {cfg.source!r} needs teacher z on the train passages", "use source=av")
    nla.adapters.set_decoder(tag, chosen.weight, chosen.bias)
    return report


def run(cfg: RefitConfig) -> dict:
    ws = Workspace(cfg.run)
    st = ws.stage(STAGE, cfg)
    if st.done:
        return st.record
    table = ws.passages(need_z=cfg.source == RefitSource.teacher)
    nla = ws.open_bundle("sft-ar", "sft-av", generate_batch_size=cfg.generate_batch_size)
    tags = cfg.tags or [t for t in nla.meta.tags if cfg.refit_anchor or t != nla.meta.anchor_tag]
    reports = {}
    for tag in tags:
        reports[tag] = refit_tag(nla, ws, table, tag, cfg)
        chosen = reports[tag]["fits"][cfg.source]["val_through_av"]
        log.info("%s %s: val fve_centred %.3f (source %s)", STAGE, tag, chosen["fve_centred"], cfg.source)
    for tag, report in reports.items():
        nla.reports[f"adapters/refit_{tag}.json"] = report
    st.save_bundle(nla)
    return st.finish(val={t: {s: r["val_through_av"] for s, r in rep["fits"].items()} for t, rep in reports.items()})
