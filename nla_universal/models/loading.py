"""Load one pooled model (optionally only its first blocks) with its tokenizer and resolved layer."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..config import DType, ModelSpec, choices
from ..errors import ConfigError, NLAError
from .arch import decoder_layers, text_config
from .sources import hub_or_local, model_folder
from .truncate import truncated_config, truncation_blocker

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 0.5


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: PreTrainedModel  # eval mode; possibly only the first num_blocks blocks
    tokenizer: PreTrainedTokenizerBase  # pad token set, padding_side "right"
    model_type: str  # the text config's model_type, e.g. "gemma3_text"
    num_layers: int  # L of the full model, whatever was loaded
    layer: int  # K: the block whose output is this model's activation
    d_model: int
    folder: Path  # the local safetensors folder the weights came from


def resolve_layer(spec: ModelSpec, num_layers: int) -> int:
    """K from `layer`, or round(depth * (L - 1)) with depth 0.5 by default."""
    if spec.layer is not None:
        layer = spec.layer
        how = f"layer {layer}"
    else:
        depth = DEFAULT_DEPTH if spec.depth is None else spec.depth
        layer = round(depth * (num_layers - 1))
        how = f"depth {depth} → layer {layer}"
    if not 0 <= layer < num_layers:
        raise ConfigError(
            f"{spec.tag}: {how} is outside the model's blocks 0..{num_layers - 1}",
            f"set `layer:` to 0..{num_layers - 1} or `depth:` to a fraction in [0, 1]",
        )
    return layer


def _torch_dtype(name: str) -> torch.dtype:
    if name not in set(DType):
        raise ConfigError(f"unknown dtype {name!r}", f"use one of {choices(DType)}")
    return getattr(torch, name)


def load_tokenizer(spec: ModelSpec, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, right-padded, with a pad token (falls back to eos, then unk)."""
    if spec.tokenizer:
        folder = hub_or_local(spec.tokenizer, None, spec.trust_remote_code)
    else:
        folder = model_folder(spec, cache_dir)
    common = dict(trust_remote_code=spec.trust_remote_code)
    tokenizer = None
    if spec.use_fast_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        except Exception as exc:  # a tokenizer.json the fast reader rejects: try the original vocab files
            log.warning("%s: fast tokenizer failed (%s: %s); using the slow one", spec.tag, type(exc).__name__, exc)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False, from_slow=True, **common)
        except Exception as exc:
            raise NLAError(
                f"{spec.tag}: cannot load a tokenizer from {folder} ({type(exc).__name__}: {exc})",
                "set `tokenizer:` to a folder or hub id with a working tokenizer",
            ) from None
        log.info("%s: loaded the slow tokenizer", spec.tag)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise NLAError(
                f"{spec.tag}: the tokenizer has no pad, eos or unk token to pad batches with",
                "set `tokenizer:` to one that defines a pad or eos token",
            )
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    return tokenizer


@contextlib.contextmanager
def _no_load_report() -> Iterator[None]:
    """Silence transformers' load report: a truncated load leaves the dropped blocks' tensors
    "unexpected" by design; _check_loading_info judges the keys instead."""
    report_log = logging.getLogger("transformers.modeling_utils")

    def drop(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    report_log.addFilter(drop)
    try:
        yield
    finally:
        report_log.removeFilter(drop)


def _check_loading_info(spec: ModelSpec, model, info: dict, num_blocks: int | None) -> None:
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise NLAError(
            f"{spec.tag}: {len(missing)} weights are not in the checkpoint and would be random "
            f"(e.g. {missing[:3]})",
            "check that the folder holds the full model's safetensors for this config",
        )
    if num_blocks is None:
        return
    blocks = decoder_layers(model)
    path = next(name for name, module in model.named_modules() if module is blocks)
    block = re.compile(rf"(^|\.){re.escape(path.rpartition('.')[2])}\.(\d+)\.")
    others = sorted(
        k for k in info.get("unexpected_keys", ()) if not ((m := block.search(k)) and int(m.group(2)) >= num_blocks)
    )
    if others:
        log.warning("%s: checkpoint tensors the model does not use: %s", spec.tag, others[:10])


def _read_config(spec: ModelSpec, folder: Path):
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise NLAError(
            f"{spec.tag}: no usable config.json in {folder}: {str(exc).splitlines()[0]}",
            "point `name:` at a Hugging Face model folder (config.json + *.safetensors); for a custom "
            "architecture whose code ships with the model, set trust_remote_code: true",
        ) from None


def load_model(
    spec: ModelSpec,
    *,
    cache_dir: str | None = None,
    num_blocks: int | Literal["to_layer"] | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """`spec`'s model and tokenizer. num_blocks=n loads only blocks 0..n-1 (the config is cut before
    the weights load); "to_layer" means n = K+1; None loads the whole model."""
    folder = model_folder(spec, cache_dir)
    config = _read_config(spec, folder)
    tconf = text_config(config)
    num_layers = tconf.num_hidden_layers
    layer = resolve_layer(spec, num_layers)
    keep = layer + 1 if num_blocks == "to_layer" else num_blocks
    if keep is not None and not 1 <= keep <= num_layers:
        raise ConfigError(f"{spec.tag}: cannot keep {keep} of {num_layers} blocks", f"use 1..{num_layers}")
    if keep == num_layers:
        keep = None
    if keep is not None and (blocker := truncation_blocker(config)) is not None:
        log.warning("%s: loading all %d blocks: %s", spec.tag, num_layers, blocker)
        keep = None
    if keep is not None:
        config = truncated_config(config, keep)
    torch_dtype = _torch_dtype(dtype or spec.dtype)
    try:
        with _no_load_report() if keep is not None else contextlib.nullcontext():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder,
                config=config,
                dtype=torch_dtype,
                use_safetensors=True,
                trust_remote_code=spec.trust_remote_code,
                output_loading_info=True,
            )
    except OSError as exc:
        raise NLAError(
            f"{spec.tag}: cannot load weights from {folder}: {str(exc).splitlines()[0]}",
            "the folder needs *.safetensors weights (pickled .bin checkpoints are never loaded): convert them",
        ) from None
    _check_loading_info(spec, model, info, keep)
    model.eval()
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=load_tokenizer(spec, cache_dir),
        model_type=tconf.model_type,
        num_layers=num_layers,
        layer=layer,
        d_model=tconf.hidden_size,
        folder=folder,
    )


def describe_model(spec: ModelSpec, cache_dir: str | None = None) -> dict:
    """What a pool entry resolves to, from its config alone (no weights loaded)."""
    folder = model_folder(spec, cache_dir)
    tconf = text_config(_read_config(spec, folder))
    return {
        "tag": spec.tag,
        "model_type": tconf.model_type,
        "num_layers": tconf.num_hidden_layers,
        "layer": resolve_layer(spec, tconf.num_hidden_layers),
        "d_model": tconf.hidden_size,
        "folder": str(folder),
    }
