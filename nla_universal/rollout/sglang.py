"""The SGLang engine: `POST /generate` with `input_embeds` (rollout-engines.md §2,
rl-stack-2026-12.md §2.3; read from SGLang 0.5.23's source, run only on a GPU machine).

Wire format: `input_embeds` is plain JSON floats, `[T][d]` for one prompt and `[B][T][d]` for a
batch (a JSON list of replies comes back, in order). SGLang tells the two apart by the type of
`input_embeds[0][0]`: an integer 0 in the first cell would turn one prompt into a malformed batch,
so rows always go out as `tensor.float().tolist()`. `text` and `input_ids` are never sent beside the
embeddings (SGLang would silently drop the embeddings). The server must run with
`--disable-radix-cache`; otherwise it refuses embeddings, and `generate` says so and names the flag.

`sampling_params` carries only keys of SGLang's schema: since 0.5.23 the `/generate` contract gate
answers 400 to any key it does not know (`SAMPLING_KEYS` below; re-check on each SGLang bump).
`return_logprob: true` gives `meta_info.output_token_logprobs` as `[logprob, token_id, text|null]`
triples, one per generated token; ids and log-probs are taken from the triples together and checked
against `output_ids`. Adapters: `/load_lora_adapter` at run time, `lora_path` (the adapter's name)
per prompt; the base model is a request without `lora_path` (whether SGLang's GPU LoRA kernels mix
base and adapter rows correctly is checked by tools/gpu/sglang_check.py, not here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import opt
from .base import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams
from .servers import BASE, LocalServer, ServerEngine, ServerRefused

# The keys of sglang.api.v1.SamplingParams (0.5.23) that this client may send.
SAMPLING_KEYS = frozenset({"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "sampling_seed", "stop",
                           "stop_token_ids", "ignore_eos", "skip_special_tokens"})
RADIX_FIX = ("restart the SGLang server with --disable-radix-cache (under Miles: --sglang-disable-radix-cache); "
             "SGLang serves input_embeds only with the radix cache off")


@dataclass
class SGLangServerConfig:
    """A local SGLang server (GPU machines: SGLang does not install on CPU-only machines)."""

    python: str = opt("python", "interpreter of the environment SGLang is installed in")
    dtype: str = opt("bfloat16", "weights and compute dtype")
    context_length: int = opt(1024, "prompt + completion tokens at most")
    mem_fraction_static: float = opt(0.5, "share of GPU memory for weights and KV cache")
    enable_lora: bool = opt(False, "serve LoRA adapters loaded at run time")
    lora_target_modules: list[str] = opt(help="the adapters' target modules (with LoRA)", factory=list)
    max_lora_rank: int = opt(16, "largest adapter rank")
    ready_timeout_s: float = opt(600.0, "seconds to wait for the server to answer /health")
    extra_args: list[str] = opt(help="more command-line arguments, as a list", factory=list)

    def command(self, model_path: str | Path):
        """argv builder for LocalServer.start: (host, port) -> the server's command line."""
        def argv(host: str, port: int) -> list[str]:
            args = [self.python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host,
                    "--port", str(port), "--dtype", self.dtype, "--context-length", str(self.context_length),
                    "--mem-fraction-static", str(self.mem_fraction_static), "--disable-radix-cache"]
            if self.enable_lora:
                args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                         "--lora-target-modules", *self.lora_target_modules]
            return args + list(self.extra_args)
        return argv


def start_sglang(model_path: str | Path, cfg: SGLangServerConfig, log_dir: str | Path,
                 env: dict[str, str] | None = None, wait: bool = True) -> LocalServer:
    """An SGLang server on `model_path` serving embeddings (radix cache off); ready unless `wait=False`."""
    return LocalServer.start(cfg.command(model_path), engine="sglang", model=str(model_path), log_dir=log_dir,
                             env={"HF_HUB_OFFLINE": "1", **(env or {})}, ready_paths=("/health",),
                             ready_timeout_s=cfg.ready_timeout_s, wait=wait,
                             install_hint="SGLang runs on GPU machines: pip install sglang==0.5.23 (tools/gpu/sglang_check.py)")


