"""A STAND-IN for an SGLang server (SGLang cannot be installed on a CPU machine): its `/generate`
protocol for prompt embeddings, as SGLang 0.5.23 defines it, served by our in-process HF engine.

What it reproduces (rollout-engines.md §2, rl-stack-2026-12.md §2.3): `input_embeds` is one prompt
when `input_embeds[0][0]` is a float, else a batch (a JSON list of responses comes back); unknown
`sampling_params` keys are refused with a 400 in the schema's words; embeddings are refused with
SGLang's own message while the radix cache is on; `return_logprob` gives `[logprob, id, null]`
triples; `finish_reason` is `{"type": "stop"|"length", ...}`; `/load_lora_adapter` loads a peft
folder, `lora_path` selects it per item, `/unload_lora_adapter`; `/health`. What it invents (real SGLang's behaviour is
not known for these): a wrong hidden size and `text`/`input_ids` beside embeddings are 400s, and
`fault` makes it misbehave on purpose (drop a completion, answer 500, die mid-batch). Loopback only.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from peft import PeftModel

from nla_universal.rollout import FINISH_STOP, HFRolloutEngine, SamplingParams

SAMPLING_KEYS = (  # sglang.api.v1.SamplingParams, "unknown keys rejected"
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
)
RADIX_MESSAGE = (  # tokenizer_manager.py, verbatim
    "input_embeds is provided while disable_radix_cache is False. Please add `--disable-radix-cache` "
    "when you launch the server if you want to use input_embeds as inputs."
)


class Refusal(Exception):
    def __init__(self, status: int, body: dict):
        self.status, self.body = status, body


class SGLangStandIn:
    """`with SGLangStandIn(model, tokenizer) as s:` serves on `s.url` until the block ends."""

    def __init__(self, model, tokenizer, radix_cache: bool = False):
        self.model, self.tokenizer, self.radix_cache = model, tokenizer, radix_cache
        self.hidden_size = int(model.get_input_embeddings().weight.shape[1])
        self.fault: str | None = None  # "drop_one" | "http500" | "die", once `fault_after` requests were served
        self.fault_after = 0
        self.requests: list[dict] = []  # every /generate body, for tests to inspect
        self.adapters: set[str] = set()
        self.sampling_keys = SAMPLING_KEYS  # a test may narrow it to play an older SGLang
        self._lock = threading.Lock()  # one generate at a time: the active adapter is global state
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "SGLangStandIn":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def generate(self, body: dict):
        params = body.get("sampling_params") or {}
        for key in params:
            if key not in self.sampling_keys:
                listed = ", ".join(f"`{k}`" for k in self.sampling_keys)
                raise Refusal(400, {"error": f"unknown field `{key}`, expected one of {listed}"})
        embeds = body.get("input_embeds")
        if embeds is None or "text" in body or "input_ids" in body:
            raise Refusal(400, {"error": {"message": "stand-in: send input_embeds alone (SGLang drops them silently)"}})
        if self.radix_cache:
            raise Refusal(400, {"error": {"message": RADIX_MESSAGE}})
        single = isinstance(embeds[0][0], float)
        prompts = [torch.tensor(p, dtype=torch.float32) for p in ([embeds] if single else embeds)]
        if any(p.dim() != 2 or p.shape[1] != self.hidden_size for p in prompts):
            raise Refusal(400, {"error": {"message": f"stand-in: input_embeds rows must have {self.hidden_size} values"}})
        loras = body.get("lora_path")
        loras = [loras] * len(prompts) if loras is None or isinstance(loras, str) else loras
        temperature = params.get("temperature", 1.0)
        sampling = SamplingParams(
            max_new_tokens=params.get("max_new_tokens", 128), greedy=temperature == 0,
            temperature=temperature or 1.0, top_p=params.get("top_p", 1.0), seed=params.get("sampling_seed"),
            return_logprobs=True,
        )
        out = [self._respond(p, c, sampling, i) for i, (p, c) in enumerate(zip(prompts, self._run(prompts, loras, sampling)))]
        if self._faulty("drop_one"):
            out = out[:-1]
        return out[0] if single else out

    def _faulty(self, kind: str) -> bool:
        return self.fault == kind and len(self.requests) > self.fault_after

    def _run(self, prompts, loras, sampling):
        """Completions in order, one HF generate per adapter group (no `lora_path`: the base model)."""
        done = {}
        with self._lock:
            for name in dict.fromkeys(loras):
                idx = [i for i, n in enumerate(loras) if n == name]
                if name is not None and name not in self.adapters:
                    raise Refusal(400, {"error": {"message": f"stand-in: LoRA adapter {name!r} is not loaded"}})
                if name is not None:
                    self.model.set_adapter(name)
                base = name is None and isinstance(self.model, PeftModel)
                with self.model.disable_adapter() if base else contextlib.nullcontext():
                    done.update(zip(idx, HFRolloutEngine(self.model, self.tokenizer).generate([prompts[i] for i in idx], sampling)))
        return [done[i] for i in range(len(prompts))]

    def _respond(self, prompt, c, sampling, i):
        finish = ({"type": "stop", "matched": c.token_ids[-1]} if c.finish_reason == FINISH_STOP
                  else {"type": "length", "length": sampling.max_new_tokens})
        return {"text": c.text, "output_ids": c.token_ids, "meta_info": {
            "id": f"standin-{len(self.requests)}-{i}", "finish_reason": finish, "prompt_tokens": prompt.shape[0],
            "completion_tokens": len(c.token_ids), "cached_tokens": 0, "weight_version": "default",
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)],
        }}

    def load_lora(self, body: dict) -> dict:
        name, path = body["lora_name"], body["lora_path"]
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.adapters.add(name)
        return {"success": True, "error_message": None, "loaded_adapters": {n: n for n in self.adapters}}

    def unload_lora(self, body: dict) -> dict:
        with self._lock:
            self.adapters.discard(body["lora_name"])
            self.model.delete_adapter(body["lora_name"])
        return {"success": True, "error_message": None, "loaded_adapters": {n: n for n in self.adapters}}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/generate":
                    standin.requests.append(body)
                if standin._faulty("die"):  # the process went away mid-batch: no reply, no more listening
                    self.close_connection = True
                    threading.Thread(target=standin.__exit__, daemon=True).start()
                    return
                if standin._faulty("http500"):
                    return self._send(500, {"error": {"message": "stand-in: internal error"}})
                routes = {"/generate": standin.generate, "/load_lora_adapter": standin.load_lora,
                          "/unload_lora_adapter": standin.unload_lora}
                if self.path not in routes:
                    return self._send(404, {"detail": "Not Found"})
                try:
                    self._send(200, routes[self.path](body))
                except Refusal as r:
                    self._send(r.status, r.body)

        return Handler
