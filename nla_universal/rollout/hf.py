"""The in-process engine: transformers' `generate(inputs_embeds=…)` on left-padded batches.

The default engine (CPU and GPU): no server, the policy's live weights, so nothing needs syncing.
Position ids come from the attention mask (as `generate` computes them), so a prompt gives the same
completion alone or in a left-padded batch, up to floating-point noise.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams, unpad_prompts


def left_pad(prompts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T, d]` rows right-aligned (zeros on the left) and the `[B, T]` mask of real rows."""
    width = max(p.shape[0] for p in prompts)
    embeds = torch.zeros(len(prompts), width, prompts[0].shape[1], dtype=dtype, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, rows in enumerate(prompts):
        embeds[i, width - rows.shape[0]:] = rows.to(device=device, dtype=dtype)
        mask[i, width - rows.shape[0]:] = 1
    return embeds, mask


def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class HFRolloutEngine(RolloutEngine):
    """Generates with a transformers causal LM (peft-wrapped or not) in this process."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 8, progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)

    def generate(
        self,
        prompt_embeds: Sequence[torch.Tensor] | torch.Tensor,
        sampling: SamplingParams,
        attention_mask: torch.Tensor | None = None,
    ) -> list[Completion]:
        prompts = unpad_prompts(prompt_embeds, attention_mask)
        param = next(self.model.parameters())
        chunks = range(0, len(prompts), self.batch_size)
        out: list[Completion] = []
        with _eval_mode(self.model), torch.no_grad(), _seeded(sampling.seed, param.device):
            for start in tqdm(chunks, desc="generate", disable=not self.progress or len(chunks) < 2):
                embeds, mask = left_pad(prompts[start:start + self.batch_size], param.dtype, param.device)
                out += self._generate_batch(embeds, mask, sampling)
        return out

    def _generate_batch(self, embeds: torch.Tensor, mask: torch.Tensor, sampling: SamplingParams) -> list[Completion]:
        knobs = dict(do_sample=False) if sampling.greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0
        )
        result = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.stop_ids),
            return_dict_in_generate=True,
            output_logits=sampling.return_logprobs,
            repetition_penalty=1.0,
            **knobs,
        )
        sequences = result.sequences.cpu()
        token_logprobs = None
        if sampling.return_logprobs:
            steps = [torch.log_softmax(step.float(), dim=-1) for step in result.logits]
            token_logprobs = torch.stack(
                [lp.gather(1, sequences[:, t:t + 1].to(lp.device)).squeeze(1).cpu() for t, lp in enumerate(steps)], dim=1
            )
        completions = []
        for i, row in enumerate(sequences.tolist()):
            end = next((t + 1 for t, tok in enumerate(row) if tok in self.stop_ids), None)
            ids = row if end is None else row[:end]
            completions.append(Completion(
                token_ids=ids,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                logprobs=None if token_logprobs is None else token_logprobs[i, :len(ids)].tolist(),
                finish_reason=FINISH_LENGTH if end is None else FINISH_STOP,
            ))
        return completions
