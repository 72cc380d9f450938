"""A plain per-query implementation of the cascade-routing rule, used as the kernel's correctness oracle.

It enumerates every candidate supermodel of one query with itertools and evaluates each with numpy,
exactly as method.md states the rule, with the same QMC samples (zero column means), tie tolerance and
order of candidates as the kernel. Slow on purpose: it is the reference the vectorized kernel must agree with.
"""

from __future__ import annotations

import itertools

import numpy as np

from router_train.kernel import COST_RTOL, TIE_TOL, normal_samples
from router_train.kernel.decide import CHOLESKY_EPS


def samples_for(quality: np.ndarray, cov: np.ndarray | None, z: np.ndarray) -> np.ndarray:
    """`(n_s, k)` joint samples `q + Z L^T` with `L = chol(Σ + εI)`, or `q` itself without Σ."""
    if cov is None:
        return quality[None, :]
    chol = np.linalg.cholesky(cov + CHOLESKY_EPS * np.eye(len(quality)))
    return quality[None, :] + z @ chol.T


def decide_one(
    quality: np.ndarray,
    cost: np.ndarray,
    run: list[int],
    *,
    mode: str,
    max_depth: int,
    lambdas: list[float] | None = None,
    thresholds: list[float] | None = None,
    cov: np.ndarray | None = None,
    expensive: bool = False,
    force_order: bool = False,
    n_samples: int = 100,
    seed: int = 0,
    tie_tol: float = TIE_TOL,
    cost_rtol: float = COST_RTOL,
) -> tuple[int, int, frozenset[int]]:
    """(next model or -1, answer model or -1, chosen supermodel) for one query."""
    k = len(quality)
    run = sorted(run)
    t = len(run)
    depth = min(max_depth, k)
    if mode == "threshold_cascade":
        last = run[-1] if run else -1
        if t == 0:
            return 0, -1, frozenset({0})
        if t >= depth:
            return -1, last, frozenset(run)
        gap = quality[t - 1] - (1.0 - thresholds[t - 1])
        go = gap < -tie_tol or (abs(gap) <= tie_tol and expensive)
        if go:
            return t, answer_of(quality, run), frozenset(run + [t])
        return -1, last, frozenset(run)
    answer = answer_of(quality, run)
    if t >= depth:
        return -1, answer, frozenset(run)
    x = samples_for(quality, cov, normal_samples(n_samples, k, seed).numpy())
    free = [i for i in range(k) if i not in run]
    candidates = []  # (tau, cost, added models)
    for size in range(0, depth - t + 1):
        # the optimal cascade's supermodels are prefixes of the model order: only those need listing
        subsets = [tuple(free[:size])] if mode == "cascade" else itertools.combinations(free, size)
        for added in subsets:
            if t == 0 and size == 0:
                continue
            if force_order and t > 0 and added and min(added) < max(run):
                continue
            members = run + list(added)
            if mode == "cascade" and sorted(members) != list(range(len(members))):
                continue
            # E[max] of one model is its estimate; of several, the mean of the samples' maxima
            value = quality[members[0]] if len(members) == 1 else x[:, members].max(axis=1).mean()
            total = float(np.sum(cost[members]))
            candidates.append((value - lambdas[t] * total, total, added))
    best = max(c[0] for c in candidates)
    tied = [c for c in candidates if c[0] >= best - tie_tol]
    target = max(c[1] for c in tied) if expensive else min(c[1] for c in tied)
    chosen = next(c for c in tied if abs(c[1] - target) <= cost_rtol * abs(target))
    added = chosen[2]
    return (min(added) if added else -1), answer, frozenset(run + list(added))


def answer_of(quality: np.ndarray, run: list[int]) -> int:
    """The run model with the highest estimated quality (first on ties), -1 if none ran."""
    if not run:
        return -1
    return run[int(np.argmax(quality[run]))]
