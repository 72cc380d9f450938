"""The paper's learned baseline: logistic regressions on hand features of the answers seen so far.

The reference trains one logistic regression per (target model, set of models already run): k·2^k
regressions, infeasible beyond a dozen models. Here each target model gets one regression shared by
every run set, which sees the run set through its features: run flags, and per run model its answer
features (zero for models not run). The same regression gives the ex-ante estimate of a model not run
and the post-hoc estimate of a model that ran (its own answer features are then among the inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from router_train.table import RoutingTable

from .base import Estimate, Features, QualityEstimator
from .cost import CostModel
from .features import answer_features
from .run_sets import sample_run_sets
from .uncertainty import ResidualCovariance

HOLDOUT_FRACTION = 0.25
"""Share of the training rows held back from the regressions to fit Σ on."""
_ANSWER_KEYS = ("has_answer", "confidence", "has_confidence", "length", "agree", "overlap")


class LogRegEstimator(QualityEstimator):
    """One L2-regularized logistic regression per target model, shared across run sets.

    Features of a state (query, run set), all standardized with the training states' mean and std:
    - one-hot of the query's `source` (categories seen in training; unseen → all zeros);
    - run flag of every model;
    - per model, zero unless it ran: top-class probability p = exp(confidence) (0 if missing), the
      binary entropy of p, has_confidence, has_answer and log(1 + answer length);
    - per pair of models (upper triangle), zero unless both ran: answer agreement and word overlap;
    - about the target model, zero unless it ran: the fraction of the other run models agreeing with
      it and their mean overlap with it. (Its own run flag, p and entropy are already among the
      inputs of its own regression, so they are not repeated.)

    Training: a seeded `HOLDOUT_FRACTION` of the training rows is held back; the regressions are fitted
    on the others, on the states of `sample_run_sets(max_depth, per_row)`, with the true qualities as
    soft labels (BCE) and sklearn's L2 convention (penalty ½‖w‖², loss summed over states and scaled by
    C; intercepts not penalized), by L-BFGS. Σ is a `ResidualCovariance` fitted on the held-back rows'
    states against the full-information estimate, which, as in the reference, comes from regressions
    of its own trained on the state where every model ran (the depth-capped regressions would
    extrapolate there: on rlc_train their all-run estimate was worse than the ex-ante one, and adding
    the all-run state to their training made the states routing visits worse). The regressions are not
    refitted on all rows, so Σ measures the regressions that are used. Costs come from a `CostModel`
    fitted on all training rows.
    """

    def __init__(self, max_depth: int = 3, C: float = 1.0, per_row: int = 4, seed: int = 0) -> None:
        if max_depth < 1 or per_row < 0 or not C > 0:
            raise ValueError(f"LogRegEstimator needs max_depth >= 1, per_row >= 0, C > 0; got {max_depth}, {per_row}, {C}")
        self.max_depth, self.C, self.per_row, self.seed = max_depth, float(C), per_row, seed
        self.models: list[str] = []
        self.sources: list[str] = []

    def fit(self, table: RoutingTable) -> "LogRegEstimator":
        """Fit the cost model, the regressions (on 1 − HOLDOUT_FRACTION of the rows) and Σ (on the rest)."""
        if table.n < 2:
            raise ValueError(f"LogRegEstimator.fit needs at least 2 training rows, got {table.n}")
        n, k = table.n, table.k
        self.models = list(table.models)
        self.sources = sorted(set(table.sources))
        self.cost_model = CostModel().fit(table)
        features = self.featurize(table)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=generator)
        n_hold = min(max(round(HOLDOUT_FRACTION * n), 1), n - 1)
        held, fitted = order[:n_hold], order[n_hold:]

        index, run = sample_run_sets(fitted.numel(), k, self.max_depth, self.per_row, generator)
        rows = fitted[index]
        self.regressions = _Regressions(*self._design(features, rows, run), table.quality[rows].float(), self.C)
        everything = torch.ones(fitted.numel(), k, dtype=torch.bool)
        self.full_regressions = _Regressions(
            *self._design(features, fitted, everything), table.quality[fitted].float(), self.C
        )

        index, run = sample_run_sets(held.numel(), k, self.max_depth, self.per_row, generator)

        def estimate(r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            regressions = self.full_regressions if bool(m.all()) else self.regressions
            return self._quality(features, r, m, regressions)

        self.uncertainty = ResidualCovariance().fit(estimate, held[index], run, torch.ones(1, k, dtype=torch.bool))
        return self

    def featurize(self, table: RoutingTable) -> Features:
        """Source index (-1 = unseen), answer features (see `answer_features`) and cost features."""
        self.check_models(table)
        answers = answer_features(table.answers, table.confidence, table.n, table.k)
        index = {s: i for i, s in enumerate(self.sources)}
        features = {name: getattr(answers, name) for name in _ANSWER_KEYS}
        features["source"] = torch.tensor([index.get(s, -1) for s in table.sources], dtype=torch.long)
        features.update(self.cost_model.featurize(table))
        return features

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        """Quality from the regressions, Σ from the residual covariance, cost from the cost model (float64)."""
        return Estimate(
            quality=self._quality(features, rows, run),
            cost=self.cost_model.predict(features, rows, run),
            cov=self.uncertainty.cov(run),
        )

    def _design(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features of states: shared (B, D) and about each target model (B, k, 2), float32."""
        k = run.shape[1]
        ran = run.float()
        both = ran.unsqueeze(2) * ran.unsqueeze(1)
        has_confidence = features["has_confidence"][rows].float() * ran
        p = (features["confidence"][rows].exp() * has_confidence).clamp(0.0, 1.0)
        entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
        agree = features["agree"][rows] * both
        overlap = features["overlap"][rows] * both
        upper = torch.triu_indices(k, k, 1)
        source = features["source"][rows]
        one_hot = torch.zeros(rows.numel(), len(self.sources))
        seen = source >= 0
        one_hot[seen.nonzero().squeeze(1), source[seen]] = 1.0
        shared = torch.cat(
            [
                one_hot,
                ran,
                p,
                entropy,
                has_confidence,
                features["has_answer"][rows].float() * ran,
                features["length"][rows] * ran,
                agree[:, upper[0], upper[1]],
                overlap[:, upper[0], upper[1]],
            ],
            1,
        )
        others = (ran.sum(1, keepdim=True) - 1).clamp(min=1)
        off_diagonal = 1.0 - torch.eye(k)
        own = torch.stack(
            [(agree * off_diagonal).sum(2) / others, (overlap * off_diagonal).sum(2) / others], 2
        )  # zero for a target that has not run: its row of `both` is zero
        return shared, own

    def _quality(
        self, features: Features, rows: torch.Tensor, run: torch.Tensor, regressions: _Regressions | None = None
    ) -> torch.Tensor:
        """(B, k) float64 estimated quality of every model at the states (rows, run)."""
        return (regressions or self.regressions).predict(*self._design(features, rows, run))


