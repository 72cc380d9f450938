"""A plain vectorized-numpy cascade-routing decision for one query: the kernel benchmark's second baseline.

Where the reference port (`reference_port.py`) walks the supermodels one numpy call at a time and
prunes, this evaluates every allowed supermodel of the query at once: gather each supermodel's members'
samples into an `(M, depth, n_s)` array (short supermodels repeat a member), max, mean; no pruning.
Same samples, candidate order and tie rule as the kernel, so the decisions are the same; it shows what
"per query" costs without a Python loop over candidates.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
from reference_port import joint_factor, pick

from router_train.kernel import normal_samples


@functools.lru_cache(maxsize=256)
def candidate_members(k: int, run: tuple[int, ...], depth: int, force_order: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every allowed supermodel `R ∪ T`, by size then in combinations order: `(M, k)` bool membership and
    `(M, depth)` member indices (a supermodel with fewer members repeats its first one)."""
    free = [i for i in range(k) if i not in run]
    if force_order and run:
        free = [i for i in free if i > run[-1]]
    supermodels = [
        run + added
        for size in range(0, depth - len(run) + 1)
        for added in itertools.combinations(free, size)
        if run or added
    ]
    members = np.zeros((len(supermodels), k), dtype=bool)
    index = np.empty((len(supermodels), depth), dtype=np.intp)
    for row, models in enumerate(supermodels):
        members[row, list(models)] = True
        index[row] = list(models) + [models[0]] * (depth - len(models))
    return members, index


def decide_query(
    quality: np.ndarray,
    cost: np.ndarray,
    run: list[int],
    cov: np.ndarray | None,
    lambdas: tuple[float, ...],
    max_depth: int,
    *,
    force_order: bool = False,
    n_samples: int = 100,
    seed: int = 0,
) -> tuple[int, tuple[int, ...]]:
    """(model to run next or -1, models the chosen supermodel adds to `run`) for one query at step `len(run)`."""
    k = quality.shape[0]
    run_t = tuple(sorted(run))
    depth = min(max_depth, k)
    if len(run_t) >= depth:
        return -1, ()
    members, index = candidate_members(k, run_t, depth, force_order)
    factor = joint_factor(cov)
    if factor is None:
        x = quality[:, None]
    else:
        x = quality[:, None] + factor @ normal_samples(n_samples, k, seed).numpy().T  # (k, n_s)
    value = np.take(x, index, axis=0).max(axis=1).mean(axis=1)
    single = members.sum(axis=1) == 1
    value[single] = quality[members[single].argmax(axis=1)]  # one model: exactly its estimate
    total = members @ cost
    chosen = members[pick(value - lambdas[len(run_t)] * total, total)]
    added = tuple(int(i) for i in np.flatnonzero(chosen) if i not in run_t)
    return (added[0] if added else -1), added
