"""Rollout servers (vLLM, SGLang): their identity and errors, the client both engines share, and
the lifecycle of a server this process starts or attaches to.

Why one shared client: both servers are reached the same way — prompts split into requests of at
most `prompts_per_request`, at most `concurrency` of them in flight, each with its own deadline and
retries (`nla_universal.http`) — and fail the same ways. A batch is all or nothing: if any request
fails or comes back short, `generate` raises a `ServerError` naming the server and the fix, and no
completion of that batch is returned.

Lifecycle: `LocalServer.start` runs a server as a child process in its own process group, bound to
127.0.0.1 on a free port, logging to a file, and stops it by that group (SIGTERM, then SIGKILL),
never by name. `attach` checks a server someone else runs.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from abc import abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import http
from ..config import opt
from ..errors import NLAError
from .base import Completion, RolloutEngine, SamplingParams, unpad_prompts

BASE = "base"  # the adapter name that means "the base model, no LoRA"


class ServerError(NLAError):
    """A rollout server that cannot serve a batch; `url` is redacted."""

    def __init__(self, problem: str, fix: str, url: str = ""):
        super().__init__(problem, fix)
        self.url = url


class ServerUnreachable(ServerError):
    """Nothing answers at the URL (not started, wrong URL, or it died)."""


class ServerRefused(ServerError):
    """The server answered 4xx: this request does not fit the server (its message is quoted)."""


class ServerFailed(ServerError):
    """The server failed mid-batch: 5xx, a dropped connection, or a reply that is short or malformed."""


class ServerStartError(ServerError):
    """A local server that exited or did not become ready."""


@dataclass(frozen=True)
class ServerIdentity:
    """What served a result; recorded with results so a run says which server produced its samples."""

    engine: str  # "vllm" | "sglang"
    endpoint: str  # http.endpoint_id(url): scheme://host:port/path, no credentials, query or trailing slash
    model: str  # the served model name (vLLM) or model path (SGLang)

    def to_dict(self) -> dict:
        return asdict(self)


def server_message(exc: http.HTTPError) -> str:
    """The server's own words from an HTTP error: the `message` (or string `error`) of its JSON body."""
    detail = exc.body or exc.problem
    found = re.search(r'"(?:message|error)"\s*:\s*"((?:[^"\\]|\\.)*)', detail)
    if not found:
        return detail
    try:
        return json.loads(f'"{found.group(1)}"')
    except ValueError:
        return found.group(1)


@dataclass
class ClientSettings:
    """How a server engine sends a batch."""

    prompts_per_request: int = opt(32, "prompts sent in one request (one batch = several requests beyond this)")
    concurrency: int = opt(4, "requests of one batch in flight at once")
    deadline_s: float = opt(600.0, "total seconds one request may take (connect + generate + reply)")
    batch_deadline_s: float = opt(0.0, "total seconds one generate call may take, retries and waits included (0 = no limit)")
    retries: int = opt(2, "retries of a request after a transient failure (connection lost, 5xx, malformed reply)")
    backoff_s: float = opt(1.0, "first wait before a retry; doubles each time")
    hidden_size: Optional[int] = opt(None, "the served model's hidden size; prompts of another width are refused before sending")


