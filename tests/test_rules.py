"""The `rules` baseline on hand-made tables whose best per-source policy is known, and on a random one."""

import numpy as np
import pytest
import torch
from factories import random_table

from router_train.rules import Policy, RulesBaseline, RulesStrategy
from router_train.table import RoutingTable


def make_table(quality, cost, *, sources, answers=None, confidence=None, models=None) -> RoutingTable:
    quality = torch.as_tensor(quality, dtype=torch.float64)
    n, k = quality.shape
    return RoutingTable(
        models=models or [f"m{j}" for j in range(k)],
        query_ids=[f"q{i}" for i in range(n)],
        queries=[f"query {i}" for i in range(n)],
        sources=list(sources),
        is_test=torch.zeros(n, dtype=torch.bool),
        quality=quality,
        cost=torch.as_tensor(cost, dtype=torch.float64).expand(n, k).clone(),
        answers=answers,
        confidence=None if confidence is None else torch.as_tensor(confidence, dtype=torch.float64),
    )


def agreement_table(repeats: int = 10) -> RoutingTable:
    """m0 (cost 1) right on half, m1 (cost 2) on 3/4, m2 (cost 10) always; m0 and m1 agree only when both are
    right, so agree(m0, m1, m2) is always right at mean cost 0.5·3 + 0.5·13 = 8."""
    quality = [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]] * repeats
    answers = [["A", "A", "A"], ["B", "B", "B"], ["X", "C", "C"], ["X", "Y", "D"]] * repeats
    return make_table(quality, [1.0, 2.0, 10.0], sources=["s"] * len(quality), answers=answers)


def chosen(strategy: RulesStrategy, source: str) -> tuple[dict, dict]:
    pair = strategy.to_dict()["sources"][source]
    return pair["cheap"], pair["dear"]


def test_a_cheap_model_that_is_always_right_is_routed_to():
    quality = [[1, 0, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]] * 5
    table = make_table(quality, [1.0, 2.0, 4.0], sources=["easy"] * 20, answers=[["A", "B", "C"]] * 20)
    rules = RulesBaseline().fit(table)
    for strategy in rules.calibrate([1.0, 2.0, 4.0, 7.0]):
        assert chosen(strategy, "easy") == ({"kind": "route", "models": ["m0"]},) * 2
        cost, quality = rules.expected(table, strategy)
        assert np.all(cost == 1.0) and np.all(quality == 1.0)


def test_two_cheap_models_agreeing_beats_routing_at_a_mid_budget():
    table = agreement_table()
    rules = RulesBaseline().fit(table)
    at_8, at_5 = rules.calibrate([8.0, 5.0])
    agree = {"kind": "agree", "models": ["m0", "m1", "m2"]}
    assert chosen(at_8, "s")[0] == agree and at_8.gamma == 0.0
    cost, quality = rules.expected(table, at_8)
    assert cost.mean() == pytest.approx(8.0) and np.all(quality == 1.0)
    # below it: route m1 (cost 2, quality .75) mixed with the agreement cascade so the budget is met exactly
    assert chosen(at_5, "s") == ({"kind": "route", "models": ["m1"]}, agree)
    assert at_5.gamma == pytest.approx(0.5)
    cost, quality = rules.expected(table, at_5)
    assert cost.mean() == pytest.approx(5.0) and at_5.train_cost == pytest.approx(5.0)
    assert quality.mean() == pytest.approx(0.5 * 0.75 + 0.5 * 1.0) == at_5.train_quality


def test_a_confident_cheap_model_is_trusted_above_a_threshold():
    # m0 is right exactly when its confidence is high; m1 is always right
    confident = np.arange(40) % 4 != 0
    quality = np.stack([confident.astype(float), np.ones(40)], 1)
    confidence = np.stack([np.where(confident, -0.1, -3.0), np.full(40, -0.5)], 1)
    confidence[0, 0] = np.nan  # a missing confidence counts as low: m1 runs, and is right
    table = make_table(quality, [1.0, 5.0], sources=["c"] * 40, confidence=confidence)
    rules = RulesBaseline().fit(table)
    (strategy,) = rules.calibrate([2.25])  # 1 + 5/4: run m1 on the quarter with low confidence
    cheap, dear = chosen(strategy, "c")
    assert cheap["kind"] == "confidence" and cheap["models"] == ["m0", "m1"] and -3.0 < cheap["threshold"] <= -0.1
    cost, quality = rules.expected(table, strategy)
    assert cost.mean() == pytest.approx(2.25) and np.all(quality == 1.0)


