"""The one supervised training loop: short enough to read in one sitting.

Data order depends only on (seed, step), and a checkpoint holds the trainable tensors, the optimiser
state and the RNG state, so a run killed at any point and resumed from its last checkpoint ends with
the same weights as an uninterrupted run.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import io
from ..config import choices, opt
from ..device import native_bf16
from ..errors import DataError

log = logging.getLogger(__name__)


class Schedule(enum.StrEnum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class Autocast(enum.StrEnum):
    auto = "auto"  # bf16 when the device computes it natively
    bf16 = "bf16"
    off = "off"


@dataclass
class LoopConfig:
    steps: int = opt(200, "optimiser steps")
    batch_size: int = opt(8, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(1e-4, "peak learning rate")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: Schedule = opt(Schedule.cosine, f"after warm-up: {choices(Schedule)}")
    min_lr_ratio: float = opt(0.1, "cosine/linear: final lr as a share of the peak")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    clip_grad: float = opt(1.0, "gradient-norm clip (0 = off)")
    autocast: Autocast = opt(Autocast.auto, "bf16 autocast: auto (when the device has native bf16) | bf16 | off")
    eval_every: int = opt(50, "steps between validation passes (0 = only at the end)")
    checkpoint_every: int = opt(50, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk")
    seed: int = opt(0, "seed of data order and dropout")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")


def autocast_context(mode: Autocast, device: torch.device):
    on = mode == Autocast.bf16 or (mode == Autocast.auto and native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def lr_at(step: int, cfg: LoopConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == Schedule.constant:
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == Schedule.cosine else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def batch_indices(n: int, batch_size: int, seed: int, step: int, micro: int, grad_accum: int) -> np.ndarray:
    """Indices of one micro-batch: a fresh seeded permutation per epoch, so order is a pure function of the step."""
    start = (step * grad_accum + micro) * batch_size
    positions = np.arange(start, start + batch_size)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(positions // n):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = positions // n == epoch
        out[sel] = perm[positions[sel] % n]
    return out


# --- checkpoints -------------------------------------------------------------------------------


def _latest(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if io.is_complete(p))
    return done[-1] if done else None


def save_checkpoint(root: Path, step: int, named: dict[str, torch.nn.Parameter], opt_: torch.optim.Optimizer, keep: int) -> None:
    names = list(named)
    state = opt_.state_dict()
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in named.items()}
    scalars: dict[str, dict] = {}
    for idx, s in state["state"].items():
        for key, val in s.items():
            if torch.is_tensor(val):
                tensors[f"opt.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    tensors["rng.torch"] = torch.get_rng_state()
    with io.atomic_dir(root / f"step-{step:06d}") as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "names": names, "param_groups": state["param_groups"], "scalars": scalars}))
        io.mark_success(tmp)
    for old in sorted(p for p in root.glob("step-*") if io.is_complete(p))[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_checkpoint(path: Path, named: dict[str, torch.nn.Parameter], opt_: torch.optim.Optimizer) -> int:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    if meta["names"] != list(named):
        raise DataError(
            f"checkpoint {path} holds other trainable parameters than this run trains (it was written with other "
            "settings, e.g. another LoRA rank or train_enc)",
            f"delete {path.parent} to restart this stage from step 0, or rerun with the settings that wrote it",
        )
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[f"param.{k}"])
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    opt_.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


# --- the loop ----------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, one line per logged step; on resume, lines after the checkpoint's step are cut, so
    the steps a killed run repeats are logged once."""

    def __init__(self, path: Path, tensorboard: bool, resume_step: int = 0):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            io.write_text(path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, step: int, **values: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 2), **values}) + "\n")
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut by a kill: dropped


def train(
    *,
    out_dir: Path,
    named_params: dict[str, torch.nn.Parameter],
    param_groups: list[dict],
    n_examples: int,
    loss_fn: Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]],
    eval_fn: Callable[[int], dict[str, float]] | None,
    cfg: LoopConfig,
    device: torch.device,
    desc: str,
) -> dict[str, float]:
    """Run (or resume) to cfg.steps. `loss_fn(indices)` returns the mean loss of that micro-batch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = out_dir / "checkpoints"
    optimiser = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimiser.param_groups]
    torch.manual_seed(cfg.seed)
    step = 0
    latest = _latest(ckpts)
    if latest is not None:
        step = load_checkpoint(latest, named_params, optimiser)
        log.info("%s: resumed from %s", desc, latest)
    metrics = MetricsLog(out_dir / "metrics.jsonl", cfg.tensorboard, resume_step=step)
    trainable = [p for g in param_groups for p in g["params"]]
    last_eval: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    while step < cfg.steps:
        scale = lr_at(step, cfg) / cfg.lr
        for group, base in zip(optimiser.param_groups, base_lrs):
            group["lr"] = base * scale
        optimiser.zero_grad(set_to_none=True)
        logged: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = batch_indices(n_examples, cfg.batch_size, cfg.seed, step, micro, cfg.grad_accum)
            with autocast_context(cfg.autocast, device):
                loss, extra = loss_fn(idx)
            (loss / cfg.grad_accum).backward()
            for k, v in {"loss": float(loss.detach()), **extra}.items():
                logged[k] = logged.get(k, 0.0) + v / cfg.grad_accum
        if cfg.clip_grad > 0:
            logged["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad))
        optimiser.step()
        step += 1
        metrics.write(step, lr=optimiser.param_groups[0]["lr"], **logged)
        bar.update(1)
        bar.set_postfix(loss=f"{logged['loss']:.4f}")
        final = step == cfg.steps
        if eval_fn is not None and (final or (cfg.eval_every and step % cfg.eval_every == 0)):
            last_eval = eval_fn(step)
            metrics.write(step, **{f"val_{k}": v for k, v in last_eval.items()})
        if final or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint(ckpts, step, named_params, optimiser, cfg.keep_checkpoints)
    bar.close()
    return last_eval


def named_trainable(modules: Iterable[tuple[str, torch.nn.Module]]) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters of several modules under prefixed, stable names."""
    return {f"{prefix}.{n}": p for prefix, m in modules for n, p in m.named_parameters() if p.requires_grad}
