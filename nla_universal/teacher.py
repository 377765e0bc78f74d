"""One explanation `z` per passage, from exactly ONE teacher per corpus.

The teacher sees only the passage text, never an activation, and answers with one sentence naming
the passage's topic and key entities (the seed's recipe). Token rows (corpus.unit=token) have the
extractive `context` teacher instead: their word and the words before it (nla_universal/token_rows.py).
Mixing teachers in one corpus wrecked the seed's v3, so `teach` refuses a passages file that already
carries another teacher's `z`, and `check_single_teacher` guards the SFT stages.

Replies are cached raw in an append-only JSONL file keyed by sha256(teacher id + filled prompt), so an
interrupted run resumes where it stopped and a change of the validation bounds needs no new request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa
from tqdm.auto import tqdm

from .config import ModelSpec, opt
from .corpus import SPLITS, is_token_table, read_passages, write_passages
from .errors import ConfigError, DataError, NLAError
from .heads import HeadKind, idf, keywords, with_head
from .http import Budget, BudgetSpent, endpoint_id, redact_url
from .teacher_http import ChatClient, ChatReply, EndpointDown, complete_all
from .token_rows import context_explanation

log = logging.getLogger(__name__)

BACKENDS = ("hf", "openai", "context")
DEFAULT_PROMPT = (
    "Describe the following passage in ONE sentence: name its topic and its key entities. "
    "Reply with that sentence only.\n\nPassage:\n{text}"
)

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok|absolutely)(?:[!.,]\s*|\s+))?"
    r"(?:here(?:'s| is| are)\b[^\n:]*(?::|\n)\s*)?"
    r"(?:(?:one[- ]sentence\s+)?(?:summary|description|answer|sentence)\s*:\s*)?",
    re.I,
)
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
    r"i'?m not able|i am not able|as an ai\b|unfortunately, i\b)",
    re.I,
)
_WRAPPERS = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("`", "`"), ("**", "**"), ("*", "*"))
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d)]*(?=\s|$)")


@dataclass
class TeacherConfig:
    """Who writes the explanations `z` and how they are asked for."""

    backend: str = opt("hf", "hf (a local causal LM, run here) | openai (any OpenAI-compatible chat endpoint) | "
                       "context (token rows only: the row's last word and the words before it, no model; "
                       "nla_universal/token_rows.py)")
    model: str = opt(
        "smollm2-135m-instruct",
        "openai: the model name sent to the endpoint (e.g. qwen/qwen3-8b); "
        "hf: a packaged model name (smollm2-135m-instruct) or a local HF folder / hub id",
    )
    base_url: str = opt("https://openrouter.ai/api/v1", "openai: endpoint base URL (vLLM/SGLang: http://HOST:PORT/v1)")
    api_key_env: Optional[str] = opt(
        "OPENROUTER_API_KEY",
        "openai: NAME of the environment variable holding the API key (the key itself never goes in a "
        "config, file or log); null or empty = send no key (local servers without auth)",
    )
    prompt: str = opt(DEFAULT_PROMPT, "instruction sent to the teacher; {text} is replaced by the passage. Part of the "
                      "teacher's id: z asked for with another prompt count as another teacher's")
    max_tokens: int = opt(80, "most tokens the teacher may write per explanation")
    temperature: float = opt(0.3, "sampling temperature; 0 = greedy")
    seed: int = opt(0, "hf: seed of the sampling RNG (temperature > 0)")
    concurrency: int = opt(8, "openai: requests in flight at once")
    timeout_s: float = opt(60.0, "openai: total deadline per request in seconds: connect + whole reply")
    max_retries: int = opt(4, "openai: retries after a 429/5xx/timeout/connection error/malformed reply")
    backoff_s: float = opt(1.0, "openai: first retry delay; doubles each retry (a larger Retry-After wins)")
    max_consecutive_failures: int = opt(32, "openai: stop the run when this many requests fail in a row")
    budget_s: float = opt(0.0, "openai: total seconds the stage may spend waiting on the endpoint, retries "
                          "included; 0 = no limit")
    batch_size: int = opt(32, "hf: passages generated together (32 runs ~1.3x the throughput of 8 on a 2-core CPU)")
    min_chars: int = opt(20, "explanations shorter than this are invalid (dropped and counted)")
    max_chars: int = opt(500, "explanations longer than this are invalid (dropped and counted)")
    max_input_chars: int = opt(2000, "passage text is cut to this many characters before prompting")
    splits: list[str] = opt(help="which splits get a z", factory=lambda: list(SPLITS))
    head: HeadKind = opt(HeadKind.none, "what opens each explanation: none | keywords (the passage's top tf-idf words, "
                         "computed here — a head the activation determines; nla_universal/heads.py)")
    head_words: int = opt(3, "head=keywords: words in the head")
    context_words: int = opt(8, "backend=context: words quoted up to and including the row's last word")
    replace: bool = opt(False, "discard explanations of another teacher already in passages.parquet")


@dataclass
class TeachReport:
    teacher: str
    rows: int  # all passages
    eligible: int  # passages in the configured splits
    kept: int  # already carried a z from this teacher
    from_cache: int  # answered from the reply cache
    requested: int  # sent to the teacher in this run
    valid: int  # rows with a z after this run
    invalid: int  # a reply came but failed validation (refusal, empty, out of bounds)
    failed: int  # no reply after retries
    seconds: float
    failure_reasons: dict[str, int] = field(default_factory=dict)
    invalid_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_id(cfg: TeacherConfig) -> str:
    """Names ONE teacher: the backend, the model, (openai) the endpoint serving it — scheme, host, port
    and path, so another server on the same host is another teacher — and, unless it is the default, a
    hash of the prompt. Explanations asked for with another prompt are another teacher's, so editing
    the prompt never keeps the old prompt's z."""
    if cfg.backend == "context":
        return f"context:{cfg.context_words}"
    who = f"{cfg.model}@{endpoint_id(cfg.base_url)}" if cfg.backend == "openai" else cfg.model
    asked = "" if cfg.prompt == DEFAULT_PROMPT else f"+prompt-{hashlib.sha256(cfg.prompt.encode()).hexdigest()[:8]}"
    return f"{cfg.backend}:{who}{asked}"


