"""Blocking HTTP calls to external services (teacher, vLLM, SGLang) that end by a real deadline.

Why not urllib: its `timeout` bounds each socket operation, not the call, so an endpoint sending one
byte a second held a request open far past the timeout, and one that never stops held it forever.
Here a call has ONE deadline, and every step — name lookup and connect (TLS and proxy tunnel
included), sending, each read of the headers and of the body (Content-Length, chunked or
read-to-close) — waits at most the time left until it. Retries and the waits between them count
against an optional `Budget` shared by a whole stage. Standard library only.

Secrets: a URL may carry a key (`https://user:KEY@host/v1`, `?key=KEY`) and so may headers
(Authorization). Every URL this module prints goes through `redact_url`, and every message it
builds is scrubbed of its request's URL and header secrets, even where the server echoes them.
Proxies come from the environment (`https_proxy`, `http_proxy`, `no_proxy`), as with urllib.

Public API (kept small and stable):

    endpoint_id(url) -> str           a service's identity: "scheme://host:port/path" (explicit port,
                                      lower-case, no userinfo/query/fragment/trailing slash)
    redact_url(url) -> str            the URL safe to print (userinfo and query values -> ***)
    join_url(base_url, path) -> str   base_url's path + "/" + path, keeping its query
    Budget(seconds, name="budget")    wall-clock seconds from its creation that calls and retry
                                      waits may use; 0 = no limit; thread-safe; .remaining()
    Response(status, headers, body)   a 2xx reply; headers: lower-case name -> value
    request(method, url, *, body=None, headers=None, deadline_s, budget=None) -> Response
    with_retries(call, *, retries, backoff_s=1.0, budget=None) -> call()'s value
    post_json(url, payload, *, headers=None, deadline_s, retries=0, backoff_s=1.0, budget=None,
              parse=None) -> the decoded JSON, or parse(decoded JSON)
    map_bounded(fn, items, concurrency) -> [fn(item) for item in items], concurrently
    parse_retry_after(value) -> seconds | None

    HTTPError(NLAError)   .url (redacted) .phase .retryable .retry_after .status
      DeadlineExceeded    the call's deadline passed (retryable)
      StatusError         a 4xx/5xx reply (retryable: 408, 425, 429, 5xx; .retry_after from Retry-After)
      BudgetSpent         the Budget ran out (never retryable); names the budget and what was awaited
    phase: "connect" | "send" | "headers" | "body" | "reply" (a whole body of the wrong shape) |
           "retry-wait" (BudgetSpent between attempts)

Other failures are plain HTTPErrors: a connection error (retryable), a 3xx (not followed; names
where it points), a reply over MAX_BODY_BYTES. A URL that is not http(s) raises ConfigError. A
URL's userinfo is sent as Basic auth unless the headers carry an Authorization. `map_bounded`'s
first exception cancels the items not yet started, so its `fn` returns per-item failures instead.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email.utils
import functools
import http.client
import io
import json
import logging
import math
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

from .errors import ConfigError, NLAError

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")

DEFAULT_PORTS = {"http": 80, "https": 443}
# 408/425/429 and every 5xx are transient; other 4xx (bad key, unknown model, bad request) are not.
RETRYABLE_STATUS = frozenset({408, 425, 429})
# A Retry-After larger than this is capped: a run should fail visibly, not hang for hours.
MAX_WAIT_S = 120.0
# A reply larger than this is a misbehaving server, not an answer; it must not fill the memory.
MAX_BODY_BYTES = 256 << 20
_SECRET_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key")
_AWAITED = {"connect": "the connection", "send": "the request to be sent", "headers": "the response headers",
            "body": "the rest of the body"}


class HTTPError(NLAError):
    """A call that failed; `problem` names the method, the redacted URL and what went wrong."""

    def __init__(self, problem: str, *, url: str = "", phase: str = "", retryable: bool = False,
                 retry_after: Optional[float] = None, status: Optional[int] = None, fix: Optional[str] = None,
                 body: str = ""):
        super().__init__(problem, fix)
        self.body = body  # the start of an error reply's body (secrets scrubbed): the server's own words
        self.url = redact_url(url) if url else ""
        self.phase = phase
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status

    def __reduce__(self):  # keyword-only fields survive pickling (Ray ships exceptions between processes)
        return self.__class__, (self.problem,), self.__dict__


class DeadlineExceeded(HTTPError):
    """The call's total deadline passed."""


