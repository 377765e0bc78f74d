"""A small local OpenAI-compatible chat-completions server for tests.

`ChatServer(responder)` listens on 127.0.0.1 (a free port) and answers POST /v1/chat/completions by
calling `responder(user_message, n)` (n = 0-based request count) for a `Reply`. The builders below
give the behaviours the teacher client must survive: canned text, 500s, timeouts, malformed JSON,
429 with Retry-After. Every request is counted and its Authorization header recorded in memory
(to check a key is sent) — nothing is written to disk. The server stops on leaving the `with`
block, or by itself after `lifetime_s`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


@dataclass
class Reply:
    status: int = 200
    content: Optional[str] = None  # chat message text (status 200)
    body: Optional[bytes] = None  # raw body instead of a chat completion
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str = "stop"


Responder = Callable[[str, int], Reply]


def completion_body(content: str, finish_reason: str = "stop") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        }
    ).encode()


def echo_summary(message: str) -> str:
    """A deterministic one-sentence 'explanation' naming the passage's first words."""
    passage = message.rsplit("Passage:", 1)[-1].split()
    return f"A passage that opens with {' '.join(passage[:6])}."


def canned(replies: Optional[dict[str, str]] = None, default: Callable[[str], str] = echo_summary) -> Responder:
    """Reply with replies[k] for the first key k found in the message, else default(message)."""
    replies = replies or {}

    def respond(message: str, n: int) -> Reply:
        for needle, text in replies.items():
            if needle in message:
                return Reply(content=text)
        return Reply(content=default(message))

    return respond


def fail_first(k: int, then: Responder, status: int = 500, headers: Optional[dict] = None) -> Responder:
    """HTTP `status` for the first k requests, then `then`."""
    return lambda message, n: Reply(status=status, body=b'{"error": "busy"}', headers=headers or {}) if n < k else then(message, n)


def fail_after(k: int, then: Responder, status: int = 500) -> Responder:
    """`then` for the first k requests, HTTP `status` for every later one."""
    return lambda message, n: then(message, n) if n < k else Reply(status=status, body=b'{"error": "down"}')


def always(status: int) -> Responder:
    return lambda message, n: Reply(status=status, body=b'{"error": "always failing"}')


def slow(delay_s: float, then: Responder) -> Responder:
    def respond(message: str, n: int) -> Reply:
        reply = then(message, n)
        reply.delay_s = delay_s
        return reply

    return respond


def malformed() -> Responder:
    return lambda message, n: Reply(body=b'{"choices": [ this is not json')


def rate_limited(k: int, retry_after_s: float, then: Responder) -> Responder:
    return fail_first(k, then, status=429, headers={"Retry-After": f"{retry_after_s:g}"})


class ChatServer:
    def __init__(self, responder: Responder, lifetime_s: float = 120.0):
        self.responder = responder
        self.lifetime_s = lifetime_s
        self.requests = 0
        self.messages: list[str] = []
        self.authorizations: list[Optional[str]] = []
        self.times: list[float] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._timer = threading.Timer(lifetime_s, self._server.shutdown)
        self._timer.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path != "/v1/chat/completions":
                    self._send(Reply(status=404, body=b'{"error": "not found"}'))
                    return
                message = json.loads(raw)["messages"][-1]["content"]
                with server._lock:
                    n = server.requests
                    server.requests += 1
                    server.messages.append(message)
                    server.authorizations.append(self.headers.get("Authorization"))
                    server.times.append(time.monotonic())
                self._send(server.responder(message, n))

            def _send(self, reply: Reply) -> None:
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                body = reply.body if reply.body is not None else completion_body(reply.content or "", reply.finish_reason)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        return Handler

    def __enter__(self) -> "ChatServer":
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
