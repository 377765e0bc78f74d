"""The joint-RL arithmetic as small pure functions, shared by the in-process RL stage, the Ray actors
and the Miles hooks: reward, group-normalised advantages, the clipped policy-gradient loss and the k3 KL.

Shapes: N samples = B prompts × G samples per prompt, laid out prompt-major (sample j of prompt i is
row i·G + j); per-token tensors are [N, R] with a {0, 1} response mask.
"""

from __future__ import annotations

import enum
import math

import torch

from ..errors import ConfigError
from ..nla.loss import FAILED_SAMPLE_PENALTY, mse_nrm


class RewardKind(enum.StrEnum):
    mse_nrm = "mse_nrm"  # −mse_nrm = −2(1 − cos): the NLA library's reward
    log_mse = "log_mse"  # −log(mse_nrm): the seed's, sharper near a perfect reconstruction


def reward(pred: torch.Tensor, gold: torch.Tensor, ok: torch.Tensor, kind: RewardKind = RewardKind.mse_nrm,
           penalty: float = FAILED_SAMPLE_PENALTY) -> torch.Tensor:
    """[N] reward of each reconstruction; samples with ok=False (unparsed or truncated), and any whose
    reconstruction is not finite, get the fixed penalty instead."""
    err = mse_nrm(pred.float(), gold.float())
    r = -err if kind == RewardKind.mse_nrm else -torch.log(err.clamp_min(1e-6))
    good = ok.to(r.device).bool() & torch.isfinite(r)
    return torch.where(good, r, torch.full_like(r, penalty))


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std (unless turned off)."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ConfigError(f"{rewards.numel()} rewards do not form groups of {group_size} (≥ 2)", "sample G ≥ 2 per prompt")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centred.view(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's response tokens, then over samples (every sample weighs the same)."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).mean()


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss per token, and the share of tokens whose ratio was clipped.

    With one update per rollout (`logp_old` = `logp` detached) the ratio is 1 and this is plain
    REINFORCE with group baselines; the clip matters once a batch is reused."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None].to(logp.dtype)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean(((ratio - 1).abs() > clip_eps).to(logp.dtype), mask)
    return loss, clip_fraction.detach()


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy ‖ reference) per token: exp(r) − r − 1 with r = ref − policy (≥ 0)."""
    r = logp_ref - logp
    return masked_mean(torch.exp(r) - r - 1, mask)


def check_rl_settings(group_size: int, kl_coef: float, clip_eps: float) -> None:
    if group_size < 2:
        raise ConfigError(f"group_size={group_size}: GRPO compares samples within a group", "sample at least 2 per vector")
    if kl_coef < 0 or not math.isfinite(kl_coef):
        raise ConfigError(f"kl_coef={kl_coef}", "use a KL coefficient ≥ 0 (0 = no pull towards the SFT AV)")
    if not 0 < clip_eps < 1:
        raise ConfigError(f"clip_eps={clip_eps}", "use a clip range in (0, 1), e.g. 0.2")
