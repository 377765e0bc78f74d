"""Typed configs (omegaconf structured dataclasses) and the one loader every stage uses.

Each option is documented once, in the `help` of its field; `nla-universal <stage> --help` prints
them. Choices are `StrEnum`s, so a misspelt value is refused at load time with the valid values
named. Stage configs live beside their stage (`pipeline/<stage>.py`) and embed the shared pieces
defined here (`ModelSpec`, `PoolConfig`, `CorpusConfig`). Pools and presets ship with the package
under `nla_universal/configs/`, so a non-editable install finds them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")

TAG_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class Source(enum.StrEnum):
    hf = "hf"
    packaged = "packaged"
    random = "random"


class Pooling(enum.StrEnum):
    mean = "mean"
    last = "last"
    positions = "positions"


class Unit(enum.StrEnum):
    passage = "passage"  # one row per passage
    token = "token"  # rows are passage prefixes ending at a word: per-token vectors (nla_universal/token_rows.py)


class DType(enum.StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def choices(kind: type[enum.Enum]) -> str:
    return " | ".join(m.value for m in kind)


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
    source: Source = opt(Source.hf, f"where the weights come from: {choices(Source)}")
    name: str = opt(
        "",
        "hf: hub id or local folder; packaged: smollm2-135m-instruct | gemma3-270m; "
        "random: a transformers model_type (tiny random weights, for architecture coverage)",
    )
    revision: Optional[str] = opt(None, "hf: git revision of the hub repo")
    layer: Optional[int] = opt(None, "layer K (output of block K = hidden_states[K+1]); or depth")
    depth: Optional[float] = opt(None, "fraction of depth f; K = round(f * (L - 1)); default 0.5")
    pool: Pooling = opt(Pooling.mean, "mean (content tokens, fp32) | last (last content token) | positions (sampled tokens)")
    positions_per_passage: int = opt(8, "pool=positions: sampled token positions per passage")
    dtype: DType = opt(DType.float32, f"compute dtype: {choices(DType)} (reductions stay fp32)")
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

    @property
    def trained_tags(self) -> list[str]:
        return [m.tag for m in self.models if not m.held_out]


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
    unit: Unit = opt(Unit.passage, f"{choices(Unit)}: what a row is; token rows are prefixes ending at a sampled "
                     "word (every pool entry then uses pool=last, and the teacher backend=context)")
    tokens_per_passage: int = opt(1, "unit=token: word ends sampled per passage (its rows share its split)")
    min_context_words: int = opt(5, "unit=token: words of context before the first word end that may be sampled")


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise ConfigError(
            f"invalid tag {tag!r}: tags become file names and state-dict keys",
            "use lowercase letters, digits and '-', starting with a letter or digit "
            "(e.g. 'qwen3-1p7b' rather than 'Qwen3-1.7B')",
        )
    return tag


def validate_pool(pool: PoolConfig) -> PoolConfig:
    """Checks that need no model files: tags, sources, names, layer/depth, the anchor."""
    if not pool.models:
        raise ConfigError("the pool has no models", "list at least one entry under `models:`")
    seen: set[str] = set()
    for m in pool.models:
        check_tag(m.tag)
        if m.tag in seen:
            raise ConfigError(f"duplicate tag {m.tag!r} in the pool", "give every model its own tag")
        seen.add(m.tag)
        for name, kind in (("source", Source), ("pool", Pooling), ("dtype", DType)):
            if getattr(m, name) not in set(kind):
                raise ConfigError(f"{m.tag}: unknown {name} {getattr(m, name)!r}", f"use one of {choices(kind)}")
        if not m.name:
            raise ConfigError(f"{m.tag}: `name` is empty", "set the hub id, package or model_type")
        if m.layer is not None and m.depth is not None:
            raise ConfigError(f"{m.tag}: both `layer` and `depth` are set", "keep only one")
        if m.depth is not None and not 0.0 <= m.depth <= 1.0:
            raise ConfigError(f"{m.tag}: depth {m.depth} outside [0, 1]", "use a fraction")
        if m.layer is not None and m.layer < 0:
            raise ConfigError(f"{m.tag}: layer {m.layer} is negative", "use a block index 0..L-1")
    if pool.anchor not in seen:
        raise ConfigError(f"anchor {pool.anchor!r} is not a tag of the pool", f"use one of {sorted(seen)}")
    if pool.spec(pool.anchor).held_out:
        raise ConfigError(f"anchor {pool.anchor!r} is marked held_out", "the trunk's own model trains")
    return pool


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"


def _fields(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _as_config_error(exc: OmegaConfBaseException, schema: type) -> ConfigError:
    key = getattr(exc, "key", None) or "?"
    full = getattr(exc, "full_key", None) or key
    if isinstance(exc, ConfigKeyError):
        parent: Any = schema
        for part in str(full).split(".")[:-1]:
            hints = typing.get_type_hints(parent) if dataclasses.is_dataclass(parent) else {}
            parent = hints.get(part)
        hint = _suggest(str(key), _fields(parent))
        stem = str(full).rpartition(".")[0]
        if stem and hint.startswith("did you mean"):
            hint = hint.replace("'", f"'{stem}.", 1)
        return ConfigError(f"unknown config key {full!r}", hint)
    return ConfigError(f"bad config value for {full!r}: {str(getattr(exc, 'msg', exc)).splitlines()[0]}",
                       "check the value against `--help`")


def _parse_yaml(parse, what: str):
    """`parse()`, with a YAML syntax error (values are read as YAML) turned into a ConfigError."""
    try:
        return parse()
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read {what} as YAML: {str(exc).splitlines()[0]}",
                          "quote values holding ': ' or ' #' (key='\"a: b\"'), or put them in a -c YAML file") from None


def load_config(schema: type[T], files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Schema defaults ← each YAML file in order ← `key=value` overrides; unknown keys and values
    outside a field's choices are errors."""
    try:
        merged = OmegaConf.structured(schema)
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"config file {f} not found", "check the path given to -c")
            merged = OmegaConf.merge(merged, _parse_yaml(lambda: OmegaConf.load(f), f"config file {f}"))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value", "write e.g. loop.batch_size=8")
        for o in overrides:
            merged = OmegaConf.merge(merged, _parse_yaml(lambda: OmegaConf.from_dotlist([o]), f"override {o!r}"))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"required config key {missing[0]!r} is not set", f"add {missing[0]}=... ")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _as_config_error(exc, schema) from None


