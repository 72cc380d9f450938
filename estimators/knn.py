"""k-nearest-neighbour quality estimates from query embeddings: an ex-ante-only baseline.

A query's quality for each model is the mean quality of that model on its `n_neighbors` most similar
training queries (cosine similarity of the embedder's vectors). It ignores the models' answers, so
the estimate of a model is the same before and after it runs; only Σ changes (zero once it ran).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from router_train.table import RoutingTable

from .base import Embedder, Estimate, Features, QualityEstimator
from .cost import CostModel

_CHUNK = 1024
"""Queries compared with the training set at a time (bounds the similarity matrix's memory)."""


class KNNEstimator(QualityEstimator):
    """Mean quality of the nearest training queries; Σ diagonal from leave-one-out training errors.

    A query whose `query_id` equals a training query's id is taken to be that query and is not its
    own neighbour (so featurizing the training table gives leave-one-out estimates). Σ: for a model not
    run, the training variance of (true quality − leave-one-out estimate); zero for run models.
    Costs come from a `CostModel` fitted on the training rows. `seed` is accepted so that every
    estimator has one, but nothing here is random.
    """

    def __init__(self, embedder: Embedder, n_neighbors: int = 20, seed: int = 0) -> None:
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
        self.embedder, self.n_neighbors, self.seed = embedder, n_neighbors, seed
        self.models: list[str] = []

    def fit(self, table: RoutingTable) -> "KNNEstimator":
        """Embed and store the training queries and qualities; fit Σ and the cost model; returns self."""
        if table.n < 2:
            raise ValueError(f"KNNEstimator.fit needs at least 2 training rows, got {table.n}")
        self.models = list(table.models)
        self.train_ids = list(table.query_ids)
        self.train_quality = table.quality.to(torch.float64)
        self.train_embedding = self._embed(table.queries)
        self.cost_model = CostModel().fit(table)
        residual = self.train_quality - self._neighbour_mean(self.train_embedding, self.train_ids)
        self.variance = residual.var(0, correction=0)
        return self

    def featurize(self, table: RoutingTable) -> Features:
        """The kNN quality estimate of every cell (n, k) float64, and cost features."""
        self.check_models(table)
        features = {"knn_quality": self._neighbour_mean(self._embed(table.queries), table.query_ids)}
        features.update(self.cost_model.featurize(table))
        return features

    def predict(self, features: Features, rows: torch.Tensor, run: torch.Tensor) -> Estimate:
        """kNN quality (the same whether a model ran or not), diagonal Σ zero for run models, cost (float64)."""
        quality = features["knn_quality"][rows]
        cov = torch.diag_embed(torch.where(run, 0.0, self.variance))
        return Estimate(quality=quality, cost=self.cost_model.predict(features, rows, run), cov=cov)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.embedder.encode(texts).float(), dim=1)

    def _neighbour_mean(self, embedding: torch.Tensor, query_ids: list[str]) -> torch.Tensor:
        """(n, k) mean training quality over each query's nearest training queries, itself excluded."""
        position = {query_id: i for i, query_id in enumerate(self.train_ids)}
        own = torch.tensor([position.get(query_id, -1) for query_id in query_ids], dtype=torch.long)
        count = min(self.n_neighbors, len(self.train_ids))
        out = torch.empty(len(query_ids), len(self.models), dtype=torch.float64)
        for start in range(0, len(query_ids), _CHUNK):
            similarity = embedding[start : start + _CHUNK] @ self.train_embedding.T
            mine = own[start : start + _CHUNK]
            has_own = (mine >= 0).nonzero().squeeze(1)
            similarity[has_own, mine[has_own]] = -float("inf")
            values, index = similarity.topk(count, dim=1)
            weight = torch.isfinite(values).to(torch.float64)  # drops the excluded self when it is picked
            out[start : start + _CHUNK] = (
                (weight.unsqueeze(2) * self.train_quality[index]).sum(1) / weight.sum(1, keepdim=True)
            )
        return out
