"""Truncated-config load vs full load, both stopping after block K (what extraction does).

Each variant runs in its own subprocess so that peak RSS is that variant's alone. Prints one JSON
line: per variant the load time (cold: first load in the process; warm: a second one), the median
forward time on a fixed batch, RSS after loading and at peak (both above the post-import baseline),
the ratios truncated / full, and the largest difference between the two variants' block-K outputs.
Times come as wall seconds and as CPU seconds of the process; on a shared machine the CPU seconds
are the steadier of the two.

Safetensors are memory-mapped: weights that are never read never become resident, so in float32
a full load that stops after block K costs little more RSS than a truncated one. A dtype
conversion (--dtype bfloat16) or a copy to a GPU touches every weight; there truncation pays.

    python tools/bench/truncation.py [--model smollm2-135m-instruct] [--dtype float32] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def child(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    from nla_universal.config import ModelSpec
    from nla_universal.models import decoder_layers, forward_to_layer, load_model

    torch.manual_seed(0)
    spec = ModelSpec(tag="bench", source="packaged", name=args.model, depth=0.5, dtype=args.dtype)
    num_blocks = "to_layer" if args.variant == "truncated" else None
    baseline = _rss_mb()
    loads, load_cpu = [], []
    for _ in range(2):
        start, start_cpu = time.perf_counter(), time.process_time()
        lm = load_model(spec, cache_dir=args.cache_dir, num_blocks=num_blocks)
        loads.append(time.perf_counter() - start)
        load_cpu.append(time.process_time() - start_cpu)
        if len(loads) == 1:
            del lm
            gc.collect()
    rss_after_load = _rss_mb() - baseline
    special = set(lm.tokenizer.all_special_ids)
    vocab = [i for i in range(lm.model.get_input_embeddings().num_embeddings) if i not in special]
    ids = torch.tensor(vocab)[torch.randint(len(vocab), (args.batch, args.seq), generator=torch.Generator().manual_seed(0))]
    mask = torch.ones_like(ids)
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first run warms up kernels and pages
            start, start_cpu = time.perf_counter(), time.process_time()
            out = forward_to_layer(lm.model, ids, mask, lm.layer)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    save_file({"h": out.contiguous()}, args.out)
    print(json.dumps({
        "blocks_loaded": len(decoder_layers(lm.model)),
        "num_layers": lm.num_layers,
        "layer": lm.layer,
        "load_cold_s": round(loads[0], 3),
        "load_s": round(loads[1], 3),
        "load_cpu_s": round(load_cpu[1], 3),
        "forward_s": round(_median(times[1:]), 3),
        "forward_cpu_s": round(_median(cpu[1:]), 3),
        "rss_after_load_over_baseline_mb": round(rss_after_load, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_over_baseline_mb": round(_peak_rss_mb() - baseline, 1),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="packaged model name")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards (median reported)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--variant", choices=["full", "truncated"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return

    from nla_universal.config import ModelSpec
    from nla_universal.models import model_folder
    from safetensors.torch import load_file

    # Convert once here, so neither measured process pays for (or peaks with) the GGUF conversion.
    model_folder(ModelSpec(tag="bench", source="packaged", name=args.model), args.cache_dir)
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in ("full", "truncated"):
            out = str(Path(scratch) / f"{variant}.safetensors")
            cmd = [sys.executable, __file__, "--variant", variant, "--out", out, "--model", args.model,
                   "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
            if args.cache_dir:
                cmd += ["--cache-dir", args.cache_dir]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[variant] = load_file(out)["h"]
    full, cut = results["full"], results["truncated"]
    ratio_keys = [k for k in full if k.endswith(("_s", "_mb"))]
    print(json.dumps({
        "model": args.model,
        "dtype": args.dtype,
        "num_layers": full["num_layers"],
        "layer": full["layer"],
        "batch": [args.batch, args.seq],
        "full": full,
        "truncated": cut,
        "ratio_truncated_over_full": {k: round(cut[k] / full[k], 3) for k in ratio_keys},
        "max_abs_diff": float((outputs["full"] - outputs["truncated"]).abs().max()),
    }))


if __name__ == "__main__":
    main()
