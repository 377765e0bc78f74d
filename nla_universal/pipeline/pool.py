"""`nla-universal pool`: show a pool — tags, sources, layers, roles (and with resolve=true, L, K, d)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import default_cache_dir, load_pool, opt
from ..models import describe_model


@dataclass
class PoolStageConfig:
    pool: str = opt("demo", "pool YAML path, or the name of one shipped in nla_universal/configs/pools/")
    resolve: bool = opt(False, "load each model's config to show L, K and d (materialises packaged/random models)")
    cache_dir: str = opt(default_cache_dir(), "where converted packaged / random models are cached")


def run(cfg: PoolStageConfig) -> None:
    pool = load_pool(cfg.pool)
    rows = [("tag", "source", "name", "layer", "pool", "role")]
    for m in pool.models:
        role = "anchor" if m.tag == pool.anchor else ("held-out" if m.held_out else "trained")
        where = str(m.layer) if m.layer is not None else f"depth {m.depth if m.depth is not None else 0.5}"
        if cfg.resolve:
            info = describe_model(m, cache_dir=cfg.cache_dir)
            where = f"K={info['layer']} of L={info['num_layers']}, d={info['d_model']}"
        rows.append((m.tag, m.source, m.name, where, m.pool, role))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