class ServerEngine(RolloutEngine):
    """A `RolloutEngine` whose model runs in a server; subclasses speak its protocol.

    Adapters: `push_policy(folder)` loads a new policy version under a fresh name and unloads the
    previous one after (name rotation: requests in flight on the old name finish on the old weights).
    `generate(..., adapter=None)` uses the current policy (the base model before any push);
    `adapter=BASE` the base model; any other name that adapter."""

    engine = "server"
    start_hint = "see nla_universal.rollout.servers.LocalServer"

    def __init__(self, url: str, model: str, settings: ClientSettings | None = None, policy_prefix: str | None = None):
        self.url = url.rstrip("/")
        self.settings = settings or ClientSettings()
        self.identity = ServerIdentity(self.engine, http.endpoint_id(url), model)
        self.policy: Optional[str] = None
        self.loaded: dict[str, str] = {}  # adapter name -> folder, loaded through this client
        # a fresh prefix per client: a restarted trainer must not collide with the names its predecessor left loaded
        self._policy_prefix = policy_prefix or f"policy-{uuid.uuid4().hex[:6]}"
        self._versions = 0

    @classmethod
    def for_server(cls, server: "LocalServer", model_folder: str | Path, settings: ClientSettings | None = None,
                   **kw: Any) -> "ServerEngine":
        """A client of a server this process started (waits until it is ready), checking widths against the
        model's hidden size."""
        server.wait_ready()
        settings = settings or ClientSettings()
        if settings.hidden_size is None:
            settings.hidden_size = hidden_size_of(model_folder)
        return cls(server.url, server.identity.model, settings, **kw)

    # ------------------------------------------------------------------ protocol (subclasses)

    @abstractmethod
    def _generate_chunk(self, prompts: list[torch.Tensor], sampling: SamplingParams, adapter: str,
                        budget: http.Budget) -> list[Completion]:
        """One request for `prompts` (through `_post`); exactly one completion per prompt, in order, or an error."""

    @abstractmethod
    def _load(self, name: str, folder: str) -> None: ...

    @abstractmethod
    def _unload(self, name: str) -> None: ...

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_embeds: Sequence[torch.Tensor] | torch.Tensor, sampling: SamplingParams,
                 attention_mask: torch.Tensor | None = None, *, adapter: str | None = None) -> list[Completion]:
        prompts = unpad_prompts(prompt_embeds, attention_mask)
        self._check_width(prompts)
        name = adapter or self.policy or BASE
        step = self.settings.prompts_per_request
        chunks = [prompts[i:i + step] for i in range(0, len(prompts), step)]
        budget = http.Budget(self.settings.batch_deadline_s, "batch_deadline_s")
        results = http.map_bounded(lambda chunk: self._generate_chunk(chunk, sampling, name, budget), chunks,
                                   self.settings.concurrency)
        return [c for chunk in results for c in chunk]

    def _check_width(self, prompts: list[torch.Tensor]) -> None:
        expected = self.settings.hidden_size
        wrong = [i for i, p in enumerate(prompts) if expected is not None and p.shape[1] != expected]
        if wrong:
            raise ServerRefused(
                f"{self.where}: prompt {wrong[0]} has rows of width {prompts[wrong[0]].shape[1]}, but the served model's "
                f"hidden size is {expected} (nothing was sent)",
                "build the prompt embeddings with the embedding table of the model the server runs (the AV trunk)",
                self.redacted,
            )

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load a peft adapter folder under `name` (the folder must be readable by the server)."""
        self._load(name, str(Path(folder).resolve()))
        self.loaded[name] = str(folder)

    def unload_adapter(self, name: str) -> None:
        self._unload(name)
        self.loaded.pop(name, None)
        if self.policy == name:
            self.policy = None

    def push_policy(self, folder: str | Path) -> str:
        """Serve the adapter in `folder` as the policy from now on; returns its name."""
        self._versions += 1
        name, previous = f"{self._policy_prefix}-{self._versions}", self.policy
        self.load_adapter(name, folder)
        self.policy = name
        if previous is not None:
            self.unload_adapter(previous)
        return name

    # ------------------------------------------------------------------ HTTP

    @property
    def redacted(self) -> str:
        return http.redact_url(self.url)

    @property
    def where(self) -> str:
        return f"the {self.engine} server at {self.redacted}"

    def _post(self, path: str, payload: Any, parse: Callable[[Any], Any] | None = None, hint: str = "",
              budget: http.Budget | None = None) -> Any:
        """POST JSON for a JSON reply, with the settings' deadline and retries; every failure becomes a ServerError."""
        s = self.settings
        try:
            return http.post_json(http.join_url(self.url, path), payload, deadline_s=s.deadline_s, retries=s.retries,
                                  backoff_s=s.backoff_s, budget=budget, parse=parse)
        except http.HTTPError as exc:
            raise self._translate(exc, path, hint, s.retries) from None

    def _post_once(self, path: str, payload: Any, hint: str = "") -> bytes:
        """POST JSON once (for calls that must not be repeated, e.g. loading an adapter); the raw reply."""
        try:
            return http.request("POST", http.join_url(self.url, path), body=json.dumps(payload).encode(),
                                headers={"Content-Type": "application/json"}, deadline_s=self.settings.deadline_s).body
        except http.HTTPError as exc:
            raise self._translate(exc, path, hint, retries=0) from None

    def _translate(self, exc: http.HTTPError, path: str, hint: str, retries: int) -> ServerError:
        if isinstance(exc, http.BudgetSpent):
            return ServerFailed(f"{self.where}: {exc.problem}", exc.fix or "raise batch_deadline_s", self.redacted)
        if exc.phase == "connect":
            return ServerUnreachable(
                f"{self.where} does not answer ({exc.problem})",
                f"start the server, or fix the URL; {self.start_hint}", self.redacted)
        if isinstance(exc, http.StatusError) and exc.status is not None and exc.status < 500:
            return ServerRefused(f"{self.where} refused {path} (HTTP {exc.status}): {server_message(exc)}",
                                 hint or "fix the request or the server's settings named in the message", self.redacted)
        if exc.phase == "reply":
            return ServerFailed(f"{self.where} sent an unusable reply to {path}: {exc.problem}",
                                "check the server's log; no completion of this batch was used", self.redacted)
        return ServerFailed(f"{self.where} failed on {path} after {retries} retries: {exc.problem}",
                            "check the server's log (it may have died: restart it and redo the batch; "
                            "those samples are not the policy's fault)", self.redacted)


