"""GPU check for the RL layouts (≤ 8 min on one GPU): peak CUDA memory, colocated vs separate, on a
Qwen3-1.7B-shaped and a Qwen3-4B-shaped trunk (random weights, bf16), and whether a 4B colocated step
fits in 32 GB — where the seed's three-copy RL ran out of memory. Prints one JSON line.

    python tools/gpu/rl_memory.py          # needs: this repo installed (make install), a CUDA torch
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "rl_memory.py"
SHAPES = {  # the published configs' sizes; the SmolLM2 tokenizer's ids all fall inside these vocabularies
    "qwen3-1p7b-shaped": {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                          "intermediate_size": 6144, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen3-4b-shaped": {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "intermediate_size": 9728, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True},
}


def main() -> None:
    out = {"check": "rl_memory_gpu"}
    for name, shape in SHAPES.items():
        cmd = [sys.executable, str(BENCH), "--device", "cuda", "--dtype", "bfloat16", "--spec", "random:qwen3",
               "--overrides", json.dumps(shape), "--steps", "2", "--prompts", "8", "--group", "8", "--tokens", "64"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=220)
        if result.returncode != 0:
            out[name] = {"error": result.stderr.strip().splitlines()[-1:]}
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        out[name] = {"peak_gib": {k: round(r["peak_rss_mib"][k] / 1024, 2) for k in ("colocated", "separate")},
                     "ratio": r["peak_rss_mib"]["ratio"], "params_ratio": r["params_held"]["ratio"],
                     "seconds_per_step": r["seconds_per_step"], "same_metrics": r["same_metrics"]}
    four = out.get("qwen3-4b-shaped", {})
    out["4b_colocated_fits_32gb"] = four.get("peak_gib", {}).get("colocated", 1e9) <= 32
    print(json.dumps(out))


if __name__ == "__main__":
    main()