class _Regressions:
    """k independent L2-regularized logistic regressions (one per target model) on standardized features."""

    def __init__(self, shared: torch.Tensor, own: torch.Tensor, target: torch.Tensor, C: float) -> None:
        """Fit on raw features shared (N, D) and own (N, k, 2) with soft labels target (N, k).

        Minimizes Σ_j [mean BCE of regression j + ‖w_j‖² / (2·C·N)] (sklearn's objective divided by
        C·N; the k problems are independent) by L-BFGS, from zero weights and prior-log-odds intercepts.
        """
        self.shared_mean, self.shared_std = _moments(shared)
        self.own_mean, self.own_std = _moments(own)
        shared, own = self._standardize(shared, own)
        n, k = target.shape
        self.weight = torch.zeros(k, shared.shape[1], requires_grad=True)
        self.own_weight = torch.zeros(k, own.shape[2], requires_grad=True)
        prior = target.mean(0).clamp(1e-3, 1 - 1e-3)
        self.bias = torch.log(prior / (1 - prior)).requires_grad_(True)
        params = [self.weight, self.own_weight, self.bias]
        optimizer = torch.optim.LBFGS(
            params, lr=1.0, max_iter=500, history_size=20, tolerance_grad=1e-6, tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(self._logits(shared, own), target, reduction="none").mean(0).sum()
            loss = loss + (self.weight.square().sum() + self.own_weight.square().sum()) / (2 * C * n)
            loss.backward()
            return loss

        optimizer.step(closure)
        for param in params:
            param.requires_grad_(False)

    def predict(self, shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """(B, k) float64 probabilities from raw features."""
        return torch.sigmoid(self._logits(*self._standardize(shared, own))).to(torch.float64)

    def _standardize(self, shared: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (shared - self.shared_mean) / self.shared_std, (own - self.own_mean) / self.own_std

    def _logits(self, shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return shared @ self.weight.T + (own * self.own_weight).sum(2) + self.bias


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over states (dim 0), std 1 where a feature is constant (so it standardizes to 0)."""
    mean = x.mean(0)
    std = x.std(0, correction=0)
    return mean, torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))
