"""`nla-universal rl`: joint RL on a bundle after refit-dec (see `train/rl.py`), in one process.

The roles are placed `colocated` (one frozen base for policy, reference and AR) or `separate` (three
copies); both run the same step. Checkpoints in run_dir/rl/ make a rerun continue where it stopped,
and the bundle is written only once every step ran. The decoders stay those refit-dec fitted; the
bundle records rl after refit-dec.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..adapters import PoolAdapters
from ..config import choices, opt
from ..distributed.config import RayConfig
from ..errors import ConfigError
from ..nla import path
from ..nla.bundle import read_meta, read_reports
from ..train.rl import RLConfig, run_rl
from ..train.rl_math import check_rl_settings
from ..train.rl_roles import LocalRoles, Placement
from .workspace import RunConfig, Workspace

log = logging.getLogger(__name__)
STAGE = "rl"


@dataclass
class RLStageConfig:
    run: RunConfig = opt(help="run folder (its bundle went through refit-dec), pool, device", factory=RunConfig)
    rl: RLConfig = opt(help="GRPO on the AV, the AR alongside", factory=RLConfig)
    placement: Placement = opt(Placement.colocated, f"{choices(Placement)}: one frozen base for the AV policy, its frozen "
                               "reference and the AR; three copies; or (Ray only) one actor per role")
    ray: RayConfig = opt(help="run the roles as Ray actors (placement groups, restarts, rollout actors)",
                         factory=RayConfig)
    tags: list[str] = opt(help="train on these tags' vectors (default: every trained tag of the pool)", factory=list)


def train_rows(ws: Workspace, meta, tags: list[str]):
    unknown = [t for t in tags if t not in meta.tags]
    if unknown:
        raise ConfigError(f"tags {unknown} are not in the bundle", f"the bundle knows: {', '.join(meta.tags)}")
    table = ws.passages()
    return {t: ws.rows(table, t, "train", need_z=False) for t in tags}


def run(cfg: RLStageConfig) -> dict:
    check_rl_settings(cfg.rl.group_size, cfg.rl.kl_coef, cfg.rl.clip_eps)
    ws = Workspace(cfg.run)
    st = ws.stage(STAGE, cfg)
    if st.done:
        return st.record
    meta = read_meta(ws.bundle_dir)
    ws.check_bundle_stages(meta, ("sft-ar", "sft-av", "refit-dec"))
    rows = train_rows(ws, meta, cfg.tags or ws.pool.trained_tags)
    adapters = PoolAdapters.load(ws.bundle_dir / "adapters")
    roles = make_roles(ws, cfg)
    try:
        final = run_rl(roles, lambda H, tag: path.encode(adapters, tag, H), rows, cfg.rl, ws.stage_dir(STAGE))
        st.write_bundle(meta, *roles.parts(), adapters, read_reports(ws.bundle_dir))
    finally:
        if cfg.ray.enabled:
            roles.close()
    return st.finish(final=final)


def make_roles(ws: Workspace, cfg: RLStageConfig):
    if cfg.ray.enabled:
        from ..distributed.driver import RayRoles

        return RayRoles(ws.bundle_dir, cfg.placement, ws.run.cache_dir, ws.run.device, cfg.rl, ws.stage_dir(STAGE) / "checkpoints",
                        cfg.ray)
    if cfg.placement == Placement.per_role:
        raise ConfigError("placement=per_role puts each role in its own Ray actor", "set ray.enabled=true, or use "
                          "placement=colocated or separate")
    return LocalRoles.build(ws.bundle_dir, cfg.placement, ws.run.cache_dir, ws.device, cfg.rl.av_lr, cfg.rl.ar_lr,
                            cfg.rl.clip_grad)
