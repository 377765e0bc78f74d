"""Score a bundle end to end per tag on the test split: dec_M(AR(AV(enc_M(n(h))))) vs n(h).

Beside every number: the mean predictor (train μ), shuffled_z (the AR on another passage's AV
explanation, same tag), teacher_z (the AR on the teacher's z — what a perfect AV imitation would
give), the linear ceiling (dec_M(enc_M(h)) with no text bottleneck, from fit-adapters) and the
AV's distinct_z. Trained and held-out tags are reported separately.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .activations import read_activations
from .adapters import PoolAdapters
from .config import load_pool, opt
from .corpus import split_ids
from .errors import DataError
from .evaluate import evaluate_linear_ceiling, linear_ceiling_predictions, score_tag
from .explanations import explain_rows
from .metrics import derangement, normalised_mean, normalize_rows
from .nla.api import UniversalNLA
from .report import write_report
from .train.data import passages_with_z, tag_rows
from .train.refit import ar_shared, sampling_for
from .train.workspace import RunConfig, bundle_dir, open_bundle

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    predictor: str = opt("nla", "nla (the full AV→AR round trip through the bundle) | linear (the linear ceiling only)")
    tags: list[str] = opt(help="score only these tags (default: all)", factory=list)
    test_passages: int = opt(0, "test passages per tag (0 = all)")
    max_new_tokens: int = opt(48, "AV generation length")
    generate_batch_size: int = opt(8, "AV prompts per generate call")
    n_boot: int = opt(1000, "bootstrap resamples for the intervals")
    out: str = opt("", "report folder (default: run_dir/eval-<predictor>)")


def decode(nla: UniversalNLA, tag: str, shared: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return nla.adapters.decode(tag, torch.as_tensor(shared, dtype=torch.float32)).double().numpy()


def score_bundle_tag(nla: UniversalNLA, run_dir: Path, table, tag: str, cfg: EvalConfig, linear: PoolAdapters | None) -> tuple[dict, list[tuple[str, str, str]]]:
    test = tag_rows(run_dir, table, tag, "test", need_z=False, limit=cfg.test_passages or None)
    if len(test) < 2:
        raise DataError(f"{tag}: {len(test)} test passages", "rebuild passages.parquet with a larger test split")
    acts = read_activations(run_dir / "activations", tag)
    train_ids = set(split_ids(table, "train"))
    train_mean = normalised_mean(acts.X[[i for i, p in enumerate(acts.passage_ids) if p in train_ids]])
    z, parsed = explain_rows(nla, run_dir, tag, test.ids, test.H, sampling_for(cfg.max_new_tokens), cfg.generate_batch_size)
    V = ar_shared(nla, z)
    pred = decode(nla, tag, V)
    controls = {"shuffled_z": decode(nla, tag, V[derangement(len(z), seed=0)])}
    if any(test.z):  # a passage whose teacher reply was dropped counts with an empty explanation
        controls["teacher_z"] = decode(nla, tag, ar_shared(nla, [t or "" for t in test.z]))
    if linear is not None and tag in linear.tags:
        controls["linear_ceiling"] = linear_ceiling_predictions(linear, tag, test.H)
    scores = score_tag(test.H, normalize_rows(pred), train_mean, controls, texts=z, n_boot=cfg.n_boot)
    scores["parsed_share"] = float(np.mean(parsed))
    texts = table.column("text").to_pylist()
    by_id = dict(zip(table.column("passage_id").to_pylist(), texts))
    examples = [(by_id[p], zz, str(t or "")) for p, zz, t in zip(test.ids[:3], z[:3], test.z[:3])]
    return scores, examples


def examples_markdown(examples: dict[str, list[tuple[str, str, str]]]) -> str:
    lines = ["## Example explanations (test split)", ""]
    for tag, rows in examples.items():
        lines.append(f"### {tag}")
        for passage, z, teacher in rows:
            snippet = " ".join(passage.split())[:300]
            lines += [f"- **passage**: {snippet}…", f"  - **AV**: {z}", f"  - **teacher**: {teacher}"]
        lines.append("")
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict:
    run_dir = Path(cfg.run.run_dir)
    pool = load_pool(cfg.run.pool)
    out = Path(cfg.out or run_dir / f"eval-{cfg.predictor}")
    if cfg.predictor == "linear":
        return evaluate_linear_ceiling(run_dir / "activations", run_dir / "passages.parquet", pool, run_dir / "adapters", out, n_boot=cfg.n_boot)
    if cfg.predictor != "nla":
        raise DataError(f"unknown predictor {cfg.predictor!r}", "use nla or linear")
    table = passages_with_z(run_dir, need_z=False)
    nla = open_bundle(cfg.run, pool)
    linear_dir = run_dir / "adapters"
    linear = PoolAdapters.load(linear_dir) if (linear_dir / "adapters.safetensors").is_file() else None
    tags = cfg.tags or list(nla.meta.tags)
    results, examples = {}, {}
    for tag in tags:
        results[tag], examples[tag] = score_bundle_tag(nla, run_dir, table, tag, cfg, linear)
        m = results[tag]
        log.info("%s: fve_centred %.3f (shuffled_z %.3f)", tag, m["metrics"]["fve_centred"], m["controls"]["shuffled_z"]["fve_centred"])
    note = ("Predictor: dec_M(AR(AV(enc_M(h)))) — the AV's own greedy explanations, read back by the AR. "
            "`shuffled_z`: the AR on another test passage's explanation (same tag). `teacher_z`: the AR on the "
            "teacher's explanation (an empty one where the teacher's reply was dropped). `linear_ceiling`: dec_M(enc_M(h)) with no text in between.")
    files = write_report(results, out, title=f"Universal NLA round trip — test split ({bundle_dir(cfg.run)})",
                         held_out={t: i.held_out for t, i in nla.meta.tags.items()},
                         random_weights={m.tag: m.source == "random" for m in pool.models},
                         extra_md=note + "\n\n" + examples_markdown(examples))
    return {"results": results, "files": files, "examples": examples}
