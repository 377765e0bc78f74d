import base64
import json
import logging
import pickle
import threading
import time

import pytest

from chat_server import ChatServer, RawServer, always, canned, drip_body, drip_headers, echo, malformed, rate_limited, silent
from nla_universal.errors import ConfigError
from nla_universal.http import (
    Budget,
    BudgetSpent,
    DeadlineExceeded,
    HTTPError,
    StatusError,
    endpoint_id,
    join_url,
    map_bounded,
    parse_retry_after,
    post_json,
    redact_url,
    request,
)

KEY = "sk-test-0123456789-never-print-me"
pytestmark = pytest.mark.timeout(30)  # a lost deadline fails its test instead of hanging the suite


@pytest.fixture(autouse=True)
def no_proxy_from_the_environment(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def timed(fn):
    started = time.monotonic()
    try:
        fn()
    except HTTPError as exc:
        return exc, time.monotonic() - started
    raise AssertionError("the call did not fail")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://openrouter.ai/api/v1", "https://openrouter.ai:443/api/v1"),
        ("HTTPS://OpenRouter.AI:443/api/v1/", "https://openrouter.ai:443/api/v1"),
        ("http://127.0.0.1:8000/v1?key=abc#frag", "http://127.0.0.1:8000/v1"),
        (f"http://user:{KEY}@Host/", "http://host:80"),
        ("http://[::1]:30000/generate", "http://[::1]:30000/generate"),
    ],
)
def test_endpoint_id_is_scheme_host_explicit_port_and_path(url, expected):
    assert endpoint_id(url) == expected


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://host/x", "http://host:99999/v1", "http:///v1"])
def test_endpoint_id_refuses_what_is_not_an_http_url(url):
    with pytest.raises(ConfigError, match="not a usable http"):
        endpoint_id(url)


def test_redact_url_hides_userinfo_and_query_values():
    url = f"https://user:{KEY}@host:8443/v1/chat?key={KEY}&flag&model=m#{KEY}"
    assert redact_url(url) == "https://***@host:8443/v1/chat?key=***&***&model=***"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert join_url(f"https://host/v1/?key={KEY}", "chat/completions") == f"https://host/v1/chat/completions?key={KEY}"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_dripped_one_byte_a_second_fails_at_the_deadline(chunked):
    with RawServer(drip_body(chunked)) as server:
        exc, took = timed(lambda: request("POST", server.base_url + "/x", body=b"{}", deadline_s=2))
    assert 1.9 <= took < 4  # urllib's per-read timeout waited ~60 s here, and forever for an endless body
    assert isinstance(exc, DeadlineExceeded) and exc.retryable and exc.phase == "body"
    assert server.base_url + "/x" in str(exc) and "body" in str(exc) and "2s" in str(exc)


@pytest.mark.parametrize(
    "server, phase",
    [(lambda: RawServer(drip_headers(interval_s=0.3)), "headers"), (lambda: RawServer(silent), "headers"),
     (lambda: RawServer(accept=False), "connect")],
    ids=["headers-dripped", "accepts-never-answers", "never-accepts"],
)
def test_a_server_that_never_finishes_the_headers_or_the_connection_fails_at_the_deadline(server, phase):
    with server() as server:
        exc, took = timed(lambda: request("GET", server.base_url, deadline_s=1))
    assert 0.9 <= took < 2.5
    assert isinstance(exc, DeadlineExceeded) and exc.phase == phase and server.base_url in str(exc)


def test_retries_stop_within_the_budget_with_a_message_naming_it():
    with ChatServer(always(500)) as server:
        budget = Budget(3, "test.budget_s")
        exc, took = timed(lambda: post_json(server.base_url + "/chat/completions", {"messages": [{"content": "x"}]},
                                            deadline_s=2, retries=20, backoff_s=0.5, budget=budget))
    assert took < 3.2 and server.requests >= 2  # retried, then stopped before the budget would be overrun
    assert isinstance(exc, BudgetSpent) and not exc.retryable
    assert "test.budget_s=3s" in str(exc) and "HTTP 500" in str(exc) and server.base_url in str(exc)
    assert "test.budget_s" in exc.fix


def test_the_budget_cuts_a_call_short_and_says_what_was_awaited():
    with RawServer(drip_body()) as server:
        exc, took = timed(lambda: request("GET", server.base_url, deadline_s=30, budget=Budget(1, "stage.budget_s")))
    assert 0.9 <= took < 2.5
    assert isinstance(exc, BudgetSpent) and exc.phase == "body" and "stage.budget_s=1s" in str(exc)
    assert "body" in str(exc) and server.base_url in str(exc)


def test_a_spent_budget_fails_the_next_call_at_once():
    budget = Budget(0.05, "b")
    time.sleep(0.1)
    with ChatServer(canned()) as server:
        exc, took = timed(lambda: request("GET", server.base_url, deadline_s=5, budget=budget))
    assert isinstance(exc, BudgetSpent) and took < 0.5 and server.requests == 0
    assert Budget(0).remaining() == float("inf")
    with pytest.raises(ConfigError, match="b is -1"):
        Budget(-1, "b")


