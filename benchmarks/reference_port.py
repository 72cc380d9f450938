"""The reference implementation's per-query cascade-routing decision, ported to numpy: the kernel's baseline.

A baseline for `benchmarks/kernel.py`, not library code. It follows eth-sri/cascade-routing (read at
commit 1788b904a42aa586d555784be240b344868480d2) function by function:

- `predict_model` is `CascadeRouter._predict_model` (src/selection/cascade_router.py): a level-by-level
  enumeration of the supermodels `R ∪ T` (T grows by models of higher index than its last one, so each
  subset is listed once; with `force_order`, only models after the last run one), skipping those above
  the depth cap, and its "Lemma 1" pruning (`do_speedup`): a supermodel whose added model raises the
  expected max by less than λ times its cost is dropped together with everything built on it. The empty
  supermodel is valued at -10**8 and never recorded as a candidate. The model to run is the first
  (lowest-index) added one; with `force_order=False` the reference computes `np.argmin` of a generator,
  which numpy answers with 0 without consuming it, so the same. (Another stored version, b8ad6d2, also
  prunes one-model supermodels against that -10**8 and records the empty one: neither changes a decision.)
- `supermodel_quality` is `BaseQualityComputer.predict_supermodels` (src/selection/quality_computer.py)
  for one supermodel: select its members' qualities and factor rows, then `compute_expected_max`.
- `expected_max` is `compute_expected_max` and `transform_samples` (src/selection/statistics.py): the
  max of the point estimates without Σ, the estimate itself for one model, otherwise the mean (and the
  variance, which the reference also computes and `_predict_model` discards) of the samples' maxima.

Deviations, each needed to make decisions comparable with the kernel's:

1. Samples. The reference draws one scrambled Sobol matrix per supermodel size (unseeded) and factors
   each supermodel's own block of Σ (`cholesky(Σ_SS + 1e-12 I)`) per evaluation. The port uses the
   kernel's samples: one `(n_s, k)` matrix `Z` (`router_train.kernel.normal_samples`: seeded, columns
   centred) and one factor `L = cholesky(Σ + 1e-9 I)` per query, so a supermodel's samples are
   `q_S + Z L_S^T` with `L_S` the rows of `L` for its members, the same numbers the kernel maximizes.
   The port therefore does one k×k factorization per query instead of one small one per candidate:
   if anything, it is faster than the reference.
2. Ties. The reference rounds `E[max] - λ cost` to 8 digits, keeps exact equals and takes the first of
   the cheapest (its `cheapest=True` branch, the one its calibration uses; its other branch draws a coin
   with probability γ). The port keeps every candidate within `TIE_TOL` of the best and takes the first
   of the cheapest (costs within `COST_RTOL` count as equal): the kernel's rule. Candidates are listed
   in the same order in both (by size, then in `itertools.combinations` order), so "first" agrees.
3. Scope: the default options only (`greedy=False`, `top_k_keep=None`, `do_speedup=True`,
   `cascade=False`, `set_sigma_none=False`), the cascade-routing mode.

With shared samples the expected max is exactly submodular (per sample, `max` is), so the pruning
never drops the supermodel the kernel's rule picks: a dropped `D ∋ m` is beaten by the cheaper `D \\ {m}`.
"""

from __future__ import annotations

import numpy as np

from router_train.kernel import COST_RTOL, TIE_TOL, normal_samples
from router_train.kernel.decide import CHOLESKY_EPS

EMPTY_QUALITY = -(10**8)
"""The reference's value of the empty supermodel ("basically negative infinity")."""


def joint_factor(cov: np.ndarray | None) -> np.ndarray | None:
    """Cholesky factor of `Σ + εI` with the kernel's ε (None without Σ): one per query, for all its supermodels."""
    if cov is None:
        return None
    return np.linalg.cholesky(cov + CHOLESKY_EPS * np.eye(cov.shape[0]))


