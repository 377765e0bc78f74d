"""How many AV SFT steps until the AV reads the injected vector: the pipeline's own sft-av, run long.

Uses the folder of `data_scaling.py` (the whole built-in corpus, SmolLM2's mean-pooled layer-K rows;
built here if absent, resumably). Each passage's lead sentence is its z: a teacher that is always
passage-specific and free, so neither teacher quality nor the number of passages limits the AV.
Then fit-adapters, a fresh bundle, and `sft-av` exactly as the quickstart runs it (same AV, prompt,
injection, LoRA and lr), only for more steps, evaluated every `--eval-every` steps. Prints one JSON
line per evaluation: `vector_gain` (val loss with another passage's vector − with the true one,
nats/token) and `distinct_z` (share of distinct greedy explanations).

Resumable: sft-av continues from its last checkpoint.

    python tools/probes/av_steps.py [--out runs/data-scaling] [--steps 240] [--eval-every 48]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_scaling import SPEC, build, lead_sentence

TEACHER = "lead-sentence"


def add_lead_z(path: Path) -> None:
    """z := each passage's lead sentence, under the teacher id `lead-sentence` (once)."""
    import pyarrow as pa

    from nla_universal.corpus import read_passages, write_passages

    table = read_passages(path)
    if "z" in table.column_names:
        return
    z = [lead_sentence(t) for t in table.column("text").to_pylist()]
    table = table.append_column("z", pa.array(z, pa.string()))
    write_passages(table.append_column("teacher", pa.array([TEACHER] * len(z), pa.string())), path)


def main() -> None:
    from nla_universal.config import default_cache_dir
    from nla_universal.pipeline import fit_adapters, sft_ar, sft_av
    from nla_universal.pipeline.workspace import RunConfig
    from nla_universal.train.loop import LoopConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/data-scaling")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--eval-every", type=int, default=48)
    ap.add_argument("--val", type=int, default=40, help="val passages scored at each evaluation")
    ap.add_argument("--cache-dir", default=default_cache_dir())
    args = ap.parse_args()
    out = Path(args.out)
    build(out, args.cache_dir)
    add_lead_z(out / "passages.parquet")
    run = RunConfig(run_dir=str(out), pool=str(out / "pool.yaml"), device="auto", cache_dir=args.cache_dir)
    fit_adapters.run(fit_adapters.FitAdaptersConfig(run=run))
    sft_ar.run(sft_ar.ARSFTConfig(run=run, loop=LoopConfig(steps=1)))  # creates the bundle; the AR is not studied here
    # the quickstart's sft-av settings (batch 8, lr 5e-4, 40 generated tokens), for more steps
    loop = LoopConfig(steps=args.steps, batch_size=8, lr=5e-4, eval_every=args.eval_every, checkpoint_every=args.eval_every)
    sft_av.run(sft_av.AVSFTConfig(run=run, loop=loop, val_passages=args.val, max_new_tokens=40))
    for line in (out / "sft-av" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_vector_gain" in row:
            print(json.dumps({"step": row["step"], "tag": SPEC["tag"], "vector_gain": round(row["val_vector_gain"], 4),
                              "val_loss": round(row["val_loss"], 4), "distinct_z": row["val_distinct_z"]}))


if __name__ == "__main__":
    main()
