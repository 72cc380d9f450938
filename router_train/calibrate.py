"""Budget calibration: fit the multipliers of a strategy so its mean training cost meets a budget.

As in method.md: one shared multiplier by bisection, then per-step multipliers by a seeded TPE
search (optuna), then a final bisection of their common scale and the tie-break probability γ so that
the expected mean cost equals the budget. Every evaluation is a full lock-step simulation of the
training split, cheap because the simulator caches all λ-independent work.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import optuna
import torch

from .simulate import Simulator
from .strategy import Strategy

SIGMA_MODES = ("cascade", "cascade_routing")
"""Modes whose decisions depend on Σ (through E[max] of supermodels of two or more models)."""
THRESHOLD_RANGE = (-10.0, 10.0)
"""Search range of the thresholding cascade's θ (continue while q̂ < 1 - θ)."""
THRESHOLD_GRID = tuple(x / 8 for x in range(-4, 13))
"""Shared θs always tried for the thresholding cascade (q̂ of calibrated estimators is mostly in [-0.5, 1.5])."""


@dataclass
class Fit:
    """A calibrated strategy with its expected mean cost and quality on the training split."""

    strategy: Strategy
    cost: float
    quality: float


@dataclass(frozen=True)
class CalibrationConfig:
    """How hard to search: bisection steps, TPE trials and the TPE search widths."""

    bisect_iters: int = 40
    n_trials: int = 50
    seed: int = 0
    lambda_log_range: float = 2.0  # per-step λ_t = scale · exp(u_t), u_t in [-range, range]
    threshold_range: float = 0.3  # per-step θ_t = scale + u_t, u_t in [-range, range]
    cascade_routing_trials: int | None = 0  # TPE trials for cascade routing alone (0: one λ; None: n_trials)
    sigma_scales: tuple[float, ...] = (1.0,)  # Σ multipliers tried for the modes that use Σ; the best is kept
    min_spend: float = 0.0  # a cheaper strategy replaces the budget-meeting one only if it spends ≥ this share

    def __post_init__(self) -> None:
        if self.cascade_routing_trials is not None and self.cascade_routing_trials < 0:
            raise ValueError(f"cascade_routing_trials must be >= 0 (0: one λ for every step), got {self.cascade_routing_trials}")
        if not 0.0 <= self.min_spend <= 1.0:
            raise ValueError(f"min_spend must be in [0, 1] (a share of the budget), got {self.min_spend}")

    def trials_for(self, mode: str) -> int:
        """TPE trials of the per-step search for `mode` (0: one shared multiplier for every step)."""
        if mode == "cascade_routing" and self.cascade_routing_trials is not None:
            return self.cascade_routing_trials
        return self.n_trials


@dataclass
class RowOutcomes:
    """Per training query, the outcome of its latest simulation in one strategy family and shape, and the
    open range of `scale` around that simulation's in which the query's decisions, hence its outcome,
    provably stay the same (`Outcome.ranges`)."""

    cost: torch.Tensor  # (n,) float64
    quality: torch.Tensor  # (n,) float64
    low: torch.Tensor  # (n,) float64
    high: torch.Tensor  # (n,) float64

    @staticmethod
    def empty(n: int) -> "RowOutcomes":
        nothing = torch.full((n,), math.nan, dtype=torch.float64)  # no range contains a scale yet
        return RowOutcomes(nothing.clone(), nothing.clone(), nothing.clone(), nothing.clone())

    def unknown(self, scale: float) -> torch.Tensor:
        """The queries whose outcome at `scale` no earlier simulation decided."""
        return (~((self.low < scale) & (scale < self.high))).nonzero().squeeze(1)


@dataclass
class SweepMemo:
    """Simulations shared by the calibrations of a budget sweep: the mean cost and quality of each
    simulated strategy, and per strategy family (at its neutral shape, which every budget's bisection
    uses) the queries' latest outcomes with the ranges of `scale` over which they are proved, so that a
    bisection step re-simulates only the queries whose decisions may change there."""

    outcomes: dict = field(default_factory=dict)  # Strategy (γ = 0) -> (mean cost, mean quality)
    rows: dict = field(default_factory=dict)  # (family key, shape) -> RowOutcomes


