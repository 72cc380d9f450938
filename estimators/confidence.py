"""Per-(model, source) calibration of log-prob confidences into the log-odds that an answer is right.

A model's confidence means different things per task (a 1B model's answer log-prob ranks its answers
well on one benchmark and not at all on another), and raw log-probs crowd near 0 where the useful
range is. Each confidence is mapped to `φ = (log(−logprob), logit p)` (both keep the range near 0 apart;
−inf log-probs are floored by the table loader) and one logistic regression per model, with a
per-source offset and slope shrunk towards the model's pooled fit, turns φ into a calibrated logit.
Answers without a confidence get their (model, source) base rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_BOUND = 12.0
"""Calibrated logits are kept within ±12 (probabilities within 6e-6 of 0 and 1)."""
_FLOOR = 1e-10
"""−logprob is clipped here so that log(−logprob) stays finite for log-probs of exactly 0."""


def confidence_transform(confidence: torch.Tensor) -> torch.Tensor:
    """φ(confidence) (…, 2): log(−logprob) and logit p of log-probs `confidence` ≤ 0, finite everywhere."""
    x = confidence.double().clamp(max=-_FLOOR)
    log_neg = torch.log(-x)
    logit = x - torch.log(-torch.expm1(x))
    return torch.stack([log_neg, logit.clamp(-50.0, 50.0)], -1).float()


class ConfidenceCalibrator:
    """`logit P(model i right | its confidence, source s) = a_i + a_is + (w_i + w_is)·φ`, with the source
    terms L2-shrunk towards 0 (the pooled fit); source index 0 is "unknown" and uses the pooled terms."""

    def __init__(self, shrink: float = 1.0, l2: float = 1e-3) -> None:
        self.shrink, self.l2 = shrink, l2
        self.mean = torch.zeros(2)
        self.std = torch.ones(2)
        self.weight = torch.zeros(0, 0, 2)  # (k, S + 1, 2): row 0 pooled, rows 1.. per-source deltas
        self.bias = torch.zeros(0, 0)  # (k, S + 1)

    def fit(
        self,
        confidence: torch.Tensor,
        has_confidence: torch.Tensor,
        quality: torch.Tensor,
        source: torch.Tensor,
        n_sources: int,
    ) -> "ConfidenceCalibrator":
        """Fit on training rows: confidence (n, k) log-probs, has_confidence (n, k) bool, quality (n, k) in
        [0, 1], source (n,) long (0 = unknown, 1..n_sources)."""
        n, k = quality.shape
        phi = confidence_transform(confidence)
        mask = has_confidence.float()
        count = mask.sum().clamp(min=1)
        self.mean = (phi * mask.unsqueeze(2)).sum((0, 1)) / count
        var = (((phi - self.mean) ** 2) * mask.unsqueeze(2)).sum((0, 1)) / count
        self.std = var.sqrt().clamp(min=1e-3)
        phi = (phi - self.mean) / self.std * mask.unsqueeze(2)
        one_hot = F.one_hot(source, n_sources + 1).float()  # (n, S + 1)
        target = quality.float()
        weight = torch.zeros(k, n_sources + 1, 2, requires_grad=True)
        prior = target.mean(0).clamp(1e-3, 1 - 1e-3)
        bias = torch.zeros(k, n_sources + 1)
        bias[:, 0] = torch.log(prior / (1 - prior))
        bias.requires_grad_(True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = self._logits(phi, mask, one_hot, weight, bias)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).sum()
            deltas = weight[:, 1:].square().sum() + bias[:, 1:].square().sum()
            loss = loss + (self.shrink * deltas + self.l2 * weight[:, 0].square().sum()) / n
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    @staticmethod
    def _logits(phi, mask, one_hot, weight, bias) -> torch.Tensor:
        """(n, k) logits from standardized, masked φ (n, k, 2) and source one-hots (n, S + 1)."""
        pooled = one_hot.clone()
        pooled[:, 0] = 1.0  # the pooled terms apply to every row, the source deltas to their source
        w = torch.einsum("ns,ksf->nkf", pooled, weight)
        b = pooled @ bias.T
        return b + (w * phi).sum(2) * (mask > 0)

    def transform(self, confidence: torch.Tensor, has_confidence: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """(n, k) calibrated logits, within ±LOGIT_BOUND; a source index beyond the fitted ones counts as unknown (0)."""
        if self.weight.numel() == 0:
            raise RuntimeError("ConfidenceCalibrator: call fit or load_state_dict first")
        n_sources = self.weight.shape[1] - 1
        source = torch.where((source >= 0) & (source <= n_sources), source, 0)
        mask = has_confidence.float()
        phi = (confidence_transform(confidence) - self.mean) / self.std * mask.unsqueeze(2)
        one_hot = F.one_hot(source, n_sources + 1).float()
        return self._logits(phi, mask, one_hot, self.weight, self.bias).clamp(-LOGIT_BOUND, LOGIT_BOUND)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "ConfidenceCalibrator":
        self.mean, self.std = state["mean"].float(), state["std"].float()
        self.weight, self.bias = state["weight"].float(), state["bias"].float()
        if self.weight.dim() != 3 or self.bias.shape != self.weight.shape[:2]:
            raise ValueError(f"ConfidenceCalibrator: weight {tuple(self.weight.shape)} and bias "
                             f"{tuple(self.bias.shape)} do not fit together")
        return self
