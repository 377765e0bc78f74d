"""The AR critic beside Miles' actors: `distributed/actors.py::RolesHost(role="critic")` as a named Ray
actor, with a memory of what it scored.

Miles has no place for a supervised critic (its critic is a PPO value head, Megatron only), so the
AR is our own actor. The reward hook (in Miles' RolloutManager) finds it by name and calls `score`,
which reconstructs the explanations and remembers (text, vector) per sample index; after the
rollout the driver calls `train_on` with the indices Miles will train the AV on, so the AR learns
from exactly the samples whose rewards it gave, with the same `CriticRole.update` as `rl_step`.
Checkpoints and restore are RolesHost's (`checkpoint`/`restore` through `call`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..distributed.actors import RolesHost
from ..errors import ConfigError, DataError


class MilesCriticHost(RolesHost):
    """The AR alone (its own copy of blocks 0..K), restored from the last checkpoint under `ckpt_root`."""

    def __init__(self, folder: str, cache_dir: str | None, device: str, ar_lr: float, clip_grad: float,
                 ckpt_root: str, num_cpus: float):
        super().__init__(folder, "critic", "separate", cache_dir, device, av_lr=0.0, ar_lr=ar_lr, clip_grad=clip_grad,
                         ckpt_root=ckpt_root, num_cpus=num_cpus)
        self.scored: dict[int, tuple[str, torch.Tensor]] = {}

    def score(self, keys: Sequence[int], texts: Sequence[str], gold: torch.Tensor) -> torch.Tensor:
        """`[N, d]` reconstructions of `texts`; remembers each text and its target vector under its sample index."""
        pred = self.roles.critic_predict(list(texts)).float().cpu()
        for key, text, vector in zip(keys, texts, gold):
            self.scored[int(key)] = (text, vector.detach().float().cpu())
        return pred

    def train_on(self, keys: Sequence[int], lr_scale: float) -> dict[str, float]:
        """One AR step on the remembered samples `keys` (a rollout's training samples); forgets the rest,
        which Miles dropped (filtered or aborted groups)."""
        keys = [int(k) for k in keys]
        missing = [k for k in keys if k not in self.scored]
        if missing:
            raise DataError(f"the AR critic scored no sample with index {missing[0]} ({len(missing)} of {len(keys)} "
                            "training samples unscored)", "reward every sample with --custom-rm-path "
                            "nla_universal.miles.reward.reward in this run (the AR trains on what it scored)")
        texts = [self.scored[k][0] for k in keys]
        gold = torch.stack([self.scored[k][1] for k in keys])
        self.scored.clear()
        return {**self.roles.critic_update(texts, gold, lr_scale), "ar_samples": float(len(keys))}


def start_critic(args, pgs, ckpt_root: str):
    """The named AR actor, on a share of AV rank 0's GPU bundle or on a GPU of its own; ready when returned."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .args import bundle_dir

    if args.nla_critic_placement == "own":
        pg, bundle, gpus = placement_group([{"GPU": 1, "CPU": 1}], strategy="PACK"), 0, 1.0
        try:
            ray.get(pg.ready(), timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError("no GPU left for the AR critic (--nla-critic-placement own) after 10 minutes",
                              "give the cluster one GPU more than Miles' actors and engines take, or use "
                              "--nla-critic-placement actor") from None
    else:
        pg, indices, _ = pgs["actor"]
        bundle, gpus = indices[0], args.nla_critic_num_gpus
    host = ray.remote(MilesCriticHost).options(
        name=args.nla_critic_name, num_gpus=gpus, num_cpus=gpus, max_restarts=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle),
    ).remote(folder=str(bundle_dir(args)), cache_dir=args.nla_cache_dir, device="auto", ar_lr=args.nla_ar_lr,
             clip_grad=args.nla_clip_grad, ckpt_root=ckpt_root, num_cpus=max(1.0, gpus))
    ray.get(host.pid.remote())  # loaded before Miles' rollout manager asks it for rewards
    return host
