"""Perfect information: the true qualities and costs, with no uncertainty. The oracle's estimator."""

from __future__ import annotations

import torch

from router_train.table import RoutingTable

from .base import Estimate, Features, QualityEstimator


class TruthEstimator(QualityEstimator):
    """Routing with it at λ → 0 picks, per query, the cheapest model with the best true quality."""

    def fit(self, table: RoutingTable) -> "TruthEstimator":
        self.models = list(table.models)
        return self

    def featurize(self, table: RoutingTable) -> Features:
        self.check_models(table)
        return {"quality": table.quality.clone(), "cost": table.cost.clone()}

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        return Estimate(quality=features["quality"][rows], cost=features["cost"][rows], cov=None)
