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


def test_completion_length_is_calibrated_per_model_and_source_and_old_calibrators_ignore_it():
    """Without any confidence, a model that answers at length is less often right in source 1 and more often
    in source 2: the calibrated logits follow the length there, and a calibrator saved with the two
    confidence signals only (before lengths were one) still loads and ignores the length."""
    g = torch.Generator().manual_seed(3)
    n = 4000
    source = torch.randint(1, 3, (n,), generator=g)
    tokens = torch.randint(1, 400, (n, 2), generator=g).double()
    answers = answer_features([["A", "B"]] * n, None, n, 2, tokens)
    z = (answers.tokens_out - answers.tokens_out.mean()) / answers.tokens_out.std()
    p = torch.sigmoid(torch.where(source.unsqueeze(1) == 1, -2 * z, 2 * z))
    quality = (torch.rand(n, 2, generator=g) < p).float()
    cal = ConfidenceCalibrator().fit(answers.confidence, answers.has_confidence, quality, source, 2,
                                     answers.tokens_out, answers.has_tokens_out)
    logits = cal.transform(answers.confidence, answers.has_confidence, source, answers.tokens_out,
                           answers.has_tokens_out)
    long, short = z[:, 0] > 1, z[:, 0] < -1
    for s, sign in ((1, -1), (2, 1)):
        mine = source == s
        assert sign * (logits[mine & long, 0].mean() - logits[mine & short, 0].mean()) > 2.0
    blind = cal.transform(answers.confidence, answers.has_confidence, source)  # no lengths given: base rates
    assert torch.allclose(blind[source == 1][0], blind[source == 1][1])
    state = cal.state_dict()
    old = {"mean": state["mean"][:2], "std": state["std"][:2], "weight": state["weight"][..., :2],
           "bias": state["bias"]}
    loaded = ConfidenceCalibrator().load_state_dict(old)
    assert torch.equal(loaded.transform(answers.confidence, answers.has_confidence, source, answers.tokens_out,
                                        answers.has_tokens_out), blind)


def test_a_run_model_without_confidence_starts_from_its_ex_ante_logit():
    """A bare answer (no log-prob) says nothing of its own correctness: with the corrections at zero, the
    run model's logit is its ex-ante one, not its (model, source) base rate; with a confidence it is the
    calibrated one."""
    from estimators.network import NetConfig, QualityNet

    torch.manual_seed(0)
    b, k, d = 6, 3, 8
    net = QualityNet(NetConfig(d, k, hidden=16, layers=0, heads=2, dropout=0.0)).eval()
    torch.nn.init.normal_(net.ante[-1].weight)  # a query-dependent ex-ante part
    embedding, prior = torch.randn(b, d), torch.randn(b, k)
    calibrated = torch.full((b, k), 5.0)
    run = torch.zeros(b, k, dtype=torch.bool)
    run[:, 0] = True
    bare = answer_features([["A", "A", "B"]] * b, None, b, k)
    with torch.no_grad():
        ante, _ = net(embedding, bare, torch.zeros_like(run), prior, calibrated)
        post, _ = net(embedding, bare, run, prior, calibrated)
        sure, _ = net(embedding, answer_features([["A", "A", "B"]] * b, torch.full((b, k), -0.1), b, k), run,
                      prior, calibrated)
    assert torch.allclose(post[:, 0], ante[:, 0]) and ante[:, 0].std() > 0.1
    assert torch.allclose(sure[:, 0], calibrated[:, 0])
