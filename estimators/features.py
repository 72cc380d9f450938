"""Features of the answers models gave: confidence, length and pairwise agreement, as dense tensors.

Shared by every estimator that looks at answers (post-hoc), in simulation (all answers known from
the table) and in serving (answers seen so far). Entries of models that have not answered are zero;
the estimators mask them with the run set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_WORD = re.compile(r"\w+")
SHORT_ANSWER = 40
"""Answers up to this many characters are compared whole; longer ones by their final number or line."""


def answer_key(answer: str | None) -> str | None:
    """A normalized form under which two answers that say the same thing compare equal."""
    if answer is None:
        return None
    text = answer.strip().lower()
    if not text:
        return None
    if len(text) > SHORT_ANSWER:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].replace(",", "").rstrip(".")
        text = text.splitlines()[-1]
    return " ".join(_WORD.findall(text))


def word_set(answer: str | None) -> frozenset[str]:
    return frozenset(_WORD.findall(answer.lower())) if answer else frozenset()


@dataclass
class AnswerFeatures:
    """Per query (n) and model (k): whether an answer exists, its confidence and length, and agreement."""

    has_answer: torch.Tensor  # (n, k) bool
    confidence: torch.Tensor  # (n, k) float32 log-prob, 0 where missing
    has_confidence: torch.Tensor  # (n, k) bool
    length: torch.Tensor  # (n, k) float32 log(1 + characters), 0 where missing
    agree: torch.Tensor  # (n, k, k) float32: 1 where the two answers' keys are equal
    overlap: torch.Tensor  # (n, k, k) float32: Jaccard similarity of the answers' word sets
    tokens_out: torch.Tensor  # (n, k) float32 log(1 + completion tokens), 0 where missing
    has_tokens_out: torch.Tensor  # (n, k) bool

    def rows(self, rows: torch.Tensor) -> "AnswerFeatures":
        return AnswerFeatures(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def answer_features(
    answers: list[list[str | None]] | None,
    confidence: torch.Tensor | None,
    n: int,
    k: int,
    tokens_out: torch.Tensor | None = None,
) -> AnswerFeatures:
    """Features of an n × k grid of answers (None = no answer), log-prob confidences (NaN = none; above
    0 counts as 0) and completion token counts (NaN = none; how long a model took to answer says how sure
    it was: on mmlu_pro's training queries a short completion is a right one more often, within every
    category)."""
    has_answer = torch.zeros(n, k, dtype=torch.bool)
    length = torch.zeros(n, k)
    key_id = torch.full((n, k), -1, dtype=torch.long)
    overlap = torch.zeros(n, k, k)
    if answers is not None:
        vocabulary: dict[str, int] = {}
        for i, row in enumerate(answers):
            keys = [answer_key(a) for a in row]
            for a, key in enumerate(keys):
                if key is not None:
                    key_id[i, a] = vocabulary.setdefault(key, len(vocabulary))
                    length[i, a] = math.log1p(len(row[a]))
            long = [a for a, text in enumerate(row) if keys[a] is not None and len(text) > SHORT_ANSWER]
            if len(long) > 1:  # word overlap says more than the key only for long free-form answers
                words = {a: word_set(row[a]) for a in long}
                for x, a in enumerate(long):
                    for b in long[x + 1 :]:
                        union = len(words[a] | words[b])
                        overlap[i, a, b] = overlap[i, b, a] = len(words[a] & words[b]) / union if union else 1.0
        has_answer = key_id >= 0
    both = has_answer.unsqueeze(2) & has_answer.unsqueeze(1)
    agree = ((key_id.unsqueeze(2) == key_id.unsqueeze(1)) & both).float()
    overlap = torch.where(overlap > 0, overlap, agree)
    if confidence is None:
        conf = torch.zeros(n, k)
        has_conf = torch.zeros(n, k, dtype=torch.bool)
    else:
        has_conf = torch.isfinite(confidence)
        # a log-probability is at most 0: a larger one (rounding, a unit error) counts as 0 instead of
        # overflowing exp(confidence) in the network into NaN estimates
        conf = torch.where(has_conf, confidence.clamp(max=0.0), 0.0).float()
    if tokens_out is None:
        has_tokens = torch.zeros(n, k, dtype=torch.bool)
        tokens = torch.zeros(n, k)
    else:
        has_tokens = torch.isfinite(tokens_out) & (tokens_out >= 0)
        tokens = torch.where(has_tokens, torch.log1p(tokens_out.clamp(min=0).double()), 0.0).float()
    return AnswerFeatures(has_answer, conf, has_conf, length, agree, overlap, tokens, has_tokens)
