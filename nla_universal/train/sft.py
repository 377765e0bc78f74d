"""The two supervised stages as training functions on in-memory rows (the pipeline reads the run folder).

AR SFT: teacher z in the AR template → the shared vector of its passage; loss `mse_nrm` (= 2(1 − cos)).
AV SFT: the injected shared vector → `<explanation>\\n{z}\\n</explanation>` + EOS, loss on response
tokens only; enc_M optionally trained with it. Every AV eval also generates for a fixed val sample
and watches the share of distinct explanations (a collapse alarm: the seed's v2/v7 wrote one template
for everything), and scores the val loss with each vector swapped for another passage's (same tag):
`vector_gain` = that loss − the true one, > 0 only when the AV reads the vector at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..metrics import derangement, distinct_share
from ..nla.api import UniversalNLA
from ..nla.loss import mse_nrm
from ..rollout import SamplingParams
from ..activations import TagRows
from .data import example_index, gather
from .loop import LoopConfig, named_trainable, train

log = logging.getLogger(__name__)


def ar_val_metrics(nla: UniversalNLA, val: dict[str, TagRows], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    losses, cos = [], []
    for tag, rows in val.items():
        pred = nla.shared_from_text(rows.z)
        losses.append(mse_nrm(pred, targets[tag]))
        cos.append(torch.nn.functional.cosine_similarity(pred, targets[tag], dim=-1))
    return {"mse_nrm": float(torch.cat(losses).mean()), "cos": float(torch.cat(cos).mean())}


def train_ar(nla: UniversalNLA, rows: dict[str, TagRows], val: dict[str, TagRows], loop: LoopConfig, out_dir: Path,
             device: torch.device) -> dict:
    """AR SFT to `loop.steps` (resuming from `out_dir`'s checkpoints); val metrics before and after."""
    targets = {t: nla.encode(r.H, t).cpu() for t, r in rows.items()}
    val_targets = {t: nla.encode(r.H, t).cpu() for t, r in val.items()}
    examples = example_index(rows)
    log.info("sft-ar: %d examples over %d tags", len(examples), len(rows))
    before = ar_val_metrics(nla, val, val_targets)
    nla.ar.train()

    def loss_fn(idx: np.ndarray):
        pairs = [examples[i] for i in idx]
        pred = nla.shared_from_text([rows[t].z[i] for t, i in pairs], grad=True)
        gold = torch.stack([targets[t][i] for t, i in pairs]).to(pred.device)
        return mse_nrm(pred.float(), gold).mean(), {}

    def eval_fn(step: int) -> dict[str, float]:
        metrics = ar_val_metrics(nla, val, val_targets)
        nla.ar.train()
        return metrics

    named = named_trainable([("ar", nla.ar)])
    final = train(out_dir=out_dir, named_params=named, param_groups=[{"params": list(named.values())}],
                  n_examples=len(examples), loss_fn=loss_fn, eval_fn=eval_fn, cfg=loop, device=device, desc="sft-ar")
    return {"before": before, "final": final or ar_val_metrics(nla, val, val_targets), "examples": len(examples)}


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


def swapped_vectors(pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each (tag, row) replaced by another row of the same tag: the vectors of a shuffled control."""
    out = list(pairs)
    for tag in dict.fromkeys(t for t, _ in pairs):
        where = [k for k, (t, _) in enumerate(pairs) if t == tag]
        if len(where) > 1:
            for k, j in zip(where, derangement(len(where))):
                out[k] = pairs[where[j]]
    return out


def batch_vectors(nla: UniversalNLA, rows: dict[str, TagRows], pairs: list[tuple[str, int]], grad: bool = False) -> torch.Tensor:
    """Shared vectors of a batch of (tag, row) pairs, in batch order."""
    out: list[torch.Tensor | None] = [None] * len(pairs)
    for tag, (positions, H) in gather(rows, pairs).items():
        v = nla.encode(H, tag, grad=grad)
        for k, pos in enumerate(positions):
            out[pos] = v[k]
    return torch.stack(out)  # type: ignore[arg-type]


def train_av(nla: UniversalNLA, rows: dict[str, TagRows], val: dict[str, TagRows], loop: LoopConfig, out_dir: Path,
             device: torch.device, *, train_enc: bool = False, enc_lr: float = 2e-4, collapse_sample: int = 16,
             collapse_threshold: float = 0.5, max_new_tokens: int = 48, train_input_map: bool = False,
             input_map_lr: float = 1e-4) -> dict[str, float]:
    """AV SFT to `loop.steps` (resuming from `out_dir`'s checkpoints); the last eval's metrics."""
    av = nla.av
    examples, val_examples = example_index(rows), example_index(val)
    val_swapped = swapped_vectors(val_examples)
    probe = [val_examples[i] for i in np.random.default_rng(0).permutation(len(val_examples))[:collapse_sample]]
    nla.adapters.requires_grad_(False)
    groups = [{"params": [p for p in av.model.parameters() if p.requires_grad]}]
    named = named_trainable([("av", av.model)])
    if train_enc:
        tags = [t for t in rows if t != nla.meta.anchor_tag]
        encoders = nla.adapters.encoder_parameters(tags)
        for p in encoders.values():
            p.requires_grad_(True)
        groups.append({"params": list(encoders.values()), "lr": enc_lr})
        named.update({f"enc.{name}": p for name, p in encoders.items()})
    if av.input_map is not None:
        av.input_map.requires_grad_(train_input_map)
        if train_input_map:
            groups.append({"params": list(av.input_map.parameters()), "lr": input_map_lr})
            named.update(named_trainable([("input_map", av.input_map)]))

    def loss_fn(idx: np.ndarray):
        pairs = [examples[i] for i in idx]
        batch = av.build_sft_batch(batch_vectors(nla, rows, pairs, grad=train_enc), [t for t, _ in pairs],
                                   [rows[t].z[i] for t, i in pairs])
        return av.sft_loss(batch), {}

    def val_loss(vector_pairs: list[tuple[str, int]]) -> float:
        return av.target_loss(batch_vectors(nla, val, vector_pairs), [t for t, _ in val_examples],
                              [val[t].z[i] for t, i in val_examples], loop.batch_size)

    def eval_fn(step: int) -> dict[str, float]:
        av.model.eval()
        with torch.no_grad():
            loss, swapped = val_loss(val_examples), val_loss(val_swapped)
            texts = [e.text for e in nla.verbalize_shared(batch_vectors(nla, val, probe), [t for t, _ in probe],
                                                          SamplingParams(greedy=True, max_new_tokens=max_new_tokens))]
        av.model.train()
        share = collapse_alarm(texts, collapse_threshold)
        log.info("sft-av step %d: val loss %.4f, with swapped vectors %.4f; e.g. %r", step, loss, swapped, texts[0][:120])
        return {"loss": loss, "vector_gain": swapped - loss, "distinct_z": share}

    av.model.train()
    final = train(out_dir=out_dir, named_params=named, param_groups=groups, n_examples=len(examples),
                  loss_fn=loss_fn, eval_fn=eval_fn, cfg=loop, device=device, desc="sft-av")
    final = final or eval_fn(loop.steps)
    nla.adapters.requires_grad_(False)
    return final