def expected_max(quality: np.ndarray, factor_rows: np.ndarray | None, z: np.ndarray) -> tuple[float, float | None]:
    """`compute_expected_max` + `transform_samples`: (E[max], Var[max]) of the members' qualities.

    `quality` (n >= 1,) and `factor_rows` (n, k) are the members' estimates and rows of the joint factor.
    """
    if factor_rows is None:
        return float(np.max(quality)), None
    n = quality.shape[0]
    if n == 1:
        return float(quality[0]), float(factor_rows[0] @ factor_rows[0])
    samples = z @ factor_rows.T + quality
    max_samples = np.max(samples, axis=1)
    return float(np.mean(max_samples)), float(np.var(max_samples))


def supermodel_quality(quality: np.ndarray, factor: np.ndarray | None, z: np.ndarray, members: list[int]) -> float:
    """`predict_supermodels` for one supermodel: its expected max."""
    rows = None if factor is None else factor[members]
    return expected_max(quality[members], rows, z)[0]


def pick(tradeoff: np.ndarray, cost: np.ndarray, tie_tol: float = TIE_TOL, cost_rtol: float = COST_RTOL) -> int:
    """Index of the chosen candidate: the best tradeoff, ties within `tie_tol` to the cheapest (costs within
    `cost_rtol` count as equal), then the first listed. The kernel's `choose` rule for one query."""
    tied = tradeoff >= tradeoff.max() - tie_tol
    target = cost[tied].min()
    return int(np.argmax(tied & (cost <= target + cost_rtol * abs(target))))


def predict_model(
    quality: np.ndarray,
    cost: np.ndarray,
    run: list[int],
    factor: np.ndarray | None,
    z: np.ndarray,
    lam: float,
    max_depth: int,
    *,
    force_order: bool = False,
    tie_tol: float = TIE_TOL,
    cost_rtol: float = COST_RTOL,
) -> tuple[int, tuple[int, ...]]:
    """`_predict_model`: (model to run next or -1 to stop, models the chosen supermodel adds to `run`)."""
    k = quality.shape[0]
    run = sorted(run)
    if len(run) >= max_depth or len(run) >= k:
        return -1, ()
    to_evaluate: list[tuple[list[int], float]] = [([], 0.0)]  # (not-run models, parent's quality)
    candidates: list[tuple[tuple[int, ...], float, float]] = []  # (added models, tradeoff, cost)
    while to_evaluate:
        next_to_evaluate = []
        for not_run, parent_quality in to_evaluate:
            members = run + not_run
            if len(members) > max_depth:
                continue
            if not members:
                total, value = 0.0, float(EMPTY_QUALITY)
            else:
                total = float(np.sum(cost[members]))
                value = supermodel_quality(quality, factor, z, members)
            if not_run and len(members) > 1 and value - parent_quality - lam * cost[not_run[-1]] < 0:
                continue  # Lemma 1: neither this supermodel nor any built on it can be optimal
            if members:
                candidates.append((tuple(not_run), value - lam * total, total))
            possible = [i for i in range(k) if i not in members]
            if force_order and members:
                possible = [i for i in possible if i > members[-1]]
            if not_run:
                possible = [i for i in possible if i > not_run[-1]]
            next_to_evaluate.extend((not_run + [i], value) for i in possible)
        to_evaluate = next_to_evaluate
    tradeoff = np.array([c[1] for c in candidates])
    total_cost = np.array([c[2] for c in candidates])
    added = candidates[pick(tradeoff, total_cost, tie_tol, cost_rtol)][0]
    return (added[0] if added else -1), added


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
    """One query's decision at step `len(run)` with the kernel's samples: factor Σ, then `predict_model`."""
    z = normal_samples(n_samples, quality.shape[0], seed).numpy()
    depth = min(max_depth, quality.shape[0])
    if len(run) >= depth:
        return -1, ()
    return predict_model(
        quality, cost, run, joint_factor(cov), z, lambdas[len(run)], depth, force_order=force_order
    )
