"""Where the RL roles run when they run on Ray (a plain dataclass: importing it needs no Ray)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..config import choices, opt


class RolloutKind(enum.StrEnum):
    hf = "hf"
    vllm = "vllm"
    sglang = "sglang"


@dataclass
class RayConfig:
    """Where the RL roles run when they run on Ray."""

    enabled: bool = opt(False, "run the RL roles as Ray actors (else in this process)")
    address: str = opt("", "Ray cluster to join: '' starts a private local one (loopback, num_cpus below); 'auto' "
                       "joins the cluster of this job (ray job submit sets it)")
    num_cpus: int = opt(2, "CPUs of the private local cluster (address '')")
    cpus_per_actor: float = opt(0.5, "CPUs reserved for each actor")
    gpus_per_actor: float = opt(0.0, "GPUs reserved for each actor (1 = one GPU per role with per_role)")
    rollout_engines: int = opt(1, "per_role: rollout actors the prompts of a step are split over")
    rollout: RolloutKind = opt(RolloutKind.hf, f"engine of the rollout actors: {choices(RolloutKind)} (hf: in the actor; "
                               "vllm / sglang: a server at rollout_url)")
    rollout_url: str = opt("", "vllm/sglang: the server's base URL")
    served_model: str = opt("", "vllm/sglang: the model name the server serves")
    max_restarts: int = opt(2, "restarts of a dead actor before the run fails")
    restart_timeout_s: float = opt(300.0, "how long to wait for a restarted actor to come back")