def explanation_id(cfg: TeacherConfig) -> str:
    """The teacher id the z carry: a head makes other z than the same teacher's sentences alone."""
    head = "" if cfg.head == HeadKind.none else f"+head-{cfg.head}{cfg.head_words}"
    return teacher_id(cfg) + head


def _strip_wrappers(text: str) -> str:
    changed = True
    while changed and text:
        changed = False
        if text[:2] in ("- ", "* "):
            text, changed = text[2:].lstrip(), True
        for left, right in _WRAPPERS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text, changed = text[len(left) : -len(right)].strip(), True
                break
    return text


def validate_explanation(
    text: Optional[str], *, min_chars: int = 20, max_chars: int = 500, truncated: bool = False
) -> Optional[str]:
    """The cleaned explanation, or None when the reply cannot serve as a training target.

    Think blocks, "Sure, here is …:" preambles, list markers and wrapping quotes are removed and
    whitespace collapsed. A reply cut at max_tokens keeps only its complete sentences.
    """
    if text is None:
        return None
    text = _THINK_BLOCK.sub("", text)
    lowered = text.lower()
    if "<think>" in lowered:  # the thinking never finished: there is no answer
        return None
    if "</think>" in lowered:  # the opening tag was part of the prompt
        text = text[lowered.rindex("</think>") + len("</think>") :]
    text = _PREAMBLE.sub("", text.strip().replace("\u2019", "'"), count=1)
    text = _strip_wrappers(" ".join(text.split()))
    if truncated:
        ends = list(_SENTENCE_END.finditer(text))
        text = text[: ends[-1].end()] if ends else ""
    if not text or _REFUSAL.match(text) or not min_chars <= len(text) <= max_chars:
        return None
    return text


