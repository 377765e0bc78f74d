"""A small local OpenAI-compatible chat-completions server for tests.

`ChatServer(responder)` listens on 127.0.0.1 (a free port, or `port` to stand in for an earlier
server: the teacher's identity includes the port) and answers POST /v1/chat/completions by
calling `responder(user_message, n)` (n = 0-based request count) for a `Reply`. The builders below
give the behaviours the teacher client must survive: canned text, 500s, timeouts, malformed JSON,
429 with Retry-After. Every request is counted and its Authorization header recorded in memory
(to check a key is sent) — nothing is written to disk. The server stops on leaving the `with`
block, or by itself after `lifetime_s`.

`RawServer(script)` speaks raw TCP for the HTTP client's deadline tests: bodies and headers dripped
one byte a second, a server that never answers, one that never accepts, and an echo of the request.
"""

from __future__ import annotations

import json
import socket
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
    def __init__(self, responder: Responder, lifetime_s: float = 120.0, port: int = 0):
        self.responder = responder
        self.lifetime_s = lifetime_s
        self.requests = 0
        self.messages: list[str] = []
        self.authorizations: list[Optional[str]] = []
        self.times: list[float] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._timer = threading.Timer(lifetime_s, self._server.shutdown)
        self._timer.daemon = True

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

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


Script = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A loopback TCP server handing each connection to `script(conn, stop)` on its own thread, for
    replies an HTTP server library would not send: a body or headers dripped a byte at a time,
    silence. `accept=False` never accepts, and fills the listen queue so that connecting hangs."""

    def __init__(self, script: Optional[Script] = None, accept: bool = True):
        self.script = script
        self.stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=0 if not accept else 16)
        self.port = self._sock.getsockname()[1]
        self._filler: list[socket.socket] = []
        if not accept:  # Linux queues one connection for backlog 0, then drops the handshakes
            self._filler.append(socket.create_connection(self._sock.getsockname(), timeout=1))
        else:
            threading.Thread(target=self._accept, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed by __exit__
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.script(conn, self.stop)
        except OSError:  # the client hung up: what the deadline tests expect
            pass

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._sock.close()
        for s in self._filler:
            s.close()


def read_request(conn: socket.socket) -> bytes:
    """The request's head and body (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def drip(head: bytes, piece: bytes, interval_s: float = 1.0) -> Script:
    """Send `head` after the request, then `piece` every `interval_s`, forever."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn)
        conn.sendall(head)
        while not stop.wait(interval_s):
            conn.sendall(piece)

    return script


def drip_body(chunked: bool = False, interval_s: float = 1.0) -> Script:
    """A 200 whose body comes one byte per interval and never ends (Content-Length or chunked)."""
    if chunked:
        return drip(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n", interval_s)
    return drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x", interval_s)


def drip_headers(interval_s: float = 1.0) -> Script:
    """A status line, then one header byte per interval: the headers never end."""
    return drip(b"HTTP/1.1 200 OK\r\n", b"X", interval_s)


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Read the request, answer nothing, wait for the client to hang up."""
    read_request(conn)
    while not stop.is_set() and conn.recv(1024):
        pass


def echo(status: int = 200) -> Script:
    """Answer `status` with a JSON body holding the request's head (request line, headers) and body."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        head, _, body = read_request(conn).partition(b"\r\n\r\n")
        reply = json.dumps({"head": head.decode("latin-1"), "body": body.decode("latin-1")}).encode()
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(reply), reply))

    return script