def resolve_config_path(name_or_path: str, kind: str) -> Path:
    """A YAML path, or the name of a file shipped in `nla_universal/configs/<kind>/` (e.g. pool `demo`)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"{kind[:-1]} file {p} not found", "check the path")
        return p
    candidate = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(x.stem for x in (CONFIG_DIR / kind).glob("*.yaml"))
        raise ConfigError(f"no {kind[:-1]} named {name_or_path!r}", f"use a YAML path or one of {known}")
    return candidate


def _check_pool_keys(path: Path) -> None:
    """Name the file, the entry and the valid keys for a typo inside a pool entry (omegaconf alone
    would only name the top-level keys)."""
    raw = _parse_yaml(lambda: yaml.safe_load(path.read_text()), f"pool file {path}")
    if not isinstance(raw, dict):
        raise ConfigError(f"pool file {path} is not a mapping with `anchor:` and `models:`", "see configs/pools/demo.yaml")
    for key in raw:
        if key not in _fields(PoolConfig):
            raise ConfigError(f"pool file {path}: unknown key {key!r}", _suggest(str(key), _fields(PoolConfig)))
    valid = _fields(ModelSpec)
    for n, entry in enumerate(raw.get("models") or []):
        if not isinstance(entry, dict):
            raise ConfigError(f"pool file {path}: models[{n}] is not a mapping", "write each model as {tag: ..., source: ..., name: ...}")
        for key in entry:
            if key not in valid:
                who = f"entry {entry['tag']!r}" if "tag" in entry else f"models[{n}]"
                raise ConfigError(f"pool file {path}, {who}: unknown key {key!r}",
                                  f"{_suggest(str(key), valid)} (entry keys: {', '.join(valid)})")


def load_pool(name_or_path: str) -> PoolConfig:
    path = resolve_config_path(name_or_path, "pools")
    _check_pool_keys(path)
    try:
        return validate_pool(load_config(PoolConfig, [str(path)]))
    except ConfigError as exc:
        raise ConfigError(f"pool file {path}: {exc.problem}", exc.fix) from None


def _shown(value: Any) -> str:
    if value is MISSING:
        return "(required)"
    return repr(value.value) if isinstance(value, enum.Enum) else repr(value)


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
        lines.append(f"  {key} = {_shown(value)}\n      {f.metadata.get('help', '')}")
    return lines
