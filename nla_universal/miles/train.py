"""`python -m nla_universal.miles.train [Miles flags] --nla-run-dir RUN [--nla-* flags]`: joint RL under Miles.

The flow of Miles' `train.py` @31f1ca9, with our pieces in it:

1. `import miles_patches; miles_patches.apply(driver=True)`: the installed Miles is checked against the
   contract, and its FSDP backend builds `NLAPolicyActor`;
2. the argument list gets our hook paths and the trunk folder where absent (`args.with_defaults`),
   Miles parses it with our flags (`parse_args(add_custom_arguments=add_nla_arguments)`), and
   `args.check_args` refuses the settings an NLA run cannot use — all before any GPU is touched;
3. Miles' placement group, then our AR critic (named, so the reward hook finds it), then Miles'
   rollout manager (SGLang engines, our data source) and training models (the AV actors);
4. per rollout: generate (our generate and reward hooks inside) → the AR's update on the same
   samples (`MilesCriticHost.train_on`, by sample index) → the AV's update (Miles' policy loss with
   the KL loss) → Miles' checkpoint at its save interval with the AR's beside it → weights to SGLang;
5. the bundle, written into RUN/bundle through the pipeline's stage writer (`StageRun.write_bundle`):
   the AV adapter from the actors, the AR from the critic, the adapters and reports as they were;
   the stage is recorded as `rl`, so `nla-universal eval` and later stages treat it as the RL stage.

It needs GPUs, SGLang (sglang-miles) and megatron-core; on CPU only the argument handling runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from ..adapters import PoolAdapters
from ..errors import DataError, NLAError
from ..nla.bundle import read_meta, read_reports
from ..pipeline.workspace import RunConfig, StageRun, Workspace
from ..train.loop import MetricsLog
from ..train.rl import latest_step, lr_scale, settings_dict
from .args import add_nla_arguments, bundle_dir, check_args, rl_config, with_defaults

STAGE = "rl"  # the same stage as `nla-universal rl`: the bundle records it so, and eval needs it


def parse(argv: list[str]):
    """Miles' arguments plus ours, checked. Miles' parser reads sys.argv, so this sets it to `argv` (completed)."""
    from miles.utils.arguments import parse_args

    sys.argv = [sys.argv[0], *with_defaults(argv)]
    args = parse_args(add_custom_arguments=add_nla_arguments)
    check_args(args)
    return args


def open_stage(args) -> tuple[StageRun, Workspace]:
    ws = Workspace(RunConfig(run_dir=str(args.nla_run_dir), cache_dir=args.nla_cache_dir))
    settings = {"RLConfig": settings_dict(rl_config(args)), "miles": {"bundle": str(bundle_dir(args)),
                "rollout_batch_size": args.rollout_batch_size, "global_batch_size": args.global_batch_size}}
    stage = StageRun(ws, STAGE, json.loads(json.dumps(settings, default=str)))
    meta, needed = read_meta(bundle_dir(args)), ("sft-ar", "sft-av", "refit-dec")
    if bundle_dir(args).resolve() == ws.bundle_dir.resolve():
        ws.check_bundle_stages(meta, needed)  # the run's own bundle: its stage records must match too
    elif not set(needed) <= set(meta.stage_names):
        raise DataError(f"the bundle {bundle_dir(args)} has been through {meta.stage_names}, RL needs {list(needed)}",
                        "run sft-ar, sft-av and refit-dec on it first")
    return stage, ws


def ar_checkpoints(ws: Workspace) -> Path:
    return ws.stage_dir(STAGE) / "miles-ar"


def metrics_path(ws: Workspace) -> Path:
    """The AR's metrics per rollout (the AV's and the rewards go to Miles' own tracking: wandb, tensorboard)."""
    ws.stage_dir(STAGE).mkdir(parents=True, exist_ok=True)
    return ws.stage_dir(STAGE) / "miles-metrics.jsonl"


def check_resume(args, ws: Workspace) -> None:
    """The AR must resume where Miles' actors resume: the checkpoints are written together, by rollout."""
    step = latest_step(ar_checkpoints(ws), ["ar"])
    if step != args.start_rollout_id:
        raise DataError(f"the AR critic restored its checkpoint of step {step}, Miles' actors resume at rollout "
                        f"{args.start_rollout_id}", f"resume from the Miles checkpoint saved with it (--load), or "
                        f"delete {ar_checkpoints(ws)} to start the AR from the bundle")


