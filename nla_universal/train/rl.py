"""Joint RL: GRPO on the AV with reward −mse_nrm from the live AR, the AR trained on the same samples.

One step: B vectors (mixed tags) → G sampled explanations each → the AR reads them → reward →
group-normalised advantages → reference log-probs → the policy's clipped PG + k3 KL update → the AR's
MSE update on the same texts. `rl_step` talks to the three roles through one small interface that
the in-process layouts (`rl_roles.LocalRoles`) and the Ray actors (`distributed/`) both provide, so
every layer runs the same step. Each step is a pure function of (seed, step, weights): data order and
sampling seeds come from the step number, so a run killed at any point and resumed from its last
checkpoint ends with the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import io
from ..activations import TagRows
from ..config import choices, opt
from ..errors import DataError
from ..metrics import distinct_share
from ..nla.prompts import parse_explanation
from ..rollout import FINISH_STOP, Completion, SamplingParams
from .data import example_index, gather
from .loop import MetricsLog, batch_indices
from .rl_math import RewardKind, check_rl_settings, group_advantages, reward


@dataclass
class RLConfig:
    """GRPO on the AV, the AR alongside."""

    steps: int = opt(20, "RL steps (one rollout batch and one update of each role per step)")
    prompts_per_step: int = opt(4, "vectors per step (B), drawn from the train split of every trained tag")
    group_size: int = opt(4, "explanations sampled per vector (G ≥ 2); advantages are normalised within each group")
    max_new_tokens: int = opt(48, "longest explanation sampled")
    temperature: float = opt(1.0, "sampling temperature of the rollouts")
    av_lr: float = opt(1e-5, "the AV LoRA's learning rate")
    ar_lr: float = opt(5e-5, "the AR's (LoRA + value head) learning rate")
    warmup_steps: int = opt(2, "linear learning-rate warm-up steps, then constant")
    kl_coef: float = opt(0.05, "weight of the k3 KL to the frozen SFT AV")
    clip_eps: float = opt(0.2, "PPO clip range of the policy ratio")
    reward: RewardKind = opt(RewardKind.mse_nrm, f"reward of a reconstruction: {choices(RewardKind)}")
    failed_penalty: float = opt(-2.0, "reward of a sample whose explanation is unparsed or cut at max_new_tokens")
    penalise_failed: bool = opt(True, "give failed samples failed_penalty; false = score their text like any other "
                                "(a small AV that rarely closes its tags still gets a signal)")
    scale_by_std: bool = opt(True, "divide advantages by their group's std (GRPO); false = mean-centring only")
    clip_grad: float = opt(1.0, "per-role gradient-norm clip (0 = off)")
    checkpoint_every: int = opt(5, "steps between checkpoints (the last step always writes one)")
    keep_checkpoints: int = opt(2, "checkpoints kept per role")
    seed: int = opt(0, "seed of the data order and of each step's sampling")


class Roles(Protocol):
    """What a step needs from the policy, the reference, the critic and the rollout engine."""

    def generate(self, vectors: torch.Tensor, tags: Sequence[str], sampling: SamplingParams) -> list[Completion]: ...

    def critic_predict(self, texts: Sequence[str]) -> torch.Tensor: ...

    def reference_logprobs(self, vectors: torch.Tensor, tags: Sequence[str], responses: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def policy_update(self, vectors, tags, responses, advantages, ref_logprobs, kl_coef: float, clip_eps: float,
                      lr_scale: float) -> dict[str, float]: ...

    def critic_update(self, texts: Sequence[str], gold: torch.Tensor, lr_scale: float) -> dict[str, float]: ...

    def checkpoint(self, root: Path, step: int, keep: int) -> None: ...

    def restore(self, root: Path, step: int) -> None: ...


class Rollback(Exception):
    """The roles went back to the checkpoint of `step` (an actor died and was restarted): replay from there."""

    def __init__(self, step: int):
        super().__init__(f"rolled back to step {step}")
        self.step = step


@dataclass
class Batch:
    """B prompts, each repeated G times (prompt-major), with the shared vectors the AR must reconstruct."""

    vectors: torch.Tensor  # [B·G, d_shared]
    tags: list[str]


def lr_scale(step: int, cfg: RLConfig) -> float:
    return min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0


def step_batch(encode, rows: dict[str, TagRows], examples: list[tuple[str, int]], cfg: RLConfig, step: int) -> Batch:
    """The step's vectors: B examples by the seeded order, each repeated G times."""
    pairs = [examples[i] for i in batch_indices(len(examples), cfg.prompts_per_step, cfg.seed, step, 0, 1)]
    vectors: list[torch.Tensor | None] = [None] * len(pairs)
    for tag, (positions, H) in gather(rows, pairs).items():
        v = encode(H, tag)
        for k, pos in enumerate(positions):
            vectors[pos] = v[k]
    v = torch.stack(vectors).repeat_interleave(cfg.group_size, dim=0)  # type: ignore[arg-type]
    return Batch(v, [t for t, _ in pairs for _ in range(cfg.group_size)])