class _Family:
    """Strategies of one mode and depth indexed by a scalar `scale` (mean cost non-increasing in it)
    and a per-step `shape`: λ_t = scale · shape_t, or θ_t = scale + shape_t for the thresholding cascade."""

    def __init__(self, mode: str, max_depth: int, force_order: bool, budget: float, sigma_scale: float = 1.0) -> None:
        self.mode, self.max_depth, self.force_order, self.budget = mode, max_depth, force_order, budget
        self.sigma_scale = sigma_scale
        self.threshold = mode == "threshold_cascade"
        self.n_params = max_depth - 1 if self.threshold else max_depth
        self.neutral = tuple([0.0 if self.threshold else 1.0] * self.n_params)
        self.key = (mode, max_depth, force_order, sigma_scale)

    def scale_ranges(self, scale: float, shape: tuple[float, ...], ranges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, the range of `scale` (with this shape) inside each of its per-step `ranges` (multipliers,
        m, 2) around `scale`; (scale, scale) where that is empty."""
        low = torch.full(ranges.shape[1:2], -math.inf, dtype=torch.float64)
        high = torch.full_like(low, math.inf)
        for s, rng in zip(shape, ranges):
            if self.threshold:  # θ_t = scale + s
                low, high = torch.maximum(low, rng[:, 0] - s), torch.minimum(high, rng[:, 1] - s)
            elif s > 0:  # λ_t = scale · s
                low, high = torch.maximum(low, rng[:, 0] / s), torch.minimum(high, rng[:, 1] / s)
        inside = (low < scale) & (scale < high)
        return torch.where(inside, low, scale), torch.where(inside, high, scale)

    def owns(self, strategy: Strategy) -> bool:
        """Whether `strategy` is one of this family's (any scale, shape and budget)."""
        return (strategy.mode, strategy.max_depth, strategy.force_order, strategy.sigma_scale) == self.key

    def make(self, scale: float, shape: tuple[float, ...], gamma: float = 0.0) -> Strategy:
        if self.threshold:
            return Strategy(
                self.mode, self.max_depth, thresholds=[scale + s for s in shape], gamma=gamma, budget=self.budget
            )
        return Strategy(
            self.mode, self.max_depth, lambdas=[scale * s for s in shape], gamma=gamma,
            force_order=self.force_order, sigma_scale=self.sigma_scale, budget=self.budget,
        )


def calibrate(
    sim: Simulator,
    mode: str,
    budget: float,
    *,
    max_depth: int,
    force_order: bool = False,
    config: CalibrationConfig = CalibrationConfig(),
    memo: SweepMemo | None = None,
) -> Fit:
    """Fit the strategy of `mode` with the highest mean quality whose expected mean cost is within the budget.

    Usually that spends the budget exactly (γ mixes the two tie-breaks at the crossing; at λ = 0 only if
    the expensive tie-break's extra calls answer better on the training queries, see `_with_gamma`); when spending
    less gives a higher quality (e.g. a cascade whose later models are worse), the cheapest of the best
    strategies seen during the search (or, through `memo`, for the sweep's earlier budgets) that still
    spend `config.min_spend` of the budget is returned if it answers clearly better (`_clearly_better`),
    with γ = 0. The floor keeps the realized cost near the budget a user asked for (1.0: exactly the
    budget; 0.0: any cheaper strategy). When no multiplier meets the budget (below what the family can
    spend, or the cost estimates cannot tell near-equal-cost models apart, so that spending by ĉ alone
    costs more), the cheapest strategy seen is returned, the best quality among equals. For the modes that
    use Σ, each of `config.sigma_scales` is calibrated (the first alone for an estimator without Σ) and the best
    within the budget kept. `memo` lets a budget sweep reuse simulations.
    """
    if mode == "routing":
        max_depth = 1
    memo = SweepMemo() if memo is None else memo
    scales = _sigma_scales(mode, config, sim)
    with sim.keeping_estimates() if len(scales) > 1 else nullcontext():
        fits = [
            _calibrate_family(sim, _Family(mode, max_depth, force_order, budget, scale), budget, config, memo)
            for scale in scales
        ]
    within = [f for f in fits if _within(f.cost, budget)]
    return _best(within) if within else _cheapest(fits)


def _calibrate_family(
    sim: Simulator, family: _Family, budget: float, config: CalibrationConfig, memo: SweepMemo
) -> Fit:
    """Calibrate the multipliers of one strategy family for the budget (see `calibrate`). The strategies of
    the family that earlier budgets of the sweep simulated are candidates too: at a budget above what λ = 0
    spends, the bisection stops at once, and a dearer budget's λ may answer better on the training queries."""

    def measure(scale: float, shape: tuple[float, ...], bisecting: bool = False) -> tuple[float, float]:
        """Mean cost and quality at (scale, shape). A bisection keeps each query's latest outcome with the
        range of scale proving it and re-simulates only the queries outside theirs (the per-step search
        tries each shape once: whole simulations)."""
        strategy = family.make(scale, shape)
        if strategy not in memo.outcomes:
            if bisecting:
                rows = memo.rows.setdefault((family.key, shape), RowOutcomes.empty(sim.n))
                todo = rows.unknown(scale)
                if todo.numel():
                    outcome = sim.run(strategy, track=True, rows=None if todo.numel() == sim.n else todo)
                    low, high = family.scale_ranges(scale, shape, outcome.ranges)
                    rows.cost[todo], rows.quality[todo], rows.low[todo], rows.high[todo] = (
                        outcome.cost, outcome.quality, low, high)
                memo.outcomes[strategy] = (float(rows.cost.mean()), float(rows.quality.mean()))
            else:
                outcome = sim.run(strategy)
                memo.outcomes[strategy] = (outcome.mean_cost, outcome.mean_quality)
        return memo.outcomes[strategy]

    if family.threshold:  # quality need not rise with spending here: look at a coarse grid of θ as well
        for theta in THRESHOLD_GRID:
            measure(theta, family.neutral, True)
    scale = _bisect(lambda s: measure(s, family.neutral, True)[0], budget, family, config.bisect_iters)
    shape = family.neutral
    if family.n_params > 1 and config.trials_for(family.mode) > 0 and not (not family.threshold and scale == 0.0):
        shape = _search_shape(measure, scale, budget, family, config)
        if shape != family.neutral:
            scale = _bisect(lambda s: measure(s, shape, True)[0], budget, family, config.bisect_iters)
            memo.rows.pop((family.key, shape), None)  # this budget's own shape: its queries' outcomes are not reused
    crossing, reach, per_query = _with_gamma(sim, family, scale, shape, budget, config.min_spend)
    tried = [Fit(s.replace(budget=budget), *outcome) for s, outcome in memo.outcomes.items() if family.owns(s)]
    if not _within(crossing.cost, budget):  # no multiplier meets it: the cheapest strategy seen, best of equals
        return _cheapest(tried + [crossing])
    floor = config.min_spend * min(budget, reach)
    better = [f for f in tried if f.cost <= budget and f.quality > crossing.quality + 1e-9 and f.cost >= floor]
    if not better:
        return crossing
    best = _best(better)
    return best if _clearly_better(sim.run(best.strategy).quality, per_query) else crossing


def _clearly_better(quality: torch.Tensor, than: torch.Tensor, z: float = 2.0) -> bool:
    """Whether per-query qualities beat `than`'s on the same queries by more than `z` standard errors of
    the mean paired difference: a smaller gain is a tie, and the budget-spending strategy keeps it (among
    many strategies seen, the best by a hair is mostly the luckiest)."""
    diff = quality.double() - than.double()
    return float(diff.mean()) > z * float(diff.std(correction=0)) / math.sqrt(diff.numel())


def calibrate_sweep(
    sim: Simulator,
    mode: str,
    budgets: list[float],
    *,
    max_depth: int,
    force_order: bool = False,
    config: CalibrationConfig = CalibrationConfig(),
) -> list[Fit]:
    """One calibrated strategy per budget; simulations are shared between budgets.

    For the modes that use Σ, one of `config.sigma_scales` for the whole sweep: the first listed, unless a
    later one answers clearly better (`_clearly_better`) on the training queries, per query averaged over the
    budgets. Choosing it budget by budget keeps the luckiest of several noisy fits at each budget (5 rlc_train
    splits, learned estimators: cascade routing's test AUC 88.13 that way, 88.31 with one multiplier per
    sweep); so does the highest mean by a hair (10 inner rlc_train splits: the one sweep that kept Σ × 1 over
    Σ × 0 that way lost 2.7 points of test AUC to routing; see docs/benchmarks.md).
    """
    memo = SweepMemo()
    scales = _sigma_scales(mode, config, sim)
    best: list[Fit] = []
    best_quality: torch.Tensor | None = None  # its per-query qualities, simulated once when first compared
    with sim.keeping_estimates() if len(scales) > 1 else nullcontext():  # the multipliers share most states
        for scale in scales:
            one = replace(config, sigma_scales=(scale,))
            fits = [calibrate(sim, mode, float(b), max_depth=max_depth, force_order=force_order, config=one,
                              memo=memo) for b in budgets]
            if not best:
                best = fits
            elif _mean_quality(fits) > _mean_quality(best) + 1e-12:  # else not clearly better: no simulation
                quality = _sweep_quality(sim, fits)
                if best_quality is None:
                    best_quality = _sweep_quality(sim, best)
                if _clearly_better(quality, best_quality):
                    best, best_quality = fits, quality
    return best


def _sweep_quality(sim: Simulator, fits: list[Fit]) -> torch.Tensor:
    """Per training query, the expected quality of a sweep's strategies averaged over its budgets."""
    return torch.stack([sim.expected(f.strategy)[1] for f in fits]).mean(0)


def _sigma_scales(mode: str, config: CalibrationConfig, sim: Simulator) -> tuple[float, ...]:
    """The Σ multipliers calibrated for `mode`: one neutral value for the modes without Σ, and only the first
    for an estimator whose Σ is always 0 (e.g. learned without answers), where every multiplier calibrates the
    same strategies."""
    if mode not in SIGMA_MODES:
        return (1.0,)
    return config.sigma_scales if sim.estimator.uncertain else config.sigma_scales[:1]


def _best(fits: list[Fit]) -> Fit:
    """The fit of highest quality, the cheapest among equals."""
    top = max(f.quality for f in fits)
    return min((f for f in fits if f.quality >= top - 1e-12), key=lambda f: f.cost)


def _cheapest(fits: list[Fit]) -> Fit:
    """The cheapest fit, the best quality among equals."""
    return min(fits, key=lambda f: (f.cost, -f.quality))


def _within(cost: float, budget: float) -> bool:
    """Whether a mean cost meets the budget, up to the rounding of γ's mix that aims at it exactly."""
    return cost <= budget + 1e-9 * abs(budget)


def _mean_quality(fits: list[Fit]) -> float:
    return sum(f.quality for f in fits) / max(len(fits), 1)


def _bisect(cost_of: Callable[[float], float], budget: float, family: _Family, iters: int) -> float:
    """The smallest scale (to bisection precision) whose mean cost is within the budget."""
    if family.threshold:
        lo, hi = THRESHOLD_RANGE
        if cost_of(lo) <= budget:
            return lo
        if cost_of(hi) > budget:
            return hi
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost_of(mid) > budget else (lo, mid)
        return hi
    if cost_of(0.0) <= budget:
        return 0.0
    lo, hi = 0.0, 1.0 / max(budget, 1e-300)
    while cost_of(hi) > budget:
        lo, hi = hi, hi * 4
        if hi > 1e30:
            return hi  # the budget is below the cheapest possible strategy
    for _ in range(iters):
        mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
        lo, hi = (mid, hi) if cost_of(mid) > budget else (lo, mid)
        if lo > 0 and hi / lo - 1 < 1e-12:
            break
    return hi


def _search_shape(measure, scale: float, budget: float, family: _Family, config: CalibrationConfig) -> tuple:
    """Per-step shape by TPE around the shared multiplier: the best quality within the budget
    (the shared one itself included), cost above the budget penalized during the search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base_cost, base_quality = measure(scale, family.neutral)
    penalty = max(base_quality, 1e-6) / max(base_cost, 1e-300)
    width = config.threshold_range if family.threshold else config.lambda_log_range
    feasible: list[tuple[float, tuple]] = [(base_quality, family.neutral)] if base_cost <= budget else []

    def to_shape(u: list[float]) -> tuple[float, ...]:
        return tuple(u) if family.threshold else tuple(math.exp(x) for x in u)

    def objective(trial: optuna.Trial) -> float:
        u = [trial.suggest_float(f"u{t}", -width, width) for t in range(family.n_params)]
        shape = to_shape(u)
        cost, quality = measure(scale, shape)
        if cost <= budget:
            feasible.append((quality, shape))
        return quality - penalty * max(0.0, cost - budget)

    sampler = optuna.samplers.TPESampler(seed=config.seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=config.trials_for(family.mode))
    if not feasible:
        return family.neutral
    return max(feasible, key=lambda f: f[0])[1]


def _with_gamma(
    sim: Simulator, family: _Family, scale: float, shape: tuple, budget: float, min_spend: float
) -> tuple[Fit, float, torch.Tensor]:
    """Set γ so the mix of the cheap and expensive tie-breaks meets the budget in expectation; also returns
    the most the crossing can spend (the expensive tie-break's cost) and its expected quality per query.

    At λ = 0 the ties are between plans of equal estimated quality (with estimates that no answer moves,
    every superset of the best model): there γ buys the expensive tie-break's extra calls only if they
    answer better on the training queries, else only up to the `min_spend` share of what it can spend.
    """
    strategy = family.make(scale, shape)
    cheap = sim.run(strategy, False)
    dear = sim.run(strategy, True)
    c0, c1 = cheap.mean_cost, dear.mean_cost
    idle = scale == 0.0 and not family.threshold and dear.mean_quality <= cheap.mean_quality + 1e-12
    reach = max(c0, c1)
    target = min_spend * min(budget, reach) if idle else budget
    gamma = min(max((target - c0) / (c1 - c0), 0.0), 1.0) if c1 > c0 else 0.0
    cost = (1 - gamma) * c0 + gamma * c1
    quality = (1 - gamma) * cheap.mean_quality + gamma * dear.mean_quality
    per_query = (1 - gamma) * cheap.quality + gamma * dear.quality
    return Fit(family.make(scale, shape, gamma), cost, quality), reach, per_query

