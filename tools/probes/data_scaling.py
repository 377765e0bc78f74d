"""How many taught passages the vector ↔ words maps need: linear probes at growing train sizes.

Builds the built-in corpus (all of it) and extracts the packaged SmolLM2's mean-pooled layer-K rows
into `--out` (resumable, like the pipeline's own stages). Each passage's lead sentence stands in for
the teacher's explanation, so thousands of passages cost nothing. At each train size N:

- vector → words: a softmax-linear map from the centred, renormalised vector to the bag of the
  explanation's tokens (val nats per token), next to the unigram of the train explanations and to
  the same map fed another passage's vector (how much the vector carries about its own passage);
- words → vector: ridge from the tf-idf bag of the explanation to the centred vector (val FVE), next
  to the same ridge fed another passage's explanation.

Each map's regulariser is picked on val (the best of three), which flatters every column alike.
Prints one JSON line per N.

    python tools/probes/data_scaling.py [--out runs/data-scaling] [--sizes 250,1000,1900]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SPEC = dict(tag="smollm2-135m", source="packaged", name="smollm2-135m-instruct", depth=0.5, dtype="float32")


def build(out: Path, cache_dir: str) -> None:
    from nla_universal import io
    from nla_universal.config import CorpusConfig, ModelSpec
    from nla_universal.pipeline import corpus, extract
    from nla_universal.pipeline.workspace import RunConfig

    run = RunConfig(run_dir=str(out), pool=str(out / "pool.yaml"), device="cpu", cache_dir=cache_dir)
    if not (out / "passages.parquet").is_file():
        corpus.run(corpus.CorpusStageConfig(run=run, corpus=CorpusConfig(max_passages=100_000)))
    io.write_yaml(out / "pool.yaml", {"anchor": SPEC["tag"], "models": [ModelSpec(**SPEC).__dict__]})
    extract.run(extract.ExtractConfig(run=run))


def lead_sentence(text: str) -> str:
    flat = " ".join(text.split())
    match = re.search(r"(.{20,200}?[.!?])(\s|$)", flat)
    return match.group(1) if match else flat[:200]


def bags(token_lists: list[list[int]], index: dict[int, int]) -> torch.Tensor:
    """[N, |vocab| + 1] token counts; the last column counts tokens unseen in train."""
    counts = torch.zeros(len(token_lists), len(index) + 1)
    for row, ids in enumerate(token_lists):
        for t in ids:
            counts[row, index.get(t, len(index))] += 1
    return counts


def nats(log_probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return -(counts * log_probs).sum() / counts.sum()


def vector_to_words(Vt, Ct, Vv, Cv, unigram: torch.Tensor) -> tuple[float, float]:
    """Val nats/token of the best-regularised softmax-linear map, with the true and with shuffled vectors."""
    shuffled = torch.roll(torch.arange(len(Vv)), 1)
    best = None
    for weight_decay in (1e-3, 1e-2, 1e-1):
        W = torch.zeros(Vt.shape[1], Ct.shape[1], requires_grad=True)
        b = unigram.log().clone().requires_grad_(True)
        opt = torch.optim.Adam([W, b], lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            loss = nats(torch.log_softmax(Vt @ W + b, -1), Ct) + weight_decay * (W**2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            scores = tuple(float(nats(torch.log_softmax(v @ W + b, -1), Cv)) for v in (Vv, Vv[shuffled]))
        best = scores if best is None or scores[0] < best[0] else best
    return best


def words_to_vector(Bt, Yt, Bv, Yv) -> tuple[float, float]:
    """Val FVE (about 0, the centred mean) of the best ridge from tf-idf bags, with the true and shuffled bags."""
    shuffled = torch.roll(torch.arange(len(Bv)), 1)
    best = None
    for lam in (0.1, 1.0, 10.0):
        W = torch.linalg.solve(Bt.T @ Bt + lam * torch.eye(Bt.shape[1]), Bt.T @ Yt)
        scores = tuple(float(1 - ((Yv - b @ W) ** 2).sum() / (Yv**2).sum()) for b in (Bv, Bv[shuffled]))
        best = scores if best is None or scores[0] > best[0] else best
    return best


def main() -> None:
    from nla_universal.activations import read_activations
    from nla_universal.config import ModelSpec, default_cache_dir
    from nla_universal.corpus import read_passages
    from nla_universal.models import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/data-scaling")
    ap.add_argument("--sizes", default="250,1000,1900")
    ap.add_argument("--cache-dir", default=default_cache_dir())
    args = ap.parse_args()
    out = Path(args.out)
    build(out, args.cache_dir)
    tokenizer = load_tokenizer(ModelSpec(**SPEC), cache_dir=args.cache_dir)
    passages = {r["passage_id"]: r for r in read_passages(out / "passages.parquet").to_pylist()}
    acts = read_activations(out / "activations", SPEC["tag"])
    split = {"train": [], "val": []}
    for pid, row in zip(acts.passage_ids, acts.X):
        if passages[pid]["split"] in split:
            ids = tokenizer(lead_sentence(passages[pid]["text"]), add_special_tokens=False)["input_ids"]
            split[passages[pid]["split"]].append((row, ids))
    X = {s: torch.nn.functional.normalize(torch.tensor(np.stack([r for r, _ in rows])), dim=-1) for s, rows in split.items()}
    tokens = {s: [t for _, t in rows] for s, rows in split.items()}
    for n in tqdm([int(s) for s in args.sizes.split(",")], desc="probe sizes", unit="size"):
        if n > len(tokens["train"]):
            tqdm.write(json.dumps({"train_passages": n, "skipped": f"only {len(tokens['train'])} train passages"}))
            continue
        mu = X["train"][:n].mean(0)
        Vt, Vv = (torch.nn.functional.normalize(x - mu, dim=-1) for x in (X["train"][:n], X["val"]))
        index = {t: i for i, t in enumerate(sorted({t for ids in tokens["train"][:n] for t in ids}))}
        Ct, Cv = bags(tokens["train"][:n], index), bags(tokens["val"], index)
        unigram = (Ct.sum(0) + 0.1) / (Ct.sum() + 0.1 * Ct.shape[1])
        scale = Vt.shape[1] ** 0.5  # rows at √d, as everywhere in the pipeline
        true_v, other_v = vector_to_words(Vt * scale, Ct, Vv * scale, Cv, unigram)
        idf = torch.log((n + 1) / ((Ct > 0).float().sum(0) + 1))
        Bt, Bv = (torch.nn.functional.normalize(C * idf, dim=-1) for C in (Ct, Cv))
        true_z, other_z = words_to_vector(Bt, Vt, Bv, Vv)
        tqdm.write(json.dumps({"train_passages": n, "val_passages": len(tokens["val"]),
                          "vector_to_words_nats": {"unigram": round(float(nats(unigram.log().expand_as(Cv), Cv)), 3),
                                                   "true_vector": round(true_v, 3), "other_vector": round(other_v, 3)},
                          "words_to_vector_fve": {"true_z": round(true_z, 3), "other_z": round(other_z, 3)}}))


if __name__ == "__main__":
    main()