class StatusError(HTTPError):
    """The server answered with a 4xx or 5xx status."""


class BudgetSpent(HTTPError):
    """The stage's time budget ran out."""


def _split(url: str) -> tuple[urllib.parse.SplitResult, str, int]:
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{redact_url(url)!r} is not a usable http:// or https:// URL",
                          "write it as http://HOST:PORT/path or https://HOST/path")
    return parts, parts.hostname, port or DEFAULT_PORTS[parts.scheme.lower()]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def endpoint_id(url: str) -> str:
    parts, host, port = _split(url)
    return f"{parts.scheme.lower()}://{_bracket(host)}:{port}{parts.path.rstrip('/')}"


def redact_url(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = "***@" + parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{item.partition('=')[0]}=***" if "=" in item else "***" if item else ""
                     for item in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def join_url(base_url: str, path: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + path.lstrip("/")))


def _secrets(url: str, headers: dict) -> list[str]:
    parts = urllib.parse.urlsplit(url)
    found = [parts.username, parts.password, *(v for _, v in urllib.parse.parse_qsl(parts.query))]
    for name, value in headers.items():
        if name.lower() in _SECRET_HEADERS:
            found += [value, value.split()[-1] if value.split() else value]
    return sorted({s for s in found if s and len(s) >= 4}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Budget:
    """Seconds of wall-clock time, from now, that a stage's calls and retry waits may take together."""

    def __init__(self, seconds: float, name: str = "budget"):
        if seconds < 0:
            raise ConfigError(f"{name} is {seconds:g}; it must be 0 (no limit) or a number of seconds", f"set {name}=0")
        self.seconds = seconds
        self.name = name
        self._end = time.monotonic() + seconds if seconds > 0 else math.inf

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def spent(self, what: str, *, url: str, phase: str) -> BudgetSpent:
        return BudgetSpent(f"the time budget {self.name}={self.seconds:g}s is spent: {what}", url=url, phase=phase,
                           fix=f"raise {self.name} (0 = no limit), or find out why the endpoint is slow or failing")


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _Call:
    """One request's deadline, phase and secrets; builds its errors."""

    def __init__(self, method: str, url: str, headers: dict, deadline_s: float, budget: Optional[Budget]):
        self.parts, self.host, self.port = _split(url)
        self.scheme = self.parts.scheme.lower()
        self.method, self.url, self.deadline_s, self.budget = method, redact_url(url), deadline_s, budget
        self.secrets = _secrets(url, headers)
        self.deadline = time.monotonic() + min(deadline_s, budget.remaining() if budget else math.inf)
        self.phase = "connect"

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def error(self, cls: type[HTTPError], text: str, **kw: Any) -> HTTPError:
        return cls(_scrub(f"{self.method} {self.url}: {text}", self.secrets), url=self.url, phase=self.phase, **kw)

    def timed_out(self) -> HTTPError:
        awaited = _AWAITED[self.phase]
        if self.budget is not None and self.budget.remaining() <= 0:
            return self.budget.spent(f"it ran out while waiting for {awaited} of {self.method} {self.url}",
                                     url=self.url, phase=self.phase)
        return self.error(DeadlineExceeded, f"timeout: no complete reply within the {self.deadline_s:g}s deadline "
                          f"(connect + headers + whole body); it passed while waiting for {awaited}", retryable=True)


class _DeadlineSocket:
    """All that http.client sees of the socket: every send and every read waits at most the time left."""

    def __init__(self, sock: socket.socket, call: _Call):
        self.sock, self.call = sock, call

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(self.call.remaining())
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kw: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self.sock.close()


class _DeadlineReader(io.RawIOBase):
    def __init__(self, dsock: _DeadlineSocket):
        self.dsock = dsock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        self.dsock.sock.settimeout(self.dsock.call.remaining())
        return self.dsock.sock.recv_into(buffer)


def _connect(host: str, port: int, call: _Call) -> socket.socket:
    found: list = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    # getaddrinfo has no timeout of its own: a hung resolver is waited for on a thread, up to the deadline.
    resolver = threading.Thread(target=resolve, daemon=True, name="http-resolve")
    resolver.start()
    resolver.join(call.remaining())
    if not found:
        raise TimeoutError
    if isinstance(found[0], OSError):
        raise found[0]
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in found[0]:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(call.remaining())
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
    raise error


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:  # loading the CA store costs milliseconds: once per process
    return ssl.create_default_context()


def _basic(parts: urllib.parse.SplitResult) -> str:
    user = urllib.parse.unquote(parts.username or "") + ":" + urllib.parse.unquote(parts.password or "")
    return "Basic " + base64.b64encode(user.encode()).decode()


def _exchange(call: _Call, body: Optional[bytes], headers: dict) -> Response:
    proxy_url = urllib.request.getproxies().get(call.scheme)
    proxy = None if not proxy_url or urllib.request.proxy_bypass(call.host) else _split(
        proxy_url if "://" in proxy_url else "http://" + proxy_url)
    if proxy:
        call.secrets = sorted(set(call.secrets + _secrets(proxy_url, {})), key=len, reverse=True)
    host_port = _bracket(call.host) + ("" if call.port == DEFAULT_PORTS[call.scheme] else f":{call.port}")
    headers = {"Host": host_port, **headers}
    if call.parts.username is not None and not any(k.lower() == "authorization" for k in headers):
        headers["Authorization"] = _basic(call.parts)
    proxy_auth = {"Proxy-Authorization": _basic(proxy[0])} if proxy and proxy[0].username is not None else {}
    target = urllib.parse.urlunsplit(("", "", call.parts.path or "/", call.parts.query, ""))
    sock = _connect(*(proxy[1:] if proxy else (call.host, call.port)), call)
    try:
        if call.scheme == "https":
            if proxy:
                _tunnel(_DeadlineSocket(sock, call), call, proxy_auth)
            sock.settimeout(call.remaining())
            sock = _tls_context().wrap_socket(sock, server_hostname=call.host)
        elif proxy:
            target = f"http://{host_port}{target}"
            headers.update(proxy_auth)
        dsock = _DeadlineSocket(sock, call)
        conn = http.client.HTTPConnection(call.host, call.port)
        conn.sock = dsock  # type: ignore[assignment]
        call.phase = "send"
        conn.request(call.method, target, body=body, headers=headers)
        call.phase = "headers"
        reply = http.client.HTTPResponse(dsock, method=call.method)  # type: ignore[arg-type]
        reply.begin()
        if reply.status >= 300:
            _raise_status(call, reply)
        call.phase = "body"
        chunks, size = [], 0
        while chunk := reply.read(1 << 16):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise call.error(HTTPError, f"the reply is larger than {MAX_BODY_BYTES >> 20} MiB")
            chunks.append(chunk)
        return Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, b"".join(chunks))
    finally:
        sock.close()


