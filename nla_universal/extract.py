"""Activations of one model at its layer: pooled rows for a list of passages.

The model runs only up to block K (it was loaded truncated); batches are bucketed by length to waste
little padding; reductions are fp32 over content tokens (BOS/EOS/pad and other specials excluded).
The run folder, shards and resumption are `pipeline/extract.py`'s.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .config import Pooling
from .errors import ConfigError
from .models import LoadedModel, content_mask, forward_to_layer


def _position_rng(passage: str, seed: int = 0) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{passage}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B,T,d] hidden states, [B,T] content mask → [B,d] in fp32 (mean over content tokens, or last)."""
    h = hidden.float()
    m = mask.to(h.dtype)
    if how == "mean":
        return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
    if how == "last":
        last = (mask.long().cumsum(1).argmax(1))  # rightmost content position
        return h[torch.arange(h.shape[0]), last]
    raise ConfigError(f"pool {how!r} is not a row-per-passage pooling", "use mean or last")


def _batches(lengths: list[int], batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, each batch within both limits."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1 > batch_size or (len(cur) + 1) * lengths[i] > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def extract_shard(lm: LoadedModel, ids: list[str], texts: list[str], *, batch_size: int = 16, batch_tokens: int = 4096,
                  device: torch.device | None = None):
    """Rows of `texts` in passage order: (passage_ids, X [N, d] fp32, n_tokens, positions | None, ids of
    passages whose activation holds NaN/inf — left out of the rows)."""
    device = device or next(lm.model.parameters()).device
    spec, tok = lm.spec, lm.tokenizer
    enc = [tok(t, add_special_tokens=True, truncation=True, max_length=spec.max_length)["input_ids"] for t in texts]
    rows: dict[int, list[tuple[np.ndarray, int, int | None]]] = {}
    for batch in _batches([len(e) for e in enc], batch_size, batch_tokens):
        padded = tok.pad({"input_ids": [enc[i] for i in batch]}, return_tensors="pt", padding=True)
        input_ids, attn = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        with torch.inference_mode():
            hidden = forward_to_layer(lm.model, input_ids, attn, lm.layer)
        content = content_mask(input_ids, attn, tok)
        n_content = content.sum(1).tolist()
        if spec.pool == Pooling.positions:
            for b, i in enumerate(batch):
                where = content[b].nonzero().flatten().tolist()
                take = sorted(_position_rng(ids[i]).choice(where, min(len(where), spec.positions_per_passage), replace=False).tolist()) if where else []
                rows[i] = [(hidden[b, p].float().cpu().numpy(), int(n_content[b]), int(p)) for p in take]
        else:
            pooled = pool_hidden(hidden, content, spec.pool).cpu().numpy()
            for b, i in enumerate(batch):
                rows[i] = [(pooled[b], int(n_content[b]), None)] if n_content[b] > 0 else []
    out_ids, X, n_tok, pos, bad = [], [], [], [], []
    for i in range(len(ids)):
        for vec, n, p in rows[i]:
            if not np.isfinite(vec).all():
                bad.append(ids[i])
                continue
            out_ids.append(ids[i])
            X.append(vec)
            n_tok.append(n)
            pos.append(p)
    X_arr = np.stack(X).astype(np.float32) if X else np.zeros((0, lm.d_model), np.float32)
    return out_ids, X_arr, np.asarray(n_tok, np.int32), (np.asarray(pos, np.int32) if spec.pool == Pooling.positions else None), sorted(set(bad))
