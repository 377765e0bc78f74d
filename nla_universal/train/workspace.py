"""A run folder and the bundle that the supervised stages build up in it.

    run_dir/passages.parquet      corpus (+ teacher z)
    run_dir/activations/<tag>/    extract
    run_dir/adapters/             fit-adapters: enc_M and the linear-ceiling dec_M, fit reports
    run_dir/bundle/               the NLA being trained; every stage loads it and saves it back whole
    run_dir/<stage>/              a stage's checkpoints and metrics.jsonl
    run_dir/stages/<stage>.json   a finished stage's settings, timings and results
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..activations import read_activations
from ..adapters import PoolAdapters
from ..config import PoolConfig, default_cache_dir, load_pool, opt
from ..errors import ConfigError, DataError
from ..extract import resolve_device
from ..nla.api import UniversalNLA
from ..nla.ar import ARConfig
from ..nla.av import AVConfig
from ..nla.bundle import TagInfo, read_reports
from .data import TagRows, passages_with_z, tag_rows, teacher_of, trained_tags

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Where a stage reads and writes, and on what device."""

    run_dir: str = opt("runs/demo", "run folder (passages, activations, adapters, bundle, stage outputs)")
    pool: str = opt("demo", "pool YAML path, or the name of one in configs/pools/")
    device: str = opt("cpu", "cpu | cuda | auto")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models are cached")


@dataclass
class BundleInitConfig:
    """Used once, when the first training stage creates the bundle."""

    av: AVConfig = opt(help="the AV", factory=AVConfig)
    ar: ARConfig = opt(help="the AR", factory=ARConfig)
    seed: int = opt(0, "seed of the fresh LoRA weights (same seed, same starting bundle)")


def bundle_dir(run: RunConfig) -> Path:
    return Path(run.run_dir) / "bundle"


def tag_infos(run_dir: Path, pool: PoolConfig) -> dict[str, TagInfo]:
    infos = {}
    for spec in pool.models:
        meta = read_activations(run_dir / "activations", spec.tag).meta
        infos[spec.tag] = TagInfo(int(meta["d_model"]), int(meta["layer"]), str(meta["pool"]), spec.held_out)
    return infos


def open_bundle(run: RunConfig, pool: PoolConfig, init: BundleInitConfig | None = None) -> UniversalNLA:
    """The run's bundle; created (fresh LoRAs, identity value head, fitted adapters) if absent."""
    device = resolve_device(run.device)
    folder = bundle_dir(run)
    if (folder / "nla_meta.yaml").is_file():
        nla = UniversalNLA.load(folder, cache_dir=run.cache_dir)
        if nla.meta.anchor_tag != pool.anchor:
            raise ConfigError(
                f"the bundle in {folder} was trained on trunk {nla.meta.anchor_tag!r}, the pool's anchor is {pool.anchor!r}",
                "use the pool the bundle was made with, or another run_dir",
            )
        return nla.to(device)
    if init is None:
        raise DataError(f"no bundle in {folder}", "run `nla-universal sft-ar` first (it creates the bundle)")
    adapters_dir = Path(run.run_dir) / "adapters"
    if not (adapters_dir / "adapters.safetensors").is_file():
        raise DataError(f"no fitted adapters in {adapters_dir}", "run `nla-universal fit-adapters` first")
    adapters = PoolAdapters.load(adapters_dir, expect_tags=pool.tags)
    teacher = teacher_of(passages_with_z(Path(run.run_dir), need_z=False))
    with torch.random.fork_rng():
        torch.manual_seed(init.seed)
        nla = UniversalNLA.create(pool.spec(pool.anchor), adapters, tag_infos(Path(run.run_dir), pool), av=init.av,
                                  ar=init.ar, teacher_id=teacher, cache_dir=run.cache_dir,
                                  reports=read_reports(adapters_dir, "adapters/"))
    nla.save(folder)
    log.info("created bundle %s (trunk %s, %d tags)", folder, pool.anchor, len(pool.tags))
    return nla.to(device)


def save_bundle(nla: UniversalNLA, run: RunConfig) -> Path:
    """Save the whole bundle (its JSON reports travel in `nla.reports`)."""
    nla.av.model.eval()
    nla.ar.eval()
    return nla.save(bundle_dir(run))


def bundle_teacher_check(nla: UniversalNLA, teacher: str | None) -> None:
    """A bundle trained on one teacher's z must not continue on another's (the seed's v3 failure)."""
    if nla.meta.teacher_id and teacher and nla.meta.teacher_id != teacher:
        raise DataError(
            f"the bundle was trained on z from {nla.meta.teacher_id!r}, the passages hold z from {teacher!r}",
            "mixing teachers is refused: use a new run_dir for the new teacher",
        )
    if teacher and not nla.meta.teacher_id:
        nla.meta.teacher_id = teacher


@dataclass
class SFTInputs:
    """What both SFT stages train on: the bundle and, per trained tag, train and val rows with z."""

    run_dir: Path
    pool: PoolConfig
    nla: UniversalNLA
    rows: dict[str, TagRows]
    val: dict[str, TagRows]


def sft_inputs(run: RunConfig, val_passages: int, init: BundleInitConfig | None = None) -> SFTInputs:
    """Passages from one teacher, the bundle (refusing a second teacher), and the rows of every trained tag."""
    run_dir = Path(run.run_dir)
    pool = load_pool(run.pool)
    table = passages_with_z(run_dir)
    nla = open_bundle(run, pool, init)
    bundle_teacher_check(nla, teacher_of(table))
    tags = trained_tags(pool)
    rows = {t: tag_rows(run_dir, table, t, "train", need_z=True) for t in tags}
    val = {t: tag_rows(run_dir, table, t, "val", need_z=True, limit=val_passages) for t in tags}
    return SFTInputs(run_dir, pool, nla, rows, val)


def settings(*configs) -> dict:
    return {type(c).__name__: asdict(c) for c in configs}

