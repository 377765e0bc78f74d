"""The `verbalize` and `reconstruct` subcommands: a bundle applied to a run's activations or to text.

    nla-universal verbalize bundle=out/bundle tag=gpt2-medium run.run_dir=runs/demo split=test
    nla-universal verbalize bundle=out/bundle tag=gpt2-medium run.pool=out/pool.yaml text="Some passage."
    nla-universal reconstruct bundle=out/bundle tag=gpt2-medium run.run_dir=runs/demo

`verbalize` writes `<run_dir>/verbalized/<tag>.jsonl` (one line per activation row: row, passage_id,
explanation, parsed, finish_reason); with `text=` it extracts that text's activation with the pooled
model on the fly and prints the explanation. `reconstruct` reads the JSONL back, writes
`<run_dir>/reconstructions/<tag>.parquet` (passage_id, row, activation) and scores the rows against
the gold activations they came from.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import io
from ..config import Pooling, choices, opt
from ..corpus import split_ids
from ..errors import ConfigError, DataError
from ..extract import extract_shard
from ..metrics import all_metrics
from ..models import load_model
from ..nla.api import UniversalNLA
from ..rollout import SamplingParams
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)


class Split(enum.StrEnum):
    train = "train"
    val = "val"
    test = "test"
    all = "all"


@dataclass
class VerbalizeConfig:
    bundle: str = opt(help="bundle folder (holds nla_meta.yaml)")
    tag: str = opt(help="which pooled model's activations to verbalize")
    run: RunConfig = opt(help="run folder (passages.parquet, activations/<tag>/); pool defines `tag`'s model for text=",
                         factory=RunConfig)
    text: str = opt("", "verbalize this text: its activation is extracted on the fly with run.pool's model for `tag`")
    split: Split = opt(Split.test, f"passages to verbalize: {choices(Split)}")
    limit: int = opt(32, "verbalize at most this many rows (0 = all)")
    output: str = opt("", "JSONL path; default <run_dir>/verbalized/<tag>.jsonl")
    greedy: bool = opt(True, "greedy decoding; false = sample with temperature / top_p")
    max_new_tokens: int = opt(96, "tokens generated at most per explanation")
    temperature: float = opt(1.0, "sampling temperature (greedy=false)")
    top_p: float = opt(1.0, "nucleus sampling mass (greedy=false)")
    seed: Optional[int] = opt(None, "sampling seed (greedy=false) for reproducible explanations")
    batch_size: int = opt(8, "prompts per generate call")


@dataclass
class ReconstructConfig:
    bundle: str = opt(help="bundle folder (holds nla_meta.yaml)")
    tag: str = opt(help="the pooled model whose space the reconstructions are decoded to")
    run: RunConfig = opt(help="run folder: gold activations/<tag>/ are read from here for scoring", factory=RunConfig)
    input: str = opt("", "JSONL with an `explanation` field per line; default <run_dir>/verbalized/<tag>.jsonl")
    output: str = opt("", "parquet path; default <run_dir>/reconstructions/<tag>.parquet")


def _selected_rows(ws: Workspace, tag: str, split: Split, limit: int):
    acts = ws.activations(tag)
    rows = np.arange(len(acts.passage_ids))
    if split != Split.all:
        wanted = set(split_ids(ws.passages(), split))
        rows = rows[[p in wanted for p in acts.passage_ids]]
    if len(rows) == 0:
        raise DataError(f"no {tag} activations in split {split!r} under {ws.root}", "use another split, or split=all")
    return acts, rows[:limit] if limit else rows


def text_activation(ws: Workspace, text: str, tag: str) -> np.ndarray:
    """[1, d_M]: `text` through `tag`'s pooled model at its layer, pooled as its pool entry says."""
    spec = ws.pool.spec(tag)
    if spec.pool == Pooling.positions:
        raise ConfigError(f"{tag} is pooled by positions", "text= verbalizes one row per text: use mean or last")
    lm = load_model(spec, cache_dir=ws.run.cache_dir, num_blocks="to_layer")
    lm.model.to(ws.device)
    _, X, _, _, bad = extract_shard(lm, ["text"], [text], device=ws.device)
    if bad or len(X) == 0:
        raise DataError(f"{tag}: the text gives no finite activation (empty after special tokens, or NaN/inf)", "pass other text")
    return X


def verbalize(cfg: VerbalizeConfig) -> Path | str:
    ws = Workspace(cfg.run)
    nla = UniversalNLA.load(cfg.bundle, cache_dir=cfg.run.cache_dir, device=ws.device, parts=("av",),
                            generate_batch_size=cfg.batch_size, progress=True)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              greedy=cfg.greedy, seed=cfg.seed)
    if cfg.text:
        explanation = nla.explain(text_activation(ws, cfg.text, cfg.tag), cfg.tag, sampling)[0]
        print(explanation.text)
        return explanation.text
    acts, rows = _selected_rows(ws, cfg.tag, cfg.split, cfg.limit)
    explanations = nla.explain(acts.X[rows], cfg.tag, sampling)
    lines = [
        json.dumps({"row": int(r), "passage_id": acts.passage_ids[r], "tag": cfg.tag, "explanation": e.text,
                    "parsed": e.parsed, "finish_reason": e.completion.finish_reason})
        for r, e in zip(rows, explanations)
    ]
    out = Path(cfg.output) if cfg.output else ws.root / "verbalized" / f"{cfg.tag}.jsonl"
    io.write_text(out, "\n".join(lines) + "\n")
    parsed = sum(e.parsed for e in explanations)
    log.info("wrote %d explanations (%d with <explanation> tags) to %s", len(lines), parsed, out)
    print(out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} not found", "run `nla-universal verbalize` first, or set input=")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not JSON ({exc.msg} at column {exc.colno})", "write one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("explanation"), str):
            raise DataError(f"{path}:{number} has no string field `explanation`", "write {\"explanation\": \"...\"} per line")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no explanations", "verbalize some activations first")
    return records


def reconstruct(cfg: ReconstructConfig) -> dict:
    ws = Workspace(cfg.run)
    source = Path(cfg.input) if cfg.input else ws.root / "verbalized" / f"{cfg.tag}.jsonl"
    records = read_jsonl(source)
    nla = UniversalNLA.load(cfg.bundle, cache_dir=cfg.run.cache_dir, device=ws.device, parts=("ar",))
    predicted = nla.reconstruct([r["explanation"] for r in records], cfg.tag).numpy().astype(np.float32)
    out = Path(cfg.output) if cfg.output else ws.root / "reconstructions" / f"{cfg.tag}.parquet"
    table = pa.table({
        "passage_id": pa.array([str(r.get("passage_id", "")) for r in records], pa.string()),
        "row": pa.array([int(r.get("row", -1)) for r in records], pa.int64()),
        "activation": pa.FixedSizeListArray.from_arrays(pa.array(predicted.reshape(-1), pa.float32()), predicted.shape[1]),
    })
    with io.atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    summary: dict = {"tag": cfg.tag, "n": len(records), "output": str(out)}
    if all("row" in r for r in records) and (ws.activations_root / cfg.tag).is_dir():
        gold = ws.activations(cfg.tag).X[[r["row"] for r in records]]
        with np.errstate(divide="ignore", invalid="ignore"):
            summary.update(all_metrics(gold, predicted))
    log.info("wrote %d reconstructions to %s", len(records), out)
    print(json.dumps(summary))
    return summary
