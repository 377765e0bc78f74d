"""`nla-universal eval`: score a bundle end to end per tag on the test split, beside its controls.

Predictor `nla`: decode(AR(AV(encode(h)))) — the AV's own greedy explanations read back by the AR.
Beside every number: the mean predictor (train μ), shuffled_z (the AR on another passage's AV
explanation, same tag), teacher_z (the AR on the teacher's z — what a perfect imitation of the teacher
would give), the linear ceiling (decode(encode(h)), no text in between, from fit-adapters) and the
AV's distinct_z. Predictor `linear`: the linear ceiling alone, for every pooled tag. Trained and
held-out tags are reported separately.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import io
from ..adapters import PoolAdapters
from ..config import choices, opt
from ..corpus import is_token_table, split_ids
from ..errors import DataError
from ..evaluate import linear_ceiling_predictions, score_tag
from ..heads import split_head
from ..metrics import derangement, normalised_mean, normalize_rows, shuffled
from ..nla.api import UniversalNLA
from ..nla.bundle import read_meta
from ..nla.input_map import nearest_words, words
from ..report import write_report
from ..activations import TagRows
from .explanations import explain_rows
from .refit_dec import greedy
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)


class Predictor(enum.StrEnum):
    nla = "nla"  # the full AV → AR round trip through the bundle
    linear = "linear"  # the linear ceiling only


@dataclass
class EvalConfig:
    run: RunConfig = opt(help="run folder, pool, device", factory=RunConfig)
    predictor: Predictor = opt(Predictor.nla, f"{choices(Predictor)}: the AV→AR round trip through the bundle, or the "
                               "linear ceiling only")
    tags: list[str] = opt(help="score only these tags (default: all)", factory=list)
    test_passages: int = opt(0, "test passages per tag (0 = all)")
    max_new_tokens: int = opt(48, "AV generation length")
    generate_batch_size: int = opt(8, "AV prompts generated together (and teacher-forced together for vector_gain)")
    vector_gain_passages: int = opt(32, "test passages per tag whose teacher z is scored for vector_gain (0 = all): "
                                    "two teacher-forced passes each, the eval's costliest part after generation")
    n_boot: int = opt(1000, "bootstrap resamples for the intervals")
    out: str = opt("", "report folder (default: run_dir/eval-<predictor>)")


def train_mean(ws: Workspace, table, tag: str) -> np.ndarray:
    acts = ws.activations(tag)
    train_ids = set(split_ids(table, "train"))
    return normalised_mean(acts.X[[i for i, p in enumerate(acts.passage_ids) if p in train_ids]])


def score_bundle_tag(nla: UniversalNLA, ws: Workspace, table, tag: str, cfg: EvalConfig,
                     linear: PoolAdapters | None) -> tuple[dict, list[tuple[str, str, str]]]:
    test = ws.rows(table, tag, "test", need_z=False, limit=cfg.test_passages or None)
    by_id = dict(zip(table.column("passage_id").to_pylist(), table.column("text").to_pylist()))
    if len(test) < 2:
        raise DataError(f"{tag}: {len(test)} test passages", "rebuild passages.parquet with a larger test split")
    z, parsed = explain_rows(nla, ws.root, tag, test.ids, test.H, greedy(cfg.max_new_tokens), cfg.generate_batch_size)
    V = nla.shared_from_text(z)
    pred = nla.decode(V, tag).double().numpy()
    controls = {"shuffled_z": nla.decode(V[derangement(len(z), seed=0)], tag).double().numpy()}
    if any(test.z):  # a passage whose teacher reply was dropped counts with an empty explanation
        controls["teacher_z"] = nla.decode(nla.shared_from_text([t or "" for t in test.z]), tag).double().numpy()
    if linear is not None and tag in linear.tags:
        controls["linear_ceiling"] = linear_ceiling_predictions(linear, tag, test.H)
    if nla.av.input_map is not None:
        controls["map_alone"] = nla.decode(nla.shared_from_text(map_alone_texts(nla, test, vocabulary(table))), tag).double().numpy()
    scores = score_tag(test.H, normalize_rows(pred), train_mean(ws, table, tag), controls, texts=z, n_boot=cfg.n_boot)
    scores["parsed_share"] = float(np.mean(parsed))
    if any(split_head(t)[0] for t in test.z if t):
        scores["head_words_in_passage"] = head_hits(z, [by_id[p] for p in test.ids])
    with_z = [i for i, z in enumerate(test.z) if z][:cfg.vector_gain_passages or None]
    if len(with_z) >= 2:
        scores["vector_gain"] = vector_gain(nla, TagRows(tag, [test.ids[i] for i in with_z], test.H[with_z],
                                                         [test.z[i] for i in with_z]), cfg.generate_batch_size)
    examples = [(by_id[p], zz, str(t or "")) for p, zz, t in zip(test.ids[:3], z[:3], test.z[:3])]
    return scores, examples


def vocabulary(table, limit: int = 2000) -> list[str]:
    """The most frequent words of the train split's teacher explanations: what the map alone may say."""
    counts: dict[str, int] = {}
    for z, split in zip(table.column("z").to_pylist() if "z" in table.column_names else [], table.column("split").to_pylist()):
        if z and split == "train":
            for w in words(z):
                counts[w] = counts.get(w, 0) + 1
    if not counts:
        raise DataError("the train split holds no teacher explanations to read the input map with", "run `nla-universal teach`")
    return sorted(counts, key=lambda w: (-counts[w], w))[:limit]


def head_hits(explanations: list[str], texts: list[str]) -> dict[str, float]:
    """Share of the head words the AV wrote that occur in their own passage, and in another passage
    (the control): a head the AV reads from the vector scores above its control."""
    def share(pairs) -> float:
        hits = [w in text.lower() for z, text in pairs for w in split_head(z)[0]]
        return float(np.mean(hits)) if hits else 0.0

    other = derangement(len(texts), seed=2)
    return {"own": share(zip(explanations, texts)), "other": share((z, texts[j]) for z, j in zip(explanations, other))}


