"""`--custom-rm-path nla_universal.miles.reward.reward` and `--custom-reward-post-process-path
nla_universal.miles.reward.post_process`: −mse_nrm from the live AR, and GRPO advantages, as `rl_step`.

`reward` is awaited by Miles either per sample (`async_rm(args, sample)`) or with a list (`--group-rm`,
or a generate hook that returns several samples: `batched_async_rm`), and returns a float or a
list of floats; Miles itself writes them into `sample.reward` (with a list it asserts the field was
still None, so this function never sets it). Either way the samples of one call are scored in one
batch: the explanation is parsed out of each response, the AR critic reconstructs them all, and
`rl_math.reward` turns prediction and vector into −mse_nrm, with the fixed penalty for a failed
sample (unparsed, or cut at the token limit, or aborted) unless --no-nla-penalise-failed.

The critic is our own Ray actor (`critic.MilesCriticHost`, started by the driver under
--nla-critic-name), found by name from Miles' RolloutManager process; it remembers what it scored so
the driver can train the AR on exactly these samples. Tests hand an in-process host to `local_critic`.

`post_process` replaces Miles' GRPO normalisation (which divides by the unbiased std) with
`rl_math.group_advantages` per `group_index`, so the advantages are those of `nla-universal rl`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator

import torch
from miles.utils.types import Sample

from ..errors import ConfigError, NLAError
from ..nla.prompts import parse_explanation
from ..train.rl_math import group_advantages
from ..train.rl_math import reward as rl_reward
from . import context
from .args import rl_config

_local: list = []  # in-process critic hosts (tests), innermost last
_handles: dict[str, object] = {}  # Ray actor handles by name, per process


@contextlib.contextmanager
def local_critic(host) -> Iterator[None]:
    """Score with `host` (a MilesCriticHost in this process) instead of the named Ray actor."""
    _local.append(host)
    try:
        yield
    finally:
        _local.remove(host)


def _actor(name: str):
    if name in _handles:
        return _handles[name]
    fix = ("start the run with `python -m nla_universal.miles.train` (it starts the AR critic before Miles' "
           "rollout manager), or give --nla-critic-name the name it was started under")
    try:
        import ray
    except ImportError:
        raise NLAError("no AR critic to score with: Ray is not installed and no in-process critic was given", fix) from None
    if not ray.is_initialized():
        raise NLAError(f"no AR critic to score with: this process is not in a Ray job, so the actor {name!r} "
                       "cannot be reached", fix)
    try:
        _handles[name] = ray.get_actor(name)
    except ValueError:
        raise NLAError(f"no AR critic actor named {name!r} in this Ray job", fix) from None
    return _handles[name]


async def _score(args, keys: list[int], texts: list[str], gold: torch.Tensor) -> torch.Tensor:
    if _local:
        return await asyncio.to_thread(_local[-1].score, keys, texts, gold)
    return await _actor(args.nla_critic_name).score.remote(keys, texts, gold)


async def scores(args, samples: list[Sample]) -> list[float]:
    """Rewards of `samples`, in order, from one batched AR call (see the module docstring)."""
    cfg = rl_config(args)
    vectors, texts, ok = [], [], []
    for sample in samples:
        vector, _ = context.sample_vector(sample)
        text, parsed = parse_explanation(sample.response or "")
        vectors.append(vector)
        texts.append(text)
        ok.append(not cfg.penalise_failed or (parsed and sample.status == Sample.Status.COMPLETED))
    gold = torch.stack(vectors)
    pred = await _score(args, [int(s.index) for s in samples], texts, gold)
    return [float(r) for r in rl_reward(pred, gold, torch.tensor(ok), cfg.reward, cfg.failed_penalty)]


async def reward(args, sample_or_samples: Sample | list[Sample], **kwargs) -> float | list[float]:
    """Miles' reward hook: a float for one sample, a list for a list (Miles sets `sample.reward`)."""
    if isinstance(sample_or_samples, list):
        return await scores(args, sample_or_samples) if sample_or_samples else []
    return (await scores(args, [sample_or_samples]))[0]


def post_process(args, samples: list[Sample]) -> tuple[list[float], list[float]]:
    """(raw rewards, advantages) of Miles' flattened samples: `rl_math.group_advantages` per group_index."""
    raw = [float(s.get_reward_value(args)) for s in samples]
    groups: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.group_index, []).append(position)
    sizes = {len(rows) for rows in groups.values()}
    if None in groups or sizes != {args.n_samples_per_prompt}:
        raise ConfigError(f"reward groups of sizes {sorted(sizes)} (group_index None: {None in groups}), expected "
                          f"{args.n_samples_per_prompt} samples per group_index",
                          "--global-batch-size = --rollout-batch-size × --n-samples-per-prompt (Miles trims a rollout "
                          "to whole global batches), and the NLA data source, which numbers the groups")
    order = [row for rows in groups.values() for row in rows]
    advantages = group_advantages(torch.tensor([raw[row] for row in order]), args.n_samples_per_prompt,
                                  rl_config(args).scale_by_std)
    out = [0.0] * len(samples)
    for row, value in zip(order, advantages.tolist()):
        out[row] = value
    return raw, out