def test_retry_after_is_honoured_and_capped():
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1e-6  # a date in the past: now
    with ChatServer(rate_limited(5, 1000, canned())) as server:
        with pytest.raises(BudgetSpent, match="retry 1/3 would start in 120.0s"):
            post_json(server.base_url + "/chat/completions", {"messages": [{"content": "x"}]}, deadline_s=2, retries=3,
                      backoff_s=0.01, budget=Budget(5, "b"))
        with pytest.raises(StatusError) as err:
            post_json(server.base_url + "/chat/completions", {"messages": [{"content": "x"}]}, deadline_s=2)
    assert err.value.status == 429 and err.value.retryable and err.value.retry_after == 1000


def test_post_json_decodes_and_retries_a_malformed_reply():
    with ChatServer(canned()) as server:
        reply = post_json(server.base_url + "/chat/completions", {"messages": [{"content": "Passage: rivers run"}]},
                          deadline_s=2, parse=lambda body: body["choices"][0]["message"]["content"])
    assert reply == "A passage that opens with rivers run."

    def refuse(body):
        raise ValueError("no usable field")

    with ChatServer(canned()) as server:
        with pytest.raises(HTTPError, match="malformed reply: no usable field") as err:
            post_json(server.base_url + "/chat/completions", {"messages": [{"content": "x"}]}, deadline_s=2,
                      retries=2, backoff_s=0.01, parse=refuse)
    assert err.value.phase == "reply" and server.requests == 3
    with ChatServer(malformed()) as server:
        with pytest.raises(HTTPError, match="not JSON"):
            post_json(server.base_url + "/chat/completions", {"messages": [{"content": "x"}]}, deadline_s=2)


def test_secrets_in_the_url_or_headers_never_reach_a_message_or_log(caplog):
    caplog.set_level(logging.DEBUG)
    with RawServer(echo(500)) as server:  # echoes the request line and headers back in its error body
        url = f"http://user:{KEY}@{server.base_url.split('//')[1]}/x?key={KEY}"
        with pytest.raises(StatusError) as err:
            post_json(url, {}, headers={"Authorization": f"Bearer {KEY}"}, deadline_s=2, retries=1, backoff_s=0.01)
    assert "HTTP 500" in str(err.value) and "***" in str(err.value)
    for text in (str(err.value), repr(err.value), err.value.url, caplog.text):
        assert KEY not in text
    assert "retry 1/1" in caplog.text
    with ChatServer(canned()) as server:
        port = server.port
    with pytest.raises(HTTPError, match="connection error") as err:
        request("GET", f"http://user:{KEY}@127.0.0.1:{port}/v1?key={KEY}", deadline_s=2)
    assert KEY not in str(err.value) and "127.0.0.1" in str(err.value)


def test_userinfo_is_sent_as_basic_auth_and_the_host_header_omits_a_default_port():
    with RawServer(echo()) as server:
        hostport = server.base_url.split("//")[1].split("/")[0]
        reply = request("GET", f"http://user:{KEY}@{hostport}/v1?x=1", deadline_s=2)
    head = json.loads(reply.body)["head"]
    assert head.startswith("GET /v1?x=1 HTTP/1.1\r\n") and f"Host: {hostport}" in head
    assert "Authorization: Basic " + base64.b64encode(f"user:{KEY}".encode()).decode() in head
    assert reply.status == 200 and reply.headers["connection"] == "close"


def test_proxies_come_from_the_environment(monkeypatch):
    with RawServer(echo()) as proxy:
        monkeypatch.setenv("http_proxy", f"http://puser:ppass@{proxy.base_url.split('//')[1]}")
        reply = request("POST", "http://service.invalid:8000/v1/x?k=v", body=b"{}", deadline_s=2)
    head = json.loads(reply.body)["head"]
    assert head.startswith("POST http://service.invalid:8000/v1/x?k=v HTTP/1.1\r\n")
    assert "Proxy-Authorization: Basic " + base64.b64encode(b"puser:ppass").decode() in head
    with RawServer(echo(403)) as proxy:
        monkeypatch.setenv("https_proxy", proxy.base_url)
        with pytest.raises(HTTPError, match="proxy refused to open a tunnel to service.invalid:443: 403"):
            request("GET", "https://service.invalid/v1", deadline_s=2)


def test_map_bounded_keeps_order_bounds_concurrency_and_stops_at_the_first_error():
    lock, running, peak, started = threading.Lock(), [0], [0], []

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started.append(i)
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if i == 5:
            raise RuntimeError("fatal at 5")
        return i * i

    assert map_bounded(work, range(5), concurrency=3) == [0, 1, 4, 9, 16] and peak[0] <= 3
    started.clear()
    with pytest.raises(RuntimeError, match="fatal at 5"):
        map_bounded(work, range(100), concurrency=2)
    assert len(started) < 20  # the items not yet started were cancelled
    assert map_bounded(work, [], concurrency=4) == []


def test_errors_survive_pickling_with_their_fields():
    exc = StatusError("POST http://h:1/x: HTTP 503", url=f"http://u:{KEY}@h:1/x", phase="headers", retryable=True,
                      retry_after=2.0, status=503)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is StatusError and str(back) == str(exc) and KEY not in back.url
    assert (back.url, back.phase, back.retryable, back.retry_after, back.status) == ("http://***@h:1/x", "headers", True, 2.0, 503)
