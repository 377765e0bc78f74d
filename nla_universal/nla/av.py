"""The activation verbalizer (AV): a causal-LM trunk + LoRA that reads a vector and writes text.

A shared vector goes through the AV's input map (`input_rows`; nla/input_map.py), and the result
replaces the marker's embedding row of a prompt that names the source model's tag. Every path below
(generation, SFT, log-probs) goes through `input_rows` and `injection`, so training, rollout and
inference inject the same row.
Batches put the prompt on the left (left padding) and the response after it, exactly the layout
of generation, with position ids counted over real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft import PeftModel
from torch import nn

from ..config import check_tag, opt
from ..errors import ConfigError
from ..models import LoadedModel, input_embedding
from ..rollout import Completion, HFRolloutEngine, RolloutEngine, SamplingParams
from .injection import embed_and_inject, injecting, marker_positions, position_ids
from .input_map import InputMap
from .lora import LoraSettings, attach_lora, load_lora, save_adapter
from .markers import MarkerSpec, check_marker, choose_marker
from .prompts import DEFAULT_AV_TEMPLATE, av_target, check_av_template, pad_ids, pad_token_id, parse_explanation, render_av_prompt

IGNORE_INDEX = -100
_NICE_STEPS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


@dataclass
class AVConfig:
    """The AV: prompt, injection norm, LoRA."""

    template: str = opt(DEFAULT_AV_TEMPLATE, "user message with {tag} (the model's tag) and {marker} (where the vector goes)")
    injection_scale: Optional[float] = opt(
        None,
        "L2 norm of the injected row; None = the smallest round number above the mean norm of the trunk's "
        "token-embedding rows (what block 0 normally receives). Recorded in the bundle",
    )
    lora: LoraSettings = opt(help="the AV's LoRA", factory=LoraSettings)
    generate_batch_size: int = opt(8, "prompts per generate call of the in-process engine")


@dataclass
class Explanation:
    text: str  # inside <explanation> tags, or the stripped completion when the tags are missing
    parsed: bool  # the tags were found
    completion: Completion


@dataclass
class SequenceLogProbs:
    total: torch.Tensor  # [N] summed over each response's tokens
    per_token: torch.Tensor  # [N, R] (0 where mask is 0)
    mask: torch.Tensor  # [N, R] 1 at real response tokens


def round_up_nice(x: float) -> float:
    """The smallest of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k strictly above x (> 0)."""
    exponent = math.floor(math.log10(x))
    return min(float(f"{s * 10.0**e:.6g}") for e in (exponent, exponent + 1) for s in _NICE_STEPS if s * 10.0**e > x)


def default_injection_scale(embedding: nn.Module, vocab_size: int, chunk: int = 8192) -> float:
    """A round number a bit above the mean norm of the embedding module's output rows (scaled on Gemma)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, vocab_size, chunk):
            ids = torch.arange(start, min(start + chunk, vocab_size), device=next(embedding.parameters()).device)
            total += embedding(ids).float().norm(dim=-1).sum().item()
    return round_up_nice(total / vocab_size)


