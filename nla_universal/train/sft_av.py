"""AV SFT: teach the verbalizer to write the teacher's z for the injected enc_M(n(h_M)).

Target: `<explanation>\\n{z}\\n</explanation>` + EOS, loss on response tokens only. enc_M is trained
jointly (its own lr) or frozen. Every eval also generates for a fixed val sample and watches the
share of distinct explanations: an AV that collapses to one template (the seed's v2/v7) is flagged.
It also scores the val loss with each vector swapped for another passage's (same tag):
`vector_gain` = that loss − the true one, > 0 only when the AV reads the vector at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import opt
from ..extract import resolve_device
from ..metrics import derangement, distinct_share
from ..rollout import SamplingParams
from .data import TagRows, example_index, gather, mark_stage_done, stage_done
from .loop import LoopConfig, named_trainable, train
from .workspace import RunConfig, save_bundle, settings, sft_inputs

log = logging.getLogger(__name__)
STAGE = "sft-av"


@dataclass
class AVSFTConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    loop: LoopConfig = opt(help="optimisation", factory=lambda: LoopConfig(steps=200, batch_size=8, lr=5e-4))
    train_enc: bool = opt(False, "train every enc_M jointly with the AV (the anchor's stays fixed)")
    enc_lr: float = opt(2e-4, "learning rate of enc_M when train_enc")
    val_passages: int = opt(32, "val passages per tag for the validation loss")
    collapse_sample: int = opt(16, "val passages generated at each eval to measure distinct_z")
    collapse_threshold: float = opt(0.5, "warn when the share of distinct explanations falls below this")
    max_new_tokens: int = opt(48, "generation length at eval")


def collapse_alarm(texts: list[str], threshold: float) -> float:
    """distinct_z of a sample; logs a loud warning below threshold."""
    share = distinct_share(texts)
    if share < threshold:
        log.warning(
            "AV COLLAPSE: only %.0f%% of %d explanations are distinct (threshold %.0f%%); the AV is writing one "
            "template regardless of the vector. Lower the lr, raise the LoRA rank, or check the injection scale.",
            100 * share, len(texts), 100 * threshold,
        )
    return share


def _vectors(nla, rows: dict[str, TagRows], pairs: list[tuple[str, int]]) -> torch.Tensor:
    """enc_M(n(h)) for a batch, in batch order, with gradients into enc_M when it trains."""
    out = [None] * len(pairs)
    for tag, (positions, H) in gather(rows, pairs).items():
        v = nla.adapters.encode(tag, H.to(next(nla.adapters.parameters()).device))
        for k, pos in enumerate(positions):
            out[pos] = v[k]
    return torch.stack(out)


def swapped_vectors(pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each (tag, row) replaced by another row of the same tag: the vectors of a shuffled control."""
    out = list(pairs)
    for tag in dict.fromkeys(t for t, _ in pairs):
        where = [k for k, (t, _) in enumerate(pairs) if t == tag]
        if len(where) > 1:
            for k, j in zip(where, derangement(len(where))):
                out[k] = pairs[where[j]]
    return out


def run_sft_av(cfg: AVSFTConfig) -> dict:
    run_dir = Path(cfg.run.run_dir)
    record = stage_done(run_dir, STAGE, settings(cfg))
    if record:
        log.info("%s: done already (%s)", STAGE, record.get("final"))
        return record
    started = time.time()
    inputs = sft_inputs(cfg.run, cfg.val_passages)
    nla, rows, val, anchor = inputs.nla, inputs.rows, inputs.val, inputs.pool.anchor
    tags = list(rows)
    examples, val_examples = example_index(rows), example_index(val)
    val_swapped = swapped_vectors(val_examples)
    probe = [val_examples[i] for i in np.random.default_rng(0).permutation(len(val_examples))[: cfg.collapse_sample]]
    av = nla.av
    for p in nla.adapters.parameters():
        p.requires_grad_(False)
    groups = [{"params": [p for p in av.model.parameters() if p.requires_grad]}]
    named = named_trainable([("av", av.model)])
    if cfg.train_enc:
        enc = [m for tag, m in nla.adapters.encoders.items() if tag in tags and tag != anchor]
        for m in enc:
            m.requires_grad_(True)
        groups.append({"params": [p for m in enc for p in m.parameters()], "lr": cfg.enc_lr})
        named.update(named_trainable([(f"enc.{tag}", m) for tag, m in nla.adapters.encoders.items() if tag in tags and tag != anchor]))
    device = resolve_device(cfg.run.device)

    def loss_fn(idx: np.ndarray):
        pairs = [examples[i] for i in idx]
        batch = av.build_sft_batch(_vectors(nla, rows, pairs), [t for t, _ in pairs], [rows[t].z[i] for t, i in pairs])
        return av.sft_loss(batch), {}

    def val_loss(vector_pairs: list[tuple[str, int]]) -> float:
        total = 0.0
        for k in range(0, len(val_examples), cfg.loop.batch_size):
            pairs = val_examples[k:k + cfg.loop.batch_size]
            batch = av.build_sft_batch(_vectors(nla, val, vector_pairs[k:k + cfg.loop.batch_size]), [t for t, _ in pairs],
                                       [val[t].z[i] for t, i in pairs])
            total += float(av.sft_loss(batch)) * len(pairs)
        return total / len(val_examples)

    def eval_fn(step: int) -> dict[str, float]:
        av.model.eval()
        with torch.no_grad():
            loss, swapped = val_loss(val_examples), val_loss(val_swapped)
            texts = [e.text for e in av.explain(_vectors(nla, val, probe), [t for t, _ in probe],
                                                 SamplingParams(greedy=True, max_new_tokens=cfg.max_new_tokens))]
        av.model.train()
        share = collapse_alarm(texts, cfg.collapse_threshold)
        log.info("%s step %d: val loss %.4f, with swapped vectors %.4f; e.g. %r", STAGE, step, loss, swapped, texts[0][:120])
        return {"loss": loss, "vector_gain": swapped - loss, "distinct_z": share}

    av.model.train()
    final = train(out_dir=run_dir / STAGE, named_params=named, param_groups=groups, n_examples=len(examples),
                  loss_fn=loss_fn, eval_fn=eval_fn, cfg=cfg.loop, device=device, desc=STAGE)
    final = final or eval_fn(cfg.loop.steps)
    for p in nla.adapters.parameters():
        p.requires_grad_(False)
    save_bundle(nla, cfg.run)
    return mark_stage_done(run_dir, STAGE, settings(cfg), started, final=final, examples=len(examples))
