import json
import logging
import re
import shlex
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chat_server import (
    ChatServer,
    RawServer,
    Reply,
    always,
    canned,
    drip_body,
    echo_summary,
    fail_after,
    fail_first,
    malformed,
    rate_limited,
    slow,
)
from nla_universal.config import CorpusConfig, ModelSpec, load_config
from nla_universal.corpus import build_passages, write_passages
from nla_universal.errors import ConfigError, DataError, NLAError
from nla_universal.teacher import (
    ReplyCache,
    TeacherConfig,
    check_single_teacher,
    generate_chat,
    teach,
    teacher_id,
    validate_explanation,
)
from nla_universal.teacher_http import ChatClient

KEY = "sk-test-0123456789-never-store-me"
TOPICS = ["rivers", "volcanoes", "compilers", "violins", "glaciers", "satellites", "bakeries", "chess", "tides", "orchids"]


@dataclass
class TeachStage:
    """The shape of the teach stage's config: the teacher's options under `teacher.`."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)


def passages_file(folder: Path, n: int = 10, splits: list[str] | None = None) -> Path:
    texts = [f"Passage {i} is about {TOPICS[i % len(TOPICS)]} and the people who study them closely." for i in range(n)]
    splits = splits or ["train"] * n
    path = folder / "passages.parquet"
    write_passages(
        pa.table({"passage_id": [f"p{i:03d}" for i in range(n)], "text": texts, "split": splits}),
        path,
    )
    return path


def openai_cfg(server: ChatServer, **kw) -> TeacherConfig:
    base = dict(backend="openai", model="test/teacher", base_url=server.base_url, api_key_env="NLA_TEST_KEY",
                backoff_s=0.01, timeout_s=5, concurrency=4, max_retries=2)
    return TeacherConfig(**{**base, **kw})


def tid(server: ChatServer, model: str = "test/teacher") -> str:
    return f"openai:{model}@{server.base_url}"  # the loopback URL is already in normal form


def table(path: Path) -> pa.Table:
    return pq.read_table(path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("NLA_TEST_KEY", KEY)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("<think>the user wants one sentence</think>\nThe passage covers rivers in Europe.", "The passage covers rivers in Europe."),
        ("Sure, here is a one-sentence description:\n\n\"Glaciers shape valleys over millennia.\"", "Glaciers shape valleys over millennia."),
        ("Here's the sentence: **Chess openings and the players who named them.**", "Chess openings and the players who named them."),
        ("Certainly! The text explains   how\ncompilers parse code.", "The text explains how compilers parse code."),
        ("I'm sorry, but I cannot summarise this passage.", None),
        ("I cannot help with that request, it seems.", None),
        ("As an AI language model I have no opinion on this.", None),
        ("   ", None),
        ("Too short.", None),
        ("x" * 501, None),
        ("<think>still thinking about the passage when tokens ran out", None),
    ],
)
def test_validate_explanation_cleans_replies_and_rejects_unusable_ones(raw, expected):
    assert validate_explanation(raw, min_chars=20, max_chars=500) == expected


def test_validate_explanation_keeps_only_complete_sentences_of_a_truncated_reply():
    raw = "Violins are built from spruce and maple. Their makers in Cremona were famous for the"
    assert validate_explanation(raw, truncated=True) == "Violins are built from spruce and maple."
    assert validate_explanation("Violins are built from spruce and maple by", truncated=True) is None
    assert validate_explanation("Violins are built from spruce and maple by", truncated=False) is not None


def test_teacher_id_names_backend_model_and_endpoint():
    default = "openai:qwen/qwen3-8b@https://openrouter.ai:443/api/v1"
    assert teacher_id(TeacherConfig(backend="openai", model="qwen/qwen3-8b")) == default
    spelled = TeacherConfig(backend="openai", model="qwen/qwen3-8b", base_url="HTTPS://OpenRouter.ai:443/api/v1/")
    assert teacher_id(spelled) == default  # one endpoint, however it is written
    local = TeacherConfig(backend="openai", model="m", base_url="http://127.0.0.1:8123/v1")
    assert teacher_id(local) == "openai:m@http://127.0.0.1:8123/v1"
    others = ["http://127.0.0.1:8124/v1", "https://127.0.0.1:8123/v1", "http://127.0.0.1:8123/v2", "http://127.0.0.2:8123/v1"]
    assert len({teacher_id(replace(local, base_url=u)) for u in others} | {teacher_id(local)}) == 5
    keyed = replace(local, base_url=f"http://user:{KEY}@127.0.0.1:8123/v1?key={KEY}")
    assert teacher_id(keyed) == teacher_id(local)  # a key in the URL is neither identity nor stored
    assert teacher_id(TeacherConfig()) == "hf:smollm2-135m-instruct"
    asked = teacher_id(TeacherConfig(prompt="Name the topic of {text}"))
    assert asked.startswith("hf:smollm2-135m-instruct+prompt-") and asked != teacher_id(TeacherConfig(prompt="Topic? {text}"))


def test_a_changed_prompt_is_another_teacher_and_never_keeps_the_old_z(tmp_path):
    path = passages_file(tmp_path)
    with ChatServer(canned()) as server:
        teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
        before = path.read_bytes()
        reworded = openai_cfg(server, prompt="Name the topic of this passage.\n\n{text}")
        with pytest.raises(NLAError, match="mixing teachers"):
            teach(path, reworded, cache_dir=tmp_path / "cache")
        assert path.read_bytes() == before
        asked = server.requests
        report = teach(path, replace(reworded, replace=True), cache_dir=tmp_path / "cache")
    assert report.kept == 0 and server.requests - asked == 10  # every passage asked again, with the new prompt
    assert all(m.startswith("Name the topic") for m in server.messages[-10:])
    assert set(table(path).column("teacher").to_pylist()) == {teacher_id(reworded)}


def test_openai_teacher_fills_z_for_configured_splits_and_sends_the_key(tmp_path):
    splits = ["train", "val", "test", "train", "train", "val", "train", "test", "train", "train"]
    path = passages_file(tmp_path, splits=splits)
    with ChatServer(canned()) as server:
        report = teach(path, openai_cfg(server, splits=["train", "val"]), cache_dir=tmp_path / "cache")
    out = table(path)
    for text, split, z, teacher in zip(*(out.column(c).to_pylist() for c in ("text", "split", "z", "teacher"))):
        if split == "test":
            assert z is None and teacher is None
        else:
            assert z == echo_summary(f"Passage:\n{text}") and teacher == tid(server)
    assert report.valid == report.requested == server.requests == 8 and report.eligible == 8
    assert set(server.authorizations) == {f"Bearer {KEY}"}
    assert check_single_teacher(out) == tid(server)
    assert out.column("passage_id").to_pylist() == [f"p{i:03d}" for i in range(10)]
    with ChatServer(canned(), port=server.port) as server:
        narrower = teach(path, openai_cfg(server, splits=["train"]), cache_dir=tmp_path / "cache")
    assert server.requests == 0 and narrower.kept == narrower.valid == 6
    assert [s for s, z in zip(splits, table(path).column("z").to_pylist()) if z is not None] == ["train"] * 6


def test_retries_server_errors_then_succeeds(tmp_path):
    path = passages_file(tmp_path, n=6)
    with ChatServer(fail_first(2, canned())) as server:
        report = teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
    assert report.valid == 6 and report.failed == 0
    assert server.requests == 6 + 2


def test_rate_limit_waits_for_retry_after(tmp_path):
    path = passages_file(tmp_path, n=3)
    with ChatServer(rate_limited(1, 0.6, canned())) as server:
        report = teach(path, openai_cfg(server, backoff_s=0.01), cache_dir=tmp_path / "cache")
    assert report.valid == 3
    assert server.times[1] - server.times[0] >= 0.55  # the 0.01 s backoff alone would retry at once


@pytest.mark.parametrize(
    "responder, settings, reason",
    [
        (always(500), dict(max_retries=1), "HTTP 500"),
        (slow(1.5, canned()), dict(timeout_s=0.3, max_retries=0), "timeout"),
        (malformed(), dict(max_retries=1), "malformed"),
    ],
)
def test_a_broken_endpoint_is_a_clear_error_and_leaves_passages_untouched(tmp_path, responder, settings, reason):
    path = passages_file(tmp_path)
    before = path.read_bytes()
    with ChatServer(responder) as server:
        with pytest.raises(NLAError) as err:
            teach(path, openai_cfg(server, **settings), cache_dir=tmp_path / "cache")
    assert reason in str(err.value) and server.base_url in str(err.value)
    assert server.requests == 1 + settings["max_retries"]  # the probe alone, then it stops
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_unreachable_endpoint_is_a_clear_error(tmp_path):
    with ChatServer(canned()) as server:
        url = server.base_url  # the port is closed once the block ends
    path = passages_file(tmp_path)
    with pytest.raises(NLAError, match="connection error") as err:
        teach(path, openai_cfg(server, base_url=url, max_retries=1), cache_dir=tmp_path / "cache")
    assert url in str(err.value) and "z" not in table(path).column_names


def test_malformed_replies_after_retries_are_counted_as_failures(tmp_path):
    path = passages_file(tmp_path, n=8)
    bad = {"volcanoes", "violins"}
    good = canned()

    def respond(message: str, n: int) -> Reply:
        return malformed()(message, n) if any(b in message for b in bad) else good(message, n)

    with ChatServer(respond) as server:
        report = teach(path, openai_cfg(server, max_retries=1), cache_dir=tmp_path / "cache")
    out = table(path)
    assert report.failed == 2 and report.valid == 6 and report.invalid == 0
    assert sum(report.failure_reasons.values()) == 2 and all("malformed" in r for r in report.failure_reasons)
    assert server.requests == 6 + 2 * 2
    missing = [t for t, z in zip(out.column("text").to_pylist(), out.column("z").to_pylist()) if z is None]
    assert sorted(t.split()[4] for t in missing) == sorted(bad)


def test_refusals_and_empty_replies_are_dropped_and_counted(tmp_path):
    path = passages_file(tmp_path)
    replies = {"volcanoes": "I'm sorry, but I can't help with that.", "violins": "", "chess": "As an AI, I cannot.", "tides": "Tides."}
    with ChatServer(canned(replies)) as server:
        report = teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
    out = table(path)
    assert report.invalid == 4 and report.valid == 6 and report.failed == 0
    assert "I'm sorry, but I can't help with that." in report.invalid_examples
    z_by_topic = {t.split()[4]: z for t, z in zip(out.column("text").to_pylist(), out.column("z").to_pylist())}
    assert {k for k, z in z_by_topic.items() if z is None} == set(replies)


def test_the_key_is_sent_but_never_stored_or_logged(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    path = passages_file(tmp_path, n=6)
    replies = {"volcanoes": f"I'm sorry, key {KEY} is not a summary"}
    with ChatServer(fail_first(2, canned(replies))) as server:
        report = teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
    assert server.authorizations[0] == f"Bearer {KEY}"
    leaky = lambda message, n: Reply(status=401, body=json.dumps({"error": f"invalid key {KEY}"}).encode())
    with ChatServer(leaky) as server:
        with pytest.raises(NLAError) as err:
            teach(passages_file(tmp_path / "other", n=2), openai_cfg(server), cache_dir=tmp_path / "other" / "cache")
    assert "HTTP 401" in str(err.value) and server.requests == 1  # a bad key is not retried
    assert KEY not in str(err.value) and KEY not in repr(err.value)
    captured = capsys.readouterr()
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert KEY.encode() not in stored  # not even where the endpoint echoed it back
    assert KEY not in caplog.text and KEY not in captured.out + captured.err
    assert KEY not in json.dumps(report.to_dict())
    assert report.invalid == 1 and "***" in report.invalid_examples[0]
    assert "retry" in caplog.text  # the retries were logged, without the key


def test_a_missing_api_key_is_refused_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("NLA_TEST_KEY")
    path = passages_file(tmp_path)
    before = path.read_bytes()
    with ChatServer(canned()) as server:
        with pytest.raises(NLAError) as err:
            teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
    assert "NLA_TEST_KEY" in str(err.value) and "export NLA_TEST_KEY" in str(err.value)
    assert server.requests == 0 and path.read_bytes() == before
    assert not (tmp_path / "cache").exists()


def test_an_interrupted_run_resumes_from_the_cache_and_matches_an_uninterrupted_one(tmp_path):
    path = passages_file(tmp_path / "resumed")
    cache = tmp_path / "resumed" / "cache"
    with ChatServer(fail_after(4, canned())) as server:
        port = server.port
        with pytest.raises(NLAError, match="in a row"):
            teach(path, openai_cfg(server, concurrency=1, max_retries=0, max_consecutive_failures=2), cache_dir=cache)
    assert "z" not in table(path).column_names
    cache_file = ReplyCache(cache, tid(server)).path
    assert len(cache_file.read_text().splitlines()) == 4
    with open(cache_file, "a") as f:  # a crash in the middle of an append
        f.write('{"key": "abc", "reply": "half a li')

    with ChatServer(canned(), port=port) as server:
        report = teach(path, openai_cfg(server), cache_dir=cache)
    assert server.requests == 10 - 4 and report.from_cache == 4 and report.requested == 6

    fresh = passages_file(tmp_path / "fresh")
    with ChatServer(canned(), port=port) as server:
        teach(fresh, openai_cfg(server), cache_dir=tmp_path / "fresh" / "cache")
    assert table(path).equals(table(fresh))
    assert len(ReplyCache(cache, tid(server)).replies) == 10  # the repaired cache reads back whole


def test_rerun_with_the_same_teacher_asks_only_for_missing_z(tmp_path):
    path = passages_file(tmp_path)
    good = canned()
    flaky = lambda message, n: Reply(status=503, body=b"{}") if "glaciers" in message else good(message, n)
    with ChatServer(flaky) as server:
        first = teach(path, openai_cfg(server, max_retries=0), cache_dir=tmp_path / "cache")
    assert first.failed == 1 and first.valid == 9
    with ChatServer(canned(), port=server.port) as server:
        second = teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
    assert server.requests == 1 and second.kept == 9 and second.valid == 10
    assert "glaciers" in server.messages[0]


def test_another_teachers_z_is_refused_unless_replace(tmp_path):
    path = passages_file(tmp_path)
    with ChatServer(canned()) as server:
        teach(path, openai_cfg(server, model="teacher-a"), cache_dir=tmp_path / "cache")
        before = path.read_bytes()
        with pytest.raises(NLAError) as err:
            teach(path, openai_cfg(server, model="teacher-b"), cache_dir=tmp_path / "cache")
        assert "mixing teachers" in str(err.value) and "replace" in str(err.value)
        assert tid(server, "teacher-a") in str(err.value) and path.read_bytes() == before
        report = teach(path, openai_cfg(server, model="teacher-b", replace=True), cache_dir=tmp_path / "cache")
    assert report.valid == 10 and report.kept == 0
    assert set(table(path).column("teacher").to_pylist()) == {tid(server, "teacher-b")}


def test_two_servers_on_one_host_differing_only_in_port_are_two_teachers(tmp_path):
    path = passages_file(tmp_path)
    with ChatServer(canned()) as first, ChatServer(canned()) as second:
        assert first.base_url.replace(str(first.port), str(second.port)) == second.base_url
        assert teacher_id(openai_cfg(first)) != teacher_id(openai_cfg(second))
        teach(path, openai_cfg(first), cache_dir=tmp_path / "cache")
        before = path.read_bytes()
        with pytest.raises(NLAError, match="mixing teachers") as err:
            teach(path, openai_cfg(second), cache_dir=tmp_path / "cache")
        assert tid(first) in str(err.value) and tid(second) in str(err.value) and path.read_bytes() == before
        report = teach(path, openai_cfg(second, replace=True), cache_dir=tmp_path / "cache")
    assert second.requests == 10 and report.from_cache == 0  # the first server's cached replies are not reused
    assert set(table(path).column("teacher").to_pylist()) == {tid(second)}


@pytest.mark.timeout(30)
def test_timeout_s_is_a_total_deadline_even_for_a_reply_that_drips(tmp_path):
    path = passages_file(tmp_path, n=2)
    with RawServer(drip_body(interval_s=0.3)) as server:
        started = time.monotonic()
        with pytest.raises(NLAError, match="timeout") as err:
            teach(path, openai_cfg(server, timeout_s=1, max_retries=0), cache_dir=tmp_path / "cache")
    assert time.monotonic() - started < 3 and "body" in str(err.value) and server.base_url in str(err.value)


@pytest.mark.timeout(30)
def test_budget_s_stops_the_stage_and_names_the_budget(tmp_path):
    path = passages_file(tmp_path)
    before = path.read_bytes()
    with ChatServer(always(503)) as server:
        started = time.monotonic()
        with pytest.raises(NLAError) as err:
            teach(path, openai_cfg(server, budget_s=2, max_retries=50, backoff_s=0.2), cache_dir=tmp_path / "cache")
    assert time.monotonic() - started < 2.5 and server.requests >= 2
    assert "teacher.budget_s=2s" in str(err.value) and "HTTP 503" in str(err.value)
    assert "raise teacher.budget_s" in err.value.fix and path.read_bytes() == before


@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_a_key_in_the_url_is_never_printed_or_logged(tmp_path, caplog, capsys, monkeypatch, where):
    caplog.set_level(logging.DEBUG)
    with ChatServer(canned()) as server:
        port = server.port  # closed once the block ends: the endpoint is down
    url = f"http://user:{KEY}@127.0.0.1:{port}/v1" if where == "userinfo" else f"http://127.0.0.1:{port}/v1?key={KEY}"
    cfg = TeacherConfig(backend="openai", model="m", base_url=url, api_key_env=None, max_retries=1, backoff_s=0.01)
    errors = []
    for attempt in (cfg, replace(cfg, api_key_env="NLA_UNSET_KEY")):  # down, then the missing-key message
        with pytest.raises(NLAError) as err:
            teach(passages_file(tmp_path, n=2), attempt, cache_dir=tmp_path / "cache")
        errors.append(err.value)
    assert "connection error" in str(errors[0]) and f"127.0.0.1:{port}" in str(errors[0])
    assert "NLA_UNSET_KEY" in str(errors[1])
    captured = capsys.readouterr()
    assert "retry 1/1" in caplog.text and "teach openai:m@" in captured.err  # the log and progress bar were written
    for text in [*map(str, errors), *map(repr, errors), caplog.text, captured.out, captured.err, teacher_id(cfg)]:
        assert KEY not in text
    assert KEY not in repr(ChatClient(url, "m", None, max_tokens=8, temperature=0, timeout_s=1, max_retries=0, backoff_s=0))


def test_the_missing_key_fix_as_typed_in_bash_means_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv("NLA_TEST_KEY")
    path = passages_file(tmp_path, n=3)
    with ChatServer(canned()) as server:
        with pytest.raises(NLAError) as err:
            teach(path, openai_cfg(server), cache_dir=tmp_path / "cache")
        typed = re.search(r"teacher\.api_key_env=\S+", err.value.fix).group(0)
        argv = shlex.split(f"nla-universal teach {typed}")  # bash's quote removal
        cfg = load_config(TeachStage, overrides=argv[2:]).teacher
        assert not cfg.api_key_env
        # the old advice, teacher.api_key_env='' typed in bash, arrives as `teacher.api_key_env=`: also no key
        assert not load_config(TeachStage, overrides=shlex.split("teacher.api_key_env=''")).teacher.api_key_env
        report = teach(path, replace(openai_cfg(server), api_key_env=cfg.api_key_env), cache_dir=tmp_path / "cache")
    assert report.valid == 3 and server.authorizations == [None] * 3


def test_check_single_teacher_rejects_mixed_unnamed_or_missing_explanations():
    base = {"passage_id": ["a", "b", "c"], "text": ["x", "y", "w"], "split": ["train"] * 3}
    one = pa.table({**base, "z": ["z1", None, "z3"], "teacher": ["t1", None, "t1"]})
    assert check_single_teacher(one) == "t1"
    for z, teachers in [(["z1", "z2", None], ["t1", "t2", None]), (["z1", "z2", None], ["t1", None, None])]:
        with pytest.raises(DataError, match="more than one teacher"):
            check_single_teacher(pa.table({**base, "z": z, "teacher": teachers}))
    with pytest.raises(DataError, match="no explanations"):
        check_single_teacher(pa.table(base))


def test_bad_teacher_config_is_refused(tmp_path):
    path = passages_file(tmp_path)
    for kw in (dict(prompt="Summarise."), dict(splits=["training"]), dict(backend="anthropic")):
        with pytest.raises(ConfigError):
            teach(path, TeacherConfig(**kw), cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def smollm2():
    from nla_universal.models import load_model

    return load_model(ModelSpec(tag="smollm2-135m", source="packaged", name="smollm2-135m-instruct"), dtype="bfloat16")


@pytest.fixture(scope="module")
def real_passages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    path = folder / "passages.parquet"
    write_passages(build_passages(CorpusConfig(max_passages=4, max_chars=400)), path)
    return path


@pytest.mark.slow
def test_hf_backend_on_the_packaged_smollm2_writes_distinct_explanations(tmp_path, real_passages, smollm2):
    path = tmp_path / "passages.parquet"
    path.write_bytes(real_passages.read_bytes())
    report = teach(path, TeacherConfig(max_tokens=40, batch_size=4), cache_dir=tmp_path / "cache")
    zs = [z for z in table(path).column("z").to_pylist() if z is not None]
    assert report.valid == len(zs) >= 3 and report.requested == 4
    assert len(set(zs)) >= 3 and all(len(z) >= 20 for z in zs)
    assert check_single_teacher(table(path)) == "hf:smollm2-135m-instruct"


@pytest.mark.slow
def test_openai_backend_against_a_server_running_the_real_smollm2(tmp_path, real_passages, smollm2):
    lock = threading.Lock()

    def generate(message: str, n: int) -> Reply:
        with lock:
            reply = generate_chat(smollm2.model, smollm2.tokenizer, [message], max_new_tokens=40, temperature=0.0)[0]
        return Reply(content=reply.text, finish_reason="length" if reply.truncated else "stop")

    path = tmp_path / "passages.parquet"
    path.write_bytes(real_passages.read_bytes())
    with ChatServer(generate, lifetime_s=600) as server:
        report = teach(path, openai_cfg(server, model="smollm2-135m-instruct", concurrency=2, timeout_s=120, max_retries=0), cache_dir=tmp_path / "cache")
    out = table(path)
    zs = [z for z in out.column("z").to_pylist() if z is not None]
    assert server.requests == 4 and report.valid == len(zs) >= 3 and len(set(zs)) >= 3
    for text, message in zip(sorted(out.column("text").to_pylist()), sorted(server.messages)):
        assert text[:100] in message  # the teacher saw the passage itself
    assert check_single_teacher(out) == tid(server, "smollm2-135m-instruct")
