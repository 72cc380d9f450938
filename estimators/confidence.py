"""Per-(model, source) calibration of what a run reveals about its own answer, into the log-odds that it is right.

A model's confidence means different things per task (a 1B model's answer log-prob ranks its answers
well on one benchmark and not at all on another), and raw log-probs crowd near 0 where the useful
range is. Each confidence is mapped to `φ = (log(−logprob), logit p)` (both keep the range near 0 apart;
−inf log-probs are floored by the table loader); the completion length, where known, adds
`log(1 + tokens_out)` (a model that rambles is less often right). One logistic regression per model,
with a per-source offset and slope shrunk towards the model's pooled fit, turns φ into a calibrated
logit; a missing signal contributes nothing, so an answer with neither gets its (model, source) base rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_BOUND = 12.0
"""Calibrated logits are kept within ±12 (probabilities within 6e-6 of 0 and 1)."""
_FLOOR = 1e-10
"""−logprob is clipped here so that log(−logprob) stays finite for log-probs of exactly 0."""
N_SIGNALS = 3
"""φ's length: log(−logprob), logit p, log(1 + tokens_out). Calibrators saved with the first two load too."""


def confidence_transform(confidence: torch.Tensor) -> torch.Tensor:
    """φ(confidence) (…, 2): log(−logprob) and logit p of log-probs `confidence` ≤ 0, finite everywhere."""
    x = confidence.double().clamp(max=-_FLOOR)
    log_neg = torch.log(-x)
    logit = x - torch.log(-torch.expm1(x))
    return torch.stack([log_neg, logit.clamp(-50.0, 50.0)], -1).float()


def signals(
    confidence: torch.Tensor,
    has_confidence: torch.Tensor,
    tokens_out: torch.Tensor | None = None,
    has_tokens_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """φ (n, k, 3) and its presence mask (n, k, 3): the confidence's two transforms, then `tokens_out`
    (already log(1 + tokens), see `answer_features`); zero and absent where a signal is missing."""
    if tokens_out is None or has_tokens_out is None:
        tokens_out, has_tokens_out = torch.zeros_like(confidence), torch.zeros_like(has_confidence)
    phi = torch.cat([confidence_transform(confidence), tokens_out.float().unsqueeze(-1)], -1)
    mask = torch.stack([has_confidence, has_confidence, has_tokens_out], -1).float()
    return phi * mask, mask


class ConfidenceCalibrator:
    """`logit P(model i right | its signals φ, source s) = a_i + a_is + (w_i + w_is)·φ`, with the source
    terms L2-shrunk towards 0 (the pooled fit); source index 0 is "unknown" and uses the pooled terms."""

    def __init__(self, shrink: float = 1.0, l2: float = 1e-3) -> None:
        self.shrink, self.l2 = shrink, l2
        self.mean = torch.zeros(N_SIGNALS)
        self.std = torch.ones(N_SIGNALS)
        self.weight = torch.zeros(0, 0, N_SIGNALS)  # (k, S + 1, F): row 0 pooled, rows 1.. per-source deltas
        self.bias = torch.zeros(0, 0)  # (k, S + 1)

    def fit(
        self,
        confidence: torch.Tensor,
        has_confidence: torch.Tensor,
        quality: torch.Tensor,
        source: torch.Tensor,
        n_sources: int,
        tokens_out: torch.Tensor | None = None,
        has_tokens_out: torch.Tensor | None = None,
    ) -> "ConfidenceCalibrator":
        """Fit on training rows: confidence (n, k) log-probs, has_confidence (n, k) bool, quality (n, k) in
        [0, 1], source (n,) long (0 = unknown, 1..n_sources); tokens_out (n, k) log(1 + completion tokens)
        with has_tokens_out, when known."""
        n, k = quality.shape
        phi, mask = signals(confidence, has_confidence, tokens_out, has_tokens_out)
        count = mask.sum((0, 1)).clamp(min=1)
        self.mean = phi.sum((0, 1)) / count
        var = (((phi - self.mean) ** 2) * mask).sum((0, 1)) / count
        self.std = var.sqrt().clamp(min=1e-3)
        phi = (phi - self.mean) / self.std * mask
        one_hot = F.one_hot(source, n_sources + 1).float()  # (n, S + 1)
        target = quality.float()
        weight = torch.zeros(k, n_sources + 1, N_SIGNALS, requires_grad=True)
        prior = target.mean(0).clamp(1e-3, 1 - 1e-3)
        bias = torch.zeros(k, n_sources + 1)
        bias[:, 0] = torch.log(prior / (1 - prior))
        bias.requires_grad_(True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = self._logits(phi, one_hot, weight, bias)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).sum()
            deltas = weight[:, 1:].square().sum() + bias[:, 1:].square().sum()
            loss = loss + (self.shrink * deltas + self.l2 * weight[:, 0].square().sum()) / n
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    @staticmethod
    def _logits(phi, one_hot, weight, bias) -> torch.Tensor:
        """(n, k) logits from standardized φ (n, k, F), zero where absent, and source one-hots (n, S + 1)."""
        pooled = one_hot.clone()
        pooled[:, 0] = 1.0  # the pooled terms apply to every row, the source deltas to their source
        w = torch.einsum("ns,ksf->nkf", pooled, weight)
        b = pooled @ bias.T
        return b + (w * phi).sum(2)

    def transform(
        self,
        confidence: torch.Tensor,
        has_confidence: torch.Tensor,
        source: torch.Tensor,
        tokens_out: torch.Tensor | None = None,
        has_tokens_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n, k) calibrated logits, within ±LOGIT_BOUND; a source index beyond the fitted ones counts as
        unknown (0). A calibrator saved before completion lengths were a signal ignores them."""
        if self.weight.numel() == 0:
            raise RuntimeError("ConfidenceCalibrator: call fit or load_state_dict first")
        n_sources, n_signals = self.weight.shape[1] - 1, self.weight.shape[2]
        source = torch.where((source >= 0) & (source <= n_sources), source, 0)
        phi, mask = signals(confidence, has_confidence, tokens_out, has_tokens_out)
        phi, mask = phi[..., :n_signals], mask[..., :n_signals]
        phi = (phi - self.mean) / self.std * mask
        one_hot = F.one_hot(source, n_sources + 1).float()
        return self._logits(phi, one_hot, self.weight, self.bias).clamp(-LOGIT_BOUND, LOGIT_BOUND)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "ConfidenceCalibrator":
        self.mean, self.std = state["mean"].float(), state["std"].float()
        self.weight, self.bias = state["weight"].float(), state["bias"].float()
        if (self.weight.dim() != 3 or self.bias.shape != self.weight.shape[:2]
                or self.weight.shape[2] not in (2, N_SIGNALS) or self.mean.shape != self.weight.shape[2:]):
            raise ValueError(f"ConfidenceCalibrator: weight {tuple(self.weight.shape)}, bias "
                             f"{tuple(self.bias.shape)} and mean {tuple(self.mean.shape)} do not fit together")
        return self
