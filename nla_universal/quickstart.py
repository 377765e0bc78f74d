"""`nla-universal quickstart`: the whole universal NLA end to end, on a preset sized for the machine.

Pool: the packaged SmolLM2-135M-Instruct (trunk and anchor), a few tiny random-weight architectures
in the training pool (coverage only — labelled as such everywhere), and the packaged Gemma-3-270M
added afterwards as a held-out model. Stages: corpus → extract → teach → fit-adapters → sft-ar →
sft-av → refit-dec → add-model (Gemma) → eval. Every stage skips or resumes what is already done,
so rerunning an interrupted (or finished) quickstart continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from . import io
from .config import CorpusConfig, ModelSpec, PoolConfig, default_cache_dir, opt
from .errors import ConfigError
from .extract import ExtractConfig, extract
from .stages import CorpusStageConfig, FitAdaptersConfig, TeachStageConfig, run_corpus, run_fit_adapters, run_teach
from .teacher import TeacherConfig
from .train.add_model import AddModelConfig, run_add_model
from .train.data import mark_stage_done, stage_done
from .train.loop import LoopConfig
from .train.refit import RefitConfig, run_refit_dec
from .train.sft_ar import ARSFTConfig, run_sft_ar
from .train.sft_av import AVSFTConfig, run_sft_av
from .train.workspace import RunConfig

log = logging.getLogger(__name__)

# The trunk stays fp32 (LoRA training under bf16 autocast is faster on fp32 weights than on bf16 ones).
ANCHOR = ModelSpec(tag="smollm2-135m", source="packaged", name="smollm2-135m-instruct", depth=0.5, dtype="float32")
HELD_OUT = ModelSpec(tag="gemma3-270m", source="packaged", name="gemma3-270m", depth=0.5, dtype="bfloat16", held_out=True)
RANDOM = [ModelSpec(tag="random-gpt2", source="random", name="gpt2", layer=1),
          ModelSpec(tag="random-qwen3", source="random", name="qwen3", layer=1)]

PRESETS: dict[str, dict] = {
    # ≤ 3 min on the 2-core CPU machine once the packaged models are converted: plumbing, not quality.
    "smoke": dict(passages=80, test_fraction=0.1, teacher_tokens=32, ar_steps=4, av_steps=4, batch=4, refit_train=20,
                  refit_val=4, test=6, gen_tokens=20, min_overlap=12, n_boot=200, random=1, gen_batch=8),
    # ≤ 20 min on the 2-core CPU machine. A fifth of the passages are test: ~70 per tag, so the bootstrap
    # interval of Δ vs shuffled_z is narrow enough to tell a weak signal from none.
    "default": dict(passages=400, test_fraction=0.2, teacher_tokens=40, ar_steps=100, av_steps=48, batch=8,
                    refit_train=48, refit_val=16, test=0, gen_tokens=40, min_overlap=32, n_boot=1000, random=1,
                    gen_batch=16),
    # one GPU: more text, more steps.
    "gpu": dict(passages=2000, test_fraction=0.1, teacher_tokens=64, ar_steps=1000, av_steps=1500, batch=16,
                refit_train=512, refit_val=128, test=0, gen_tokens=64, min_overlap=32, n_boot=1000, random=2, gen_batch=32),
}


@dataclass
class QuickstartConfig:
    preset: str = opt("default", f"size of the run: {' | '.join(PRESETS)}")
    out: str = opt("runs/quickstart", "output folder (the run folder: bundle, reports, plots)")
    device: str = opt("auto", "cpu | cuda | auto")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models are cached")


def pool_for(p: dict) -> PoolConfig:
    return PoolConfig(anchor=ANCHOR.tag, models=[ANCHOR, *RANDOM[: p["random"]]])


class StageTimer:
    """Wall time and peak RSS of each stage (the kernel's high-water mark, reset between stages).

    Kept in `timings.json`, written after every stage and summed over reruns: a run killed part-way
    keeps the time of the stages it finished, and rerunning a finished run adds only each stage's check.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.is_file():
            try:
                self.rows = {r["stage"]: {"runs": 1, **r} for r in json.loads(path.read_text())}
            except (ValueError, KeyError, TypeError):
                log.warning("quickstart: %s is unreadable; stage timings start again from this run", path)

    @staticmethod
    def _reset_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _peak_mib() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run(self, name: str, fn: Callable[[], object]):
        per_stage = self._reset_peak()
        start = time.time()
        result = fn()
        seconds = time.time() - start
        row = self.rows.setdefault(name, {"stage": name, "seconds": 0.0, "peak_rss_mib": 0, "runs": 0})
        row.update(seconds=round(row["seconds"] + seconds, 1), runs=row["runs"] + 1, peak_is_per_stage=per_stage,
                   peak_rss_mib=max(row["peak_rss_mib"], round(self._peak_mib())))
        io.write_text(self.path, json.dumps(list(self.rows.values()), indent=2))
        log.info("quickstart: %s done in %.1fs", name, seconds)
        return result


def timings_markdown(rows: list[dict]) -> str:
    lines = ["## Stage timings", "",
             "Wall time summed over every run of this folder (a rerun of a finished stage adds only its check); "
             "peak RSS is the highest seen.", "", "| stage | wall s | peak RSS MiB |", "|---|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_rss_mib']} |" for r in rows]
    lines.append(f"| **total** | {round(sum(r['seconds'] for r in rows), 1)} | |")
    return "\n".join(lines)


# Below this many nats/token of val loss gained from the true vector (vs another passage's), the AV's
# text cannot depend on the passage: the round trip is then bounded by the AV, whatever the AR does.
VECTOR_GAIN_FLOOR = 0.01


def diagnostics_markdown(run_dir: Path) -> str:
    """What the SFT stages learned, read from their stage records, with a plain verdict on the AV."""
    ar = json.loads((run_dir / "stages" / "sft-ar.json").read_text())
    av = json.loads((run_dir / "stages" / "sft-av.json").read_text())["final"]
    lines = ["## Training diagnostics", "", "| stage | measure (val split) | value |", "|---|---|---|",
             f"| sft-ar | cos of the AR's prediction from the teacher's z, before → after | "
             f"{ar['before']['cos']:.3f} → {ar['final']['cos']:.3f} |",
             f"| sft-av | vector_gain: loss with another passage's vector − with the true one (nats/token) | "
             f"{av['vector_gain']:+.4f} |",
             f"| sft-av | distinct_z: share of distinct explanations in a sample | {av['distinct_z']:.2f} |", ""]
    if av["vector_gain"] < VECTOR_GAIN_FLOOR:
        lines.append(f"**The AV does not read the injected vector yet** (vector_gain < {VECTOR_GAIN_FLOOR}): its "
                     "explanations cannot carry passage-specific information, so Δ vs shuffled_z stays near 0 whatever "
                     "the AR learns. Reading the vector comes only after many more AV SFT steps on many more "
                     "passages than a CPU run affords (`--preset gpu` on a GPU; `tools/probes/av_steps.py` measures "
                     "vector_gain along a long run).")
    else:
        lines.append("The AV's loss depends on the vector it reads (vector_gain ≥ "
                     f"{VECTOR_GAIN_FLOOR}): its explanations can carry passage-specific information.")
    return "\n".join(lines)


def run_quickstart(cfg: QuickstartConfig) -> Path:
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}", f"use one of {sorted(PRESETS)}")
    from .evaluate_nla import EvalConfig, run_eval

    p = PRESETS[cfg.preset]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = pool_for(p)
    pool_file = out / "pool.yaml"
    io.write_yaml(pool_file, {"anchor": pool.anchor, "models": [m.__dict__ for m in pool.models]})
    run = RunConfig(run_dir=str(out), pool=str(pool_file), device=cfg.device, cache_dir=cfg.cache_dir)
    loop = dict(batch_size=p["batch"], eval_every=0, checkpoint_every=25)
    t = StageTimer(out / "timings.json")
    corpus = CorpusConfig(max_passages=p["passages"], test_fraction=p["test_fraction"])
    t.run("corpus", lambda: run_corpus(CorpusStageConfig(run_dir=str(out), corpus=corpus)))
    t.run("extract", lambda: extract(ExtractConfig(run_dir=str(out), pool=str(pool_file), device=cfg.device, cache_dir=cfg.cache_dir)))
    t.run("teach", lambda: run_teach(TeachStageConfig(run_dir=str(out), cache_dir=cfg.cache_dir,
                                                      teacher=TeacherConfig(max_tokens=p["teacher_tokens"],
                                                                            max_input_chars=1000))))
    fit = FitAdaptersConfig(run_dir=str(out), pool=str(pool_file))
    fit.fit.min_overlap = p["min_overlap"]
    t.run("fit-adapters", lambda: run_fit_adapters(fit))
    t.run("sft-ar", lambda: run_sft_ar(ARSFTConfig(run=run, loop=LoopConfig(steps=p["ar_steps"], lr=2e-4, **loop))))
    t.run("sft-av", lambda: run_sft_av(AVSFTConfig(run=run, loop=LoopConfig(steps=p["av_steps"], lr=5e-4, **loop),
                                                   max_new_tokens=p["gen_tokens"])))
    gen = dict(max_new_tokens=p["gen_tokens"], generate_batch_size=p["gen_batch"])
    refit = RefitConfig(run=run, train_passages=p["refit_train"], val_passages=p["refit_val"], **gen)
    refit.fit.min_overlap = p["min_overlap"]
    t.run("refit-dec", lambda: run_refit_dec(refit))
    add = AddModelConfig(run=run, model=replace(HELD_OUT), train_passages=p["refit_train"], val_passages=p["refit_val"], **gen)
    add.fit.min_overlap = p["min_overlap"]

    def add_held_out():
        settings = {"model": HELD_OUT.__dict__, "preset": p}
        if stage_done(out, "add-model", settings) is None:
            started = time.time()
            mark_stage_done(out, "add-model", settings, started, result=run_add_model(add))

    t.run("add-model", add_held_out)
    ev = EvalConfig(run=run, test_passages=p["test"], n_boot=p["n_boot"], out=str(out / "eval"), **gen)
    result = t.run("eval", lambda: run_eval(ev))
    text = Path(result["files"]["markdown"]).read_text()
    header = (f"# nla-universal quickstart ({cfg.preset})\n\nPool: trunk/anchor {ANCHOR.tag} (real, packaged); "
              f"held out {HELD_OUT.tag} (real, packaged; only its adapters were fitted); "
              f"{', '.join(m.tag for m in RANDOM[: p['random']])}: **random weights**, for architecture coverage only.\n\n")
    sections = [header + text, diagnostics_markdown(out), timings_markdown(list(t.rows.values()))]
    io.write_text(out / "report.md", "\n\n".join(sections) + "\n")
    (out / "fve_report.json").write_text((out / "eval" / "fve_report.json").read_text())
    print(yaml.safe_dump({"report": str(out / "report.md"), "bundle": str(out / "bundle")}, sort_keys=False))
    return out
