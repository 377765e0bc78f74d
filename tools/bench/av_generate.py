"""AV generation speed: batched (the in-process engine's left-padded batches) vs a smaller batch (default:
one prompt at a time).

Same AV (the real SmolLM2 trunk + a fresh LoRA, bf16 by default), same injected prompts, same greedy
decoding and max_new_tokens; each side is warmed up once. Prints one JSON line.

    python tools/bench/av_generate.py [--prompts 16] [--batch-size 8] [--baseline-batch-size 1] [--max-new-tokens 32]
                                      [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed_generate(av, vectors, tags, sampling, batch_size: int) -> tuple[float, list]:
    av.engine.batch_size = batch_size
    av.generate(vectors[:batch_size], tags[:batch_size], sampling)  # warm-up
    start = time.perf_counter()
    completions = av.generate(vectors, tags, sampling)
    return time.perf_counter() - start, completions


def n_tokens(completions) -> int:
    return sum(len(c.token_ids) for c in completions)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default="packaged:smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--baseline-batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from nla_universal.config import ModelSpec
    from nla_universal.models import load_model
    from nla_universal.nla import AV, AVConfig
    from nla_universal.rollout import SamplingParams

    source, name = args.spec.split(":", 1)
    trunk = load_model(ModelSpec(tag="trunk", source=source, name=name, depth=0.5, dtype=args.dtype))
    torch.manual_seed(0)
    av = AV.create(trunk, AVConfig(), canonical_tag="trunk")
    pool = ["trunk", "gpt2-medium", "qwen3-1p7b", "gemma3-270m", "llama-3p2-1b"]  # tags of different token lengths
    tags = [pool[i % len(pool)] for i in range(args.prompts)]
    vectors = torch.randn(args.prompts, trunk.d_model)
    sampling = SamplingParams(greedy=True, max_new_tokens=args.max_new_tokens)

    base_s, base = timed_generate(av, vectors, tags, sampling, args.baseline_batch_size)
    batched_s, batched = timed_generate(av, vectors, tags, sampling, args.batch_size)
    print(json.dumps({
        "bench": "av_generate", "spec": args.spec, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prompts": args.prompts, "batch_size": args.batch_size, "baseline_batch_size": args.baseline_batch_size,
        "max_new_tokens": args.max_new_tokens,
        "explanations_per_s": round(args.prompts / batched_s, 3),
        "baseline_explanations_per_s": round(args.prompts / base_s, 3),
        "tokens_per_s": round(n_tokens(batched) / batched_s, 1), "baseline_tokens_per_s": round(n_tokens(base) / base_s, 1),
        "speedup": round(base_s / batched_s, 3),
        # bf16 is not batch-invariant, so greedy texts may drift after the first tokens (rollout-engines.md §1.8)
        "same_completions": sum(a.token_ids == b.token_ids for a, b in zip(base, batched)),
    }))


if __name__ == "__main__":
    main()
