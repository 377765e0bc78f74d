"""Adapter-fit benchmark: our fit_linear against numpy.linalg.lstsq on the same system, one JSON line.

Synthetic activations shaped like mean-pooled hidden states — a shared direction, a low-rank part and
noise — with rows rescaled to √d as in every fit; Y is a noisy linear image of X. Fixed seed.

    python tools/bench/fit.py [--n 10000] [--d-in 4096] [--d-out 2048] [--rank 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from nla_universal.lstsq import fit_linear
from nla_universal.metrics import normalize_rows


def synthetic(n: int, d_in: int, d_out: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d_in)
    factors = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d_in)) / np.sqrt(rank)
    X = 3.0 * common + factors + 0.3 * rng.standard_normal((n, d_in))
    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    Y = X @ W.T + 0.1 * rng.standard_normal((n, d_out))
    return normalize_rows(X).astype(np.float32), normalize_rows(Y).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-out", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    X, Y = synthetic(args.n, args.d_in, args.d_out, args.rank, args.seed)

    load_before = os.getloadavg()[0]  # other work on the 2 cores slows both solvers alike
    fit = fit_linear(X, Y)
    # numpy gets float64 copies: its answer is the accurate reference the rel_diff is measured against
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    t0 = time.perf_counter()
    reference = np.linalg.lstsq(X64, Y64, rcond=None)[0].T
    numpy_seconds = time.perf_counter() - t0

    ours = fit.weight.double().numpy()
    rel_diff = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
    print(json.dumps({
        "seconds": round(fit.seconds, 3),
        "numpy_seconds": round(numpy_seconds, 3),
        "speedup": round(numpy_seconds / fit.seconds, 2),
        "rel_diff": rel_diff,
        "solver": fit.solver,
        "condition": fit.condition,
        "fallback": fit.fallback,
        "n": args.n, "d_in": args.d_in, "d_out": args.d_out, "rank": args.rank, "seed": args.seed,
        "numpy_dtype": "float64", "threads": torch.get_num_threads(), "loadavg_1m_before": round(load_before, 2),
    }))


if __name__ == "__main__":
    main()
