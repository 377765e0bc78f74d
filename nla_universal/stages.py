"""Small CLI stages that only wire a core module to its config: corpus, pool, fit-adapters, teach."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import io
from .adapters import DEFAULT_RIDGE_GRID, AdapterFitConfig, fit_pool_adapters
from .config import CorpusConfig, default_cache_dir, load_pool, opt
from .corpus import build_passages, fingerprint, read_passages, write_passages
from .errors import DataError
from .teacher import TeacherConfig, teach

log = logging.getLogger(__name__)


@dataclass
class CorpusStageConfig:
    run_dir: str = opt("runs/demo", "run folder; passages.parquet is written there")
    corpus: CorpusConfig = opt(help="where passages come from", factory=CorpusConfig)
    overwrite: bool = opt(False, "replace an existing passages.parquet built from other text")


def run_corpus(cfg: CorpusStageConfig) -> Path:
    path = Path(cfg.run_dir) / "passages.parquet"
    table = build_passages(cfg.corpus)
    if path.exists():
        old = read_passages(path)
        same = fingerprint(old.column("passage_id").to_pylist()) == fingerprint(table.column("passage_id").to_pylist())
        if same:
            log.info("%s is up to date (%d passages); kept", path, old.num_rows)
            return path
        if not cfg.overwrite:
            raise DataError(
                f"{path} exists with different passages (and any teacher z and activations made from them)",
                "use another run_dir, or overwrite=true to replace it",
            )
    write_passages(table, path)
    splits = table.column("split").to_pylist()
    log.info("wrote %s: %d passages (train %d, val %d, test %d)", path, table.num_rows,
             splits.count("train"), splits.count("val"), splits.count("test"))
    print(path)
    return path


@dataclass
class PoolStageConfig:
    pool: str = opt("demo", "pool YAML path, or the name of one in configs/pools/")
    resolve: bool = opt(False, "load each model's config to show L, K and d (materialises packaged/random models)")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models are cached")


def run_pool(cfg: PoolStageConfig) -> None:
    pool = load_pool(cfg.pool)
    rows = [("tag", "source", "name", "layer", "pool", "role")]
    for m in pool.models:
        role = "anchor" if m.tag == pool.anchor else ("held-out" if m.held_out else "trained")
        where = str(m.layer) if m.layer is not None else f"depth {m.depth if m.depth is not None else 0.5}"
        if cfg.resolve:
            from .models import describe_model

            info = describe_model(m, cache_dir=cfg.cache_dir)
            where = f"K={info['layer']} of L={info['num_layers']}, d={info['d_model']}"
        rows.append((m.tag, m.source, m.name, where, m.pool, role))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


@dataclass
class FitAdaptersConfig:
    run_dir: str = opt("runs/demo", "run folder: reads passages.parquet and activations/, writes adapters/")
    pool: str = opt("demo", "pool YAML path, or the name of one in configs/pools/")
    fit: AdapterFitConfig = opt(help="the least-squares solve",
                                factory=lambda: AdapterFitConfig(ridge_grid=list(DEFAULT_RIDGE_GRID)))
    centre: bool = opt(
        True,
        "centre the shared space on the anchor's train mean μ (enc_anchor = identity − μ; every dec_M gets a bias): "
        "pooled rows share one dominant direction, which would otherwise drown the passage-specific part",
    )


def run_fit_adapters(cfg: FitAdaptersConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    out = run_dir / "adapters"
    fit_pool_adapters(run_dir / "activations", run_dir / "passages.parquet", load_pool(cfg.pool), out, cfg.fit, cfg.centre)
    print(out)
    return out


@dataclass
class TeachStageConfig:
    run_dir: str = opt("runs/demo", "run folder: fills z and teacher in passages.parquet")
    teacher: TeacherConfig = opt(help="the teacher", factory=TeacherConfig)
    cache_dir: str = opt(default_cache_dir(), "reply cache and converted models")


def run_teach(cfg: TeachStageConfig) -> dict:
    report = teach(Path(cfg.run_dir) / "passages.parquet", cfg.teacher, cache_dir=cfg.cache_dir, model_cache_dir=cfg.cache_dir)
    summary = report.to_dict()
    io.write_text(Path(cfg.run_dir) / "teach_report.json", json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("teacher", "valid", "invalid", "failed", "seconds")}))
    return summary
