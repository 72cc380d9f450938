"""Transparent per-source baselines (FrugalGPT / AutoMix style), fitted on training queries only.

Each source (the table's `source` column) gets a small family of policies, all scored exactly on the
table since every model's result is known:

- `route(i)`: run model i, return its answer;
- `confidence(a, b, θ)`: run a; keep its answer if its confidence is at least θ (a missing confidence
  counts as low), else run b and return b's;
- `agree(a, b, c)`: run a and b; if their answers agree (equal `answer_key`, both present) return b's,
  else run c and return c's;
- `vote(a, b, c)`: run a, b and c; return an answer given by at least two (the priciest such model's),
  else c's.

Cascades use only the models on the source's cost–quality hull (at most `max_cascade_models`, cheaper
first), and confidence thresholds are inner quantiles of a's confidence on the source's training
queries, so the family stays small and transparent. For a budget, one multiplier λ is shared by all
sources: each takes its policy maximizing mean quality − λ·mean cost, λ is bisected so the query-weighted
training cost is within the budget, and the cheap and dear tie-breaks are mixed with probability γ so
that it equals the budget (as routing is calibrated in method.md). Test queries whose source was not
seen in training, and queries without a source, use the policies fitted on all training queries pooled.

    rules = RulesBaseline().fit(train_table)
    strategies = rules.calibrate([1e-4, 5e-4])
    cost, quality = rules.expected(test_table, strategies[0])   # per-query expected values
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from estimators.features import answer_key

from .metrics import single_model_points, upper_hull
from .table import RoutingTable

KINDS = ("route", "confidence", "agree", "vote")
"""Policy kinds, with 1, 2, 3 and 3 models."""
TIE_TOL = 1e-9
"""Two policies of a source tie when their values `mean quality − λ·mean cost` differ by at most this much."""
_BISECT_ITERS = 200
_LAMBDA_CAP = 1e30


@dataclass(frozen=True)
class Policy:
    """One per-source rule: its kind, the models it runs (cheaper first) and, for `confidence`, θ."""

    kind: str
    models: tuple[str, ...]
    threshold: float | None = None

    def __post_init__(self) -> None:
        sizes = {"route": 1, "confidence": 2, "agree": 3, "vote": 3}
        if self.kind not in sizes:
            raise ValueError(f"policy.kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.models) != sizes[self.kind]:
            raise ValueError(f"policy.models: a {self.kind} policy runs {sizes[self.kind]} model(s), got {self.models}")
        if (self.kind == "confidence") != (self.threshold is not None):
            raise ValueError("policy.threshold is required for confidence policies and only for them")

    def to_dict(self) -> dict:
        data: dict = {"kind": self.kind, "models": list(self.models)}
        if self.threshold is not None:
            data["threshold"] = self.threshold
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Policy:
        return cls(data["kind"], tuple(data["models"]), data.get("threshold"))


@dataclass
class RulesStrategy:
    """The rules fitted for one budget: λ, γ and per source the policy under the cheap and the dear tie-break.

    `sources` maps a training source to its (cheap, dear) policies; `fallback` serves every other query.
    `train_cost`/`train_quality` are the γ-mixed means on the training queries.
    """

    budget: float
    lam: float
    gamma: float
    sources: dict[str, tuple[Policy, Policy]]
    fallback: tuple[Policy, Policy]
    train_cost: float
    train_quality: float

    def to_dict(self) -> dict:
        def pair(policies: tuple[Policy, Policy]) -> dict:
            return {"cheap": policies[0].to_dict(), "dear": policies[1].to_dict()}

        return {
            "mode": "rules", "budget": self.budget, "lambda": self.lam, "gamma": self.gamma,
            "train_cost": self.train_cost, "train_quality": self.train_quality,
            "sources": {name: pair(p) for name, p in self.sources.items()}, "global": pair(self.fallback),
        }


class _Outcomes:
    """A table's per-query results as numpy arrays, to score policies: cost, quality, confidence, answer ids."""

    def __init__(self, table: RoutingTable) -> None:
        self.models = list(table.models)
        self.cost = table.cost.double().numpy()
        self.quality = table.quality.double().numpy()
        self.confidence = None if table.confidence is None else table.confidence.double().numpy()
        self.answer_ids = None
        if table.answers is not None:
            vocabulary: dict[str, int] = {}
            ids = np.full((table.n, table.k), -1, dtype=np.int64)
            for i, row in enumerate(table.answers):
                for j, answer in enumerate(row):
                    key = answer_key(answer)
                    if key is not None:
                        ids[i, j] = vocabulary.setdefault(key, len(vocabulary))
            self.answer_ids = ids

    def score(self, policy: Policy, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-query (cost, quality) of `policy` on `rows`."""
        cols = [self.models.index(m) for m in policy.models]
        cost, quality = self.cost[rows][:, cols], self.quality[rows][:, cols]
        if policy.kind == "route":
            return cost[:, 0], quality[:, 0]
        if policy.kind == "confidence":
            if self.confidence is None:
                raise ValueError("table.confidence: confidence policies need a table with a confidence column")
            confident = self.confidence[rows, cols[0]] >= policy.threshold  # NaN (missing) compares False: low
            return cost[:, 0] + np.where(confident, 0.0, cost[:, 1]), np.where(confident, quality[:, 0], quality[:, 1])
        if self.answer_ids is None:
            raise ValueError(f"table.answers: {policy.kind} policies need a table with an answer column")
        ids = self.answer_ids[rows][:, cols]

        def agree(x: int, y: int) -> np.ndarray:
            return (ids[:, x] == ids[:, y]) & (ids[:, x] >= 0)

        if policy.kind == "agree":
            stop = agree(0, 1)
            spent = cost[:, 0] + cost[:, 1] + np.where(stop, 0.0, cost[:, 2])
            return spent, np.where(stop, quality[:, 1], quality[:, 2])
        only_ab = agree(0, 1) & ~agree(1, 2) & ~agree(0, 2)  # otherwise c is in the majority, or there is none
        return cost.sum(1), np.where(only_ab, quality[:, 1], quality[:, 2])


@dataclass
class _Group:
    """The policies of one source with their mean training cost and quality, and its weight in the training cost."""

    policies: list[Policy]
    cost: np.ndarray  # (P,)
    quality: np.ndarray  # (P,)
    weight: int  # training queries served by this group

    def choose(self, lam: float, dear: bool) -> int:
        """Index of the policy maximizing quality − λ·cost; ties to the cheapest, or with `dear` the dearest."""
        value = self.quality - lam * self.cost if lam > 0 else self.quality.copy()
        tied = value >= value.max() - TIE_TOL
        costs = np.where(tied, self.cost, -np.inf if dear else np.inf)
        return int(np.argmax(costs) if dear else np.argmin(costs))


class RulesBaseline:
    """Per-source route, confidence, agreement and vote policies, calibrated to budgets on training queries.

    `max_cascade_models`: how many of a source's hull models cascades may use (spread along the hull);
    `n_thresholds`: inner quantiles of a model's confidence tried as θ.
    """

    def __init__(self, max_cascade_models: int = 5, n_thresholds: int = 7) -> None:
        if max_cascade_models < 1:
            raise ValueError(f"max_cascade_models must be >= 1, got {max_cascade_models}")
        if n_thresholds < 1:
            raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
        self.max_cascade_models = max_cascade_models
        self.n_thresholds = n_thresholds

    def fit(self, table: RoutingTable) -> RulesBaseline:
        """Build every source's policy family and score it on the training queries of `table`."""
        if table.n == 0:
            raise ValueError("rules: the training table has no queries; pass the training split")
        self.models_ = list(table.models)
        self.uses_confidence_ = table.confidence is not None
        self.uses_answers_ = table.answers is not None
        outcomes = _Outcomes(table)
        sources = np.array(table.sources, dtype=object)
        self.groups_ = {
            name: self._group(outcomes, np.flatnonzero(sources == name), weight=int((sources == name).sum()))
            for name in sorted(set(table.sources) - {""})
        }
        self.global_ = self._group(outcomes, np.arange(table.n), weight=int((sources == "").sum()))
        self.n_train_ = table.n
        return self

    def _group(self, outcomes: _Outcomes, rows: np.ndarray, weight: int) -> _Group:
        """The policy family of the queries `rows`, with its mean training cost and quality per policy."""
        policies = [Policy("route", (m,)) for m in self.models_]
        chain = self._cascade_models(outcomes, rows)
        names = [self.models_[j] for j in chain]
        if outcomes.confidence is not None:
            for a, b in combinations(range(len(chain)), 2):
                for theta in self._thresholds(outcomes.confidence[rows, chain[a]]):
                    policies.append(Policy("confidence", (names[a], names[b]), theta))
        if outcomes.answer_ids is not None:
            for triple in combinations(names, 3):
                policies += [Policy("agree", triple), Policy("vote", triple)]
        scores = [outcomes.score(p, rows) for p in policies]
        return _Group(
            policies,
            np.array([c.mean() for c, _ in scores]),
            np.array([q.mean() for _, q in scores]),
            weight,
        )

    def _cascade_models(self, outcomes: _Outcomes, rows: np.ndarray) -> list[int]:
        """Columns of the models on the upper cost–quality hull of `rows`, cheaper first, at most
        `max_cascade_models` of them spread evenly along the hull (its cheapest and dearest kept)."""
        points = single_model_points(outcomes.quality[rows], outcomes.cost[rows])
        hull = upper_hull(points)
        cols = [int(np.flatnonzero((points == point).all(1))[0]) for point in hull]
        if len(cols) > self.max_cascade_models:
            keep = np.unique(np.round(np.linspace(0, len(cols) - 1, self.max_cascade_models)).astype(int))
            cols = [cols[i] for i in keep]
        return cols

    def _thresholds(self, confidence: np.ndarray) -> list[float]:
        """Distinct inner quantiles of the finite confidences (none when the model has no confidence here)."""
        finite = confidence[np.isfinite(confidence)]
        if finite.size == 0:
            return []
        levels = np.arange(1, self.n_thresholds + 1) / (self.n_thresholds + 1)
        return sorted({float(x) for x in np.quantile(finite, levels)})

    def _choices(self, lam: float, dear: bool) -> tuple[dict[str, int], int, float, float]:
        """Per-source and fallback policy indices at λ, with their query-weighted mean training cost and quality."""
        picks = {name: g.choose(lam, dear) for name, g in self.groups_.items()}
        fallback = self.global_.choose(lam, dear)
        cost = sum(g.weight * g.cost[picks[name]] for name, g in self.groups_.items())
        quality = sum(g.weight * g.quality[picks[name]] for name, g in self.groups_.items())
        cost += self.global_.weight * self.global_.cost[fallback]
        quality += self.global_.weight * self.global_.quality[fallback]
        return picks, fallback, float(cost / self.n_train_), float(quality / self.n_train_)

    def _lambda(self, budget: float) -> float:
        """The smallest λ (to bisection precision) whose cheap-tie-break training cost is within the budget."""

        def cost_of(lam: float) -> float:
            return self._choices(lam, dear=False)[2]

        if cost_of(0.0) <= budget:
            return 0.0
        lo, hi = 0.0, 1.0 / max(budget, 1e-300)
        while cost_of(hi) > budget:
            lo, hi = hi, hi * 4
            if hi > _LAMBDA_CAP:
                return hi  # the budget is below the cheapest policies: take them
        for _ in range(_BISECT_ITERS):
            mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
            lo, hi = (mid, hi) if cost_of(mid) > budget else (lo, mid)
            if lo > 0 and hi / lo - 1 < 1e-13:
                break
        return hi

    def calibrate(self, budgets: list[float] | np.ndarray) -> list[RulesStrategy]:
        """One strategy per budget (mean cost per query): λ by bisection, then γ so the training cost meets it."""
        self._check_fitted()
        strategies = []
        for budget in np.asarray(budgets, dtype=np.float64).reshape(-1).tolist():
            if not (math.isfinite(budget) and budget >= 0):
                raise ValueError(f"budgets must be finite costs >= 0, got {budget}")
            lam = self._lambda(budget)
            cheap, cheap_fb, c0, q0 = self._choices(lam, dear=False)
            dear, dear_fb, c1, q1 = self._choices(lam, dear=True)
            gamma = min(max((budget - c0) / (c1 - c0), 0.0), 1.0) if c1 > c0 else 0.0
            strategies.append(RulesStrategy(
                budget=budget, lam=lam, gamma=gamma,
                sources={
                    name: (g.policies[cheap[name]], g.policies[dear[name]]) for name, g in self.groups_.items()
                },
                fallback=(self.global_.policies[cheap_fb], self.global_.policies[dear_fb]),
                train_cost=(1 - gamma) * c0 + gamma * c1,
                train_quality=(1 - gamma) * q0 + gamma * q1,
            ))
        return strategies

    def expected(self, table: RoutingTable, strategy: RulesStrategy) -> tuple[np.ndarray, np.ndarray]:
        """Per-query expected (cost, quality) of `strategy` on `table`, the tie-breaks mixed with probability γ."""
        cost, quality = self.expected_sweep(table, [strategy])
        return cost[:, 0], quality[:, 0]

    def expected_sweep(self, table: RoutingTable, strategies: list[RulesStrategy]) -> tuple[np.ndarray, np.ndarray]:
        """`expected` for several strategies at once: (cost, quality) of shape (n, len(strategies))."""
        self._check_fitted()
        if sorted(table.models) != sorted(self.models_):
            extra = sorted(set(table.models) - set(self.models_))
            absent = sorted(set(self.models_) - set(table.models))
            raise ValueError(
                f"rules: the table's models differ from the training models (not in training: {extra}; "
                f"missing: {absent}); score on a table with exactly the models the rules were fitted on"
            )
        outcomes = _Outcomes(table)
        sources = np.array(table.sources, dtype=object)
        cost, quality = np.zeros((table.n, len(strategies))), np.zeros((table.n, len(strategies)))
        for column, strategy in enumerate(strategies):
            known = np.isin(sources, list(strategy.sources)) if strategy.sources else np.zeros(table.n, dtype=bool)
            groups = [(np.flatnonzero(sources == name), p) for name, p in strategy.sources.items()]
            groups.append((np.flatnonzero(~known), strategy.fallback))
            for rows, (cheap, dear) in groups:
                if rows.size == 0:
                    continue
                c0, q0 = outcomes.score(cheap, rows)
                c1, q1 = outcomes.score(dear, rows)
                cost[rows, column] = (1 - strategy.gamma) * c0 + strategy.gamma * c1
                quality[rows, column] = (1 - strategy.gamma) * q0 + strategy.gamma * q1
        return cost, quality

    def _check_fitted(self) -> None:
        if not hasattr(self, "groups_"):
            raise ValueError("rules: call fit(train_table) before calibrate() or expected()")
