"""Cost estimates of every model for a query: before it runs (ex-ante) and after (post-hoc).

Ex-ante rule, per model j, fitted on the training rows:

    ĉ_j = α_{j,s} + β_j · x_j,   clipped at 0,

with `s` the query's source and `x_j` its input size as a serving process knows it before calling
anything: `r_j · characters` of the query, with `r_j = Σ tokens_in / Σ characters` on train when the
model had tokens_in on at least half its training rows, else the number of characters. (Recorded
tokens_in are not used as inputs: serving does not have them, and the evaluation must decide on the
same information as serving.) β_j ≥ 0 is the
within-source least-squares slope of cost on x_j and α_{j,s} the source's intercept, shrunk towards
the model's pooled intercept with the weight of `prior_rows` rows (unseen sources get the pooled one).
Output tokens are unknown before a model runs; their expected cost, per-call overheads (a self-check
call, a fixed output allowance) and per-source prompt formats are absorbed by α_{j,s}. So:
- a table with cost = price × (tokens_in + constant) and tokens_in proportional to the query length
  is recovered exactly (β = price / r);
- without tokens, or with constant query lengths, the rule is the per-(model, source) mean cost
  (shrunk towards the model's mean).
On the real `rlc_train` table this is 5-6× more accurate than price × (tokens_in + mean tokens_out),
which is worse than the plain mean cost there, because output lengths and prompt overheads differ by
source far more than they vary with the input length.

Post-hoc, for a model that ran: its observed cost when known; else, when its output tokens are known
and the model has a price model, `p_in · x_j + p_out · tokens_out + p_0` with prices fitted by
non-negative least squares on the training rows (the model needs tokens_out on at least half of
them); else the ex-ante rule with what is known of the query.
"""

from __future__ import annotations

import itertools

import torch

from router_train.table import RoutingTable

from .base import Features

_MIN_FRACTION = 0.5
"""A model uses a token column when at least this fraction of its training rows have it."""
_MIN_PRICE_ROWS = 3
"""Fewest training rows with tokens_out and cost to fit a price model on."""