class _ActorAV:
    """`save(folder)` of the AV held by Miles' FSDP actors (every rank takes part in the gather)."""

    def __init__(self, actor_model):
        self.actor_model = actor_model

    def save(self, folder) -> None:
        import ray

        ray.get([h.save_nla_adapter.remote(str(folder)) for h in self.actor_model._actor_handles])


class _CriticAR:
    def __init__(self, critic):
        self.critic = critic

    def save(self, folder) -> None:
        import ray

        ray.get(self.critic.call.remote("save_part", "ar", str(folder)))


async def train(args) -> dict:
    """The loop of the module docstring; returns the stage record."""
    import ray
    from miles.ray.placement_group import create_placement_groups, create_rollout_manager, create_training_models
    from miles.utils import object_store
    from miles.utils.data import remove_rollout_data_refs
    from miles.utils.misc import should_run_periodic_action
    from miles.utils.tracking_utils.tracking import init_tracking
    from sglang.srt.constants import GPU_MEMORY_TYPE_CUDA_GRAPH, GPU_MEMORY_TYPE_KV_CACHE, GPU_MEMORY_TYPE_WEIGHTS

    from .critic import start_critic

    stage, ws = open_stage(args)
    if stage.done:
        return stage.record
    cfg = rl_config(args)
    pgs = create_placement_groups(args)
    object_store.init_instance(args, contribute_segment=False)
    init_tracking(args)
    critic = start_critic(args, pgs, str(ar_checkpoints(ws)))
    rollout_manager, per_epoch = create_rollout_manager(args, pgs["rollout"])
    actor_model, _ = await create_training_models(args, pgs, rollout_manager)
    check_resume(args, ws)
    if args.offload_rollout:
        await rollout_manager.onload_weights.remote()
    await actor_model.update_weights()
    if args.offload_rollout:
        await rollout_manager.onload_kv.remote()

    metrics = MetricsLog(metrics_path(ws), tensorboard=False, resume_step=args.start_rollout_id)
    final: dict = {}
    for rollout_id in range(args.start_rollout_id, args.num_rollout):
        started = time.time()
        pack = await rollout_manager.generate.remote(rollout_id)
        if args.offload_rollout:
            tags = [GPU_MEMORY_TYPE_CUDA_GRAPH] + [t for level, t in (("kv_cache", GPU_MEMORY_TYPE_KV_CACHE),
                                                                     ("weight", GPU_MEMORY_TYPE_WEIGHTS))
                                                   if level in args.offload_rollout_level]
            await rollout_manager.offload.remote(tags=tags)
        final = await critic.train_on.remote(list(pack["sample_indices"]), lr_scale(rollout_id, cfg))
        await actor_model.train(rollout_id, pack)
        remove_rollout_data_refs(args, pack)
        if should_run_periodic_action(rollout_id, args.save_interval, per_epoch, args.num_rollout):
            await actor_model.save_model(rollout_id, force_sync=rollout_id == args.num_rollout - 1)
            await critic.call.remote("checkpoint", ar_checkpoints(ws), rollout_id + 1, cfg.keep_checkpoints)
            await rollout_manager.save.remote(rollout_id)
        await (actor_model.offload() if args.offload_train else actor_model.clear_memory())
        if args.offload_rollout:
            await rollout_manager.onload_weights.remote()
        await actor_model.update_weights(rollout_id=rollout_id)
        if args.offload_rollout:
            await rollout_manager.onload_kv.remote()
        metrics.write(rollout_id + 1, **final, seconds=round(time.time() - started, 2))

    meta = read_meta(bundle_dir(args))
    stage.write_bundle(meta, _ActorAV(actor_model), _CriticAR(critic), PoolAdapters.load(bundle_dir(args) / "adapters"),
                       read_reports(bundle_dir(args)))
    await rollout_manager.dispose.remote()
    ray.kill(critic)
    return stage.finish(final=final)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            import miles_patches
        except ImportError:
            raise NLAError("miles_patches is not importable", "run from the nla-universal repository root, or put it "
                           "on PYTHONPATH (the driver applies its patches explicitly)") from None
        miles_patches.apply(driver=True)
        args = parse(list(sys.argv[1:] if argv is None else argv))
        asyncio.run(train(args))
    except NLAError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
