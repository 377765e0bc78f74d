"""What the Miles hooks of one process share: the bundle's AV and adapters, the SGLang client, and the
vector each sample carries.

The data source, the generate hook and the reward hook all run inside Miles' RolloutManager (one
CPU process). They load the bundle once per process (`nla`), build prompt rows with the AV's own
functions, and read a sample's vector only through `sample_vector`, so a sample that did not come
from `NLADataSource` is refused with the flag that fixes it.
"""

from __future__ import annotations

import functools

import torch

from ..errors import DataError
from ..nla.api import UniversalNLA
from ..rollout.servers import ClientSettings
from .args import HOOKS, bundle_dir

VEC, POSITIONS, TAG = "nla_vec", "nla_vec_positions", "nla_tag"


@functools.lru_cache(maxsize=2)
def _load(bundle: str, cache_dir: str | None) -> UniversalNLA:
    return UniversalNLA.load(bundle, cache_dir=cache_dir, parts=("av",), trained=False).eval()


def nla(args) -> UniversalNLA:
    """The bundle's AV (on the CPU: it only embeds prompts here) and its per-model adapters."""
    return _load(str(bundle_dir(args)), args.nla_cache_dir)


@functools.lru_cache(maxsize=8)
def _client(url: str, model: str, hidden_size: int):
    from ..rollout.sglang import SGLangRolloutEngine

    return SGLangRolloutEngine(url, model, ClientSettings(prompts_per_request=1, hidden_size=hidden_size))


def sglang(args, hidden_size: int):
    """Our SGLang client of Miles' router (one per process and address)."""
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}"
    return _client(url, str(args.hf_checkpoint), hidden_size)


def sample_vector(sample) -> tuple[torch.Tensor, str]:
    """The shared vector `[d]` and the tag a sample carries (put there by NLADataSource)."""
    meta = sample.metadata if isinstance(sample.metadata, dict) else {}
    if VEC not in meta or TAG not in meta:
        raise DataError(f"sample {sample.index} (group {sample.group_index}) carries no activation vector "
                        f"(metadata keys: {sorted(meta)})",
                        f"let Miles draw the prompts from our data source: --data-source-path {HOOKS['data_source_path']}")
    return torch.as_tensor(meta[VEC], dtype=torch.float32), str(meta[TAG])


def train_inputs(vector: torch.Tensor, marker_position: int) -> dict[str, torch.Tensor]:
    """The tensors Miles carries to the trainer for one sample (`multimodal_train_inputs`): the vector as
    one item `[1, d]`, and its marker's index in the sample's tokens (Miles shifts `*_positions` keys to
    the packed sequence, backends/training_utils/data.py)."""
    return {VEC: vector.detach().float().reshape(1, -1).clone(), POSITIONS: torch.tensor([marker_position], dtype=torch.long)}
