"""The learned estimator's network: an ex-ante MLP plus one transformer over model tokens that corrects
it with whatever the run models answered, for every run set.

`logit_i = prior_i + ante_i(query) + post_i(tokens) + wide_i(answers)` for a model not run, and
`calibrated_i + wide_i(answers)` for one that ran with a confidence (its answer's confidence and length,
calibrated per model and source, corrected by the agreement with the others); a run model whose answer
came without a confidence keeps its ex-ante logit, corrected by the wide part (calibrated length,
agreement). The prior (an input, see
`neighbors.py`) is each model's quality on the most similar training queries; the ex-ante MLP corrects
it from the query embedding (and the source tag when one is known). Each of the k models is a token: a
learned model embedding, the projected query, its ex-ante logit, and what is known about its answer
when it has run (calibrated confidence, length, agreement with the other run models' answers), zeros
otherwise; attention lets a model that has not run read the answers of those that have (`layers: 0`
keeps the tokens without attention). A per-model readout of the token (for models not run) and a
"wide" per-model logistic regression on post-hoc features (every run model's calibrated confidence,
agreement share, their product and the agreement share per source tag; pairwise agreement) give the
correction; a second head (trained after) gives the log variance of how far each estimate moves when
the router runs one more model. After training, `move_gain` scales each post-hoc move (post-hoc logit −
ex-ante logit) by how informative such moves proved on held-back rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .features import AnswerFeatures

N_SCALAR_FEATURES = 9


@dataclass
class NetConfig:
    """Sizes of the network."""

    embed_dim: int
    n_models: int
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    n_sources: int = 0  # source tags seen in training (index 0 = unknown)


def token_features(
    answers: AnswerFeatures, run: torch.Tensor, calibrated: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-model scalar features (B, k, 8) and pairwise agreement rows (B, k, 2k), zero for models not run;
    `calibrated` (B, k) holds each answer's calibrated log-odds of being right (see `confidence.py`)."""
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
            r * (calibrated / 4.0).clamp(-4.0, 4.0),
            r * answers.length / 5.0,
            (agree.sum(2) - r) / others,
            (overlap.sum(2) - r) / others,
            (t / run.shape[1]).expand_as(r),
        ],
        dim=2,
    )
    return scalars, torch.cat([agree, overlap], dim=2)


def wide_size(k: int, n_sources: int) -> int:
    """Length of `wide_features` for k models and n_sources known source tags."""
    return 11 * k + k * (n_sources + 1) + k * (k - 1) // 2


def wide_features(
    answers: AnswerFeatures,
    run: torch.Tensor,
    calibrated: torch.Tensor,
    prior: torch.Tensor,
    source: torch.Tensor,
    n_sources: int,
) -> torch.Tensor:
    """Post-hoc features as one flat vector (B, wide_size): per run model its run flag, calibrated
    confidence logit, agreement share with the other run models, their product, the number agreeing,
    answer presence and length, its prior logit (so that a model's own answer can replace its prior,
    which the logits are offset by), whether it ran alone and its calibrated logit then (with no answer
    to compare with, its confidence is all there is), its mean word overlap with the other run models'
    answers, and the agreement share per source tag (what agreeing means depends on the task: 4 options
    or free text); per pair of run models whether they agree. Zero for models not run."""
    r = run.float()
    k = run.shape[1]
    pair = r.unsqueeze(2) * r.unsqueeze(1)
    agreeing = (answers.agree * pair).sum(2) - r * answers.has_answer  # other run models agreeing
    others = (r.sum(1, keepdim=True) - 1).clamp(min=1)
    share = agreeing / others
    overlap_share = ((answers.overlap * pair).sum(2) - r * answers.has_answer) / others
    cal = r * calibrated
    alone = r * (r.sum(1, keepdim=True) == 1)  # nothing to compare its answer with
    per_model = torch.cat(
        [r, cal, share, share * cal, agreeing / k, r * answers.has_answer, r * answers.length / 5.0, r * prior,
         alone, alone * calibrated, overlap_share],
        dim=1,
    )
    tag = torch.nn.functional.one_hot(source.clamp(0, n_sources), n_sources + 1).to(share.dtype)
    by_source = (share.unsqueeze(2) * tag.unsqueeze(1)).flatten(1)
    upper = torch.triu_indices(k, k, offset=1, device=run.device)
    agree = answers.agree[:, upper[0], upper[1]] * r[:, upper[0]] * r[:, upper[1]]
    return torch.cat([per_model, by_source, agree], dim=1)


def starts_from_answer(answers: AnswerFeatures, run: torch.Tensor) -> torch.Tensor:
    """(B, k) bool: the models whose estimate starts from their answer's calibrated confidence. The others
    start from their ex-ante logit: models not run, and run models whose answer came without a confidence
    (a bare answer says nothing of its own correctness; its calibrated value would be the (model, source)
    base rate, which would throw away what the query says)."""
    return run & answers.has_confidence


