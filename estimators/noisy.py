"""The paper's simulated estimators: truth plus Gaussian noise, recalibrated by linear regression.

Ex-ante (model not run yet): `q + N(0, σ_before²)`; post-hoc (model run): `q + N(0, σ_after²)`, each
mapped through a per-model linear regression fitted on the training split only. The noise of a
(query, model) cell is fixed by the seed and the query id, so it is the same in every run set and in
any row order. Σ is diagonal: for a model not run, the training variance of (post-hoc − ex-ante
estimate), how far the estimate moves once the model runs; zero for run models. Costs are the
table's true costs (the reference's ground-truth cost estimator).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from router_train.table import RoutingTable

from .base import Estimate, Features, QualityEstimator

NOISE_LEVELS = {"low": (0.6, 0.3), "medium": (1.6, 0.8), "high": (2.4, 1.2)}
"""(σ_before, σ_after) of the paper's three noise levels."""


class NoisyEstimator(QualityEstimator):
    """Simulated estimators of a given noise level; needs the true qualities, so for evaluation only."""

    def __init__(self, noise: str | tuple[float, float] = "low", seed: int = 0) -> None:
        if isinstance(noise, str):
            if noise not in NOISE_LEVELS:
                raise ValueError(f"noise must be one of {sorted(NOISE_LEVELS)} or (σ_before, σ_after), got {noise!r}")
            noise = NOISE_LEVELS[noise]
        self.sigma_before, self.sigma_after = (float(s) for s in noise)
        if self.sigma_before < 0 or self.sigma_after < 0:
            raise ValueError(f"noise standard deviations must be >= 0, got {noise}")
        self.seed = seed
        self.models: list[str] = []

    def _noisy(self, table: RoutingTable) -> tuple[torch.Tensor, torch.Tensor]:
        noise = np.empty((table.n, 2, table.k))
        for i, query_id in enumerate(table.query_ids):
            rng = np.random.default_rng([self.seed, zlib.crc32(query_id.encode())])
            noise[i] = rng.standard_normal((2, table.k))
        noise = torch.from_numpy(noise)
        return table.quality + self.sigma_before * noise[:, 0], table.quality + self.sigma_after * noise[:, 1]

    def fit(self, table: RoutingTable) -> "NoisyEstimator":
        self.models = list(table.models)
        before, after = self._noisy(table)
        self.coef_before = _fit_linear(before, table.quality)
        self.coef_after = _fit_linear(after, table.quality)
        ante = _apply(self.coef_before, before)
        post = _apply(self.coef_after, after)
        self.variance = ((post - ante) ** 2).mean(0) - (post - ante).mean(0) ** 2
        return self

    def featurize(self, table: RoutingTable) -> Features:
        self.check_models(table)
        before, after = self._noisy(table)
        return {
            "ante": _apply(self.coef_before, before),
            "post": _apply(self.coef_after, after),
            "cost": table.cost.clone(),
        }

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        quality = torch.where(run, features["post"][rows], features["ante"][rows])
        cov = torch.diag_embed(torch.where(run, 0.0, self.variance.to(quality.dtype)))
        return Estimate(quality=quality, cost=features["cost"][rows], cov=cov)


def _fit_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-column least squares `y ≈ a x + b`, returned as (2, k) = (a, b); a = 0 for a constant column."""
    xm, ym = x.mean(0), y.mean(0)
    var = ((x - xm) ** 2).mean(0)
    slope = torch.where(var > 0, ((x - xm) * (y - ym)).mean(0) / var.clamp(min=1e-300), 0.0)
    return torch.stack([slope, ym - slope * xm])


def _apply(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return coef[0] * x + coef[1]
