"""The estimator interface the simulator, calibration and serving code rely on.

An estimator is fitted on a training table, turns any table (or a serving batch shaped like one) into
per-row feature tensors once, and then predicts, for rows and the set of models already run on each,
the quality of every model (post-hoc for run models, ex-ante for the others), the uncertainty Σ of those
estimates and the cost of every model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from router_train.table import RoutingTable

Features = dict[str, torch.Tensor]
"""Per-row tensors (first dimension = table rows) an estimator computes once per table."""


class Embedder(Protocol):
    """Turns query texts into fixed-size vectors (the text encoder, or a stand-in in tests)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(n, d) float32 embeddings, one row per text."""

    def identity(self) -> dict:
        """What determines the embeddings (encoder id, revision, pooling): a cache key and manifest entry."""


@dataclass
class Estimate:
    """Estimates for B queries: `quality` (B, k), `cost` (B, k), `cov` (B, k, k) or None."""

    quality: torch.Tensor
    cost: torch.Tensor
    cov: torch.Tensor | None = None


class QualityEstimator(ABC):
    """Predicts every model's quality and cost for a query, given what the models run so far answered."""

    models: list[str]

    @abstractmethod
    def fit(self, table: RoutingTable) -> "QualityEstimator":
        """Fit on a table whose rows are all training data; returns self."""

    @abstractmethod
    def featurize(self, table: RoutingTable) -> Features:
        """Per-row features of a table with the same models, computed once and reused for every run set."""

    @abstractmethod
    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        """Estimates for `rows` (B,) of the featurized table, with `run` (B, k) bool the models already run."""

    @property
    def uncertain(self) -> bool:
        """Whether `predict` can return a nonzero Σ; calibration tries Σ multipliers only for estimators that can."""
        return True

    def check_models(self, table: RoutingTable) -> None:
        """Raise a ValueError unless the table has exactly this estimator's models, in its order."""
        if list(table.models) != list(self.models):
            raise ValueError(
                f"the table's models {table.models} differ from the estimator's {self.models}; "
                "select the same models (--models) in the same cost order"
            )
