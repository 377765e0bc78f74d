"""`nla-universal extract`: activations of every pooled model → `activations/<tag>/part-NNNNN.parquet`.

The whole pool is checked first (every entry's model resolves and its layer exists), so a bad entry
fails before any model is extracted. Then one model at a time, truncated to blocks 0..K before its
weights load. Passages are cut into fixed shards in corpus order: a rerun resumes at the first
missing shard and produces the same files. A folder is complete once `meta.yaml` records every
shard's row count and `_SUCCESS` is written after it.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__, activations, io
from ..config import ModelSpec, Pooling, opt
from ..corpus import fingerprint, is_token_table
from ..errors import ConfigError, DataError, NLAError
from ..extract import extract_shard
from ..models import LoadedModel, describe_model, load_model
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)

# meta.yaml keys that define what the activations mean; a change invalidates old output.
IDENTITY_KEYS = ("source", "name", "revision", "model_type", "layer", "pool", "positions_per_passage", "max_length", "dtype", "corpus_fingerprint")


@dataclass
class ExtractConfig:
    run: RunConfig = opt(help="run folder (reads passages.parquet, writes activations/<tag>/), pool, device", factory=RunConfig)
    tags: list[str] = opt(help="extract only these tags (default: the whole pool)", factory=list)
    batch_size: int = opt(16, "at most this many passages per forward")
    batch_tokens: int = opt(4096, "at most this many (padded) tokens per forward")
    shard_size: int = opt(256, "passages per parquet shard (the unit of resumption)")
    drop_nonfinite: bool = opt(False, "drop passages whose activation is NaN/inf (counted in meta.yaml) instead of failing")
    overwrite: bool = opt(False, "discard the selected tags' existing activations and extract them again")


def check_models(specs: list[ModelSpec], cache_dir: str) -> dict[str, dict]:
    """Every entry resolves (model found, layer within its blocks) — all problems named at once."""
    found, problems = {}, []
    for spec in tqdm(specs, desc="check pool", unit="model", disable=len(specs) < 2):
        try:
            found[spec.tag] = describe_model(spec, cache_dir=cache_dir)
        except NLAError as exc:
            problems.append(f"{exc.problem} (fix: {exc.fix})" if exc.fix else exc.problem)
    if problems:
        raise ConfigError(f"{len(problems)} pool entr{'y is' if len(problems) == 1 else 'ies are'} unusable, nothing was "
                          f"extracted: " + "; ".join(problems), "fix those entries of the pool file and rerun")
    return found


def _identity(lm: LoadedModel, corpus_fp: str) -> dict:
    s = lm.spec
    return {
        "source": str(s.source), "name": s.name, "revision": s.revision, "model_type": lm.model_type,
        "layer": lm.layer, "pool": str(s.pool),
        "positions_per_passage": s.positions_per_passage if s.pool == Pooling.positions else None,
        "max_length": s.max_length, "dtype": str(s.dtype), "corpus_fingerprint": corpus_fp,
    }


def _clear(folder: Path) -> None:
    for stale in folder.iterdir():
        stale.unlink()


def _prepare_folder(folder: Path, identity: dict, overwrite: bool) -> None:
    """Keep a folder made with the same settings (resume); refuse or discard one made otherwise."""
    meta_path = folder / "meta.yaml"
    if not meta_path.exists():
        if folder.exists():
            _clear(folder)
        return
    old = io.read_yaml(meta_path) or {}
    changed = {k: (old.get(k), identity[k]) for k in IDENTITY_KEYS if old.get(k) != identity[k]}
    if overwrite:
        log.info("discarding %s (overwrite=true)", folder)
        _clear(folder)
        return
    if not changed:
        for leftover in folder.glob(".*.tmp"):  # a killed run's half-written shard
            leftover.unlink()
        return
    desc = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
    raise DataError(
        f"{folder} holds activations made with other settings ({desc})",
        "use another run.run_dir, delete that folder, or pass overwrite=true to discard it",
    )


def check_token_pooling(specs: list[ModelSpec], where: str) -> None:
    """Token rows (corpus.unit=token) need pool=last on every entry: a token row's vector is its last token's."""
    wrong = [s.tag for s in specs if s.pool != Pooling.last]
    if wrong:
        raise ConfigError(f"{where} holds token rows (corpus.unit=token), but {wrong} do not use pool=last",
                          "set pool: last on those entries: a token row's vector is its last token's")


def check_untruncated(lm: LoadedModel, ids: list[str], texts: list[str]) -> None:
    """Token rows must fit in max_length: truncation would cut off the very token the row is about."""
    lengths = [len(row) for row in lm.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    long = [(i, n) for i, n in zip(ids, lengths) if n > lm.spec.max_length]
    if long:
        raise DataError(f"{lm.spec.tag}: {len(long)} token rows exceed max_length={lm.spec.max_length} tokens, e.g. "
                        f"{long[0][0]} ({long[0][1]} tokens)", "lower corpus.max_chars, or raise max_length of this pool entry")


def extract_tag(ws: Workspace, spec: ModelSpec, passages, cfg: ExtractConfig) -> Path:
    folder = activations.tag_dir(ws.activations_root, spec.tag)
    if io.is_complete(folder) and not cfg.overwrite:
        log.info("%s: complete, skipped", spec.tag)
        return folder
    ids = passages.column("passage_id").to_pylist()
    texts = passages.column("text").to_pylist()
    token_rows = is_token_table(passages)
    if token_rows:
        check_token_pooling([spec], str(ws.passages_path))
    started = time.time()
    lm = load_model(spec, cache_dir=ws.run.cache_dir, num_blocks="to_layer")
    if token_rows:
        check_untruncated(lm, ids, texts)
    lm.model.to(ws.device)
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
        out_ids, X, n_tok, pos, bad = extract_shard(lm, ids[lo:hi], texts[lo:hi], batch_size=cfg.batch_size,
                                                    batch_tokens=cfg.batch_tokens, device=ws.device)
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
    shards = activations.shard_rows(folder)
    meta.update(shards=shards, n_rows=sum(shards.values()), dropped_nonfinite=len(dropped),
                seconds=round(time.time() - started, 2))
    io.write_yaml(folder / "meta.yaml", meta)
    io.mark_success(folder)
    del lm
    gc.collect()
    return folder


def run(cfg: ExtractConfig) -> dict[str, Path]:
    ws = Workspace(cfg.run)
    pool = ws.pool
    passages = ws.passages()
    unknown = [t for t in cfg.tags if t not in pool.tags]
    if unknown:
        raise ConfigError(f"unknown tag(s) {unknown}", f"the pool has: {', '.join(pool.tags)}")
    specs = [spec for spec in pool.models if not cfg.tags or spec.tag in cfg.tags]
    todo = [s for s in specs if cfg.overwrite or not io.is_complete(activations.tag_dir(ws.activations_root, s.tag))]
    check_models(todo, ws.run.cache_dir)
    return {spec.tag: extract_tag(ws, spec, passages, cfg) for spec in specs}
