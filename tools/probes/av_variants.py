"""The quickstart's AV SFT with one thing changed: does the AV now read the vector?

Reads a quickstart run folder (passages with the teacher's z, activations, adapters; the quickstart
up to fit-adapters is enough) and trains a fresh AV on the anchor's train passages with the
pipeline's training loop and the quickstart's `sft-av` settings (batch 8, lr 5e-4), except:

  --lr        the LoRA learning rate (quickstart: 5e-4)
  --proj-lr   also train a d×d projection, identity at start, applied before the injection
  --template  the AV prompt (with {tag} and {marker}); --scale the injection norm
  --target    z: the teacher's; lead: each passage's lead sentence; pc1: "alpha" or "beta" by the
              side of the train median along the vectors' first principal component (a 1-bit
              function of the vector: the simplest thing there is to read)

Prints one JSON line: vector_gain (val loss with another passage's vector − with the true one,
nats/token), distinct_z over greedy explanations and, for pc1, the share of val passages answered
right.

    python tools/probes/av_variants.py --run runs/quickstart [--lr 3e-3] [--target pc1] ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_scaling import lead_sentence


def pc1_labels(V: torch.Tensor, axis: torch.Tensor, cut: float) -> list[str]:
    return [f"The passage is about {'alpha' if x > cut else 'beta'}." for x in (V @ axis).tolist()]


def main() -> None:
    from nla_universal.config import default_cache_dir
    from nla_universal.metrics import derangement, distinct_share
    from nla_universal.models import load_model
    from nla_universal.nla.av import AV, AVConfig
    from nla_universal.rollout import SamplingParams
    from nla_universal.nla import path
    from nla_universal.pipeline.workspace import RunConfig, Workspace
    from nla_universal.train.loop import Autocast, LoopConfig, autocast_context, named_trainable, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--proj-lr", type=float, default=0.0)
    ap.add_argument("--template", default=None)
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--target", choices=("z", "lead", "pc1"), default="z")
    ap.add_argument("--val", type=int, default=40, help="val passages scored")
    ap.add_argument("--generate", type=int, default=24, help="val passages explained greedily")
    ap.add_argument("--cache-dir", default=default_cache_dir())
    args = ap.parse_args()
    torch.manual_seed(0)
    run = Path(args.run)
    ws = Workspace(RunConfig(run_dir=str(run), pool=str(run / "pool.yaml")))
    pool = ws.pool
    tag = pool.anchor
    table = ws.passages(need_z=True)
    rows = {s: ws.rows(table, tag, s, need_z=True, limit=args.val if s == "val" else None) for s in ("train", "val")}
    adapters = ws.adapters()
    V = {s: path.encode(adapters, tag, r.H) for s, r in rows.items()}
    if args.target == "z":
        z = {s: r.z for s, r in rows.items()}
    elif args.target == "lead":
        text = dict(zip(table.column("passage_id").to_pylist(), table.column("text").to_pylist()))
        z = {s: [lead_sentence(text[p]) for p in r.ids] for s, r in rows.items()}
    else:
        axis = torch.linalg.svd(V["train"] - V["train"].mean(0), full_matrices=False).Vh[0]
        cut = float((V["train"] @ axis).median())
        z = {s: pc1_labels(V[s], axis, cut) for s in V}

    cfg = AVConfig(injection_scale=args.scale, generate_batch_size=args.generate)
    if args.template:
        cfg.template = args.template.replace("\\n", "\n")
    av = AV.create(load_model(pool.spec(tag), cache_dir=args.cache_dir), cfg, tag)
    d = V["train"].shape[1]
    proj = torch.nn.Linear(d, d, bias=False)
    torch.nn.init.eye_(proj.weight)
    groups = [{"params": [p for p in av.model.parameters() if p.requires_grad], "lr": args.lr}]
    if args.proj_lr:
        groups.append({"params": list(proj.parameters()), "lr": args.proj_lr})
    named = named_trainable([("av", av.model), *([("proj", proj)] if args.proj_lr else [])])
    device = torch.device("cpu")
    vectors = (lambda v: proj(v)) if args.proj_lr else (lambda v: v)

    def loss_fn(idx: np.ndarray):
        return av.sft_loss(av.build_sft_batch(vectors(V["train"][idx]), [tag] * len(idx), [z["train"][i] for i in idx])), {}

    av.model.train()
    with tempfile.TemporaryDirectory() as scratch:  # the loop's checkpoints: a probe is not resumed
        train(out_dir=Path(scratch), named_params=named, param_groups=groups, n_examples=len(z["train"]),
              loss_fn=loss_fn, eval_fn=None, device=device, desc="av sft",
              cfg=LoopConfig(steps=args.steps, batch_size=8, lr=args.lr, eval_every=0, checkpoint_every=0))
    av.model.eval()

    def val_loss(v: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad(), autocast_context(Autocast.auto, device):
            for k in range(0, len(v), 8):
                texts = z["val"][k:k + 8]
                total += float(av.sft_loss(av.build_sft_batch(vectors(v[k:k + 8]), [tag] * len(texts), texts))) * len(texts)
        return total / len(v)

    true_loss, swapped_loss = val_loss(V["val"]), val_loss(V["val"][derangement(len(V["val"]))])
    m = min(args.generate, len(V["val"]))
    with torch.no_grad():
        texts = [e.text for e in av.explain(vectors(V["val"][:m]), [tag] * m, SamplingParams(greedy=True, max_new_tokens=40))]
    out = {"target": args.target, "lr": args.lr, "proj_lr": args.proj_lr, "scale": av.injection_scale,
           "prompt_tokens": len(av.prompt_ids(tag)), "steps": args.steps, "val_loss": round(true_loss, 4),
           "vector_gain": round(swapped_loss - true_loss, 4), "distinct_z": round(distinct_share(texts), 3),
           "example": texts[0][:100]}
    if args.target == "pc1":
        out["pc1_correct"] = float(np.mean([t.strip() == g.strip() for t, g in zip(texts, z["val"][:m])]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