def _tunnel(dsock: _DeadlineSocket, call: _Call, proxy_auth: dict) -> None:
    target = f"{_bracket(call.host)}:{call.port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", *(f"{k}: {v}" for k, v in proxy_auth.items())]
    dsock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    reply = http.client.HTTPResponse(dsock, method="CONNECT")  # type: ignore[arg-type]
    reply.begin()
    if reply.status != 200:
        raise call.error(HTTPError, f"the proxy refused to open a tunnel to {target}: {reply.status} {reply.reason}",
                         retryable=reply.status >= 500, status=reply.status)


def _raise_status(call: _Call, reply: http.client.HTTPResponse) -> None:
    if reply.status < 400:
        where = redact_url(urllib.parse.urljoin(call.url, reply.getheader("Location", "")))
        raise call.error(HTTPError, f"HTTP {reply.status}: redirected to {where}", status=reply.status,
                         fix="use the URL it redirects to")
    try:  # the status is the story: a body that is slow to come must not turn it into a timeout
        body = _scrub(reply.read(2048).decode("utf-8", "replace").strip(), call.secrets)
    except (OSError, http.client.HTTPException):
        body = ""
    raise call.error(StatusError, f"HTTP {reply.status}: {body[:200]}", status=reply.status, body=body,
                     retryable=reply.status in RETRYABLE_STATUS or reply.status >= 500,
                     retry_after=parse_retry_after(reply.getheader("Retry-After")))