def sampling_params(sampling: SamplingParams) -> dict:
    """Our sampling settings in SGLang's keys (temperature 0 is SGLang's greedy)."""
    params: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens}
    if sampling.greedy:
        params["temperature"] = 0.0
    else:
        params.update(temperature=sampling.temperature, top_p=sampling.top_p)
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    assert params.keys() <= SAMPLING_KEYS, sorted(params.keys() - SAMPLING_KEYS)
    return params


def parse_generate(body: Any, n: int) -> list[Completion]:
    """`n` completions from a `/generate` reply (a dict for one prompt, a list for a batch); ValueError otherwise."""
    items = [body] if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise ValueError("the reply is neither a response object nor a list of them")
    if len(items) != n:
        raise ValueError(f"{len(items)} completions for {n} prompts")
    return [_completion(item, i) for i, item in enumerate(items)]


def _completion(item: Any, i: int) -> Completion:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"item {i}: no meta_info")
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in (FINISH_STOP, FINISH_LENGTH):
        detail = finish.get("message") if isinstance(finish, dict) else None
        raise ValueError(f"item {i}: finish_reason {kind!r}" + (f": {detail}" if detail else ""))
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list) or not triples:
        raise ValueError(f"item {i}: no output_token_logprobs (was return_logprob dropped?)")
    ids = [int(t[1]) for t in triples]
    if item.get("output_ids") is not None and list(item["output_ids"]) != ids:
        raise ValueError(f"item {i}: {len(item['output_ids'])} output_ids but {len(ids)} logprob triples, or other ids")
    return Completion(token_ids=ids, text=item.get("text", ""), logprobs=[float(t[0]) for t in triples],
                      finish_reason=kind)


class SGLangRolloutEngine(ServerEngine):
    """Generates through an SGLang server from prompt embeddings; see the module docstring."""

    engine = "sglang"
    start_hint = "python -m sglang.launch_server --model-path MODEL --disable-radix-cache (a GPU machine)"

    def _generate_chunk(self, prompts, sampling: SamplingParams, adapter: str, budget) -> list[Completion]:
        single = len(prompts) == 1
        rows = [p.detach().float().cpu().tolist() for p in prompts]  # floats in every cell: see the module docstring
        payload: dict[str, Any] = {"input_embeds": rows[0] if single else rows,
                                   "sampling_params": sampling_params(sampling), "return_logprob": True}
        if adapter != BASE:
            payload["lora_path"] = adapter if single else [adapter] * len(prompts)
        try:
            return self._post("/generate", payload, parse=lambda body: parse_generate(body, len(prompts)),
                              hint="send only SGLang's sampling keys (nla_universal.rollout.sglang.SAMPLING_KEYS "
                                   "may be out of date for this SGLang), prompts of the model's hidden size, and "
                                   "adapters loaded before", budget=budget)
        except ServerRefused as exc:
            if "disable_radix_cache" in exc.problem or "disable-radix-cache" in exc.problem:
                raise ServerRefused(exc.problem, RADIX_FIX, exc.url) from None
            raise

    def _load(self, name: str, folder: str) -> None:
        self._lora_call("/load_lora_adapter", {"lora_name": name, "lora_path": folder})

    def _unload(self, name: str) -> None:
        self._lora_call("/unload_lora_adapter", {"lora_name": name})

    def _lora_call(self, path: str, payload: dict) -> None:
        raw = self._post_once(path, payload, hint="start the server with --enable-lora and --lora-target-modules "
                              "covering the adapter's targets")
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = {"error_message": raw[:200].decode("utf-8", "replace")}
        if not (isinstance(reply, dict) and reply.get("success")):
            detail = reply.get("error_message") if isinstance(reply, dict) else reply
            raise ServerRefused(f"{self.where} did not do {path}: {detail}",
                                "check the adapter folder and the server's LoRA settings", self.redacted)