class AV:
    """Trunk + LoRA; prompts per tag; inject, generate, score."""

    def __init__(self, model: PeftModel, tokenizer, marker: MarkerSpec, template: str, injection_scale: float,
                 engine: RolloutEngine | None = None, generate_batch_size: int = 8, progress: bool = False, *,
                 input_map: InputMap | None = None, adapter_name: str = "default"):
        self.model = model.eval()  # LoRA dropout off until a trainer calls .train()
        self.input_map = input_map
        self.adapter_name = adapter_name
        self.tokenizer = tokenizer
        self.marker = marker
        self.template = check_av_template(template)
        if not injection_scale > 0:
            raise ConfigError(f"injection_scale={injection_scale}", "use a positive norm, or leave it unset (automatic)")
        self.injection_scale = float(injection_scale)
        self.engine = engine or HFRolloutEngine(model, tokenizer, batch_size=generate_batch_size, progress=progress)
        self.pad_id = pad_token_id(tokenizer)
        self._prompts: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, loaded: LoadedModel, cfg: AVConfig, canonical_tag: str, engine: RolloutEngine | None = None) -> "AV":
        """A fresh AV on a loaded trunk: choose the marker, resolve the scale, attach a new LoRA."""
        template = check_av_template(cfg.template)
        marker = choose_marker(loaded.tokenizer, lambda c: render_av_prompt(loaded.tokenizer, template, canonical_tag, c))
        scale = cfg.injection_scale
        if scale is None:
            scale = default_injection_scale(input_embedding(loaded.model), loaded.model.config.vocab_size)
        model = attach_lora(loaded.model, cfg.lora, task_type="CAUSAL_LM")
        return cls(model, loaded.tokenizer, marker, template, scale, engine, cfg.generate_batch_size)

    @classmethod
    def load(cls, folder: str | Path, loaded: LoadedModel, marker: MarkerSpec, template: str, injection_scale: float,
             canonical_tag: str, engine: RolloutEngine | None = None, generate_batch_size: int = 8,
             progress: bool = False, *, has_input_map: bool = False, trainable: bool = True) -> "AV":
        """The AV saved in `folder`, after checking the recorded marker against the live tokenizer."""
        check_marker(loaded.tokenizer, marker, lambda c: render_av_prompt(loaded.tokenizer, template, canonical_tag, c))
        model = load_lora(loaded.model, folder, trainable=trainable)
        input_map = InputMap.load(folder, loaded.d_model, loaded.d_model) if has_input_map else None
        return cls(model, loaded.tokenizer, marker, template, injection_scale, engine, generate_batch_size, progress,
                   input_map=input_map)

    def save(self, folder: str | Path) -> None:
        """This AV's adapter (only it, on a base that carries several) and its input map, if any."""
        save_adapter(self.model, self.adapter_name, folder)
        if self.input_map is not None:
            self.input_map.save(folder)

    @property
    def embedding(self) -> nn.Module:
        return input_embedding(self.model)

    @property
    def d_model(self) -> int:
        return int(self.embedding.weight.shape[1])

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, tag: str) -> list[int]:
        """The prompt for `tag`, rendered once and checked to hold the marker between its neighbours."""
        if tag not in self._prompts:
            ids = render_av_prompt(self.tokenizer, self.template, check_tag(tag), self.marker.char)
            marker_positions(torch.tensor([ids]), self.marker)
            self._prompts[tag] = ids
        return self._prompts[tag]

    def layout(self, tags: Sequence[str], responses: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, torch.Tensor, int]:
        """ids, mask and P: prompts left-padded to width P, then the responses (if any), right-padded."""
        prompt_ids, prompt_mask = pad_ids([self.prompt_ids(t) for t in tags], self.pad_id, "left")
        if not responses:
            return prompt_ids, prompt_mask, prompt_ids.shape[1]
        if len(responses) != len(tags):
            raise ValueError(f"{len(tags)} tags but {len(responses)} responses")
        resp_ids, resp_mask = pad_ids([list(r) for r in responses], self.pad_id, "right")
        return torch.cat([prompt_ids, resp_ids], 1), torch.cat([prompt_mask, resp_mask], 1), prompt_ids.shape[1]

    def _device(self) -> torch.device:
        return self.embedding.weight.device

    def input_rows(self, vectors: torch.Tensor, n: int) -> torch.Tensor:
        """The rows injected for shared vectors `[n, d_shared]`: through the input map when the AV has one."""
        if vectors.dim() != 2 or vectors.shape[0] != n:
            raise ValueError(f"vectors {tuple(vectors.shape)} do not give one row per prompt ({n})")
        vectors = vectors.to(self._device())
        return vectors if self.input_map is None else self.input_map(vectors)

    def prompt_embeds(self, vectors: torch.Tensor, tags: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded `[B, T, d]` input rows with the vectors injected, and the mask (for any engine)."""
        ids, mask, _ = self.layout(tags)
        ids, mask = ids.to(self._device()), mask.to(self._device())
        return embed_and_inject(self.embedding, ids, self.input_rows(vectors, len(tags)), self.marker, self.injection_scale), mask

    # ------------------------------------------------------------------ generation

    def generate(self, vectors: torch.Tensor, tags: Sequence[str], sampling: SamplingParams | None = None) -> list[Completion]:
        with torch.no_grad():
            embeds, mask = self.prompt_embeds(vectors, tags)
        return self.engine.generate(embeds, sampling or SamplingParams(), attention_mask=mask)

    def explain(self, vectors: torch.Tensor, tags: Sequence[str], sampling: SamplingParams | None = None) -> list[Explanation]:
        return [Explanation(*parse_explanation(c.text), completion=c) for c in self.generate(vectors, tags, sampling)]

    # ------------------------------------------------------------------ teacher-forced forwards

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """`[B, T, V]` logits with the vectors injected through a hook on the embedding module."""
        device = self._device()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with injecting(self.embedding, self.input_rows(vectors, input_ids.shape[0]), self.marker, self.injection_scale):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask), use_cache=False)
        return out.logits

    def response_ids(self, text: str) -> list[int]:
        """Token ids of an SFT target: `av_target(text)` then EOS."""
        ids = self.tokenizer(av_target(text), add_special_tokens=False)["input_ids"]
        return list(ids) + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def build_sft_batch(self, vectors: torch.Tensor, tags: Sequence[str], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / labels (IGNORE_INDEX on prompt and padding) / vectors for AV SFT."""
        ids, mask, start = self.layout(tags, [self.response_ids(t) for t in texts])
        labels = ids.clone()
        labels[:, :start] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "vectors": vectors}

    def sft_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the target tokens of a `build_sft_batch` batch."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"], batch["vectors"])
        labels = batch["labels"].to(logits.device)
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )

    def target_loss(self, vectors: torch.Tensor, tags: Sequence[str], texts: Sequence[str], batch_size: int = 8) -> float:
        """Mean SFT loss (nats per target token, batch by batch) of writing `texts` after these vectors:
        with each vector swapped for another's, the difference is `vector_gain` — > 0 only if the AV reads them."""
        total = 0.0
        with torch.no_grad():
            for k in range(0, len(texts), batch_size):
                sl = slice(k, k + batch_size)
                total += float(self.sft_loss(self.build_sft_batch(vectors[sl], tags[sl], texts[sl]))) * len(texts[sl])
        return total / len(texts)

    def sequence_log_probs(self, vectors: torch.Tensor, tags: Sequence[str], response_ids: Sequence[Sequence[int]]) -> SequenceLogProbs:
        """Log-probs of each response's tokens after its injected prompt (gradients flow; RL policy and reference)."""
        if any(len(r) == 0 for r in response_ids):
            raise ValueError("every response needs at least one token")
        ids, mask, start = self.layout(tags, response_ids)  # every response starts at column `start`
        logits = self.logits(ids, mask, vectors)[:, start - 1:-1]
        targets = ids[:, start:].to(logits.device)
        resp_mask = mask[:, start:].to(logits.device)
        per_token = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * resp_mask
        return SequenceLogProbs(total=per_token.sum(1), per_token=per_token, mask=resp_mask)