def request(method: str, url: str, *, body: Optional[bytes] = None, headers: Optional[dict] = None,
            deadline_s: float, budget: Optional[Budget] = None) -> Response:
    """One call, finished within `deadline_s` (and what is left of `budget`) or an HTTPError.

    A 2xx reply is returned; 3xx, 4xx, 5xx raise. A key in the URL's userinfo is sent as Basic auth
    unless `headers` carry an Authorization."""
    call = _Call(method, url, headers or {}, deadline_s, budget)
    try:
        return _exchange(call, body, dict(headers or {}))
    except HTTPError:
        raise
    except TimeoutError:
        raise call.timed_out() from None
    except (OSError, http.client.HTTPException) as exc:
        raise call.error(HTTPError, f"connection error while waiting for {_AWAITED[call.phase]}: "
                         f"{type(exc).__name__}: {exc}",
                         retryable=not isinstance(exc, ssl.SSLCertVerificationError)) from None


def with_retries(call: Callable[[], T], *, retries: int, backoff_s: float = 1.0, budget: Optional[Budget] = None) -> T:
    """`call()`, again after a retryable HTTPError up to `retries` times, waiting backoff_s · 2^n (a larger
    Retry-After wins, capped at MAX_WAIT_S). A wait that would outlast `budget` raises BudgetSpent now."""
    attempt = 0
    while True:
        try:
            return call()
        except HTTPError as exc:
            if not exc.retryable or attempt >= retries:
                raise
            delay = min(MAX_WAIT_S, max(backoff_s * 2**attempt, exc.retry_after or 0.0))
            if budget is not None and delay >= budget.remaining():
                raise budget.spent(f"{exc.problem}; retry {attempt + 1}/{retries} would start in {delay:.1f}s, "
                                   "after the budget ends", url=exc.url, phase="retry-wait") from None
            attempt += 1
            log.warning("%s; retry %d/%d in %.1fs", exc.problem, attempt, retries, delay)
            time.sleep(delay)


def post_json(url: str, payload: Any, *, headers: Optional[dict] = None, deadline_s: float, retries: int = 0,
              backoff_s: float = 1.0, budget: Optional[Budget] = None, parse: Optional[Callable[[Any], T]] = None) -> Any:
    """POST `payload` as JSON and decode the reply, with retries. `parse` runs on the decoded reply inside
    the retry loop: a ValueError it raises marks the reply malformed (phase "reply", retried)."""
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}

    def attempt() -> Any:
        raw = request("POST", url, body=body, headers=headers, deadline_s=deadline_s, budget=budget).body
        try:
            decoded = json.loads(raw)
        except ValueError:
            reason = f"not JSON: {raw[:80]!r}"
        else:
            try:
                return parse(decoded) if parse else decoded
            except ValueError as exc:
                reason = str(exc)
        raise HTTPError(_scrub(f"POST {redact_url(url)}: malformed reply: {reason}", _secrets(url, headers)),
                        url=url, phase="reply", retryable=True)

    return with_retries(attempt, retries=retries, backoff_s=backoff_s, budget=budget)


def map_bounded(fn: Callable[[A], T], items: Iterable[A], concurrency: int) -> list[T]:
    """`fn` over `items` on at most `concurrency` threads; results in the items' order. An exception
    from `fn` cancels the items not started and is raised once the running ones end (their deadlines
    bound that wait), so `fn` should return per-item failures it can live with rather than raise."""
    items = list(items)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(concurrency, len(items))), thread_name_prefix="http")
    try:
        futures = [pool.submit(fn, item) for item in items]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
