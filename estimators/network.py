"""The learned estimator's network: one transformer over model tokens serves every run set.

Each of the k models is a token: a learned model embedding, plus the projected query embedding, plus
what is known about that model's answer when it has run (confidence, length, agreement with the
other run models' answers), zeros otherwise. Attention lets a model that has not run read the answers
of those that have. Outputs per model: the logit of its answer quality, and (second stage) the log
variance of how far that estimate will move once every model has run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .features import AnswerFeatures

N_SCALAR_FEATURES = 8


@dataclass
class NetConfig:
    """Sizes of the network."""

    embed_dim: int
    n_models: int
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1


def token_features(answers: AnswerFeatures, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-model scalar features (B, k, 8) and pairwise agreement rows (B, k, 2k), zero for models not run."""
    r = run.float()
    pair = r.unsqueeze(2) * r.unsqueeze(1)
    t = r.sum(1, keepdim=True)
    others = (t - 1).clamp(min=1)
    agree = answers.agree * pair
    overlap = answers.overlap * pair
    conf = answers.confidence * answers.has_confidence
    scalars = torch.stack(
        [
            r,
            r * answers.has_confidence,
            r * conf.exp() * answers.has_confidence,
            r * (conf / 5.0).clamp(min=-4.0),
            r * answers.length / 5.0,
            (agree.sum(2) - r) / others,
            (overlap.sum(2) - r) / others,
            (t / run.shape[1]).expand_as(r),
        ],
        dim=2,
    )
    return scalars, torch.cat([agree, overlap], dim=2)


class QualityNet(nn.Module):
    """Query embedding + run set + answer features → every model's quality logit (and log variance)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        h, k = config.hidden, config.n_models
        self.model_embedding = nn.Parameter(torch.randn(k, h) * 0.02)
        self.query = nn.Sequential(nn.LayerNorm(config.embed_dim), nn.Linear(config.embed_dim, h))
        self.scalars = nn.Linear(N_SCALAR_FEATURES, h)
        self.pairs = nn.Linear(2 * k, h, bias=False)
        layer = nn.TransformerEncoderLayer(
            h, config.heads, dim_feedforward=2 * h, dropout=config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.quality_head = nn.Linear(h, 1)
        self.variance_head = nn.Sequential(nn.Linear(h + 1, h), nn.GELU(), nn.Linear(h, 1))

    def hidden(self, embedding: torch.Tensor, answers: AnswerFeatures, run: torch.Tensor) -> torch.Tensor:
        """Token states (B, k, hidden)."""
        scalars, pairs = token_features(answers, run)
        tokens = self.model_embedding + self.query(embedding).unsqueeze(1) + self.scalars(scalars) + self.pairs(pairs)
        return self.norm(self.encoder(tokens))

    def forward(self, embedding: torch.Tensor, answers: AnswerFeatures, run: torch.Tensor) -> torch.Tensor:
        """Quality logits (B, k)."""
        return self.quality_head(self.hidden(embedding, answers, run)).squeeze(2)

    def log_variance(self, hidden: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """Log variance (B, k) of the move of each estimate once all models run, from detached token states."""
        return self.variance_head(torch.cat([hidden.detach(), run.unsqueeze(2).float()], 2)).squeeze(2)
