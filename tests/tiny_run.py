"""A tiny run folder for the stage, RL and Ray tests: two random-weight trunks, passages taught by a
deterministic stand-in teacher (each passage's first sentence), activations and fitted adapters; and
the short stage calls the tests build on. The fixtures that build them once per session are in conftest.py."""

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import torch
import yaml
from safetensors.torch import load_file

from nla_universal.config import CorpusConfig
from nla_universal.corpus import build_passages, write_passages
from nla_universal.nla.av import AVConfig
from nla_universal.nla.lora import LoraSettings
from nla_universal.pipeline import extract, fit_adapters, refit_dec, rl, sft_ar, sft_av
from nla_universal.pipeline.refit_dec import RefitConfig
from nla_universal.pipeline.sft_ar import ARSFTConfig, BundleInitConfig
from nla_universal.pipeline.sft_av import AVSFTConfig
from nla_universal.pipeline.workspace import RunConfig
from nla_universal.train.loop import LoopConfig
from nla_universal.train.rl import RLConfig

TEACHER = "fixture:first-sentence"
POOL = {"anchor": "tiny-llama", "models": [
    {"tag": "tiny-llama", "source": "random", "name": "llama", "layer": 1},
    {"tag": "tiny-gpt2", "source": "random", "name": "gpt2", "layer": 1},
]}
FAST = dict(batch_size=4, eval_every=0, checkpoint_every=2, autocast="off", warmup_steps=1)


def first_sentence(text: str) -> str:
    """A deterministic stand-in teacher: the passage's first sentence (real text, passage-specific)."""
    return re.split(r"(?<=[.!?])\s", " ".join(text.split()))[0][:160]


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("passages.parquet", "pool.yaml"):
        (dst / name).write_bytes((src / name).read_bytes())
    for sub in ("activations", "adapters", "stages"):
        for f in (src / sub).rglob("*"):
            if f.is_file():
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


def run_cfg(run: Path) -> RunConfig:
    return RunConfig(run_dir=str(run), pool=str(run / "pool.yaml"))


def small_init() -> BundleInitConfig:
    return BundleInitConfig(av=AVConfig(lora=LoraSettings(r=4, alpha=8)))


def ar_sft(run: Path, steps: int, lr: float = 3e-3) -> dict:
    return sft_ar.run(ARSFTConfig(run=run_cfg(run), init=small_init(), loop=LoopConfig(steps=steps, lr=lr, **FAST), val_passages=8))


def av_sft(run: Path, steps: int = 1, **kw) -> dict:
    return sft_av.run(AVSFTConfig(run=run_cfg(run), loop=LoopConfig(steps=steps, lr=3e-3, **FAST), val_passages=8,
                                  collapse_sample=4, max_new_tokens=6, **kw))


def bundle_tensors(run: Path, part: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "bundle" / part).glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def make_prepared(run: Path) -> Path:
    """passages with z, activations and fitted adapters for the tiny pool, in `run`."""
    table = build_passages(CorpusConfig(max_passages=120))
    z = [first_sentence(t) for t in table.column("text").to_pylist()]
    table = table.append_column("z", pa.array(z)).append_column("teacher", pa.array([TEACHER] * len(z)))
    write_passages(table, run / "passages.parquet")
    (run / "pool.yaml").write_text(yaml.safe_dump(POOL))
    extract.run(extract.ExtractConfig(run=run_cfg(run)))
    fit = fit_adapters.FitAdaptersConfig(run=run_cfg(run))
    fit.fit.min_overlap = 8
    fit_adapters.run(fit)
    return run


TINY_RL = dict(steps=3, prompts_per_step=2, group_size=3, max_new_tokens=6, av_lr=1e-3, ar_lr=1e-3, warmup_steps=1,
               checkpoint_every=1, penalise_failed=False)


def make_refitted(prepared: Path, run: Path) -> Path:
    """A copy of `prepared` whose bundle went through sft-ar, sft-av and refit-dec."""
    run = copy_run(prepared, run)
    ar_sft(run, steps=2)
    av_sft(run, input_map="none")
    refit = RefitConfig(run=run_cfg(run), train_passages=16, val_passages=4, max_new_tokens=4)
    refit.fit.min_overlap = 8
    refit_dec.run(refit)
    return run


def fresh_copy(refitted: Path, dst: Path) -> Path:
    shutil.copytree(refitted, dst, ignore=shutil.ignore_patterns("rl", "explanations"))
    (dst / "stages" / "rl.json").unlink(missing_ok=True)
    return dst


def rl_cfg(run: Path, placement: str, **kw) -> rl.RLStageConfig:
    return rl.RLStageConfig(run=run_cfg(run), rl=RLConfig(**{**TINY_RL, **kw}), placement=placement)


def metric_lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "seconds")}
            for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("av", "ar"):
        for f in sorted((run / "bundle" / part).glob("*.safetensors")):
            out.update({f"{part}/{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out
