"""The Ray driver: places the RL hosts with a placement group and runs the same loop as the in-process
stage (`train/rl.py::run_rl`) through `RayRoles`, a `Roles` whose methods are actor calls.

Placements: `colocated` (one actor over one frozen base), `separate` (one actor, three copies) and
`per_role` (the policy, the reference and the critic each in their own actor, plus `rollout_engines`
rollout actors that hold a copy of the policy and get its LoRA after every update). Scaling: the
rollouts split each step's prompts over the rollout actors; training is one policy and one critic
(data-parallel training of the roles is Miles'/FSDP's job: see `miles/`).

Fault tolerance: every actor has `max_restarts`; calls are not retried by Ray (an update is not
idempotent). When an actor dies, the driver waits for it to come back, rolls every host back to the
last step all roles checkpointed, and `run_rl` replays from there: each step is a pure function of
(seed, step, weights), so the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

from ..errors import ConfigError, NLAError
from ..train.rl import Rollback, latest_step
from ..train.rl_roles import Placement
from . import actors
from .config import RayConfig

log = logging.getLogger(__name__)


ACTOR_ERRORS: tuple[type[BaseException], ...] = ()


def _ray():
    try:
        import ray
    except ImportError:
        raise NLAError("the RL stage with ray.enabled=true needs Ray", "pip install 'nla-universal[ray]'") from None
    global ACTOR_ERRORS
    ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
    return ray


def _reachable(address: str, timeout_s: float = 5.0) -> bool:
    """A TCP connect to a `host:port` (or `ray://host:port`) address: Ray itself retries for a minute or more."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def connect(cfg: RayConfig):
    """Join (or start) the cluster; a clear error when the address answers nothing."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    fix = "start the head (`ray start --head`, or launch/head.sh start) or fix ray.address"
    if cfg.address not in ("", "auto") and not _reachable(cfg.address):
        raise NLAError(f"cannot reach the Ray cluster at {cfg.address}: nothing answers there", fix)
    try:
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:  # a private cluster on this machine: loopback, explicit CPUs, no dashboard
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise NLAError(f"cannot reach the Ray cluster at {cfg.address or 'a new local head'}: {str(exc).splitlines()[0]}",
                       fix) from None
    return ray


def host_specs(placement: Placement, cfg: RayConfig) -> list[str]:
    """The hosts a placement needs, in placement-group bundle order."""
    if placement == Placement.per_role:
        return ["policy", "reference", "critic", *["rollout"] * cfg.rollout_engines]
    return ["all"]


def check_resources(ray, hosts: list[str], cfg: RayConfig) -> None:
    have = ray.cluster_resources()
    need = {"CPU": cfg.cpus_per_actor * len(hosts), "GPU": cfg.gpus_per_actor * len(hosts)}
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        desc = ", ".join(f"{v:g} {k} asked, {h:g} in the cluster" for k, (v, h) in short.items())
        raise ConfigError(f"the RL placement needs more than the Ray cluster has ({desc}); nothing was started",
                          "lower ray.gpus_per_actor / ray.cpus_per_actor / ray.rollout_engines, or add nodes")


class RayRoles:
    """The `Roles` of `train/rl.py`, each method routed to the host that holds the role; a dead actor
    becomes a `Rollback` to the last step every role checkpointed."""

    def __init__(self, folder: Path, placement: Placement, cache_dir: str | None, device: str, rl, ckpt_root: Path,
                 cfg: RayConfig):
        self.ray = connect(cfg)
        self.cfg, self.ckpt_root = cfg, ckpt_root
        hosts = host_specs(placement, cfg)
        check_resources(self.ray, hosts, cfg)
        if cfg.rollout != "hf":
            from ..rollout.servers import attach

            attach(cfg.rollout_url, cfg.rollout, cfg.served_model)  # a rollout URL that is down fails here, before any work
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": cfg.cpus_per_actor, **({"GPU": cfg.gpus_per_actor} if cfg.gpus_per_actor else {})}
        self.pg = placement_group([dict(bundle) for _ in hosts], strategy="PACK")
        self.ray.get(self.pg.ready(), timeout=cfg.restart_timeout_s)
        common = dict(folder=str(folder), cache_dir=cache_dir, device=device)
        self.hosts: dict[str, object] = {}
        self.rollouts: list = []
        for index, kind in enumerate(hosts):
            opts = dict(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=cfg.max_restarts,
                        max_task_retries=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, index))
            if kind == "rollout":
                self.rollouts.append(self.ray.remote(actors.RolloutHost).options(**opts).remote(
                    num_cpus=cfg.cpus_per_actor, engine=cfg.rollout, engine_url=cfg.rollout_url,
                    served_model=cfg.served_model, **common))
            else:
                self.hosts[kind] = self.ray.remote(actors.RolesHost).options(**opts).remote(
                    role=kind, placement=str(placement), av_lr=rl.av_lr, ar_lr=rl.ar_lr, clip_grad=rl.clip_grad,
                    ckpt_root=str(ckpt_root), num_cpus=cfg.cpus_per_actor, **common)
        self._get([h.pid.remote() for h in self._all()])
        self._sync_rollouts()

    def _all(self) -> list:
        return [*self.hosts.values(), *self.rollouts]

    def _host(self, role: str):
        return self.hosts.get(role) or self.hosts["all"]

    def _get(self, refs):
        try:
            return self.ray.get(refs, timeout=self.cfg.restart_timeout_s)
        except ACTOR_ERRORS as exc:
            log.warning("rl: an actor died (%s); rolling every role back to its last checkpoint", type(exc).__name__)
            raise Rollback(self._recover()) from None

    def _recover(self) -> int:
        """Wait for the restarted actors, put every role back to the last common checkpoint; that step."""
        deadline = time.time() + self.cfg.restart_timeout_s
        while True:
            try:
                self.ray.get([h.pid.remote() for h in self._all()], timeout=30)
                break
            except ACTOR_ERRORS:
                if time.time() > deadline:
                    raise NLAError("an RL actor did not come back after dying", "check the Ray logs (ray.max_restarts spent?)")
                time.sleep(0.5)
        step = latest_step(self.ckpt_root)
        if not step:
            raise NLAError("an RL actor died before the first checkpoint", "rerun the stage (it starts again from the bundle)")
        self.restore(self.ckpt_root, step)
        return step

    # ------------------------------------------------------------------ the Roles interface

    def generate(self, vectors, tags, sampling):
        if not self.rollouts:
            return self._get(self._host("policy").call.remote("generate", vectors, tags, sampling))
        n = len(self.rollouts)
        bounds = [round(i * len(tags) / n) for i in range(n + 1)]
        parts = self._get([r.generate.remote(vectors[a:b], tags[a:b], sampling)
                           for r, a, b in zip(self.rollouts, bounds, bounds[1:]) if b > a])
        return [c for part in parts for c in part]

    def critic_predict(self, texts):
        return self._get(self._host("critic").call.remote("critic_predict", texts))

    def reference_logprobs(self, vectors, tags, responses):
        return self._get(self._host("reference").call.remote("reference_logprobs", vectors, tags, responses))

    def policy_update(self, *args):
        out = self._get(self._host("policy").call.remote("policy_update", *args))
        self._sync_rollouts()
        return out

    def critic_update(self, *args):
        return self._get(self._host("critic").call.remote("critic_update", *args))

    def checkpoint(self, root: Path, step: int, keep: int) -> None:
        self._get([h.call.remote("checkpoint", root, step, keep) for h in self.hosts.values()])

    def restore(self, root: Path, step: int) -> None:
        self.ray.get([h.call.remote("restore", root, step) for h in self.hosts.values()], timeout=self.cfg.restart_timeout_s)
        self._sync_rollouts()

    def _sync_rollouts(self) -> None:
        if self.rollouts:
            state = self.ray.get(self._host("policy").call.remote("policy_state"), timeout=self.cfg.restart_timeout_s)
            self.ray.get([r.load_lora.remote(state) for r in self.rollouts], timeout=self.cfg.restart_timeout_s)

    # ------------------------------------------------------------------ the end of a run

    def parts(self) -> tuple["RemotePart", "RemotePart"]:
        """Savers of the trained AV and AR for `write_bundle` (the run folder is shared with the actors)."""
        return RemotePart(self, "policy", "av"), RemotePart(self, "critic", "ar")

    def actor_pids(self) -> dict[str, int]:
        return dict(zip(self.hosts, self.ray.get([h.pid.remote() for h in self.hosts.values()])))

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for h in self._all():
            self.ray.kill(h, no_restart=True)
        remove_placement_group(self.pg)


class RemotePart:
    """`save(folder)` of a part held by an actor: the actor writes it (each saves only its own adapter)."""

    def __init__(self, roles: RayRoles, role: str, part: str):
        self.roles, self.role, self.part = roles, role, part

    def save(self, folder) -> None:
        self.roles._get(self.roles._host(self.role).call.remote("save_part", self.part, str(folder)))
