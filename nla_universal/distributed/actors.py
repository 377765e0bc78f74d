"""The processes the Ray driver places: hosts of the RL roles of `train/rl_roles.py` — all of them in
one (`colocated`, `separate`) or one each (`per_role`) — and rollout hosts that keep a copy of the policy.

Nothing here re-implements RL: a host builds the same `LocalRoles` the in-process stage uses (with the
roles it is given) and forwards calls to it. Ray restores none of an actor's state after a restart,
so a host, when (re)built, reloads the last checkpoint its roles completed; the driver then rolls all
hosts back to the last step every role completed and replays from it. These are plain classes; the
driver wraps them with `ray.remote`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..device import resolve_device
from ..train.rl import latest_step
from ..train.rl_roles import LocalRoles, Placement, load_policy


class RolesHost:
    """Every role (`role="all"`, in `placement`'s layout) or one of "policy", "reference", "critic"."""

    def __init__(self, folder: str, role: str, placement: str, cache_dir: str | None, device: str, av_lr: float,
                 ar_lr: float, clip_grad: float, ckpt_root: str, num_cpus: float):
        torch.set_num_threads(max(1, int(num_cpus)))  # the CPUs it was given, not every core of the node
        dev = resolve_device(device)
        if role == "all":
            self.roles = LocalRoles.build(Path(folder), Placement(placement), cache_dir, dev, av_lr, ar_lr, clip_grad)
        else:
            lr = av_lr if role == "policy" else ar_lr
            self.roles = LocalRoles.build_one(role, Path(folder), cache_dir, dev, lr, clip_grad)
        step = latest_step(Path(ckpt_root), [r.name for r in self.roles.trained])
        if step:
            self.roles.restore(Path(ckpt_root), step)

    def call(self, method: str, *args):
        return getattr(self.roles, method)(*args)

    def pid(self) -> int:
        return os.getpid()


class RolloutHost:
    """A copy of the policy that only samples; the driver pushes the policy's LoRA after every update.
    With a server engine the samples come from vLLM or SGLang instead (prompt embeddings built here)."""

    def __init__(self, folder: str, cache_dir: str | None, device: str, num_cpus: float, engine: str = "hf",
                 engine_url: str = "", served_model: str = ""):
        torch.set_num_threads(max(1, int(num_cpus)))
        self.av = load_policy(Path(folder), cache_dir)
        self.av.model.to(resolve_device(device)).eval()
        self.server = None
        if engine != "hf":
            self.server = server_engine(engine, engine_url, served_model)
            self.av.engine = self.server
        self.scratch = Path(folder).parent / ".rollout-adapter"

    def generate(self, vectors, tags, sampling):
        with torch.no_grad():
            return self.av.generate(vectors, tags, sampling)

    def load_lora(self, state: dict[str, torch.Tensor]) -> None:
        """The policy's trained tensors (names without the adapter); a server gets them as a new adapter folder."""
        named = {n.replace(f".{self.av.adapter_name}.", "."): p for n, p in self.av.model.named_parameters()}
        with torch.no_grad():
            for name, tensor in state.items():
                named[name].copy_(tensor)
        if self.server is not None:
            self.av.save(self.scratch)
            self.server.push_policy(self.scratch)

    def pid(self) -> int:
        return os.getpid()


def server_engine(engine: str, url: str, served_model: str):
    """The rollout client of a running vLLM or SGLang server."""
    if engine == "vllm":
        from ..rollout.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(url, served_model)
    from ..rollout.sglang import SGLangRolloutEngine

    return SGLangRolloutEngine(url, served_model)
