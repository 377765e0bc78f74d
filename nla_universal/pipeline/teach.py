"""`nla-universal teach`: one explanation z per passage from ONE teacher, into passages.parquet."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import io
from ..config import opt
from ..teacher import TeacherConfig, teach
from .workspace import RunConfig, Workspace


@dataclass
class TeachStageConfig:
    run: RunConfig = opt(help="run folder (fills z and teacher in passages.parquet); cache_dir keeps the replies", factory=RunConfig)
    teacher: TeacherConfig = opt(help="the teacher", factory=TeacherConfig)


def run(cfg: TeachStageConfig) -> dict:
    ws = Workspace(cfg.run)
    report = teach(ws.passages_path, cfg.teacher, cache_dir=cfg.run.cache_dir, model_cache_dir=cfg.run.cache_dir)
    summary = report.to_dict()
    io.write_text(ws.root / "teach_report.json", json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("teacher", "valid", "invalid", "failed", "seconds")}))
    return summary
