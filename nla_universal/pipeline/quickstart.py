"""`nla-universal quickstart`: the whole universal NLA end to end, on a preset sized for the machine.

A preset (`nla_universal/configs/presets/<name>.yaml`, or any YAML path) holds the pool, the held-out
model and one section per stage, each loaded through the same typed loader as the stage's own CLI
config. Stages: corpus → extract → teach → fit-adapters → sft-ar → sft-av → refit-dec → add-model
(the held-out model) → eval (into eval-sft/) → rl → eval (into eval/). Every stage skips or resumes what is already done, so rerunning an
interrupted (or finished) quickstart continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import io
from ..errors import DataError
from ..config import PoolConfig, Unit, default_cache_dir, load_config, opt, resolve_config_path, validate_pool
from . import add_model, corpus, evaluate, extract, fit_adapters, refit_dec, rl, sft_ar, sft_av, teach
from .add_model import AddModelConfig
from .corpus import CorpusStageConfig
from .evaluate import EvalConfig
from .extract import ExtractConfig
from .fit_adapters import FitAdaptersConfig
from .quickstart_report import StageTimer, before_after_markdown, diagnostics_markdown, timings_markdown
from .refit_dec import RefitConfig
from .rl import RLStageConfig
from .sft_ar import ARSFTConfig
from .sft_av import AVSFTConfig
from .teach import TeachStageConfig
from .workspace import RunConfig, Workspace


@dataclass
class Preset:
    """A quickstart preset: what is pooled and how each stage runs (`run` of each stage is set by the quickstart)."""

    description: str = opt("", "one line shown in the report")
    pool: PoolConfig = opt(help="the training pool; its anchor is the AV/AR trunk", factory=PoolConfig)
    corpus: CorpusStageConfig = opt(help="corpus stage", factory=CorpusStageConfig)
    extract: ExtractConfig = opt(help="extract stage", factory=ExtractConfig)
    teach: TeachStageConfig = opt(help="teach stage", factory=TeachStageConfig)
    fit_adapters: FitAdaptersConfig = opt(help="fit-adapters stage", factory=FitAdaptersConfig)
    sft_ar: ARSFTConfig = opt(help="sft-ar stage", factory=ARSFTConfig)
    sft_av: AVSFTConfig = opt(help="sft-av stage", factory=AVSFTConfig)
    refit_dec: RefitConfig = opt(help="refit-dec stage", factory=RefitConfig)
    add_model: AddModelConfig = opt(help="add-model stage: the held-out model (only its adapters are fitted)", factory=AddModelConfig)
    eval: EvalConfig = opt(help="eval stage (run after SFT into eval-sft/, and after RL into eval/)", factory=EvalConfig)
    rl: RLStageConfig = opt(help="rl stage", factory=RLStageConfig)


@dataclass
class QuickstartConfig:
    preset: str = opt("default", "preset name in nla_universal/configs/presets/ (smoke | default | gpu) or a YAML path")
    out: str = opt("runs/quickstart", "output folder (the run folder: bundle, reports, plots)")
    device: str = opt("auto", "cpu | cuda | auto")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models and teacher replies are cached")


def load_preset(name_or_path: str) -> Preset:
    preset = load_config(Preset, [str(resolve_config_path(name_or_path, "presets"))])
    validate_pool(preset.pool)
    if preset.corpus.corpus.unit == Unit.token:  # caught here, not by extract an hour in (add-model runs last)
        extract.check_token_pooling([*preset.pool.models, preset.add_model.model], f"preset {name_or_path}")
    return preset


def eval_before_rl(cfg: EvalConfig) -> dict:
    """The SFT-only scores: once RL has rewritten the bundle they can only come from the earlier record."""
    ws = Workspace(cfg.run)
    record = ws.record(Path(cfg.out).name)
    if record is not None and "rl" in ws.bundle_stage_names():
        return {"results": record["results"], "files": {k: Path(v) for k, v in record["files"].items()}}
    if "rl" in ws.bundle_stage_names():
        raise DataError(f"the bundle in {ws.bundle_dir} went through RL and {cfg.out} holds no earlier scores",
                        "run the quickstart into a new --out folder to see scores before and after RL")
    return evaluate.run(cfg)


def run(cfg: QuickstartConfig) -> Path:
    preset = load_preset(cfg.preset)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pool_file = out / "pool.yaml"
    io.write_yaml(pool_file, dataclasses.asdict(preset.pool))
    run_cfg = RunConfig(run_dir=str(out), pool=str(pool_file), device=cfg.device, cache_dir=cfg.cache_dir)
    for field in dataclasses.fields(preset):
        stage_cfg = getattr(preset, field.name)
        if hasattr(stage_cfg, "run"):
            stage_cfg.run = run_cfg
    t = StageTimer(out / "timings.json")
    t.run("corpus", lambda: corpus.run(preset.corpus))
    t.run("extract", lambda: extract.run(preset.extract))
    t.run("teach", lambda: teach.run(preset.teach))
    t.run("fit-adapters", lambda: fit_adapters.run(preset.fit_adapters))
    t.run("sft-ar", lambda: sft_ar.run(preset.sft_ar))
    t.run("sft-av", lambda: sft_av.run(preset.sft_av))
    t.run("refit-dec", lambda: refit_dec.run(preset.refit_dec))
    t.run("add-model", lambda: add_model.run(preset.add_model))
    before = t.run("eval-sft", lambda: eval_before_rl(dataclasses.replace(preset.eval, out=str(out / "eval-sft"))))
    t.run("rl", lambda: rl.run(preset.rl))
    after = t.run("eval", lambda: evaluate.run(dataclasses.replace(preset.eval, out=str(out / "eval"))))
    text = Path(after["files"]["markdown"]).read_text()
    randoms = [m.tag for m in preset.pool.models if m.source == "random"]
    header = (f"# nla-universal quickstart ({cfg.preset}: {preset.description})\n\nPool: trunk/anchor {preset.pool.anchor} "
              f"(real); held out {preset.add_model.model.tag} (real; only its adapters were fitted); "
              f"{', '.join(randoms) or 'no random models'}: **random weights**, for architecture coverage only. "
              "The tables below are after RL; the SFT-only scores are beside them in *Before and after RL*.\n\n")
    before_after = before_after_markdown(*(json.loads(Path(r["files"]["json"]).read_text()) for r in (before, after)))
    sections = [header + text, before_after, diagnostics_markdown(out), timings_markdown(list(t.rows.values()))]
    io.write_text(out / "report.md", "\n\n".join(sections) + "\n")
    io.write_text(out / "fve_report.json", (out / "eval" / "fve_report.json").read_text())
    print(yaml.safe_dump({"report": str(out / "report.md"), "bundle": str(out / "bundle")}, sort_keys=False))
    return out