# ---------------------------------------------------------------------- lifecycle


def hidden_size_of(model_folder: str | Path) -> int:
    """The hidden size in a Hugging Face model folder's config.json (multimodal configs: the text model's)."""
    config = json.loads((Path(model_folder) / "config.json").read_text())
    return int(config.get("hidden_size") or config["text_config"]["hidden_size"])


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another process could still take it before the server does)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def probe(url: str, paths: Sequence[str], deadline_s: float = 5.0) -> Optional[str]:
    """None if one of `paths` answers 2xx, else the last failure in words."""
    reason = "no path probed"
    for path in paths:
        try:
            http.request("GET", http.join_url(url, path), deadline_s=deadline_s)
            return None
        except http.HTTPError as exc:
            reason = exc.problem
    return reason


def attach(url: str, engine: str, model: str, paths: Sequence[str] = ("/health", "/v1/models")) -> ServerIdentity:
    """The identity of a running server, after checking that it answers."""
    reason = probe(url, paths)
    if reason is not None:
        raise ServerUnreachable(
            f"no {engine} server answers at {http.redact_url(url)}: {reason}",
            f"start it (or wait until it has loaded the model), or fix the URL; probed {', '.join(paths)}",
            http.redact_url(url))
    return ServerIdentity(engine, http.endpoint_id(url), model)


class LocalServer:
    """A server this process started; `with LocalServer.start(...) as server:` stops it at the end."""

    HOST = "127.0.0.1"  # never another interface: these servers have no authentication

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, identity: ServerIdentity, argv: list[str],
                 ready_paths: Sequence[str], ready_timeout_s: float, install_hint: str):
        self.process, self.url, self.log_path, self.identity = process, url, log_path, identity
        self._argv, self._ready_paths, self._ready_timeout_s = argv, tuple(ready_paths), ready_timeout_s
        self._install_hint = install_hint
        self._launched = time.monotonic()
        self.started_s: Optional[float] = None  # seconds from launch to ready, once ready
        atexit.register(self.stop)

    @classmethod
    def start(cls, command: Callable[[str, int], list[str]], *, engine: str, model: str, log_dir: str | Path,
              env: dict[str, str] | None = None, ready_paths: Sequence[str] = ("/health",),
              ready_timeout_s: float = 600.0, wait: bool = True, install_hint: str = "") -> "LocalServer":
        """Run `command(host, port)`; with `wait`, return once one of `ready_paths` answers 2xx (else call
        `wait_ready()` before use: the caller may do other work while the server loads). `install_hint`
        tells, in a start error, how to install the server."""
        port = free_port(cls.HOST)
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{engine}-{port}.log"
        argv = command(cls.HOST, port)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {})}, start_new_session=True)
        url = f"http://{cls.HOST}:{port}"
        server = cls(process, url, log_path, ServerIdentity(engine, http.endpoint_id(url), model), argv, ready_paths,
                     ready_timeout_s, install_hint)
        if wait:
            server.wait_ready()
        return server

    def wait_ready(self) -> "LocalServer":
        """Block until the server answers; a server that exits or stays silent is stopped and reported."""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        if self.started_s is not None:
            return
        end = self._launched + self._ready_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"the {self.identity.engine} server exited with code {code} while starting "
                    f"(`{' '.join(self._argv[:4])} …`); last lines of {self.log_path}:\n{self.log_tail()}",
                    "read the log above" + (f"; {self._install_hint}" if self._install_hint else ""), self.url)
            if probe(self.url, self._ready_paths, deadline_s=5.0) is None:
                self.started_s = time.monotonic() - self._launched
                return
            if time.monotonic() > end:
                raise ServerStartError(
                    f"the {self.identity.engine} server at {self.url} was not ready after {self._ready_timeout_s:g}s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}",
                    "raise ready_timeout_s on a busy machine, or read the log", self.url)
            time.sleep(1.0)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's own process group, SIGKILL after `grace_s`; idempotent."""
        atexit.unregister(self.stop)
        group = self.process.pid  # start_new_session made the server the leader of its own group
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait_s
            while time.monotonic() < end and _group_alive(group, self.process):
                time.sleep(0.2)
            if not _group_alive(group, self.process):
                break

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _group_alive(group: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the leader so it does not linger as a zombie member of the group
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
