"""Uncertainty Σ of quality estimates: how far they move once more models have run.

As in the reference: for the states of a held-back split, the residual is the estimate with full
information (e.g. every model run) minus the estimate with the state's run set; one k×k covariance of
those residuals is kept per run-set size t. A model that has run is not uncertain, so its entries are
left out when estimating and zeroed when predicting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ResidualCovariance:
    """One residual covariance Σ_t per run-set size t, masked to the models not yet run."""

    def __init__(self) -> None:
        self.sigma = torch.empty(0, 0, 0, dtype=torch.float64)

    def fit(
        self,
        predict_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rows: torch.Tensor,
        run: torch.Tensor,
        full_run: torch.Tensor,
    ) -> "ResidualCovariance":
        """Fit Σ_t on the states (rows (N,), run (N, k)); `predict_fn(rows, run)` gives quality (B, k).

        Entry (a, b) of Σ_t is the covariance of the residuals of a and b over the states of size t in
        which neither a nor b has run (pairwise deletion), each residual centred by its own mean over
        the states where its model has not run. Sizes between 0 and the largest seen with no states
        take the nearest smaller fitted size (the nearest larger when there is none).
        """
        if rows.numel() == 0:
            raise ValueError("ResidualCovariance.fit needs at least one state")
        full_run = full_run.expand_as(run)
        residual = (predict_fn(rows, full_run) - predict_fn(rows, run)).to(torch.float64)
        size = run.sum(1)
        k = run.shape[1]
        sigma = torch.zeros(int(size.max()) + 1, k, k, dtype=torch.float64)
        fitted = torch.zeros(sigma.shape[0], dtype=torch.bool)
        for t in size.unique().tolist():
            free = (~run[size == t]).to(torch.float64)  # (m, k): 1 where the model has not run
            r = residual[size == t] * free
            mean = r.sum(0) / free.sum(0).clamp(min=1)
            centred = (r - mean) * free
            pairs = free.T @ free
            sigma[t] = (centred.T @ centred) / pairs.clamp(min=1)
            fitted[t] = True
        seen = fitted.nonzero().squeeze(1)
        for t in (~fitted).nonzero().squeeze(1).tolist():
            below = seen[seen < t]
            sigma[t] = sigma[below[-1] if below.numel() else seen[0]]
        self.sigma = sigma
        return self

    def cov(self, run: torch.Tensor) -> torch.Tensor:
        """(B, k, k) float64: Σ_t for t = |run| (the largest fitted t beyond it), run models' rows and
        columns zero, symmetrized and made PSD by clipping negative eigenvalues to 0."""
        if self.sigma.shape[0] == 0:
            raise ValueError("ResidualCovariance.cov: call fit or load_state_dict first")
        masks, inverse = torch.unique(run, dim=0, return_inverse=True)
        size = masks.sum(1).clamp(max=self.sigma.shape[0] - 1)
        free = (~masks).to(torch.float64)
        sigma = self.sigma[size] * free.unsqueeze(2) * free.unsqueeze(1)
        sigma = (sigma + sigma.transpose(1, 2)) / 2
        values, vectors = torch.linalg.eigh(sigma)
        psd = (vectors * values.clamp(min=0).unsqueeze(1)) @ vectors.transpose(1, 2)
        psd = (psd + psd.transpose(1, 2)) / 2 * free.unsqueeze(2) * free.unsqueeze(1)
        return psd[inverse]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"sigma": (T + 1, k, k)}: Σ_t for t = 0..T."""
        return {"sigma": self.sigma}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "ResidualCovariance":
        """Restore `state_dict`'s tensors; returns self."""
        sigma = state["sigma"]
        if sigma.dim() != 3 or sigma.shape[1] != sigma.shape[2]:
            raise ValueError(f"ResidualCovariance state 'sigma' must be (T + 1, k, k), got {tuple(sigma.shape)}")
        self.sigma = sigma.to(torch.float64)
        return self
