"""RL memory and speed: the colocated layout (one frozen base for AV policy, reference and AR) vs three copies.

Both layouts run the same RL steps on the same bundle (a fresh bundle on the trunk: fresh LoRAs,
identity value head, identity adapters — memory and time do not depend on training), each in its own
subprocess so its peak RSS is its own. Reported: parameters held (deduplicated by storage), peak RSS
(high-water mark, and net of the import overhead), seconds per step after a warm-up step, and the
ratios colocated/separate. Prints one JSON line.

    python tools/bench/rl_memory.py [--spec packaged:smollm2-135m-instruct] [--steps 3] [--prompts 4] [--group 4]
    python tools/bench/rl_memory.py --device cuda --spec random:qwen3 --overrides '{"hidden_size": 2048, ...}'

On CUDA the peak is `torch.cuda.max_memory_allocated` (tools/gpu/rl_memory.py runs the model shapes of the
seed's failure there).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trunk_spec(spec_text: str, overrides: str, dtype: str):
    from nla_universal.config import ModelSpec

    source, name = spec_text.split(":", 1)
    return ModelSpec(tag="trunk", source=source, name=name, depth=0.5, dtype=dtype,
                     random_overrides=json.loads(overrides) if overrides else {})


def make_bundle(folder: Path, spec_text: str, overrides: str, dtype: str) -> None:
    import torch

    from nla_universal.adapters import PoolAdapters
    from nla_universal.models import describe_model
    from nla_universal.nla import TagInfo, UniversalNLA

    spec = trunk_spec(spec_text, overrides, dtype)
    info = describe_model(spec)
    d = info["d_model"]
    adapters = PoolAdapters(d, "trunk")
    adapters.add("trunk", torch.eye(d), torch.eye(d))
    torch.manual_seed(0)
    nla = UniversalNLA.create(spec, adapters, {"trunk": TagInfo(d, info["layer"], "mean")})
    nla.meta.stages = [{"stage": s, "id": "bench"} for s in ("sft-ar", "sft-av", "refit-dec")]
    nla.save(folder)


def held_params(roles) -> int:
    """Parameters of every module the roles hold, each storage counted once."""
    seen, total = set(), 0
    modules = [roles.policy.av.model, roles.reference.av.model, roles.critic.ar]
    for module in modules:
        for p in module.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.numel()
    return total


def run_variant(args) -> dict:
    import torch
    import transformers  # noqa: F401  (part of the fixed overhead)

    torch.set_num_threads(args.threads)
    overhead = rss_mib()
    from nla_universal.activations import TagRows
    from nla_universal.nla.bundle import read_meta
    from nla_universal.train.rl import RLConfig, rl_step, step_batch
    from nla_universal.train.rl_roles import LocalRoles

    folder = Path(args.bundle)
    device = torch.device(args.device)
    roles = LocalRoles.build(folder, args.variant, None, device, 1e-5, 5e-5, 1.0)
    loaded = rss_mib()
    d = read_meta(folder).d_shared
    g = torch.Generator().manual_seed(0)
    rows = {"trunk": TagRows("trunk", [f"p{i}" for i in range(32)], torch.randn(32, d, generator=g).numpy(), [None] * 32)}
    cfg = RLConfig(prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.tokens, penalise_failed=False)
    examples = [("trunk", i) for i in range(32)]
    encode = lambda H, tag: torch.nn.functional.normalize(torch.as_tensor(H), dim=-1) * d**0.5  # noqa: E731
    times = []
    for step in range(args.steps + 1):  # step 0 warms up
        start = time.perf_counter()
        metrics = rl_step(roles, step_batch(encode, rows, examples, cfg, step), cfg, step)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib()
    return {"params_held": held_params(roles), "overhead_mib": 0.0 if device.type == "cuda" else overhead,
            "loaded_mib": loaded, "peak_mib": peak, "seconds_per_step": sum(times[1:]) / args.steps,
            "last": {k: round(v, 4) for k, v in metrics.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--overrides", default="", help="random: JSON config keys (a model shape)")
    ap.add_argument("--variant", choices=("colocated", "separate"), help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "bundle"
        make_bundle(bundle, args.spec, args.overrides, args.dtype)
        out = {}
        for variant in ("colocated", "separate"):
            cmd = [sys.executable, __file__, "--variant", variant, "--bundle", str(bundle), "--spec", args.spec,
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
                   "--tokens", str(args.tokens), "--threads", str(args.threads), "--device", args.device]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[variant] = json.loads(result.stdout.strip().splitlines()[-1])
    c, s = out["colocated"], out["separate"]
    net = lambda r: r["peak_mib"] - r["overhead_mib"]  # noqa: E731
    print(json.dumps({
        "bench": "rl_memory", "spec": args.spec, "device": args.device, "dtype": args.dtype, "steps": args.steps,
        "samples_per_step": args.prompts * args.group,
        "params_held": {"colocated": c["params_held"], "separate": s["params_held"],
                        "ratio": round(c["params_held"] / s["params_held"], 3)},
        "peak_rss_mib": {"colocated": round(c["peak_mib"]), "separate": round(s["peak_mib"]),
                         "ratio": round(c["peak_mib"] / s["peak_mib"], 3), "net_ratio": round(net(c) / net(s), 3)},
        "seconds_per_step": {"colocated": round(c["seconds_per_step"], 2), "separate": round(s["seconds_per_step"], 2),
                             "ratio": round(c["seconds_per_step"] / s["seconds_per_step"], 3)},
        "same_metrics": c["last"] == s["last"],
    }))


if __name__ == "__main__":
    main()