def check_single_teacher(table: pa.Table) -> str:
    """The one teacher id shared by every row that has a `z`; DataError otherwise."""
    if "z" not in table.column_names or table.column("z").null_count == table.num_rows:
        raise DataError("the passages carry no explanations (no `z`)", "run `nla-universal teach` first")
    teachers = table.column("teacher").to_pylist() if "teacher" in table.column_names else [None] * table.num_rows
    counts: dict[str, int] = {}
    for z, t in zip(table.column("z").to_pylist(), teachers):
        if z is not None:
            counts[t or "<unknown>"] = counts.get(t or "<unknown>", 0) + 1
    if len(counts) != 1 or "<unknown>" in counts:
        listed = ", ".join(f"{t} ({n} rows)" for t, n in sorted(counts.items()))
        raise DataError(
            f"the explanations come from more than one teacher or an unnamed one: {listed}; "
            "mixing teachers in one corpus wrecked the seed's v3",
            "rerun `nla-universal teach` with one teacher into a new output folder (or teacher.replace=true)",
        )
    return next(iter(counts))


def _check_config(cfg: TeacherConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown teacher backend {cfg.backend!r}", f"use one of {BACKENDS}")
    if cfg.backend == "context" and (cfg.head != HeadKind.none or cfg.context_words < 1):
        raise ConfigError(f"teacher.backend=context with head={cfg.head}, context_words={cfg.context_words}",
                          "leave teacher.head=none (the context teacher's head is the row's word) and quote ≥ 1 word")
    if "{text}" not in cfg.prompt:
        raise ConfigError("the teacher prompt has no {text} placeholder", "put {text} where the passage goes")
    unknown = sorted(set(cfg.splits) - set(SPLITS))
    if unknown or not cfg.splits:
        raise ConfigError(f"teacher.splits {list(cfg.splits)} is empty or names unknown splits", f"use some of {SPLITS}")
    if not 0 < cfg.min_chars <= cfg.max_chars:
        raise ConfigError("teacher.min_chars must be positive and at most max_chars", "fix the bounds")
    for name in ("concurrency", "batch_size", "max_tokens", "max_input_chars", "max_consecutive_failures"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"teacher.{name} must be at least 1", f"set teacher.{name}")
    if cfg.max_retries < 0 or cfg.timeout_s <= 0 or cfg.backoff_s < 0:
        raise ConfigError("teacher retry settings must be non-negative (timeout_s positive)", "fix them")


def _api_key(cfg: TeacherConfig) -> Optional[str]:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise NLAError(
            f"the teacher endpoint {redact_url(cfg.base_url)} needs an API key in the environment variable "
            f"{cfg.api_key_env}, which is not set",
            f"export {cfg.api_key_env}=<your key> (or pass teacher.api_key_env=null for a server without auth)",
        )
    return key


class ReplyCache:
    """Append-only JSONL of raw replies; one flushed line per finished item."""

    def __init__(self, cache_dir: str | os.PathLike, teacher: str):
        slug = re.sub(r"[^a-z0-9.-]+", "-", teacher.lower()).strip("-")[:80]
        digest = hashlib.sha256(teacher.encode()).hexdigest()[:8]
        self.path = Path(cache_dir) / "teacher" / f"{slug}-{digest}.jsonl"
        self.replies: dict[str, ChatReply] = {}
        if self.path.is_file():
            self._load()

    @staticmethod
    def key(teacher: str, prompt: str) -> str:
        return hashlib.sha256(f"{teacher}\0{prompt}".encode()).hexdigest()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.decode("utf-8", errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                self.replies[row["key"]] = ChatReply(row["reply"], bool(row["truncated"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                if n < len(lines):  # only a crash mid-append explains a bad last line
                    log.warning("skipping unreadable line %d of the teacher cache %s", n, self.path)
        if raw and not raw.endswith(b"\n"):  # a crash left a partial line: later lines start fresh
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def add(self, key: str, reply: ChatReply) -> None:
        self.replies[key] = reply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(json.dumps({"key": key, "reply": reply.text, "truncated": reply.truncated}).encode() + b"\n")
            f.flush()


def fill_prompt(cfg: TeacherConfig, text: str) -> str:
    return cfg.prompt.replace("{text}", text[: cfg.max_input_chars])


def generate_chat(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[ChatReply]:
    """One chat-templated user turn per prompt, generated as a left-padded batch."""
    import torch

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the teacher model has no chat template", "use an instruction-tuned model as the teacher")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    replies = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        finished = any(t in eos_ids for t in row)
        replies.append(ChatReply(tokenizer.decode(row, skip_special_tokens=True), truncated=not finished))
    return replies


def _ask_hf(cfg: TeacherConfig, jobs: list[tuple[str, str]], cache: ReplyCache, bar: tqdm, model_cache_dir) -> None:
    import torch

    from .models import PACKAGED, load_model

    source = "packaged" if cfg.model in PACKAGED else "hf"
    loaded = load_model(ModelSpec(tag="teacher", source=source, name=cfg.model), cache_dir=model_cache_dir, dtype="bfloat16")
    jobs = sorted(jobs, key=lambda job: len(job[1]))  # similar lengths share a batch: less padding
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        for start in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[start : start + cfg.batch_size]
            replies = generate_chat(
                loaded.model, loaded.tokenizer, [p for _, p in chunk], max_new_tokens=cfg.max_tokens, temperature=cfg.temperature
            )
            for (key, _), reply in zip(chunk, replies):
                cache.add(key, reply)
            bar.update(len(chunk))


def _ask_openai(cfg: TeacherConfig, api_key: Optional[str], jobs: list[tuple[str, str]], cache: ReplyCache, bar: tqdm) -> dict[str, str]:
    client = ChatClient(
        cfg.base_url, cfg.model, api_key, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
        budget=Budget(cfg.budget_s, "teacher.budget_s"),
    )
    failures: dict[str, str] = {}

    def on_result(key: str, reply: Optional[ChatReply], reason: Optional[str]) -> None:
        if reply is not None:
            cache.add(key, reply)
        else:
            failures[key] = reason or "unknown"
        bar.update(1)
        bar.set_postfix(failed=len(failures), refresh=False)

    try:
        complete_all(client, jobs, concurrency=cfg.concurrency, on_result=on_result,
                     max_consecutive_failures=cfg.max_consecutive_failures)
    except EndpointDown as exc:
        raise NLAError(
            f"the teacher endpoint {redact_url(cfg.base_url)} (model {cfg.model!r}) is not answering: {exc.reason}; "
            f"passages.parquet was left unchanged and {len(cache.replies)} finished replies are cached in {cache.path}",
            "check base_url, model and the API key, then rerun: cached replies are not asked again",
        ) from None
    except BudgetSpent as exc:
        raise NLAError(
            f"{exc.problem}; passages.parquet was left unchanged and {len(cache.replies)} finished replies are "
            f"cached in {cache.path}",
            f"{exc.fix}, then rerun: cached replies are not asked again",
        ) from None
    return failures


def _existing_z(table: pa.Table, tid: str, cfg: TeacherConfig, path: Path) -> list[Optional[str]]:
    """This teacher's earlier explanations (kept); another teacher's → refused unless `replace`."""
    if "z" not in table.column_names:
        return [None] * table.num_rows
    zs = table.column("z").to_pylist()
    teachers = table.column("teacher").to_pylist() if "teacher" in table.column_names else [None] * len(zs)
    others = sorted({t or "<unnamed>" for z, t in zip(zs, teachers) if z is not None and t != tid})
    if others and not cfg.replace:
        raise NLAError(
            f"{path} already holds explanations from teacher {', '.join(others)}, and this run's teacher is "
            f"{tid}: mixing teachers in one corpus is refused (it wrecked the seed's v3)",
            "write to a new output folder (a fresh passages.parquet), or set teacher.replace=true to discard "
            "the old explanations and teach every passage again",
        )
    return [z if t == tid else None for z, t in zip(zs, teachers)]


def teach(
    passages_path: str | os.PathLike,
    cfg: TeacherConfig,
    *,
    cache_dir: str | os.PathLike,
    model_cache_dir: Optional[str | os.PathLike] = None,
) -> TeachReport:
    """Fill `z` and `teacher` of passages.parquet (in place, atomically) for the configured splits.

    Replies are cached under `cache_dir/teacher/`; the hf backend's converted model under
    `model_cache_dir` (default: the models module's own cache).
    """
    started = time.perf_counter()
    _check_config(cfg)
    api_key = _api_key(cfg) if cfg.backend == "openai" else None
    tid = teacher_id(cfg)  # the replies' identity; the z's is explanation_id (a head changes z, not replies)
    zid = explanation_id(cfg)
    path = Path(passages_path)
    table = read_passages(path)
    texts = table.column("text").to_pylist()
    splits = table.column("split").to_pylist()
    earlier = _existing_z(table, zid, cfg, path)
    wanted = set(cfg.splits)
    eligible = [i for i, s in enumerate(splits) if s in wanted]
    kept = [i for i in eligible if earlier[i] is not None]

    cache = ReplyCache(cache_dir, tid)
    keys: dict[int, str] = {}
    prompts: dict[str, str] = {}
    for i in eligible:
        if earlier[i] is None:
            # the context teacher reads the whole row: a prompt cut at max_input_chars could merge two rows
            prompt = texts[i] if cfg.backend == "context" else fill_prompt(cfg, texts[i])
            keys[i] = ReplyCache.key(tid, prompt)
            prompts[keys[i]] = prompt
    from_cache = sum(1 for k in keys.values() if k in cache.replies)
    jobs = [] if cfg.backend == "context" else [(k, p) for k, p in prompts.items() if k not in cache.replies]
    log.info("teacher %s: %d passages need a z, %d cached, %d to ask", tid, len(keys), from_cache, len(jobs))

    failures: dict[str, str] = {}
    replies = cache.replies
    if cfg.backend == "context":  # extractive: computed here, nothing to ask or cache
        if not is_token_table(table):
            raise DataError(f"teacher.backend=context explains token rows, and {path} holds whole passages",
                            "build the corpus with corpus.unit=token, or use the hf / openai teacher")
        replies = {keys[i]: ChatReply(context_explanation(texts[i], cfg.context_words), False) for i in keys}
    elif jobs:
        with tqdm(total=len(jobs), desc=f"teach {tid}", unit="passage", dynamic_ncols=True) as bar:
            if cfg.backend == "openai":
                failures = _ask_openai(cfg, api_key, jobs, cache, bar)
            else:
                _ask_hf(cfg, jobs, cache, bar, model_cache_dir)

    z: list[Optional[str]] = [earlier[i] if splits[i] in wanted else None for i in range(table.num_rows)]
    report = TeachReport(teacher=zid, rows=table.num_rows, eligible=len(eligible), kept=len(kept),
                         from_cache=from_cache, requested=len(jobs), valid=0, invalid=0, failed=0, seconds=0.0)
    idf_of = idf([t for t, s in zip(texts, splits) if s == "train"])
    for i, key in keys.items():
        reply = replies.get(key)
        if reply is None:
            report.failed += 1
            reason = failures.get(key, "no reply")
            report.failure_reasons[reason] = report.failure_reasons.get(reason, 0) + 1
            continue
        z[i] = validate_explanation(reply.text, min_chars=cfg.min_chars, max_chars=cfg.max_chars, truncated=reply.truncated)
        if z[i] is not None and cfg.head == HeadKind.keywords:
            z[i] = with_head(z[i], keywords(texts[i], idf_of, cfg.head_words))
        if z[i] is None:
            report.invalid += 1
            if len(report.invalid_examples) < 5:
                report.invalid_examples.append(reply.text[:200])
    report.valid = sum(1 for v in z if v is not None)
    report.seconds = round(time.perf_counter() - started, 3)
    if eligible and report.valid == 0:
        examples = report.invalid_examples[:2] or list(report.failure_reasons)[:2]
        raise NLAError(
            f"teacher {tid} produced no usable explanation for {len(eligible)} passages ({report.invalid} "
            f"invalid replies, {report.failed} failed requests; e.g. {examples})",
            "check the teacher model and prompt (teacher.prompt, teacher.min_chars/max_chars); passages.parquet is unchanged",
        )
    table = table.drop_columns([c for c in ("z", "teacher") if c in table.column_names])
    table = table.append_column("z", pa.array(z, pa.string()))
    table = table.append_column("teacher", pa.array([zid if v is not None else None for v in z], pa.string()))
    write_passages(table, path)
    log.info("teacher %s: %d valid, %d invalid, %d failed (%.1fs)", zid, report.valid, report.invalid, report.failed, report.seconds)
    return report