def test_vote_returns_the_majority_answer_of_the_dearest_agreeing_model():
    answers = [["A", "A", "B"], ["A", "B", "A"], ["B", "A", "A"], ["A", "B", "C"], [None, None, "C"]]
    quality = [[0.2, 0.4, 0.9]] * 5
    table = make_table(quality, [1.0, 2.0, 3.0], sources=[""] * 5, answers=answers)
    rules = RulesBaseline().fit(table)
    vote = Policy("vote", ("m0", "m1", "m2"))
    strategy = RulesStrategy(budget=6.0, lam=0.0, gamma=0.0, sources={}, fallback=(vote, vote),
                             train_cost=0.0, train_quality=0.0)
    cost, quality = rules.expected(table, strategy)
    np.testing.assert_allclose(cost, 6.0)
    np.testing.assert_allclose(quality, [0.4, 0.9, 0.9, 0.9, 0.9])  # a+b agree: b's; c in the majority or none: c's


def test_unseen_sources_and_queries_without_a_source_use_the_pooled_policy():
    # source A: m0 always right; source B: m1 always right; pooled, only m2 (the dearest) is always right
    quality = [[1, 0, 1]] * 4 + [[0, 1, 1]] * 4
    train = make_table(quality, [1.0, 2.0, 4.0], sources=["A"] * 4 + ["B"] * 4)
    rules = RulesBaseline().fit(train)
    (strategy,) = rules.calibrate([1.5])
    assert chosen(strategy, "A")[0]["models"] == ["m0"] and chosen(strategy, "B")[0]["models"] == ["m1"]
    assert strategy.to_dict()["global"]["cheap"] == {"kind": "route", "models": ["m2"]}
    test = make_table([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]], [1.0, 2.0, 4.0], sources=["A", "B", "C", ""])
    cost, quality = rules.expected(test, strategy)
    np.testing.assert_allclose(cost, [1.0, 2.0, 4.0, 4.0])
    np.testing.assert_allclose(quality, 1.0)


def test_tables_without_answers_or_confidences_get_route_policies_only():
    table = random_table(90, 4, seed=2).train()
    table.answers, table.confidence = None, None
    rules = RulesBaseline().fit(table)
    budgets = np.linspace(table.cost.mean(0).min().item(), table.cost.mean(0).max().item(), 6)
    for strategy in rules.calibrate(budgets):
        data = strategy.to_dict()
        pairs = [*data["sources"].values(), data["global"]]
        assert {p[tie]["kind"] for p in pairs for tie in ("cheap", "dear")} == {"route"}


def test_budget_is_met_on_training_queries_and_fits_are_deterministic():
    table = random_table(150, 5, seed=6).train()
    means = table.cost.mean(0)
    budgets = np.linspace(means.min().item(), means.max().item(), 9)
    rules = RulesBaseline().fit(table)
    strategies = rules.calibrate(budgets)
    spent = [rules.expected(table, s)[0].mean() for s in strategies]
    np.testing.assert_allclose(spent, [s.train_cost for s in strategies], rtol=1e-12)
    sweep_cost, _ = rules.expected_sweep(table, strategies)
    np.testing.assert_array_equal(sweep_cost[:, 3], rules.expected(table, strategies[3])[0])
    assert all(c <= b * (1 + 1e-9) for c, b in zip(spent, budgets))
    top = max(s.train_quality for s in strategies)
    for s, b in zip(strategies, budgets):  # the budget is spent exactly unless the best policies cost less
        assert s.train_cost == pytest.approx(b, rel=1e-9) or s.train_quality == pytest.approx(top)
    assert 0 < strategies[2].gamma < 1 or 0 < strategies[3].gamma < 1  # tie-breaks are mixed to meet budgets
    qualities = [s.train_quality for s in strategies]
    assert qualities == sorted(qualities)  # more budget is never worse on the training queries
    again = RulesBaseline().fit(table).calibrate(budgets)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in strategies]


def test_bad_input_is_rejected_with_the_field_named():
    table = agreement_table(2)
    with pytest.raises(ValueError, match="call fit"):
        RulesBaseline().calibrate([1.0])
    rules = RulesBaseline().fit(table)
    with pytest.raises(ValueError, match="budgets"):
        rules.calibrate([-1.0])
    (strategy,) = rules.calibrate([8.0])
    other = make_table(table.quality, [1.0, 2.0, 10.0], sources=table.sources, answers=table.answers,
                       models=["m0", "m1", "m9"])
    with pytest.raises(ValueError, match=r"not in training: \['m9'\]; missing: \['m2'\]"):
        rules.expected(other, strategy)
    no_answers = make_table(table.quality, [1.0, 2.0, 10.0], sources=table.sources)
    with pytest.raises(ValueError, match="table.answers"):
        rules.expected(no_answers, strategy)
    with pytest.raises(ValueError, match="no queries"):
        RulesBaseline().fit(table.subset([]))