def map_alone_texts(nla: UniversalNLA, rows: TagRows, vocab: list[str], k: int = 8) -> list[str]:
    mapped = nla.av.input_map(nla.encode(rows.H, rows.tag).to(nla.av.embedding.weight.device))
    return nearest_words(mapped, vocab, nla.av.tokenizer, nla.av.embedding, k)


def vector_gain(nla: UniversalNLA, rows: TagRows, batch_size: int) -> float:
    """On held-out text: the AV's loss on the teacher's z with another passage's vector − with its own
    (over the passages the teacher explained)."""
    v = nla.encode(rows.H, rows.tag)
    tags, texts = [rows.tag] * len(rows), [str(z) for z in rows.z]
    true = nla.av.target_loss(v, tags, texts, batch_size)
    return nla.av.target_loss(v[derangement(len(rows), seed=1)], tags, texts, batch_size) - true


def examples_markdown(examples: dict[str, list[tuple[str, str, str]]], token_rows: bool = False) -> str:
    lines = ["## Example explanations (test split)", ""]
    for tag, rows in examples.items():
        lines.append(f"### {tag}")
        for passage, z, teacher in rows:
            if token_rows:  # the row is about its last word
                lines.append(f"- **text**: …{' '.join(passage.split())[-200:]}")
            else:
                lines.append(f"- **passage**: {' '.join(passage.split())[:300]}…")
            lines += [f"  - **AV**: {z}", f"  - **teacher**: {teacher}"]
        lines.append("")
    return "\n".join(lines)


def run_linear(ws: Workspace, out: Path, n_boot: int, seed: int = 0) -> dict:
    """The linear ceiling of every pooled tag on the test split; `shuffled_z` is the map on another passage's h."""
    table = ws.passages()
    if not split_ids(table, "test"):
        raise DataError(f"{ws.passages_path} holds no test split", "rebuild it with corpus.test_fraction > 0")
    adapters = ws.adapters()
    missing = [t for t in ws.pool.tags if t not in adapters.tags]
    if missing:
        raise DataError(f"the adapters in {ws.adapters_dir} lack tags {missing}", "rerun `nla-universal fit-adapters` with this pool")
    results = {}
    for tag in tqdm(ws.pool.tags, desc="linear ceiling", unit="tag"):
        test = ws.rows(table, tag, "test", need_z=False)
        if len(test) < 2:
            raise DataError(f"{tag}: {len(test)} test rows have activations", f"extract {tag} on the same passages.parquet")
        predict = lambda h, tag=tag: linear_ceiling_predictions(adapters, tag, h)  # noqa: E731
        control = shuffled(predict, test.H, derangement(len(test), seed))
        results[tag] = score_tag(test.H, predict(test.H), train_mean(ws, table, tag), {"shuffled_z": control},
                                 n_boot=n_boot, seed=seed)
    note = ("Predictor: the linear ceiling decode(encode(h)) through the anchor's space, no text bottleneck. "
            "Here `shuffled_z` is the same map applied to another passage's activation.")
    files = write_report(results, out, title="Linear ceiling — test split",
                         held_out={m.tag: m.held_out for m in ws.pool.models},
                         random_weights={m.tag: m.source == "random" for m in ws.pool.models}, extra_md=note)
    return {"results": results, "files": files}


def run(cfg: EvalConfig) -> dict:
    ws = Workspace(cfg.run)
    out = Path(cfg.out or ws.root / f"eval-{cfg.predictor}")
    if cfg.predictor == Predictor.linear:
        return run_linear(ws, out, cfg.n_boot)
    st = ws.stage(out.name, cfg)
    bundle_stages = read_meta(ws.bundle_dir).stages if (ws.bundle_dir / "nla_meta.yaml").is_file() else None
    if st.done and st.record.get("bundle_stages") == bundle_stages and (out / "fve_report.json").is_file():
        return {"results": st.record["results"], "files": {k: Path(v) for k, v in st.record["files"].items()}}
    table = ws.passages()
    nla = ws.open_bundle("sft-ar", "sft-av", "refit-dec", generate_batch_size=cfg.generate_batch_size)
    linear = ws.adapters() if (ws.adapters_dir / io.MANIFEST).is_file() else None
    tags = cfg.tags or list(nla.meta.tags)
    results, examples = {}, {}
    for tag in tags:
        results[tag], examples[tag] = score_bundle_tag(nla, ws, table, tag, cfg, linear)
        m = results[tag]
        log.info("%s: fve_centred %.3f (shuffled_z %.3f)", tag, m["metrics"]["fve_centred"], m["controls"]["shuffled_z"]["fve_centred"])
    note = ("Predictor: decode(AR(AV(encode(h)))) — the AV's own greedy explanations, read back by the AR. "
            "`shuffled_z`: the AR on another test passage's explanation (same tag). `teacher_z`: the AR on the "
            "teacher's explanation (an empty one where the teacher's reply was dropped). `linear_ceiling`: "
            "decode(encode(h)) with no text in between.")
    files = write_report(results, out, title=f"Universal NLA round trip — test split ({ws.bundle_dir})",
                         held_out={t: i.held_out for t, i in nla.meta.tags.items()},
                         random_weights={m.tag: m.source == "random" for m in ws.pool.models},
                         extra_md=note + "\n\n" + examples_markdown(examples, is_token_table(table)))
    st.finish(bundle_stages=nla.meta.stages, results=results, files={k: str(v) for k, v in files.items()})
    return {"results": results, "files": files, "examples": examples}
