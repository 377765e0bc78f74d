"""`nla-universal corpus`: passages.parquet with stable ids and a by-passage train/val/test split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import CorpusConfig, opt
from ..corpus import build_passages, fingerprint, read_passages, write_passages
from ..errors import DataError
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)


@dataclass
class CorpusStageConfig:
    run: RunConfig = opt(help="run folder (passages.parquet is written there)", factory=RunConfig)
    corpus: CorpusConfig = opt(help="where passages come from", factory=CorpusConfig)
    overwrite: bool = opt(False, "replace an existing passages.parquet built from other text")


def run(cfg: CorpusStageConfig) -> Path:
    path = Workspace(cfg.run).passages_path
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
                "use another run.run_dir, or overwrite=true to replace it",
            )
    write_passages(table, path)
    splits = table.column("split").to_pylist()
    log.info("wrote %s: %d passages (train %d, val %d, test %d)", path, table.num_rows,
             splits.count("train"), splits.count("val"), splits.count("test"))
    print(path)
    return path
