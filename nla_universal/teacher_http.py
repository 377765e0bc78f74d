"""Client for OpenAI-compatible chat-completions endpoints (OpenRouter, vLLM, SGLang).

Standard library only: asyncio bounds the number of requests in flight and schedules retries; each
request is a blocking urllib call on a worker thread, so no HTTP dependency is added. The API key
travels only in the Authorization header: it is never put into a message, log line, exception or
`repr`, and any text an endpoint echoes back is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Optional, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# 408/425/429 and every 5xx are transient; other 4xx (bad key, unknown model, bad request) are not.
RETRYABLE_STATUS = frozenset({408, 425, 429})
# A Retry-After larger than this is capped: a teacher run should fail visibly, not hang for hours.
MAX_WAIT_S = 120.0


@dataclass(frozen=True)
class ChatReply:
    text: str
    truncated: bool  # generation stopped at max_tokens (finish_reason "length")


class ChatFailure(Exception):
    """One request failed for good (retries exhausted or an error that retrying cannot fix)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class EndpointDown(ChatFailure):
    """The endpoint fails every request: the run stops rather than counting failures for hours."""


class _AttemptFailed(Exception):
    def __init__(self, reason: str, retryable: bool, retry_after: Optional[float] = None):
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(reason)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_chat_response(raw: bytes) -> ChatReply:
    """The first choice's text of a chat-completions response body."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _AttemptFailed(f"malformed response (not JSON): {raw[:80]!r}", retryable=True) from None
    if not isinstance(body, dict):
        raise _AttemptFailed("malformed response (not a JSON object)", retryable=True)
    if "error" in body:
        # OpenRouter reports upstream provider errors in a 200 body.
        raise _AttemptFailed(f"endpoint error: {str(body['error'])[:200]}", retryable=True)
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise _AttemptFailed("malformed response (no choices[0].message.content)", retryable=True) from None
    if isinstance(content, list):  # content given as parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        raise _AttemptFailed("malformed response (content is not text)", retryable=True)
    return ChatReply(text=content or "", truncated=choice.get("finish_reason") == "length")


class ChatClient:
    """POSTs one user message to `<base_url>/chat/completions`, retrying transient failures."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str],
        *,
        max_tokens: int,
        temperature: float,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._key = api_key or None
        self._headers = {"Content-Type": "application/json", "X-Title": "nla-universal"}
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"

    def __repr__(self) -> str:
        return f"ChatClient(url={self.url!r}, model={self.model!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, payload: bytes) -> ChatReply:
        request = urllib.request.Request(self.url, data=payload, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace").strip()
            retryable = exc.code in RETRYABLE_STATUS or exc.code >= 500
            raise _AttemptFailed(
                f"HTTP {exc.code}: {detail}", retryable, parse_retry_after(exc.headers.get("Retry-After"))
            ) from None
        except TimeoutError:
            raise _AttemptFailed(f"timeout after {self.timeout_s:g}s", retryable=True) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _AttemptFailed(f"timeout after {self.timeout_s:g}s", retryable=True) from None
            raise _AttemptFailed(f"connection error: {exc.reason}", retryable=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _AttemptFailed(f"connection error: {type(exc).__name__}: {exc}", retryable=True) from None
        return parse_chat_response(raw)

    async def complete(self, prompt: str) -> ChatReply:
        payload = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        attempt = 0
        while True:
            try:
                reply = await asyncio.to_thread(self._post, payload)
                return ChatReply(self._scrub(reply.text), reply.truncated)  # even an echoed key is not kept
            except _AttemptFailed as exc:
                reason = self._scrub(exc.reason)
                if not exc.retryable or attempt >= self.max_retries:
                    raise ChatFailure(reason) from None
                delay = min(MAX_WAIT_S, max(self.backoff_s * 2**attempt, exc.retry_after or 0.0))
                attempt += 1
                log.warning("teacher request failed (%s); retry %d/%d in %.1fs", reason, attempt, self.max_retries, delay)
                await asyncio.sleep(delay)


OnResult = Callable[[str, Optional[ChatReply], Optional[str]], None]


async def _complete_all(
    client: ChatClient, jobs: list[tuple[str, str]], concurrency: int, on_result: OnResult, max_consecutive_failures: int
) -> None:
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-http")
    )
    if not jobs:
        return
    # One request alone first: a wrong URL, key or model name fails in seconds with its own message.
    key, prompt = jobs[0]
    try:
        on_result(key, await client.complete(prompt), None)
    except ChatFailure as exc:
        raise EndpointDown(exc.reason) from None

    semaphore = asyncio.Semaphore(concurrency)
    consecutive = 0

    async def one(key: str, prompt: str) -> None:
        nonlocal consecutive
        async with semaphore:
            try:
                reply = await client.complete(prompt)
            except ChatFailure as exc:
                consecutive += 1
                on_result(key, None, exc.reason)
                if consecutive >= max_consecutive_failures:
                    raise EndpointDown(f"{consecutive} requests in a row failed; last: {exc.reason}") from None
                return
            consecutive = 0
            on_result(key, reply, None)

    try:
        async with asyncio.TaskGroup() as group:
            for key, prompt in jobs[1:]:
                group.create_task(one(key, prompt))
    except ExceptionGroup as errors:  # the first error is the story (EndpointDown, or a full disk)
        raise errors.exceptions[0] from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside an event loop (a notebook, an async actor): run ours on its own thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def complete_all(
    client: ChatClient,
    jobs: list[tuple[str, str]],
    *,
    concurrency: int,
    on_result: OnResult,
    max_consecutive_failures: int,
) -> None:
    """Ask every `(key, prompt)`; `on_result(key, reply, None)` or `(key, None, reason)` per job.

    Raises EndpointDown when the first request fails or `max_consecutive_failures` fail in a row;
    results already reported stay reported.
    """
    _run(_complete_all(client, jobs, concurrency, on_result, max_consecutive_failures))