def sampling_for(cfg: RLConfig, step: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed * 1_000_003 + step)


def rl_step(roles: Roles, batch: Batch, cfg: RLConfig, step: int) -> dict[str, float]:
    """One GRPO step on `batch`; returns its metrics. Raises before any update when a number goes non-finite."""
    completions = roles.generate(batch.vectors, batch.tags, sampling_for(cfg, step))
    parsed = [parse_explanation(c.text) for c in completions]
    texts = [text for text, _ in parsed]
    ok = torch.tensor([not cfg.penalise_failed or (p and c.finish_reason == FINISH_STOP) for (_, p), c in zip(parsed, completions)])
    pred = roles.critic_predict(texts)
    rewards = reward(pred, batch.vectors, ok, cfg.reward, cfg.failed_penalty)
    advantages = group_advantages(rewards, cfg.group_size, cfg.scale_by_std)
    responses = [c.token_ids for c in completions]
    ref = roles.reference_logprobs(batch.vectors, batch.tags, responses)
    scale = lr_scale(step, cfg)
    policy = roles.policy_update(batch.vectors, batch.tags, responses, advantages, ref, cfg.kl_coef, cfg.clip_eps, scale)
    critic = roles.critic_update(texts, batch.vectors, scale)
    metrics = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), **policy, **critic,
               "response_len": float(np.mean([len(r) for r in responses])), "distinct": distinct_share(texts),
               "ok_share": float(ok.float().mean()), "lr_scale": scale}
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise DataError(f"RL step {step + 1}: non-finite {bad}", "lower the learning rates; the last checkpoint is intact")
    return metrics


def latest_step(root: Path, roles: Sequence[str] = ("av", "ar")) -> int:
    """The last step for which every role has a complete checkpoint (0 = start from the bundle)."""
    steps = [{int(p.name.split("-")[1]) for p in (root / r).glob("step-*") if io.is_complete(p)} for r in roles]
    common = set.intersection(*steps) if steps else set()
    return max(common, default=0)


def run_rl(roles: Roles, encode, rows: dict[str, TagRows], cfg: RLConfig, out_dir: Path) -> dict[str, float]:
    """Run (or resume) to cfg.steps; metrics per step in out_dir/metrics.jsonl and a plot beside it."""
    check_rl_settings(cfg.group_size, cfg.kl_coef, cfg.clip_eps)
    examples = example_index(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = out_dir / "checkpoints"
    step = latest_step(ckpts)
    if step:
        roles.restore(ckpts, step)
        logging.getLogger(__name__).info("rl: resumed from step %d", step)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", tensorboard=False, resume_step=step)
    last: dict[str, float] = {}
    with tqdm(total=cfg.steps, initial=step, desc="rl", unit="step", dynamic_ncols=True) as bar:
        while step < cfg.steps:
            started = time.time()
            try:
                last = rl_step(roles, step_batch(encode, rows, examples, cfg, step), cfg, step)
            except Rollback as back:
                step = back.step
                metrics_log = MetricsLog(out_dir / "metrics.jsonl", tensorboard=False, resume_step=step)
                bar.reset(total=cfg.steps)
                bar.update(step)
                continue
            step += 1
            metrics_log.write(step, **last, seconds=round(time.time() - started, 2))
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.4f}")
            if step == cfg.steps or step % cfg.checkpoint_every == 0:
                roles.checkpoint(ckpts, step, cfg.keep_checkpoints)
    plot_metrics(out_dir / "metrics.jsonl", out_dir / "rl.png")
    return last


def plot_metrics(metrics: Path, out: Path) -> bool:
    """Reward, KL, AR loss and distinct share per step (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return False
    panels = [("reward_mean", "reward (−mse_nrm)"), ("kl", "k3 KL to the SFT AV"), ("ar_loss", "AR loss (mse_nrm)"),
              ("distinct", "distinct explanations")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    with io.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def settings_dict(cfg: RLConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))
