"""Extraction speed: ours (truncated to blocks 0..K, length-bucketed) vs the straightforward way.

The baseline runs the full model with output_hidden_states=True on the same batches and pools
hidden_states[K+1] the same way. Each variant runs in its own subprocess so peak memory (RSS high
water mark) is its own. Prints one JSON line.

    python tools/bench/extract.py [--spec packaged:smollm2-135m-instruct] [--passages 96] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(args) -> dict:
    import torch

    from nla_universal.config import CorpusConfig, ModelSpec
    from nla_universal.corpus import build_passages
    from nla_universal.extract import _batches, extract_shard, pool_hidden
    from nla_universal.models import content_mask, load_model

    torch.manual_seed(0)
    source, name = args.spec.split(":", 1)
    overrides = json.loads(args.overrides) if args.overrides else {}
    spec = ModelSpec(tag="bench", source=source, name=name, depth=args.depth, dtype=args.dtype, max_length=args.max_length, random_overrides=overrides)
    table = build_passages(CorpusConfig(max_passages=args.passages))
    ids, texts = table.column("passage_id").to_pylist(), table.column("text").to_pylist()
    sizes = dict(batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    device = torch.device(args.device)
    lm = load_model(spec, num_blocks="to_layer" if args.variant == "ours" else None)
    lm.model.to(device)
    tok = lm.tokenizer
    n_tokens = sum(min(len(tok(t)["input_ids"]), spec.max_length) for t in texts)
    extract_shard(lm, ids[:4], texts[:4], **sizes, device=device)  # warm-up
    start = time.perf_counter()
    if args.variant == "ours":
        _, X, *_ = extract_shard(lm, ids, texts, **sizes, device=device)
    else:
        enc = [tok(t, truncation=True, max_length=spec.max_length)["input_ids"] for t in texts]
        rows = {}
        for batch in _batches([len(e) for e in enc], args.batch_size, args.batch_tokens):
            padded = tok.pad({"input_ids": [enc[i] for i in batch]}, return_tensors="pt").to(device)
            with torch.inference_mode():
                hs = lm.model(**padded, output_hidden_states=True).hidden_states[lm.layer + 1]
            pooled = pool_hidden(hs, content_mask(padded["input_ids"], padded["attention_mask"], tok), "mean").cpu()
            rows.update(zip(batch, pooled))
        X = torch.stack([rows[i] for i in range(len(texts))]).numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "passages_per_s": len(texts) / seconds, "tokens_per_s": n_tokens / seconds,
            "peak_mib": peak, "rows": X.tolist()[:4], "layer": lm.layer, "num_layers": lm.num_layers}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default="packaged:smollm2-135m-instruct")
    p.add_argument("--overrides", default="", help="random source: JSON config overrides (e.g. a Qwen3-1.7B shape)")
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--passages", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("baseline", "ours"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    import numpy as np

    diff = float(np.abs(np.array(results["ours"]["rows"]) - np.array(results["baseline"]["rows"])).max())
    print(json.dumps({
        "bench": "extract", "spec": args.spec, "dtype": args.dtype, "device": args.device, "passages": args.passages,
        "layer": results["ours"]["layer"], "num_layers": results["ours"]["num_layers"],
        "passages_per_s": round(results["ours"]["passages_per_s"], 2),
        "baseline_passages_per_s": round(results["baseline"]["passages_per_s"], 2),
        "tokens_per_s": round(results["ours"]["tokens_per_s"], 1),
        "speedup": round(results["ours"]["passages_per_s"] / results["baseline"]["passages_per_s"], 3),
        "peak_mib": round(results["ours"]["peak_mib"], 1), "baseline_peak_mib": round(results["baseline"]["peak_mib"], 1),
        "peak_ratio": round(results["ours"]["peak_mib"] / results["baseline"]["peak_mib"], 3),
        "max_abs_diff": diff,
    }))


if __name__ == "__main__":
    main()
