"""Cross-fitting: out-of-fold estimates for every training query, to calibrate λ, γ and the Σ scale on.

Calibrating on the queries an estimator was trained on flatters it (its estimates there are too
good), and holding a share back leaves few queries to calibrate on (186 on half of rlc_train: a mean
quality's standard error of ~2.5 points). Cross-fitting does both right: the training queries are
split into K folds, K estimators are each fitted on the other folds, and each query is estimated by
the one that has not seen it. The estimator that is exported and tested is fitted on all queries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from router_train.table import RoutingTable

from .base import Estimate, Features, QualityEstimator


def fold_of(n: int, folds: int, seed: int) -> torch.Tensor:
    """(n,) fold index of each row: a seeded permutation dealt round-robin, so fold sizes differ by ≤ 1."""
    fold = torch.empty(n, dtype=torch.long)
    fold[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] = torch.arange(n) % folds
    return fold


class CrossFitted(QualityEstimator):
    """K estimators built by `build()`, each fitted on all folds but one; predicts each row of the
    fitted table with the estimator that did not see it. Only for the table it was fitted on."""

    def __init__(self, build: Callable[[], QualityEstimator], folds: int = 5, seed: int = 0) -> None:
        if folds < 2:
            raise ValueError(f"cross-fitting needs folds >= 2, got {folds}")
        self.build, self.folds, self.seed = build, folds, seed
        self.members: list[QualityEstimator] = []
        self.fold = torch.empty(0, dtype=torch.long)
        self.query_ids: list[str] = []
        self.models: list[str] = []

    def fit(self, table: RoutingTable) -> "CrossFitted":
        """Fit one member per fold on the other folds' queries."""
        if table.n < self.folds:
            raise ValueError(f"cross-fitting with {self.folds} folds needs at least {self.folds} queries, got {table.n}")
        self.models, self.query_ids = list(table.models), list(table.query_ids)
        self.fold = fold_of(table.n, self.folds, self.seed)
        self.members = [self.build().fit(table.subset(self.fold != f)) for f in range(self.folds)]
        return self

    @property
    def uncertain(self) -> bool:
        return any(member.uncertain for member in self.members)

    def featurize(self, table: RoutingTable) -> Features:
        """Each member's features of its own held-out fold, with each row's fold and position in it."""
        self.check_models(table)
        if list(table.query_ids) != self.query_ids:
            raise ValueError("out-of-fold estimates exist only for the table the cross-fitted estimator was fitted on")
        local = torch.empty(table.n, dtype=torch.long)
        features: Features = {"fold": self.fold, "local": local}
        for f, member in enumerate(self.members):
            rows = (self.fold == f).nonzero().squeeze(1)
            local[rows] = torch.arange(rows.numel())
            features.update({f"{f}/{name}": value for name, value in member.featurize(table.subset(rows)).items()})
        return features

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        """Estimates of `rows` from their out-of-fold members, in the order given."""
        fold = features["fold"][rows]
        if rows.numel() == 0:
            fold = torch.zeros(0, dtype=torch.long)
            own = {name[2:]: v for name, v in features.items() if name.startswith("0/")}
            return self.members[0].predict(own, fold, run)
        parts: list[tuple[torch.Tensor, Estimate]] = []
        for f, member in enumerate(self.members):
            sel = (fold == f).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            own = {name.split("/", 1)[1]: v for name, v in features.items() if name.startswith(f"{f}/")}
            parts.append((sel, member.predict(own, features["local"][rows[sel]], run[sel])))
        b, k = run.shape
        first = parts[0][1]
        quality = torch.empty(b, k, dtype=first.quality.dtype)
        cost = torch.empty(b, k, dtype=first.cost.dtype)
        cov = None if first.cov is None else torch.zeros(b, k, k, dtype=first.cov.dtype)
        for sel, est in parts:
            quality[sel], cost[sel] = est.quality, est.cost
            if cov is not None:
                cov[sel] = est.cov
        return Estimate(quality=quality, cost=cost, cov=cov)
