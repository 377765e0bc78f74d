"""Passages with stable ids and a by-passage train/val/test split → `passages.parquet`.

The built-in corpus is generated on the machine from Python's own documentation (the help topics
shipped in `pydoc_data` and the docstrings of the standard library), so no third-party text lives in
this repo and every machine with the same Python builds the same passages.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import io
from .config import CorpusConfig, Unit
from .errors import DataError
from .token_rows import token_rows

SPLITS = ("train", "val", "test")
SOURCE_ID = "source_id"  # token rows: the passage the prefix was cut from
_SKIP_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
_WS = re.compile(r"[ \t]+")


def passage_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_of(pid: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the id: the same passage lands in the same split everywhere."""
    u = int(hashlib.sha256(f"split:{pid}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _clean(text: str) -> str:
    lines = [_WS.sub(" ", line).strip() for line in text.strip().splitlines()]
    return "\n".join(lines).strip()


def _prose_share(text: str) -> float:
    return sum(c.isalpha() or c.isspace() for c in text) / max(1, len(text))


def _cut(text: str, max_chars: int) -> str:
    """Cut at the last sentence end (else word boundary) before max_chars."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = max(head.rfind(". "), head.rfind(".\n"))
    if end > max_chars // 2:
        return head[: end + 1]
    return head.rsplit(" ", 1)[0]


def _chunk_paragraphs(text: str, max_chars: int) -> Iterator[str]:
    """Greedily merge consecutive paragraphs into chunks of at most max_chars."""
    buf = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if buf and len(buf) + len(para) + 2 > max_chars:
            yield buf
            buf = ""
        buf = f"{buf}\n\n{para}" if buf else para
    if buf:
        yield buf


def _builtin_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_STDLIB_DIRS.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n} is not JSON ({exc.msg} at column {exc.colno})",
                                        "write one JSON object per line") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{n} is not a JSON object", f'write {{"{text_field}": "..."}} per line')
                    if text_field not in row:
                        raise DataError(f"{path}:{n} has no field {text_field!r}", "set corpus.text_field")
                    yield str(row[text_field])
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path} has no column {text_field!r}", "set corpus.text_field")
            yield from (str(t) for t in table.column(text_field).to_pylist() if t is not None)
        else:
            raise DataError(f"unsupported corpus file {path}", "use .txt, .jsonl or .parquet files")
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"cannot read corpus file {path}: {exc}", "check the file is readable and well-formed") from None


def _hf_documents(name: str, text_field: str, limit: int) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("corpus source hf:… needs the `datasets` package", "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # network and hub errors come in many types
        raise DataError(f"cannot load dataset {name!r}: {exc}", "check the name and that the hub is reachable") from None
    for n, row in enumerate(ds):
        if n >= limit:
            break
        yield str(row[text_field])


def _documents(cfg: CorpusConfig) -> Iterable[str]:
    if cfg.source == "builtin":
        return _builtin_documents()
    if cfg.source.startswith("hf:"):
        return _hf_documents(cfg.source[3:], cfg.text_field, cfg.max_passages * 4)
    path = Path(cfg.source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise DataError(f"corpus folder {path} holds no .txt, .jsonl or .parquet files", "point corpus.source at your text")
        return (doc for f in files for doc in _read_file(f, cfg.text_field))
    if path.is_file():
        return _read_file(path, cfg.text_field)
    raise DataError(f"corpus source {cfg.source!r} is neither 'builtin', 'hf:<name>', a folder nor a file", "fix corpus.source")


def build_passages(cfg: CorpusConfig) -> pa.Table:
    """Documents → cleaned, length-filtered, deduplicated passages with ids and splits."""
    if not 0 <= cfg.val_fraction + cfg.test_fraction < 1:
        raise DataError("val_fraction + test_fraction must be in [0, 1)", "lower the fractions")
    by_id: dict[str, str] = {}
    for doc in _documents(cfg):
        for chunk in _chunk_paragraphs(_clean(doc), cfg.max_chars):
            text = _cut(chunk, cfg.max_chars)
            if len(text) >= cfg.min_chars and _prose_share(text) >= 0.75:
                by_id.setdefault(passage_id(text), text)
    if not by_id:
        raise DataError(
            f"the corpus {cfg.source!r} yields no passages of at least {cfg.min_chars} characters",
            "give more text, or lower corpus.min_chars",
        )
    # A hash order picks a deterministic, topic-mixed subset when capping.
    ids = sorted(by_id)[: cfg.max_passages]
    texts = [by_id[i] for i in ids]
    splits = [split_of(i, cfg.val_fraction, cfg.test_fraction) for i in ids]
    if cfg.unit == Unit.token:
        return _token_table(ids, texts, splits, cfg)
    return pa.table({"passage_id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                     "split": pa.array(splits, pa.string())})


def _token_table(ids: list[str], texts: list[str], splits: list[str], cfg: CorpusConfig) -> pa.Table:
    if cfg.tokens_per_passage < 1 or cfg.min_context_words < 0:
        raise DataError(f"corpus.tokens_per_passage={cfg.tokens_per_passage}, min_context_words={cfg.min_context_words}",
                        "sample at least one word end per passage, after a non-negative number of words")
    rows = list(token_rows(ids, texts, splits, cfg.tokens_per_passage, cfg.min_context_words))
    if not rows:
        raise DataError(f"no passage has more than {cfg.min_context_words} words to sample a token row from",
                        "lower corpus.min_context_words or give longer passages")
    columns = ("passage_id", "text", "split", SOURCE_ID)
    return pa.table({name: pa.array([r[j] for r in rows], pa.string()) for j, name in enumerate(columns)})


def is_token_table(table: pa.Table) -> bool:
    """Rows are per-token prefixes (corpus.unit=token), not whole passages."""
    return SOURCE_ID in table.column_names


def fingerprint(passage_ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(passage_ids)).encode()).hexdigest()[:16]


def write_passages(table: pa.Table, path: str | Path) -> None:
    with io.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_passages(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found", "run `nla-universal corpus` first")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"cannot read {path}: {exc}", f"delete {path} and rerun `nla-universal corpus`") from None
    missing = {"passage_id", "text", "split"} - set(table.column_names)
    if missing:
        raise DataError(f"{path} lacks columns {sorted(missing)}", "rebuild it with `nla-universal corpus`")
    if table.num_rows == 0:
        raise DataError(f"{path} holds no passages", "rebuild it from a non-empty corpus")
    return table


def split_ids(table: pa.Table, split: str) -> list[str]:
    ids = table.column("passage_id").to_pylist()
    return [i for i, s in zip(ids, table.column("split").to_pylist()) if s == split]
