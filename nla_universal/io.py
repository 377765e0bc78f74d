"""Atomic file output: write under a temporary name in the same folder, rename when complete.

A later stage never sees a half-written file: either the final name exists with full content, or it
does not exist at all.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

SUCCESS = "_SUCCESS"

# Configs hold StrEnum choices; in YAML they are their plain values.
yaml.SafeDumper.add_multi_representer(enum.Enum, lambda dumper, value: dumper.represent_data(value.value))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def read_yaml(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return yaml.safe_load(f)


def mark_success(folder: str | os.PathLike) -> None:
    write_text(Path(folder) / SUCCESS, "")


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SUCCESS).exists()


def file_digest(path: str | os.PathLike) -> dict:
    """Size and sha256 of a file: what a manifest records, and what a reader checks against."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def manifest(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """`file_digest` of every file under `folder` (relative posix paths), except the names in `skip`."""
    folder = Path(folder)
    return {rel: file_digest(folder / rel) for rel in manifest_names(folder, skip)}


def manifest_problems(folder: str | os.PathLike, expected: dict[str, dict], skip: tuple[str, ...] = ()) -> list[str]:
    """What differs between `folder` and a manifest of it: missing, changed and unexpected files."""
    folder = Path(folder)
    problems = []
    for rel, digest in expected.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != digest["bytes"] or file_digest(path)["sha256"] != digest["sha256"]:
            problems.append(f"{rel} changed since it was written")
    extra = sorted(set(manifest_names(folder, skip)) - set(expected))
    problems += [f"{rel} is not part of it" for rel in extra]
    return problems


def manifest_names(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Files under `folder` (relative posix paths), except the names in `skip`, sorted."""
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip]


MANIFEST = "manifest.json"


def seal(folder: str | os.PathLike) -> None:
    """Write `manifest.json` — the size and sha256 of every other file — last: the folder's completion record."""
    write_text(Path(folder) / MANIFEST, json.dumps({"files": manifest(folder, skip=(MANIFEST,))}, indent=1))


def seal_problems(folder: str | os.PathLike) -> list[str] | None:
    """What differs from the folder's manifest (missing, changed, unexpected files); None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        expected = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST} is corrupt"]
    return manifest_problems(folder, expected, skip=(MANIFEST,))
