"""AR memory: the truncated AR (blocks 0..K loaded, K at depth 0.5) vs the full trunk read at hidden_states[K+1].

Each variant runs in its own subprocess, so its peak RSS (high-water mark) is its own; the RSS right
after `import torch, transformers` is reported as the fixed overhead. Both variants read the same
texts in the same batches at the same token; with a fresh LoRA and the identity value head they
must agree (max_abs_diff). Prints one JSON line.

    python tools/bench/ar_memory.py [--spec packaged:smollm2-135m-instruct] [--depth 0.5] [--texts 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_trunk_rows(lm, texts: list[str], batch_size: int):
    """The straightforward way: every block, output_hidden_states=True, hidden_states[K+1] at the last token."""
    import torch

    from nla_universal.nla.ar import last_real_index
    from nla_universal.nla.prompts import DEFAULT_AR_TEMPLATE, ar_text, pad_ids, pad_token_id

    parts = []
    for i in range(0, len(texts), batch_size):
        seqs = [lm.tokenizer(ar_text(DEFAULT_AR_TEMPLATE, t), add_special_tokens=True)["input_ids"] for t in texts[i:i + batch_size]]
        ids, mask = pad_ids(seqs, pad_token_id(lm.tokenizer), "right")
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[lm.layer + 1]
        parts.append(hidden[torch.arange(len(seqs)), last_real_index(mask)].float())
    return torch.cat(parts)


def run_variant(args) -> dict:
    import torch
    import transformers  # noqa: F401  (part of the fixed overhead)

    overhead = rss_mib()
    from nla_universal.config import ModelSpec
    from nla_universal.models import load_model
    from nla_universal.nla import AR, ARConfig

    source, name = args.spec.split(":", 1)
    spec = ModelSpec(tag="trunk", source=source, name=name, depth=args.depth, dtype=args.dtype)
    texts = [f"Passage {i}: bridges, canals and the engineers who built them, told at some length. " * 3 for i in range(args.texts)]
    lm = load_model(spec, num_blocks="to_layer" if args.variant == "ar" else None)
    params = sum(p.numel() for p in lm.model.parameters())
    if args.variant == "ar":
        ar = AR.create(lm, ARConfig(batch_size=args.batch_size))
    loaded = rss_mib()
    start = time.perf_counter()
    rows = ar.reconstruct(texts) if args.variant == "ar" else full_trunk_rows(lm, texts, args.batch_size)
    seconds = time.perf_counter() - start
    return {"peak_mib": rss_mib(), "loaded_mib": loaded, "overhead_mib": overhead, "seconds": seconds,
            "trunk_params": params, "layer": lm.layer, "num_layers": lm.num_layers, "rows": rows[:4].tolist()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default="packaged:smollm2-135m-instruct")
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variant", choices=["ar", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("full", "ar"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    import numpy as np

    ar, full = results["ar"], results["full"]
    print(json.dumps({
        "bench": "ar_memory", "spec": args.spec, "dtype": args.dtype, "depth": args.depth,
        "layer": ar["layer"], "num_layers": ar["num_layers"], "texts": args.texts,
        "peak_mib": round(ar["peak_mib"], 1), "full_peak_mib": round(full["peak_mib"], 1),
        "peak_ratio": round(ar["peak_mib"] / full["peak_mib"], 3),
        "peak_ratio_above_overhead": round((ar["peak_mib"] - ar["overhead_mib"]) / (full["peak_mib"] - full["overhead_mib"]), 3),
        "blocks_ratio": round((ar["layer"] + 1) / ar["num_layers"], 3),
        "params_ratio": round(ar["trunk_params"] / full["trunk_params"], 3),
        "overhead_mib": round(full["overhead_mib"], 1),
        "seconds": round(ar["seconds"], 2), "full_seconds": round(full["seconds"], 2),
        "max_abs_diff": float(np.abs(np.array(ar["rows"]) - np.array(full["rows"])).max()),
    }))


if __name__ == "__main__":
    main()
