"""Typed configs (omegaconf structured dataclasses) and the one loader every stage uses.

Each option is documented once, in the `help` of its field; `nla-universal <stage> --help` prints
them. Stage configs live beside their stage (e.g. `extract.ExtractConfig`) and embed the shared
pieces defined here (`ModelSpec`, `PoolConfig`, `CorpusConfig`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")

TAG_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
SOURCES = ("hf", "packaged", "random")
POOLINGS = ("mean", "last", "positions")
DTYPES = ("float32", "bfloat16", "float16")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def opt(default: Any = MISSING, help: str = "", factory: Any = None) -> Any:
    """A documented config field."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def default_cache_dir() -> str:
    return os.environ.get("NLA_UNIVERSAL_CACHE", str(Path.home() / ".cache" / "nla-universal"))


@dataclass
class ModelSpec:
    """One model of the pool."""

    tag: str = opt(help="short name, [a-z0-9][a-z0-9-]*; used in file names and prompts")
    source: str = opt("hf", "where the weights come from: hf | packaged | random")
    name: str = opt(
        "",
        "hf: hub id or local folder; packaged: smollm2-135m-instruct | gemma3-270m; "
        "random: a transformers model_type (tiny random weights, for architecture coverage)",
    )
    revision: Optional[str] = opt(None, "hf: git revision of the hub repo")
    layer: Optional[int] = opt(None, "layer K (output of block K = hidden_states[K+1]); or depth")
    depth: Optional[float] = opt(None, "fraction of depth f; K = round(f * (L - 1)); default 0.5")
    pool: str = opt("mean", "mean (content tokens, fp32) | last (last content token) | positions")
    positions_per_passage: int = opt(8, "pool=positions: sampled token positions per passage")
    dtype: str = opt("float32", "compute dtype: float32 | bfloat16 | float16 (reductions stay fp32)")
    max_length: int = opt(256, "tokens per passage; longer passages are truncated")
    tokenizer: Optional[str] = opt(None, "tokenizer hub id or folder when it differs from the model")
    use_fast_tokenizer: bool = opt(True, "try the fast tokenizer first (falls back to slow)")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code (off by default)")
    seed: int = opt(0, "random: seed of the weight initialisation")
    random_overrides: dict = opt(help="random: config keys over the tiny recipe", factory=dict)
    held_out: bool = opt(False, "never used to train the AV/AR; only its adapters are fitted")


@dataclass
class PoolConfig:
    """A pool of models sharing one AV/AR; the anchor's space is d_shared."""

    anchor: str = opt(help="tag of the trunk's own model (its enc_M is the identity, minus the shared mean when centred)")
    models: list[ModelSpec] = opt(help="the pooled models", factory=list)

    def spec(self, tag: str) -> ModelSpec:
        for m in self.models:
            if m.tag == tag:
                return m
        raise ConfigError(f"unknown tag {tag!r}", f"use one of: {', '.join(self.tags)}")

    @property
    def tags(self) -> list[str]:
        return [m.tag for m in self.models]


@dataclass
class CorpusConfig:
    """Where passages come from and how they are split."""

    source: str = opt(
        "builtin",
        "builtin (Python's own documentation, generated here) | a folder of .txt/.jsonl/.parquet "
        "| a file | hf:<datasets name> (online only)",
    )
    text_field: str = opt("text", "JSONL/parquet/datasets column holding the text")
    max_passages: int = opt(2000, "keep at most this many passages (after dedup and filtering)")
    min_chars: int = opt(200, "drop passages shorter than this")
    max_chars: int = opt(2000, "cut passages longer than this at a sentence or word boundary")
    val_fraction: float = opt(0.1, "share of passages in val (by hash of the passage id)")
    test_fraction: float = opt(0.1, "share of passages in test (by hash of the passage id)")


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise ConfigError(
            f"invalid tag {tag!r}: tags become file names and state-dict keys",
            "use lowercase letters, digits and '-', starting with a letter or digit "
            "(e.g. 'qwen3-1p7b' rather than 'Qwen3-1.7B')",
        )
    return tag


