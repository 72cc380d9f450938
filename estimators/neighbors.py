"""The learned estimator's prior: each model's expected quality for a query, read off the training
queries most like it.

For a query with source tag s (when known), the prior is the mean quality of each model over its
`n_neighbors` most similar training queries of the same tag (cosine of embeddings; any tag when s is
unknown), shrunk towards the tag's mean with the weight of `shrink` queries. With `n_neighbors = 0`
it is the (shrunk) per-tag mean. The network learns corrections on top of it.
"""

from __future__ import annotations

import torch

_CHUNK = 1024


class NeighborPrior:
    """Prior logits (B, k) from a bank of training embeddings, their qualities and source tags."""

    def __init__(self, n_neighbors: int = 30, shrink: float = 20.0) -> None:
        if n_neighbors < 0 or shrink < 0:
            raise ValueError(f"n_neighbors and shrink must be >= 0, got {n_neighbors} and {shrink}")
        self.n_neighbors, self.shrink = n_neighbors, shrink

    def fit(self, embedding: torch.Tensor, quality: torch.Tensor, source: torch.Tensor, n_sources: int) -> "NeighborPrior":
        """Remember the training queries (none when the prior is the per-tag mean); `source` holds tag
        indices (0 = unknown, 1..n_sources)."""
        keep = slice(None) if self.n_neighbors else slice(0)
        self.bank = torch.nn.functional.normalize(embedding.float(), dim=1)[keep]
        self.quality = quality.float()[keep]
        self.source = source.long()[keep]
        quality = quality.float()
        overall = quality.mean(0)
        one_hot = torch.nn.functional.one_hot(source.long(), n_sources + 1).float()
        count = one_hot.sum(0).unsqueeze(1)
        self.source_mean = (one_hot.t() @ quality + 10.0 * overall) / (count + 10.0)
        self.source_mean[0] = overall
        return self

    def probabilities(
        self, embedding: torch.Tensor, source: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, k) prior qualities; `exclude` (B,) the bank row of each query itself (-1: none), left out."""
        base = self.source_mean[source]
        if self.n_neighbors == 0 or self.bank.shape[0] == 0:
            return base
        out = []
        query = torch.nn.functional.normalize(embedding.float(), dim=1)
        for start in range(0, query.shape[0], _CHUNK):
            sl = slice(start, start + _CHUNK)
            # float64 and rounded, so that the neighbours do not depend on the batch a query comes in
            # (BLAS sums in a batch-size dependent order; near-ties would otherwise flip)
            sim = torch.round(query[sl].double() @ self.bank.double().t(), decimals=9)
            src = source[sl].unsqueeze(1)
            allowed = (src == 0) | (self.source.unsqueeze(0) == src)
            if exclude is not None:
                allowed &= torch.arange(self.bank.shape[0]).unsqueeze(0) != exclude[sl].unsqueeze(1)
            sim = sim.masked_fill(~allowed, float("-inf"))
            k = min(self.n_neighbors, self.bank.shape[0])
            top, index = sim.topk(k, dim=1)
            found = torch.isfinite(top).float()  # fewer same-tag neighbours than k: use those there are
            count = found.sum(1, keepdim=True)
            mean = (self.quality[index] * found.unsqueeze(2)).sum(1)
            out.append((mean + self.shrink * base[sl]) / (count + self.shrink))
        return torch.cat(out)

    def logits(self, embedding: torch.Tensor, source: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        p = self.probabilities(embedding, source, exclude).clamp(0.01, 0.99)
        return torch.log(p / (1 - p))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank, "quality": self.quality, "source": self.source, "source_mean": self.source_mean}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "NeighborPrior":
        self.bank, self.quality = state["bank"].float(), state["quality"].float()
        self.source, self.source_mean = state["source"].long(), state["source_mean"].float()
        return self
