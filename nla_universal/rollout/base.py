"""What every rollout engine offers: generate completions from prompt embeddings.

The trainer side builds the prompt embeddings (token rows plus the injected activation row, see
`nla.injection`) and hands them over; an engine never sees the activation or the marker. Engines:
the in-process HF engine (`rollout.hf`), and servers (vLLM `prompt_embeds`, SGLang `input_embeds`)
behind the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..config import opt
from ..errors import ConfigError

FINISH_STOP = "stop"  # the model emitted an end-of-sequence token (kept in token_ids)
FINISH_LENGTH = "length"  # max_new_tokens reached first


@dataclass
class SamplingParams:
    """How completions are sampled."""

    max_new_tokens: int = opt(96, "tokens generated at most per completion")
    temperature: float = opt(1.0, "softmax temperature (ignored when greedy)")
    top_p: float = opt(1.0, "nucleus sampling mass (1.0 = off; ignored when greedy)")
    greedy: bool = opt(False, "always take the most likely token")
    seed: Optional[int] = opt(None, "seed of the sampler for reproducible samples (None = the global RNG)")
    return_logprobs: bool = opt(False, "also return each generated token's log-probability (raw model distribution)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}", "generate at least 1 token")
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} with sampling", "use a positive temperature, or greedy=true")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}", "use a value in (0, 1]")


@dataclass
class Completion:
    """One generated continuation (the prompt is not included)."""

    token_ids: list[int]
    text: str
    logprobs: Optional[list[float]]  # one per token id, when asked for
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH


class RolloutEngine(ABC):
    """Generates from prompt embeddings: `embeds[i]` is prompt i's `[T_i, d]` input rows."""

    @abstractmethod
    def generate(
        self,
        prompt_embeds: Sequence[torch.Tensor] | torch.Tensor,
        sampling: SamplingParams,
        attention_mask: torch.Tensor | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order.

        `prompt_embeds` is a list of `[T_i, d]` tensors, or a left-padded `[B, T, d]` batch with its
        `[B, T]` attention mask.
        """


def unpad_prompts(prompt_embeds: Sequence[torch.Tensor] | torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The per-prompt `[T_i, d]` rows of either accepted input form."""
    if isinstance(prompt_embeds, torch.Tensor):
        if prompt_embeds.dim() != 3:
            raise ConfigError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)}", "pass [B, T, d] with a mask, or a list of [T, d]")
        if attention_mask is None:
            return list(prompt_embeds)
        if attention_mask.shape != prompt_embeds.shape[:2]:
            raise ConfigError(
                f"attention_mask {tuple(attention_mask.shape)} does not match prompt_embeds {tuple(prompt_embeds.shape[:2])}",
                "pass the [B, T] mask of the same batch",
            )
        return [row[mask.bool()] for row, mask in zip(prompt_embeds, attention_mask)]
    prompts = list(prompt_embeds)
    for i, rows in enumerate(prompts):
        if rows.dim() != 2 or rows.shape[0] == 0:
            raise ConfigError(f"prompt {i} has shape {tuple(rows.shape)}", "each prompt must be a non-empty [T, d] tensor")
    return prompts