def move_gains(gain: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """Per state and model (B, k), the entry of `gain` (2,) for whether the model ran."""
    return gain.to(run.device)[run.long()]


class QualityNet(nn.Module):
    """Query embedding (+ source) + run set + answer features → every model's quality logit (and log variance)."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        h, k, d = config.hidden, config.n_models, config.embed_dim
        source_dim = 16 if config.n_sources else 0
        self.source = nn.Embedding(config.n_sources + 1, source_dim) if config.n_sources else None
        self.ante = nn.Sequential(
            nn.Linear(d + source_dim, 2 * h), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(2 * h, k)
        )
        nn.init.zeros_(self.ante[-1].weight)  # the ex-ante part starts at the prior
        nn.init.zeros_(self.ante[-1].bias)
        self.model_embedding = nn.Parameter(torch.randn(k, h) / h**0.5)
        self.query = nn.Linear(d + source_dim, h)
        self.scalars = nn.Linear(N_SCALAR_FEATURES, h)
        self.pairs = nn.Linear(2 * k, h, bias=False)
        layer = nn.TransformerEncoderLayer(
            h, config.heads, dim_feedforward=2 * h, dropout=config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False) if config.layers else None
        self.norm = nn.LayerNorm(h)
        self.readout = nn.Parameter(torch.zeros(k, h))  # per-model correction weights, start at no correction
        # the "wide" part: a per-model logistic regression on the reference's hand features
        n_wide = wide_size(k, config.n_sources)
        self.wide = nn.Linear(n_wide, 2 * k)  # per model: weights while it has not run, and once it has
        nn.init.zeros_(self.wide.weight)
        nn.init.zeros_(self.wide.bias)
        # standardization of the wide features, set from training data
        self.register_buffer("wide_mean", torch.zeros(n_wide))
        self.register_buffer("wide_scale", torch.ones(n_wide))
        self.variance_head = nn.Sequential(nn.Linear(h + 1, h), nn.GELU(), nn.Linear(h, 1))
        # (2,): multiplier of the post-hoc logit move of a model not run (0) or run (1); fitted on held-back
        # rows after training, None: gain 1
        self.move_gain: torch.Tensor | None = None

    def _query(self, embedding: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if self.source is None:
            return embedding
        return torch.cat([embedding, self.source(source)], 1)

    def forward(
        self,
        embedding: torch.Tensor,
        answers: AnswerFeatures,
        run: torch.Tensor,
        prior: torch.Tensor,
        calibrated: torch.Tensor,
        source: torch.Tensor | None = None,
        ante: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(quality logits (B, k), token states (B, k, hidden)); `prior` (B, k) holds prior logits,
        `calibrated` (B, k) the answers' calibrated confidence logits, `source` (B,) tag indices (0 = unknown).
        With `move_gain` set, each logit is its ex-ante one plus the gain times its post-hoc move; `ante`
        (B, k), the ex-ante logits of these rows when already computed, saves a pass."""
        logits, hidden = self._logits(embedding, answers, run, prior, calibrated, source)
        if self.move_gain is None or not bool(run.any()):
            return logits, hidden
        if ante is None:
            ante, _ = self._logits(embedding, answers, torch.zeros_like(run), prior, calibrated, source)
        return ante + move_gains(self.move_gain, run).to(logits) * (logits - ante), hidden

    def _logits(self, embedding, answers, run, prior, calibrated, source) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's own logits and token states (see `forward`)."""
        if source is None:
            source = torch.zeros(embedding.shape[0], dtype=torch.long, device=embedding.device)
        query = self._query(embedding, source)
        ante = prior + self.ante(query)
        scalars, pairs = token_features(answers, run, calibrated)
        scalars = torch.cat([scalars, torch.tanh(ante.detach() / 4).unsqueeze(2)], 2)
        tokens = self.model_embedding + self.query(query).unsqueeze(1) + self.scalars(scalars) + self.pairs(pairs)
        hidden = self.norm(self.encoder(tokens) if self.encoder is not None else tokens)
        # the tokens inform models not yet run; a run model's answer speaks through the wide part
        wide = wide_features(answers, run, calibrated, prior, source, self.config.n_sources)
        correction = (hidden * self.readout).sum(2) * ~run + self._wide(wide, run)
        return torch.where(starts_from_answer(answers, run), calibrated, ante) + correction, hidden

    def _wide(self, wide: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """The wide regression's logits (B, k): a model's own answer changes which evidence counts, so each
        model has one weight vector while it has not run and another once it has. `wide` may be a sparse CSR
        matrix of the raw features (most are zero: every feature of a model not run); the standardization is
        then folded into the weights and the product skips the zeros (stage 0's L-BFGS with many models)."""
        if wide.is_sparse_csr:
            weight = self.wide.weight / self.wide_scale
            logits = torch.sparse.mm(wide, weight.t()) + (self.wide.bias - weight @ self.wide_mean)
        else:
            logits = self.wide((wide - self.wide_mean) / self.wide_scale)
        free, ran = logits.chunk(2, dim=1)
        return torch.where(run, ran, free)

    def shallow(self, wide: torch.Tensor, base: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """The network's logits while its deep parts are still zero: `base` (the prior, or the calibrated
        confidence for models that ran) plus the wide regression (`wide` dense or sparse CSR, see `_wide`)."""
        return base + self._wide(wide, run)

    def log_variance(self, hidden: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """Log variance (B, k) of the move of each estimate when its model runs next, from detached token states."""
        return self.variance_head(torch.cat([hidden.detach(), run.unsqueeze(2).float()], 2)).squeeze(2)