class CostModel:
    """Per-model cost estimates from the source, input size and, once a model ran, its observed usage."""

    def __init__(self, prior_rows: float = 5.0) -> None:
        if prior_rows < 0:
            raise ValueError(f"prior_rows must be >= 0, got {prior_rows}")
        self.prior_rows = float(prior_rows)
        self.models: list[str] = []
        self.sources: list[str] = []

    def fit(self, table: RoutingTable) -> "CostModel":
        """Fit the ex-ante rule and the price models on a table of training rows; returns self."""
        if table.n == 0:
            raise ValueError("CostModel.fit: the table has no rows")
        n, k = table.n, table.k
        self.models = list(table.models)
        self.sources = sorted(set(table.sources))
        chars = _chars(table)
        tokens_in = _column(table.tokens_in, n, k)
        tokens_out = _column(table.tokens_out, n, k)
        has_in = torch.isfinite(tokens_in)
        self.uses_tokens = has_in.double().mean(0) >= _MIN_FRACTION
        in_sum = torch.where(has_in, tokens_in, 0.0).sum(0)
        char_sum = (chars.unsqueeze(1) * has_in).sum(0)
        self.ratio = torch.where(self.uses_tokens & (char_sum > 0), in_sum / char_sum.clamp(min=1e-300), 1.0)
        x = self._input_size(chars)

        index = {s: i for i, s in enumerate(self.sources)}
        group = torch.tensor([index[s] for s in table.sources])
        one_hot = torch.nn.functional.one_hot(group, len(self.sources)).double()  # (n, S)
        count = one_hot.sum(0).unsqueeze(1)  # (S, 1)
        x_mean = one_hot.T @ x / count  # (S, k)
        c_mean = one_hot.T @ table.cost / count
        dx, dc = x - x_mean[group], table.cost - c_mean[group]
        den = (dx * dx).sum(0)
        self.slope = torch.where(den > 0, (dx * dc).sum(0) / den.clamp(min=1e-300), 0.0).clamp(min=0.0)
        self.intercept = table.cost.mean(0) - self.slope * x.mean(0)
        own = c_mean - self.slope * x_mean
        self.source_intercept = (count * own + self.prior_rows * self.intercept) / (count + self.prior_rows)

        self.price = torch.zeros(k, 3, dtype=torch.float64)
        has_out = torch.isfinite(tokens_out)
        self.has_price = (has_out.double().mean(0) >= _MIN_FRACTION) & (has_out.sum(0) >= _MIN_PRICE_ROWS)
        for j in self.has_price.nonzero().squeeze(1).tolist():
            rows = has_out[:, j]
            design = torch.stack([x[rows, j], tokens_out[rows, j], torch.ones(int(rows.sum()), dtype=torch.float64)], 1)
            self.price[j] = _nonnegative_lstsq(design, table.cost[rows, j])
        return self

    def featurize(self, table: RoutingTable) -> Features:
        """Ex-ante and post-hoc cost of every cell, (n, k) float64 each; never reads `table.quality`.

        Only cells of models that ran may carry cost / tokens_out (NaN elsewhere); `predict` uses the
        post-hoc value only for run models.
        """
        if list(table.models) != self.models:
            raise ValueError(f"the table's models {table.models} differ from the cost model's {self.models}")
        n, k = table.n, table.k
        x = self._input_size(_chars(table)).expand(n, k)
        index = {s: i for i, s in enumerate(self.sources)}
        group = torch.tensor([index.get(s, -1) for s in table.sources], dtype=torch.long)
        alpha = torch.where(
            (group >= 0).unsqueeze(1), self.source_intercept[group.clamp(min=0)], self.intercept.unsqueeze(0)
        )
        ante = (alpha + self.slope * x).clamp(min=0.0)
        tokens_out = _column(table.tokens_out, n, k)
        priced = self.price[:, 0] * x + self.price[:, 1] * tokens_out + self.price[:, 2]
        post = torch.where(self.has_price & torch.isfinite(tokens_out), priced.clamp(min=0.0), ante)
        observed = table.cost.to(torch.float64)
        post = torch.where(torch.isfinite(observed), observed.clamp(min=0.0), post)
        return {"cost_ante": ante, "cost_post": post}

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """(B, k) float64 cost estimates: post-hoc for run models, ex-ante for the others."""
        return torch.where(run, features["cost_post"][rows], features["cost_ante"][rows])

    def _input_size(self, chars: torch.Tensor) -> torch.Tensor:
        """(n, k) input size per cell: r·characters for models with token counts, else characters."""
        return chars.unsqueeze(1) * torch.where(self.uses_tokens, self.ratio, 1.0)

    def config(self) -> dict:
        """JSON-serializable settings: models, the sources seen in training (the rows of `source_intercept`)."""
        return {"models": list(self.models), "sources": list(self.sources), "prior_rows": self.prior_rows}

    @classmethod
    def from_config(cls, config: dict) -> "CostModel":
        """An unfitted model with `config`'s settings; `load_state_dict` then restores the fitted tensors."""
        model = cls(prior_rows=config["prior_rows"])
        model.models = list(config["models"])
        model.sources = list(config["sources"])
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted parameters as plain tensors (safetensors-compatible)."""
        return {
            "uses_tokens": self.uses_tokens,
            "ratio": self.ratio,
            "slope": self.slope,
            "intercept": self.intercept,
            "source_intercept": self.source_intercept,
            "price": self.price,
            "has_price": self.has_price,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "CostModel":
        """Restore the tensors of `state_dict`; returns self."""
        k, n_sources = len(self.models), len(self.sources)
        expected = {"source_intercept": (n_sources, k), "price": (k, 3)}
        for name in ("uses_tokens", "ratio", "slope", "intercept", "source_intercept", "price", "has_price"):
            shape = tuple(state[name].shape)
            if shape != expected.get(name, (k,)):
                raise ValueError(f"CostModel state {name!r} has shape {shape}, expected {expected.get(name, (k,))}")
        self.uses_tokens = state["uses_tokens"].bool()
        self.has_price = state["has_price"].bool()
        for name in ("ratio", "slope", "intercept", "source_intercept", "price"):
            setattr(self, name, state[name].to(torch.float64))
        return self


def _chars(table: RoutingTable) -> torch.Tensor:
    return torch.tensor([len(q) for q in table.queries], dtype=torch.float64)


def _column(values: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """An optional (n, k) table column as float64, all NaN when absent."""
    return torch.full((n, k), float("nan"), dtype=torch.float64) if values is None else values.to(torch.float64)


def _nonnegative_lstsq(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least squares with non-negative coefficients, exactly, for a few columns.

    The optimum is the unconstrained solution on its own support, so the best feasible solution over
    all column subsets is it; coefficients negative only by rounding (a negligible share of the
    target) count as zero.
    """
    m = design.shape[1]
    scale = design.abs().mean(0).clamp(min=1e-300)
    tolerance = 1e-9 * float(target.abs().mean())
    best, best_error = torch.zeros(m, dtype=torch.float64), float((target**2).sum())
    for size in range(1, m + 1):
        for cols in itertools.combinations(range(m), size):
            sub = design[:, list(cols)]
            coef = torch.linalg.lstsq(sub, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            if bool(((coef < 0) & (-coef * scale[list(cols)] > tolerance)).any()):
                continue
            coef = coef.clamp(min=0.0)
            error = float(((sub @ coef - target) ** 2).sum())
            if error < best_error:
                best = torch.zeros(m, dtype=torch.float64)
                best[list(cols)] = coef
                best_error = error
    return best
