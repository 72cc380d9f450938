"""Per-(model, source) confidence calibration and the post-hoc features built on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from estimators.confidence import LOGIT_BOUND, ConfidenceCalibrator, confidence_transform
from estimators.features import answer_features
from estimators.network import wide_features, wide_size


def synthetic(n: int = 4000, seed: int = 0):
    """Two sources; model 0's confidence predicts correctness in source 1 and the opposite in source 2,
    model 1's confidence says nothing (its base rate differs per source)."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(1, 3, (n,), generator=g)
    conf = -torch.rand(n, 2, generator=g) * 3
    p0 = torch.where(source == 1, torch.sigmoid(3 + 2 * conf[:, 0]), torch.sigmoid(-2 - 2 * conf[:, 0]))
    p1 = torch.where(source == 1, torch.full((n,), 0.8), torch.full((n,), 0.3))
    quality = (torch.rand(n, 2, generator=g) < torch.stack([p0, p1], 1)).float()
    return conf, torch.ones(n, 2, dtype=torch.bool), quality, source


def test_calibration_learns_per_source_meaning_of_confidence():
    conf, has, quality, source = synthetic()
    cal = ConfidenceCalibrator().fit(conf, has, quality, source, 2)
    test_conf, test_has, test_quality, test_source = synthetic(seed=1)
    logits = cal.transform(test_conf, test_has, test_source)
    per_source = ConfidenceCalibrator(shrink=1e6).fit(conf, has, quality, source, 2)  # source terms shrunk away
    loss = F.binary_cross_entropy_with_logits(logits, test_quality)
    pooled = F.binary_cross_entropy_with_logits(per_source.transform(test_conf, test_has, test_source), test_quality)
    assert loss < pooled - 0.05
    high = test_conf[:, 0] > -0.5
    low = test_conf[:, 0] < -2.5
    for s, sign in ((1, 1), (2, -1)):
        mine = test_source == s
        assert sign * (logits[mine & high, 0].mean() - logits[mine & low, 0].mean()) > 1.0
    # model 1: its base rate per source
    assert torch.sigmoid(logits[test_source == 1, 1]).mean() > 0.7 > 0.4 > torch.sigmoid(logits[test_source == 2, 1]).mean()


def test_unknown_sources_missing_confidences_and_extremes():
    conf, has, quality, source = synthetic()
    cal = ConfidenceCalibrator().fit(conf, has, quality, source, 2)
    unknown = cal.transform(conf[:5], has[:5], torch.tensor([0, 7, -1, 0, 0]))
    assert torch.isfinite(unknown).all()
    missing = cal.transform(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool), torch.tensor([1, 1, 2]))
    assert torch.allclose(missing[0], missing[1]) and not torch.allclose(missing[0], missing[2])  # per-source base rate
    extreme = cal.transform(torch.tensor([[0.0, -1e-30], [-1e4, -1e4]]), torch.ones(2, 2, dtype=torch.bool),
                            torch.tensor([1, 2]))
    assert torch.isfinite(extreme).all() and extreme.abs().max() <= LOGIT_BOUND
    assert torch.isfinite(confidence_transform(torch.tensor([0.0, -1e-300, -700.0]))).all()
    again = ConfidenceCalibrator().load_state_dict(cal.state_dict())
    assert torch.equal(again.transform(conf, has, source), cal.transform(conf, has, source))


def test_wide_features_are_zero_for_models_not_run_and_see_agreement():
    answers = answer_features([["A", "A", "B"], ["C", "D", "C"]], torch.tensor([[-0.1, -0.2, -3.0]] * 2), 2, 3)
    run = torch.tensor([[True, True, False], [True, False, False]])
    calibrated = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    prior = torch.full((2, 3), 0.5)
    wide = wide_features(answers, run, calibrated, prior, torch.tensor([1, 0]), n_sources=2)
    assert wide.shape == (2, wide_size(3, 2))
    blind = wide_features(answers, torch.zeros_like(run), calibrated, prior, torch.tensor([1, 0]), n_sources=2)
    assert torch.count_nonzero(blind) == 0
    k = 3
    share = wide[:, 2 * k : 3 * k]
    assert share[0].tolist() == [1.0, 1.0, 0.0]  # models 0 and 1 agree; model 2 has not run
    alone = wide[:, 8 * k : 9 * k]
    assert alone.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
