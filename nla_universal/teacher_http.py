"""Client for OpenAI-compatible chat-completions endpoints (OpenRouter, vLLM, SGLang).

The HTTP itself — a total deadline per request, retries, the stage's time budget, requests in
flight, secrets kept out of messages — is `nla_universal.http`'s. This module knows the chat request
and reply, and the teacher's rules for a failing endpoint: one request alone first (a wrong URL,
key or model fails in seconds with its own message), then stop after too many failures in a row.
The API key travels only in the Authorization header, and text an endpoint echoes back in a reply
is scrubbed of it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .http import Budget, BudgetSpent, HTTPError, join_url, map_bounded, post_json, redact_url


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


def parse_chat_response(body: Any) -> ChatReply:
    """The first choice's text of a decoded chat-completions reply; ValueError when it has none."""
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    if "error" in body:  # OpenRouter reports upstream provider errors in a 200 body
        raise ValueError(f"endpoint error: {str(body['error'])[:200]}")
    try:
        choice = body["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):  # content given as parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        raise ValueError("content is not text")
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
        budget: Optional[Budget] = None,
    ):
        self.url = join_url(base_url, "chat/completions")
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.budget = budget
        self._key = api_key or None
        self._headers = {"X-Title": "nla-universal"}
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"

    def __repr__(self) -> str:
        return f"ChatClient(url={redact_url(self.url)!r}, model={self.model!r})"

    def complete(self, prompt: str) -> ChatReply:
        """The reply; ChatFailure when the request fails for good, BudgetSpent when the budget ran out."""
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        try:
            reply = post_json(self.url, payload, headers=self._headers, deadline_s=self.timeout_s,
                              retries=self.max_retries, backoff_s=self.backoff_s, budget=self.budget,
                              parse=parse_chat_response)
        except BudgetSpent:
            raise
        except HTTPError as exc:
            raise ChatFailure(exc.problem) from None
        text = reply.text.replace(self._key, "***") if self._key else reply.text  # an echoed key is not kept
        return ChatReply(text, reply.truncated)


OnResult = Callable[[str, Optional[ChatReply], Optional[str]], None]


def complete_all(
    client: ChatClient,
    jobs: list[tuple[str, str]],
    *,
    concurrency: int,
    on_result: OnResult,
    max_consecutive_failures: int,
) -> None:
    """Ask every `(key, prompt)`; `on_result(key, reply, None)` or `(key, None, reason)` per job, one
    call at a time.

    Raises EndpointDown when the first request fails or `max_consecutive_failures` fail in a row, and
    BudgetSpent when the client's budget runs out; results already reported stay reported.
    """
    if not jobs:
        return
    key, prompt = jobs[0]
    try:
        on_result(key, client.complete(prompt), None)
    except ChatFailure as exc:
        raise EndpointDown(exc.reason) from None

    lock = threading.Lock()
    consecutive = 0

    def one(job: tuple[str, str]) -> None:
        nonlocal consecutive
        key, prompt = job
        try:
            reply = client.complete(prompt)
        except ChatFailure as exc:
            with lock:
                consecutive += 1
                on_result(key, None, exc.reason)
                if consecutive >= max_consecutive_failures:
                    raise EndpointDown(f"{consecutive} requests in a row failed; last: {exc.reason}") from None
            return
        with lock:
            consecutive = 0
            on_result(key, reply, None)

    map_bounded(one, jobs[1:], concurrency)
