"""Least squares for the adapters: fast float64 normal equations, with named fallbacks.

The solver order: Cholesky on XᵀX (+ λI) while the estimated condition number allows it, else SVD
least squares (gelsd), else the seed's ridge. Every switch is named in the FitResult. (torch's
pivoted-QR gelsy returned wrong, varying ranks on rank-deficient inputs on our CPU machines.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError, DataError

RIDGE_FALLBACK = 1e-4  # × mean(diag XᵀX), the seed's fallback strength

@dataclass
class FitResult:
    weight: torch.Tensor  # [d_out, d_in] float32
    bias: torch.Tensor | None  # [d_out] float32
    solver: str
    seconds: float
    condition: float  # estimated cond of the (centred) X — with a ridge, of the regularised system; inf = singular
    fallback: str | None  # why the first-choice solver was not used

    def predict(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """X Wᵀ + b in float64, rows as given (callers normalise, as for the fit)."""
        X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
        out = X @ self.weight.double().T
        return (out if self.bias is None else out + self.bias.double()).numpy()

    def summary(self) -> dict:
        condition = self.condition if np.isfinite(self.condition) else None  # JSON has no inf
        return {"solver": self.solver, "seconds": round(self.seconds, 3), "condition": condition,
                "fallback": self.fallback, "bias": self.bias is not None}


def _gram(A: np.ndarray) -> torch.Tensor:
    """AᵀA; numpy turns `A.T @ A` into one BLAS syrk (half the flops of a general matmul)."""
    return torch.from_numpy(A.T @ A)


def _condition(G: torch.Tensor, L: torch.Tensor, iters: int = 6, width: int = 4) -> float:
    """≈ √(λmax/λmin) of the SPD matrix G = LLᵀ, i.e. cond(X): block power iteration on G and on G⁻¹.

    A few iterations give a slight underestimate (1666 vs 1726 exact on the bench data), enough to
    tell a well-conditioned fit from one that needs the SVD path.
    """
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(G.shape[0], width, dtype=G.dtype, generator=gen)
    u = v.clone()
    for _ in range(iters):
        v = torch.linalg.qr(G @ v).Q
        # two triangular solves: 3x faster than cholesky_solve for a handful of right-hand sides
        w = torch.linalg.solve_triangular(L, u, upper=False)
        u = torch.linalg.qr(torch.linalg.solve_triangular(L.T, w, upper=True)).Q
    lam_max = float(torch.linalg.eigvalsh(v.T @ G @ v).max())
    lam_min = float(torch.linalg.eigvalsh(u.T @ G @ u).min())
    return float(np.sqrt(lam_max / lam_min)) if lam_min > 0 else float("inf")


class _GramSystem:
    """The Gram of the smaller side — XᵀX (N ≥ d) or XXᵀ (dual, N < d) — built once, solved by
    Cholesky for any ridge λ: min ‖X B − Y‖² + λ‖B‖²."""

    def __init__(self, X: np.ndarray, Y: np.ndarray):
        self.X, self.Y = torch.from_numpy(X), torch.from_numpy(Y)
        self.primal = X.shape[0] >= X.shape[1]
        self.G = _gram(X) if self.primal else _gram(X.T)
        self.rhs = self.X.T @ self.Y if self.primal else self.Y

    def solve(self, lam: float) -> tuple[torch.Tensor | None, float]:
        """(B [d_in, d_out], or None when G + λI is not positive definite; condition estimate)."""
        G = self.G
        if lam:
            G = G.clone()
            G.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            return None, float("inf")
        B = torch.cholesky_solve(self.rhs, L)
        return (B if self.primal else self.X.T @ B), _condition(G, L)


def _as_f64(name: str, a: np.ndarray | torch.Tensor) -> tuple[np.ndarray, float]:
    """C-contiguous float64 copy and its sum of squares (a NaN/inf anywhere makes that non-finite)."""
    a = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    sumsq = float(np.einsum("ij,ij->", a, a)) if a.ndim == 2 else 0.0
    if not np.isfinite(sumsq):
        raise DataError(f"{name} holds NaN/inf", "drop or recompute the non-finite rows before fitting")
    return a, sumsq


def fit_linear(
    X: np.ndarray | torch.Tensor,
    Y: np.ndarray | torch.Tensor,
    *,
    ridge: float = 0.0,
    bias: bool = False,
    max_condition: float = 1e6,
) -> FitResult:
    """W (and b) minimising ‖X Wᵀ + b − Y‖ (+ λ‖W‖², λ = ridge · mean(diag XᵀX)); minimum-norm when N < d.

    float64 throughout. First choice: Cholesky of the normal (or, when N < d, dual) equations — fast,
    and accurate while cond(X) ≤ max_condition. Ill-conditioned or singular → SVD least squares
    (gelsd). That failing or non-finite → ridge with λ = 1e-4·mean(diag XᵀX). Any switch is named in
    `fallback`. Not gelsy (the seed's choice): on this MKL build it returned wrong, run-to-run
    different ranks (4..10 of 10) for a matrix with duplicated columns — the very case it is for.
    """
    return fit_linear_path(X, Y, [ridge], bias=bias, max_condition=max_condition)[0]


def fit_linear_path(
    X: np.ndarray | torch.Tensor,
    Y: np.ndarray | torch.Tensor,
    ridges: Sequence[float],
    *,
    bias: bool = False,
    max_condition: float = 1e6,
) -> list[FitResult]:
    """`fit_linear` for each ridge strength, sharing one Gram matrix (a few Cholesky solves more)."""
    t0 = time.perf_counter()
    if not ridges or min(ridges) < 0:
        raise ConfigError(f"ridge strengths {list(ridges)} must be a non-empty list of numbers ≥ 0", "use e.g. 0 or 1e-3")
    X64, sumsq = _as_f64("X", X)
    Y64, _ = _as_f64("Y", Y)
    if X64.ndim != 2 or Y64.ndim != 2 or X64.shape[0] != Y64.shape[0]:
        raise DataError(f"cannot fit X {X64.shape} to Y {Y64.shape}", "pass aligned 2-D arrays")
    means = (X64.mean(0), Y64.mean(0)) if bias else None
    if means:  # an intercept is the same fit on centred rows; centring also helps the conditioning
        X64, Y64 = X64 - means[0], Y64 - means[1]
        sumsq = float(np.einsum("ij,ij->", X64, X64))
    system = _GramSystem(X64, Y64)
    setup = time.perf_counter() - t0
    return [_solve(system, r, sumsq / X64.shape[1], max_condition, means, setup) for r in ridges]


def _solve(system: _GramSystem, ridge: float, mean_diag: float, max_condition: float, means, setup: float) -> FitResult:
    t0 = time.perf_counter()
    fallback = None
    if ridge > 0:
        B, cond = system.solve(ridge * mean_diag)
        solver = "ridge-cholesky-f64"
    else:
        B, cond = system.solve(0.0)
        solver = "normal-cholesky-f64" if system.primal else "dual-cholesky-f64"
        if B is None or cond > max_condition:
            fallback = f"condition estimate {cond:.3g} > {max_condition:.3g}: SVD least squares instead of {solver}"
            solver = "gelsd-f64"
            try:
                B = torch.linalg.lstsq(system.X, system.Y, driver="gelsd").solution
                if not torch.isfinite(B).all():
                    raise FloatingPointError("non-finite solution")
            except (RuntimeError, FloatingPointError) as exc:
                fallback += f"; gelsd failed ({exc}): ridge λ = {RIDGE_FALLBACK:g}·mean(diag XᵀX)"
                solver = "ridge-fallback-f64"
                B, _ = system.solve(RIDGE_FALLBACK * mean_diag)
    if B is None or not torch.isfinite(B).all():
        raise DataError(f"least squares produced no finite solution (solver {solver})", "raise the ridge strength")
    weight = B.T.contiguous()
    b = (torch.from_numpy(means[1]) - weight @ torch.from_numpy(means[0])).float() if means else None
    return FitResult(weight.float(), b, solver, setup + time.perf_counter() - t0, cond, fallback)
