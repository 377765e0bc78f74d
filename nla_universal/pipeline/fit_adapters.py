"""`nla-universal fit-adapters`: least-squares enc_M against the anchor and the linear-ceiling dec_M.

Every tag (held-out ones too) is fitted on the train passages and scored on val, in the shared space
centred on the anchor's train mean unless `centre=false`. The folder — adapters, one report per fit
and fit_summary.json — is written whole, its manifest last.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .. import io
from ..adapters import DEFAULT_RIDGE_GRID, SUMMARY_KEYS, AdapterFitConfig, anchor_adapters, fit_tag
from ..config import opt
from ..corpus import split_ids
from .workspace import RunConfig, Workspace

STAGE = "fit-adapters"


@dataclass
class FitAdaptersConfig:
    run: RunConfig = opt(help="run folder (reads passages.parquet and activations/, writes adapters/), pool", factory=RunConfig)
    fit: AdapterFitConfig = opt(help="the least-squares solve",
                                factory=lambda: AdapterFitConfig(ridge_grid=list(DEFAULT_RIDGE_GRID)))
    centre: bool = opt(
        True,
        "centre the shared space on the anchor's train mean μ (enc_anchor = identity − μ; every dec_M gets a bias): "
        "pooled rows share one dominant direction, which would otherwise drown the passage-specific part",
    )


def summarise(report: dict) -> dict:
    return {k: report[k] for k in SUMMARY_KEYS if k in report}


def run(cfg: FitAdaptersConfig) -> Path:
    ws = Workspace(cfg.run)
    st = ws.stage(STAGE, cfg)
    if st.done and io.seal_problems(ws.adapters_dir) == []:
        return ws.adapters_dir
    pool = ws.pool
    passages = ws.passages()
    train_ids, val_ids = split_ids(passages, "train"), split_ids(passages, "val")
    anchor = ws.activations(pool.anchor)
    adapters, anchor_report = anchor_adapters(anchor, train_ids, val_ids, cfg.fit, cfg.centre)
    reports: dict[str, dict] = {}
    summary: dict[str, dict] = {pool.anchor: {"anchor": True, "encoder": "identity − μ" if cfg.centre else "identity"}}
    if anchor_report:
        reports[f"fit_decoder_{pool.anchor}.json"] = anchor_report
        summary[pool.anchor]["decoder"] = summarise(anchor_report)
    for tag in tqdm([t for t in pool.tags if t != pool.anchor], desc="adapter fits", unit="tag"):
        enc, dec, enc_report, dec_report = fit_tag(ws.activations(tag), anchor, train_ids, val_ids, cfg.fit, adapters.centre)
        adapters.add(tag, enc.weight, dec.weight, enc.bias, dec.bias)
        reports[f"fit_encoder_{tag}.json"], reports[f"fit_decoder_{tag}.json"] = enc_report, dec_report
        summary[tag] = {"held_out": pool.spec(tag).held_out, "encoder": summarise(enc_report), "decoder": summarise(dec_report)}
    reports["fit_summary.json"] = {"config": asdict(cfg.fit), "centre": cfg.centre, "tags": summary}
    ws.write_adapters(adapters, reports)
    st.finish(tags=list(adapters.tags))
    print(ws.adapters_dir)
    return ws.adapters_dir
