"""The activation reconstructor (AR): explanation text → a vector of the shared space.

The trunk is cut to blocks 0..K by config before its weights load (K = the trunk's own layer), its
final norm and LM head become identities, and a LoRA plus a `Linear(d, d, bias=False)` value head
(identity at creation, trainable, saved beside the adapter) read the residual stream at the last
real token of a fixed-suffix template.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .. import io
from ..config import opt
from ..errors import DataError, NLAError
from ..models import LoadedModel, decoder_layers, forward_to_layer, strip_head
from .lora import LoraSettings, attach_lora, load_lora, save_adapter
from .prompts import DEFAULT_AR_TEMPLATE, ar_text, check_ar_template, pad_ids, pad_token_id

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class ARConfig:
    """The AR: template, LoRA, loss scale."""

    template: str = opt(DEFAULT_AR_TEMPLATE, "raw text around the explanation; must hold {explanation} and end in a fixed suffix")
    mse_scale: Optional[float] = opt(None, "norm both vectors are rescaled to before the MSE; None = √d_shared")
    lora: LoraSettings = opt(help="the AR's LoRA", factory=LoraSettings)
    batch_size: int = opt(16, "texts per forward in reconstruct()")


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's rightmost 1: correct under left and right padding (argmax takes the first max)."""
    return attention_mask.long().cumsum(dim=1).argmax(dim=1)


def identity_head(d: int) -> nn.Linear:
    head = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d))
    return head


class AR(nn.Module):
    """Truncated trunk + LoRA + value head. `forward` keeps gradients; `reconstruct` is batched inference."""

    def __init__(self, model: PeftModel, tokenizer, template: str, value_head: nn.Linear, batch_size: int = 16, *,
                 layer: int | None = None, adapter_name: str = "default"):
        """`layer`: the block read (K); default the last block of a trunk loaded with K+1 blocks. A full trunk
        shared with the AV passes K: the forward stops there, so the blocks after it never run."""
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.template = check_ar_template(template)
        self.value_head = value_head
        self.eval()  # LoRA dropout off until a trainer calls .train()
        self.batch_size = batch_size
        self.layer = len(decoder_layers(model)) - 1 if layer is None else layer
        self.adapter_name = adapter_name
        self.pad_id = pad_token_id(tokenizer)

    @staticmethod
    def _prepare(loaded: LoadedModel) -> nn.Module:
        kept = len(decoder_layers(loaded.model))
        if kept != loaded.layer + 1:
            raise NLAError(
                f"the AR trunk has {kept} blocks, expected K+1 = {loaded.layer + 1} (layer {loaded.layer})",
                "load it with load_model(spec, num_blocks=K+1)",
            )
        strip_head(loaded.model)
        return loaded.model

    @classmethod
    def create(cls, loaded: LoadedModel, cfg: ARConfig) -> "AR":
        """A fresh AR on a trunk loaded with K+1 blocks: new LoRA, identity value head."""
        model = attach_lora(cls._prepare(loaded), cfg.lora, task_type=None)
        return cls(model, loaded.tokenizer, cfg.template, identity_head(loaded.d_model), cfg.batch_size)

    @classmethod
    def load(cls, folder: str | Path, loaded: LoadedModel, template: str, batch_size: int = 16) -> "AR":
        """The AR saved in `folder`: LoRA adapter and value head."""
        folder = Path(folder)
        model = load_lora(cls._prepare(loaded), folder)
        head = nn.Linear(loaded.d_model, loaded.d_model, bias=False)
        weight = load_value_head(folder / VALUE_HEAD_FILE, loaded.d_model)
        with torch.no_grad():
            head.weight.copy_(weight)
        return cls(model, loaded.tokenizer, template, head, batch_size)

    def save(self, folder: str | Path) -> None:
        """This AR's adapter (only it, on a base that carries several) and its value head."""
        folder = Path(folder)
        save_adapter(self.model, self.adapter_name, folder)
        with io.atomic_path(folder / VALUE_HEAD_FILE) as tmp:
            save_file({"weight": self.value_head.weight.detach().float().cpu().contiguous()}, str(tmp))

    @property
    def d_model(self) -> int:
        return self.value_head.in_features

    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids of the filled template, BOS kept where the tokenizer adds one."""
        if not texts:
            raise ValueError("no texts to encode")
        seqs = [self.tokenizer(ar_text(self.template, t), add_special_tokens=True)["input_ids"] for t in texts]
        return pad_ids([list(s) for s in seqs], self.pad_id, "right")

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """`[N, d]` value-head outputs at the last real token (fp32, with gradients)."""
        device = self.value_head.weight.device
        ids, mask = (t.to(device) for t in self.encode_texts(texts))
        hidden = forward_to_layer(self.model, ids, mask, self.layer)
        last = hidden[torch.arange(hidden.shape[0], device=device), last_real_index(mask)]
        return self.value_head(last.float())

    def reconstruct(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """`[N, d]` outputs without gradients, in batches, in eval mode (no LoRA dropout)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                chunks = range(0, len(texts), self.batch_size)
                parts = [self(texts[i:i + self.batch_size]) for i in tqdm(chunks, desc="reconstruct", disable=not progress)]
        finally:
            self.train(was_training)
        return torch.cat(parts).cpu()


def load_value_head(path: Path, d: int) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"{path} is missing: the AR's value head would be lost", "re-save the bundle from its training run")
    try:
        weight = load_file(str(path))["weight"]
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise DataError(f"corrupt value head {path}: {type(exc).__name__}: {exc}", "re-save the bundle from its training run") from None
    if tuple(weight.shape) != (d, d) or not torch.isfinite(weight).all():
        raise DataError(f"{path}: weight is {tuple(weight.shape)} (or non-finite), expected ({d}, {d})", "re-save the bundle")
    return weight


def default_mse_scale(d_shared: int) -> float:
    return math.sqrt(d_shared)