def validate_pool(pool: PoolConfig) -> PoolConfig:
    if not pool.models:
        raise ConfigError("the pool has no models", "list at least one entry under `models:`")
    seen: set[str] = set()
    for m in pool.models:
        check_tag(m.tag)
        if m.tag in seen:
            raise ConfigError(f"duplicate tag {m.tag!r} in the pool", "give every model its own tag")
        seen.add(m.tag)
        if m.source not in SOURCES:
            raise ConfigError(f"{m.tag}: unknown source {m.source!r}", f"use one of {SOURCES}")
        if not m.name:
            raise ConfigError(f"{m.tag}: `name` is empty", "set the hub id, package or model_type")
        if m.pool not in POOLINGS:
            raise ConfigError(f"{m.tag}: unknown pool {m.pool!r}", f"use one of {POOLINGS}")
        if m.dtype not in DTYPES:
            raise ConfigError(f"{m.tag}: unknown dtype {m.dtype!r}", f"use one of {DTYPES}")
        if m.layer is not None and m.depth is not None:
            raise ConfigError(f"{m.tag}: both `layer` and `depth` are set", "keep only one")
        if m.depth is not None and not 0.0 <= m.depth <= 1.0:
            raise ConfigError(f"{m.tag}: depth {m.depth} outside [0, 1]", "use a fraction")
    if pool.anchor not in seen:
        raise ConfigError(f"anchor {pool.anchor!r} is not a tag of the pool", f"use one of {sorted(seen)}")
    if pool.spec(pool.anchor).held_out:
        raise ConfigError(f"anchor {pool.anchor!r} is marked held_out", "the trunk's own model trains")
    return pool


def _suggest(key: str, node: Any) -> str:
    valid = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    close = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"


def _as_config_error(exc: OmegaConfBaseException, schema: type) -> ConfigError:
    key = getattr(exc, "key", None) or "?"
    full = getattr(exc, "full_key", None) or key
    if isinstance(exc, ConfigKeyError):
        parent: Any = schema
        for part in str(full).split(".")[:-1]:
            hints = typing.get_type_hints(parent) if dataclasses.is_dataclass(parent) else {}
            parent = hints.get(part)
        hint = _suggest(str(key), parent)
        stem = str(full).rpartition(".")[0]
        if stem and hint.startswith("did you mean"):
            hint = hint.replace("'", f"'{stem}.", 1)
        return ConfigError(f"unknown config key {full!r}", hint)
    return ConfigError(f"bad config value for {full!r}: {str(getattr(exc, 'msg', exc)).splitlines()[0]}",
                       "check the value's type against `--help`")


def _parse_yaml(parse, what: str):
    """`parse()`, with a YAML syntax error (values are read as YAML) turned into a ConfigError."""
    try:
        return parse()
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read {what} as YAML: {str(exc).splitlines()[0]}",
                          "quote values holding ': ' or ' #' (key='\"a: b\"'), or put them in a -c YAML file") from None


def load_config(schema: type[T], files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Schema defaults ← each YAML file in order ← `key=value` overrides; unknown keys are errors."""
    try:
        merged = OmegaConf.structured(schema)
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"config file {f} not found", "check the path given to -c")
            merged = OmegaConf.merge(merged, _parse_yaml(lambda: OmegaConf.load(f), f"config file {f}"))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value", "write e.g. batch_size=8")
        for o in overrides:
            merged = OmegaConf.merge(merged, _parse_yaml(lambda: OmegaConf.from_dotlist([o]), f"override {o!r}"))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"required config key {missing[0]!r} is not set", f"add {missing[0]}=... ")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _as_config_error(exc, schema) from None


def resolve_config_path(name_or_path: str, kind: str) -> Path:
    """A YAML path, or the name of a file in `configs/<kind>/` (e.g. pool `demo`)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"{kind} file {p} not found", "check the path")
        return p
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(x.stem for x in (CONFIG_DIR / kind).glob("*.yaml"))
        raise ConfigError(f"no {kind} named {name_or_path!r}", f"use a YAML path or one of {known}")
    return candidate


def load_pool(name_or_path: str) -> PoolConfig:
    return validate_pool(load_config(PoolConfig, [str(resolve_config_path(name_or_path, "pools"))]))


def describe(schema: Any, prefix: str = "") -> list[str]:
    """One line per option: key, default, help (for --help). Takes a config class or instance."""
    lines: list[str] = []
    cls = schema if isinstance(schema, type) else type(schema)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if not isinstance(schema, type):
            value = getattr(schema, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = MISSING
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(value if dataclasses.is_dataclass(value) else hints[f.name], key + ".")
            continue
        shown = "(required)" if value is MISSING else repr(value)
        lines.append(f"  {key} = {shown}\n      {f.metadata.get('help', '')}")
    return lines
