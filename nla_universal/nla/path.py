"""The NLA path as small functions: h → v (the shared vector), text → v, v → ĥ.

    encode(adapters, tag, h)   n(h) at √d_M → enc_M → n(·) at √d_shared: what the AV reads, what the AR
                               is trained to output and what the RL reward compares against
    normalise_ar(out)          the AR's raw output → n(·) at √d_shared (the AR's output carries no scale)
    decode(adapters, tag, v)   n(v) at √d_shared → dec_M (an affine map; it adds the model's mean back)

Every stage, the evaluation, the probes and the RL layers reach the adapters through these (mostly
via `UniversalNLA`); nothing else rescales or applies enc_M / dec_M. Rows are always rescaled with
`rescale`, in fp32.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from ..adapters import PoolAdapters
from ..errors import NLAError
from .injection import rescale


def as_rows(h, tag: str, d_model: int) -> torch.Tensor:
    """`h` ([N, d] or [d], tensor or array) as fp32 rows, checked for width and NaN/inf."""
    rows = h if isinstance(h, torch.Tensor) else torch.as_tensor(np.asarray(h, dtype=np.float32))
    rows = rows.float()
    if rows.dim() == 1:
        rows = rows[None]
    if rows.dim() != 2 or rows.shape[1] != d_model or rows.shape[0] == 0:
        raise NLAError(f"{tag}: got activations of shape {tuple(rows.shape)}, expected [N, {d_model}] or [{d_model}]",
                       f"pass rows of {tag}'s own hidden size, taken at its layer")
    bad = int((~torch.isfinite(rows)).any(dim=1).sum())
    if bad:
        raise NLAError(f"{tag}: {bad} of {rows.shape[0]} activation rows hold NaN or inf", "drop or fix those rows")
    return rows


def _device(adapters: PoolAdapters) -> torch.device:
    return next(adapters.parameters()).device


def encode(adapters: PoolAdapters, tag: str, h, *, grad: bool = False) -> torch.Tensor:
    """`[N, d_shared]` shared vectors n(enc_M(n(h))) at √d_shared. `grad=True` keeps enc_M's graph (training it)."""
    if tag not in adapters.dims:
        raise NLAError(f"no adapters for tag {tag!r}", f"known tags: {', '.join(adapters.tags)}")
    rows = as_rows(h, tag, adapters.dims[tag])
    with contextlib.nullcontext() if grad else torch.no_grad():
        v = adapters.encode(tag, rescale(rows, math.sqrt(rows.shape[1])).to(_device(adapters)))
        return rescale(v, math.sqrt(adapters.d_shared))


def normalise_ar(out: torch.Tensor) -> torch.Tensor:
    """The AR's value-head output as shared vectors at √d_shared."""
    return rescale(out, math.sqrt(out.shape[-1]))


def decode(adapters: PoolAdapters, tag: str, v: torch.Tensor) -> torch.Tensor:
    """`[N, d_M]`: dec_M(n(v)); rows are not rescaled afterwards (every metric rescales)."""
    v = torch.as_tensor(v).float()
    with torch.no_grad():
        return adapters.decode(tag, rescale(v, math.sqrt(adapters.d_shared)).to(_device(adapters))).cpu()
