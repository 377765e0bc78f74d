"""Activations of every pooled model at its layer → `activations/<tag>/part-NNNNN.parquet`.

One model in memory at a time, truncated to blocks 0..K before its weights load. Passages are cut
into fixed shards in corpus order (so a rerun resumes at the first missing shard and produces the
same files); inside a shard, batches are bucketed by length to waste little padding.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, activations, io
from .config import ModelSpec, PoolConfig, default_cache_dir, load_pool, opt
from .corpus import fingerprint, read_passages
from .errors import ConfigError, DataError
from .models import LoadedModel, content_mask, forward_to_layer, load_model

log = logging.getLogger(__name__)

# meta.yaml keys that define what the activations mean; a change invalidates old output.
IDENTITY_KEYS = ("source", "name", "revision", "model_type", "layer", "pool", "positions_per_passage", "max_length", "dtype", "corpus_fingerprint")


@dataclass
class ExtractConfig:
    run_dir: str = opt("runs/demo", "run folder: reads passages.parquet, writes activations/<tag>/")
    pool: str = opt("demo", "pool YAML path, or the name of one in configs/pools/")
    tags: list[str] = opt(help="extract only these tags (default: the whole pool)", factory=list)
    batch_size: int = opt(16, "at most this many passages per forward")
    batch_tokens: int = opt(4096, "at most this many (padded) tokens per forward")
    shard_size: int = opt(256, "passages per parquet shard (the unit of resumption)")
    drop_nonfinite: bool = opt(False, "drop passages whose activation is NaN/inf (counted in meta.yaml) instead of failing")
    overwrite: bool = opt(False, "discard existing activations made with different settings")
    device: str = opt("cpu", "cpu | cuda | auto")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models are cached")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available", "use device=cpu")
    return torch.device(name)


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


def extract_shard(lm: LoadedModel, ids: list[str], texts: list[str], cfg: ExtractConfig, device: torch.device):
    """Rows for one shard, in passage order: (passage_ids, X, n_tokens, positions|None, nonfinite ids)."""
    spec, tok = lm.spec, lm.tokenizer
    enc = [tok(t, add_special_tokens=True, truncation=True, max_length=spec.max_length)["input_ids"] for t in texts]
    rows: dict[int, list[tuple[np.ndarray, int, int | None]]] = {}
    for batch in _batches([len(e) for e in enc], cfg.batch_size, cfg.batch_tokens):
        padded = tok.pad({"input_ids": [enc[i] for i in batch]}, return_tensors="pt", padding=True)
        input_ids, attn = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        with torch.inference_mode():
            hidden = forward_to_layer(lm.model, input_ids, attn, lm.layer)
        content = content_mask(input_ids, attn, tok)
        n_content = content.sum(1).tolist()
        if spec.pool == "positions":
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
    return out_ids, X_arr, np.asarray(n_tok, np.int32), (np.asarray(pos, np.int32) if spec.pool == "positions" else None), sorted(set(bad))


def _identity(lm: LoadedModel, corpus_fp: str) -> dict:
    s = lm.spec
    return {
        "source": s.source, "name": s.name, "revision": s.revision, "model_type": lm.model_type,
        "layer": lm.layer, "pool": s.pool, "positions_per_passage": s.positions_per_passage if s.pool == "positions" else None,
        "max_length": s.max_length, "dtype": s.dtype, "corpus_fingerprint": corpus_fp,
    }


def _prepare_folder(folder: Path, identity: dict, overwrite: bool) -> None:
    """Keep a folder made with the same settings (resume); refuse or discard one made otherwise."""
    meta_path = folder / "meta.yaml"
    if not meta_path.exists():
        if folder.exists():
            for stale in folder.iterdir():
                stale.unlink()
        return
    old = io.read_yaml(meta_path) or {}
    changed = {k: (old.get(k), identity[k]) for k in IDENTITY_KEYS if old.get(k) != identity[k]}
    if not changed:
        for leftover in folder.glob(".*.tmp"):  # a killed run's half-written shard
            leftover.unlink()
        return
    desc = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
    if not overwrite:
        raise DataError(
            f"{folder} holds activations made with other settings ({desc})",
            "use another run_dir, delete that folder, or pass overwrite=true to discard it",
        )
    log.warning("discarding %s (settings changed: %s)", folder, desc)
    for stale in folder.iterdir():
        stale.unlink()


def extract_tag(spec: ModelSpec, passages, cfg: ExtractConfig, device: torch.device) -> Path:
    folder = activations.tag_dir(Path(cfg.run_dir) / "activations", spec.tag)
    if io.is_complete(folder):
        log.info("%s: complete, skipped", spec.tag)
        return folder
    ids = passages.column("passage_id").to_pylist()
    texts = passages.column("text").to_pylist()
    started = time.time()
    lm = load_model(spec, cache_dir=cfg.cache_dir, num_blocks="to_layer")
    lm.model.to(device)
    identity = _identity(lm, fingerprint(ids))
    _prepare_folder(folder, identity, cfg.overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"tag": spec.tag, **identity, "d_model": lm.d_model, "num_layers": lm.num_layers, "package_version": __version__}
    io.write_yaml(folder / "meta.yaml", meta)
    n_shards = (len(ids) + cfg.shard_size - 1) // cfg.shard_size
    dropped: list[str] = []
    bar = tqdm(total=len(ids), desc=f"extract {spec.tag}", unit="passage", dynamic_ncols=True)
    for s in range(n_shards):
        lo, hi = s * cfg.shard_size, min(len(ids), (s + 1) * cfg.shard_size)
        if activations.shard_path(folder, s).exists():
            bar.update(hi - lo)
            continue
        out_ids, X, n_tok, pos, bad = extract_shard(lm, ids[lo:hi], texts[lo:hi], cfg, device)
        if bad and not cfg.drop_nonfinite:
            bar.close()
            raise DataError(
                f"{spec.tag}: non-finite activations for {len(bad)} passage(s), e.g. {bad[:5]} (dtype {spec.dtype})",
                "load the model in float32 or bfloat16 (float16 overflows at sink channels), "
                "or set drop_nonfinite=true to skip these passages",
            )
        dropped += bad
        activations.write_shard(folder, s, activations.shard_table(out_ids, X, n_tok, pos))
        bar.update(hi - lo)
    bar.close()
    n_rows = sum(activations.pq.read_metadata(p).num_rows for p in activations.complete_shards(folder))
    meta.update(n_rows=n_rows, dropped_nonfinite=len(dropped), seconds=round(time.time() - started, 2))
    io.write_yaml(folder / "meta.yaml", meta)
    io.mark_success(folder)
    del lm
    gc.collect()
    return folder


def extract(cfg: ExtractConfig, pool: PoolConfig | None = None) -> dict[str, Path]:
    pool = pool or load_pool(cfg.pool)
    passages = read_passages(Path(cfg.run_dir) / "passages.parquet")
    unknown = [t for t in cfg.tags if t not in pool.tags]
    if unknown:
        raise ConfigError(f"unknown tag(s) {unknown}", f"the pool has: {', '.join(pool.tags)}")
    device = resolve_device(cfg.device)
    return {spec.tag: extract_tag(spec, passages, cfg, device) for spec in pool.models if not cfg.tags or spec.tag in cfg.tags}
