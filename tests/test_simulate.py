"""The cached lock-step simulator decides exactly as the kernel called step by step, and calibration meets budgets."""

import contextlib

import numpy as np
import pytest
import torch
from factories import random_table
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators import NoisyEstimator
from estimators.truth import TruthEstimator
from router_train.calibrate import CalibrationConfig, RowOutcomes, SweepMemo, calibrate, calibrate_sweep
from router_train.kernel import KernelConfig, decide
from router_train.kernel.candidates import Candidates, choose
from router_train.kernel.prune import prune
from router_train.kernel.subsets import subset_table
from router_train import simulate
from router_train.simulate import Simulator
from router_train.strategy import Strategy

KERNEL = KernelConfig(n_samples=32)


@pytest.fixture(scope="module")
def setup():
    table = random_table(90, 5, seed=3)
    estimator = NoisyEstimator("medium", seed=1).fit(table.train())
    return table, estimator, Simulator(table, estimator, kernel=KERNEL)


def step_by_step(table, estimator, strategy, expensive):
    """Reference: call the kernel on every active query at every step, no caching or pruning."""
    features = estimator.featurize(table)
    run = torch.zeros(table.n, table.k, dtype=torch.bool)
    answer = torch.full((table.n,), -1, dtype=torch.long)
    active = torch.ones(table.n, dtype=torch.bool)
    for _ in range(table.k + 1):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        est = estimator.predict(features, rows, run[rows])
        out = decide(
            est.quality, est.cost, run[rows], strategy, cov=est.cov, expensive=torch.full((rows.numel(),), expensive),
            config=KERNEL,
        )
        stop = out.next_model < 0
        answer[rows[stop]] = out.answer_model[stop]
        run[rows[~stop], out.next_model[~stop]] = True
        active[rows[stop]] = False
    return run, answer


STRATEGIES = [
    Strategy("routing", 1, lambdas=[2000.0]),
    Strategy("cascade_routing", 3, lambdas=[0.0, 0.0, 0.0]),
    Strategy("cascade_routing", 3, lambdas=[1500.0, 500.0, 4000.0]),
    Strategy("cascade_routing", 4, lambdas=[800.0] * 4, force_order=True),
    Strategy("cascade", 4, lambdas=[1000.0, 2000.0, 100.0, 5000.0]),
    Strategy("cascade", 5, lambdas=[300.0, 0.0, 100.0, 50.0, 10.0]),  # uncapped: all k = 5 models
    Strategy("threshold_cascade", 4, thresholds=[0.4, 0.3, 0.1]),
    Strategy("threshold_cascade", 5, thresholds=[0.4, 0.5, 0.3, 0.6]),
    Strategy("cascade_routing", 5, lambdas=[1e7] * 5),
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.mode)
@pytest.mark.parametrize("expensive", [False, True])
def test_simulator_matches_the_kernel_step_by_step(setup, strategy, expensive):
    table, estimator, sim = setup
    outcome = sim.run(strategy, expensive)
    run, answer = step_by_step(table, estimator, strategy, expensive)
    assert torch.equal(outcome.run, run)
    assert torch.equal(outcome.answer, answer)
    assert torch.allclose(outcome.cost, (table.cost * run).sum(1))
    assert torch.equal(outcome.quality, table.quality.gather(1, answer.unsqueeze(1)).squeeze(1))


@pytest.mark.parametrize("strategy", STRATEGIES[1:6], ids=lambda s: s.mode)
def test_lambda_tables_built_in_small_groups_of_states_decide_the_same(setup, strategy, monkeypatch):
    """The simulator builds its λ tables `TABLE_STATES` states at a time (bounded memory): 7 at a time, the
    outcomes are those of the kernel step by step, as with one group."""
    table, estimator, _ = setup
    monkeypatch.setattr(simulate, "TABLE_STATES", 7)
    sim = Simulator(table, estimator, kernel=KERNEL)
    for expensive in (False, True):
        outcome = sim.run(strategy, expensive)
        run, answer = step_by_step(table, estimator, strategy, expensive)
        assert torch.equal(outcome.run, run) and torch.equal(outcome.answer, answer)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(0, 2**16), st.lists(st.sampled_from([0.0, 1.0, 10.0, 55.5, 300.0, 1e4, 1e7]), min_size=1, max_size=6))
def test_pruning_never_changes_a_choice(seed, lambdas):
    """Grid values and costs make exact and near ties (within the tolerance) at λ = 0, at breakpoints and as λ → ∞."""
    rng = np.random.default_rng(seed)
    b, m = 6, 40
    value = rng.choice([0.2, 0.5, 0.7, 0.7 + 5e-7, 0.9, 0.9 - 5e-7], size=(b, m))
    cost = rng.choice([0.0, 0.001, 0.002, 0.004, 0.01], size=(b, m))
    jitter = rng.random((b, 1)) < 0.3  # some rows continuous, no ties
    value = torch.tensor(np.where(jitter, value + rng.random((b, m)), value))
    cost = torch.tensor(np.where(jitter, cost + rng.random((b, m)) * 0.01, cost))
    valid = torch.tensor(rng.random((b, m)) < 0.8)
    valid[:, 1] = True
    full = Candidates(0, subset_table(6, 6), torch.arange(6).expand(b, -1), torch.zeros(b, dtype=torch.long),
                      value, cost, valid, torch.arange(m).expand(b, -1))
    pruned = prune(full)
    assert pruned.value.shape[1] <= m
    for lam in lambdas:
        for expensive in (False, True):
            a = full.subsets(choose(full, lam, expensive))
            p = pruned.subsets(choose(pruned, lam, expensive))
            assert torch.equal(a, p)


@pytest.mark.parametrize("mode", ["routing", "threshold_cascade", "cascade", "cascade_routing"])
def test_calibration_meets_the_budget(setup, mode):
    table, estimator, _ = setup
    sim = Simulator(table.train(), estimator, kernel=KERNEL)
    costs = table.train().cost.mean(0)
    budget = float(costs[1] + 0.3 * (costs[3] - costs[1]))
    fit = calibrate(sim, mode, budget, max_depth=3, config=CalibrationConfig(n_trials=8, seed=0))
    if mode == "threshold_cascade":  # may stop short of the budget where later models answer worse
        assert fit.cost <= budget * (1 + 1e-9)
    else:
        assert fit.cost == pytest.approx(budget, rel=1e-6)
    cost, quality = sim.expected(fit.strategy)
    assert float(cost.mean()) == pytest.approx(fit.cost, rel=1e-9)
    assert float(quality.mean()) == pytest.approx(fit.quality, rel=1e-9)
    again = calibrate(sim, mode, budget, max_depth=3, config=CalibrationConfig(n_trials=8, seed=0))
    assert again.strategy == fit.strategy


def test_calibration_with_a_budget_above_every_strategy_spends_less(setup):
    table, estimator, _ = setup
    sim = Simulator(table.train(), estimator, kernel=KERNEL)
    fit = calibrate(sim, "cascade_routing", 1.0, max_depth=2, config=CalibrationConfig(n_trials=0))
    assert fit.strategy.lambdas == (0.0, 0.0)
    assert fit.cost < 1.0


def test_ties_that_change_no_answer_are_not_paid_for(setup):
    """With estimates no answer moves, every superset of the best model ties at λ = 0: the expensive
    tie-break runs more models for the same answers, so γ stays 0 unless `min_spend` asks for the spending."""
    table, _, _ = setup
    train = table.train()
    sim = Simulator(train, TruthEstimator().fit(train), kernel=KERNEL)
    zero = Strategy("cascade_routing", 3, lambdas=[0.0, 0.0, 0.0])
    cheap, dear = sim.run(zero, False), sim.run(zero, True)
    assert dear.mean_cost > cheap.mean_cost and dear.mean_quality == cheap.mean_quality
    budget = (cheap.mean_cost + dear.mean_cost) / 2
    fit = calibrate(sim, "cascade_routing", budget, max_depth=3, config=CalibrationConfig(n_trials=0))
    assert fit.strategy.lambdas == (0.0, 0.0, 0.0) and fit.strategy.gamma == 0.0
    assert fit.cost == pytest.approx(cheap.mean_cost) and fit.quality == pytest.approx(cheap.mean_quality)
    spending = calibrate(sim, "cascade_routing", budget, max_depth=3,
                         config=CalibrationConfig(n_trials=0, min_spend=1.0))
    assert spending.cost == pytest.approx(budget) and spending.quality == pytest.approx(cheap.mean_quality)


class _SwappedCosts(TruthEstimator):
    """True qualities; the cost estimates of model 1 swapped between its cheap and its dear queries."""

    def featurize(self, table):
        features = super().featurize(table)
        cost = features["cost"]
        cost[:, 1] = cost[:, 1].max() + cost[:, 1].min() - cost[:, 1]
        return features


def test_a_budget_no_multiplier_meets_gets_the_cheapest_strategy_seen(setup):
    """Two models of equal mean cost: spending by ĉ alone (λ → ∞) picks the worse one where its cost is
    misestimated, costing more for worse answers; a budget below every strategy's cost gets the cheapest."""
    table, _, _ = setup
    train = table.train()
    n = train.n
    train.quality = torch.stack([torch.ones(n), torch.zeros(n)], 1).to(train.quality.dtype)
    dear = torch.arange(n) % 2 == 0
    train.cost = torch.stack([torch.full((n,), 1.0), torch.where(dear, 1.1, 0.9)], 1).to(train.cost.dtype)
    train.models, train.answers, train.confidence = train.models[:2], None, None
    train.tokens_in = train.tokens_out = None
    sim = Simulator(train, _SwappedCosts().fit(train), kernel=KERNEL)
    by_cost = sim.run(Strategy("routing", 1, lambdas=[1e30]))
    assert by_cost.mean_cost > 1.0 and by_cost.mean_quality < 1.0  # what λ → ∞ alone would return
    for mode in ("routing", "cascade_routing"):
        fit = calibrate(sim, mode, 0.99, max_depth=2, config=CalibrationConfig(n_trials=0))
        assert fit.cost == pytest.approx(1.0) and fit.quality == pytest.approx(1.0), mode
        assert sim.run(fit.strategy).mean_quality == pytest.approx(1.0)


class _Flattering(TruthEstimator):
    """The true costs; every query's quality estimated at 0.6 for model 0 and 0.9 for model 1."""

    def featurize(self, table):
        features = super().featurize(table)
        features["quality"] = torch.tensor([0.6, 0.9], dtype=features["quality"].dtype).expand(table.n, 2).clone()
        return features


def test_a_generous_budget_keeps_a_cheaper_strategy_of_the_sweep_that_answers_better(setup):
    """λ = 0 meets a generous budget at once; when a strategy the sweep fitted for a smaller budget answers
    better on the training queries (here the estimates rank the models wrongly), the larger budget gets it."""
    table, _, _ = setup
    train = table.train()
    n = train.n
    train.quality = torch.stack([torch.ones(n), torch.zeros(n)], 1).to(train.quality.dtype)
    train.cost = torch.stack([torch.full((n,), 1.0), torch.full((n,), 2.0)], 1).to(train.cost.dtype)
    train.models, train.answers, train.confidence = train.models[:2], None, None
    train.tokens_in = train.tokens_out = None
    sim = Simulator(train, _Flattering().fit(train), kernel=KERNEL)
    greedy = sim.run(Strategy("routing", 1, lambdas=[0.0]))
    assert greedy.mean_cost == pytest.approx(2.0) and greedy.mean_quality == 0.0
    alone = calibrate(sim, "routing", 2.5, max_depth=1, config=CalibrationConfig(n_trials=0))
    assert alone.strategy.lambdas == (0.0,) and alone.quality == 0.0  # nothing cheaper was simulated
    for mode in ("routing", "cascade_routing"):
        low, high = calibrate_sweep(sim, mode, [1.0, 2.5], max_depth=2, config=CalibrationConfig(n_trials=0))
        assert low.quality == pytest.approx(1.0) and low.cost == pytest.approx(1.0), mode
        assert high.quality == pytest.approx(1.0) and high.cost == pytest.approx(1.0), mode
        assert high.strategy.budget == 2.5 and sim.run(high.strategy).mean_quality == pytest.approx(1.0)
        spending = calibrate_sweep(sim, mode, [1.0, 2.5], max_depth=2, config=CalibrationConfig(n_trials=0, min_spend=1.0))
        assert spending[1].cost >= 2.0 - 1e-9, mode  # a spending floor still spends
    # better by one query in 90 is a tie: the generous budget is spent as the multipliers say
    right = (torch.arange(n) % 3 > 0).to(train.quality.dtype)
    train.quality = torch.stack([right, right], 1)
    train.quality[1, 1] = 0.0  # query 1: model 0 right, model 1 wrong
    sim = Simulator(train, _Flattering().fit(train), kernel=KERNEL)
    low, high = calibrate_sweep(sim, "routing", [1.0, 2.5], max_depth=1, config=CalibrationConfig(n_trials=0))
    assert low.quality == pytest.approx(high.quality + 1 / n) and high.cost == pytest.approx(2.0)


def test_calibration_prefers_quality_over_spending(setup):
    """A thresholding cascade whose later models are worse should not spend a generous budget."""
    table, estimator, _ = setup
    worse = table.train()
    worse.quality = torch.zeros_like(worse.quality)
    worse.quality[:, 0] = 1.0  # the first model is always right, every later one always wrong
    sim = Simulator(worse, NoisyEstimator("low").fit(worse), kernel=KERNEL)
    budget = float(worse.cost.sum(1).mean())
    fit = calibrate(sim, "threshold_cascade", budget, max_depth=3, config=CalibrationConfig(n_trials=4))
    assert fit.quality == pytest.approx(float(worse.quality[:, 0].mean()))
    assert fit.cost == pytest.approx(float(worse.cost[:, 0].mean()))
    # with a spending floor it uses most of what the budget allows
    spending = calibrate(sim, "threshold_cascade", budget, max_depth=3, config=CalibrationConfig(n_trials=4, min_spend=0.9))
    most = calibrate(sim, "threshold_cascade", budget, max_depth=3, config=CalibrationConfig(n_trials=4, min_spend=1.0))
    assert spending.cost >= 0.9 * most.cost - 1e-12
    assert spending.cost > fit.cost


def test_cascade_routing_trials_apply_to_cascade_routing_alone(setup):
    """0 trials for cascade routing: one λ for every step, while the cascades still search per-step values."""
    table, estimator, _ = setup
    sim = Simulator(table.train(), estimator, kernel=KERNEL)
    costs = table.train().cost.mean(0)
    budget = float(costs[1] + 0.4 * (costs[3] - costs[1]))
    config = CalibrationConfig(n_trials=8, cascade_routing_trials=0, seed=0)
    shared_runs, searched_runs = SweepMemo(), SweepMemo()
    shared = calibrate(sim, "cascade_routing", budget, max_depth=3, config=config, memo=shared_runs)
    assert len(set(shared.strategy.lambdas)) == 1 and shared.strategy.lambdas[0] > 0
    assert shared.cost == pytest.approx(budget, rel=1e-6)
    assert all(len(set(s.lambdas)) == 1 for s in shared_runs.outcomes)  # no per-step shape was ever simulated
    assert CalibrationConfig().trials_for("cascade_routing") == 0  # one λ is the default
    calibrate(sim, "cascade_routing", budget, max_depth=3,
              config=CalibrationConfig(n_trials=8, cascade_routing_trials=None, seed=0), memo=searched_runs)
    assert any(len(set(s.lambdas)) > 1 for s in searched_runs.outcomes)
    cascade = calibrate(sim, "threshold_cascade", budget, max_depth=3, config=config)
    assert cascade.strategy == calibrate(sim, "threshold_cascade", budget, max_depth=3,
                                         config=CalibrationConfig(n_trials=8, seed=0)).strategy
    with pytest.raises(ValueError, match="cascade_routing_trials must be >= 0"):
        CalibrationConfig(cascade_routing_trials=-1)


def test_min_spend_must_be_a_share():
    with pytest.raises(ValueError, match="min_spend must be in \\[0, 1\\]"):
        CalibrationConfig(min_spend=1.5)


def test_calibrating_sigma_scales_keeps_the_best(setup):
    table, estimator, _ = setup
    sim = Simulator(table.train(), estimator, kernel=KERNEL)
    costs = table.train().cost.mean(0)
    budget = float(costs[1] + 0.5 * (costs[3] - costs[1]))
    only_one = calibrate(sim, "cascade_routing", budget, max_depth=3, config=CalibrationConfig(n_trials=4))
    several = calibrate(sim, "cascade_routing", budget, max_depth=3,
                        config=CalibrationConfig(n_trials=4, sigma_scales=(0.0, 0.5, 1.0)))
    assert several.quality >= only_one.quality - 1e-12
    assert several.strategy.sigma_scale in (0.0, 0.5, 1.0)
    cost, quality = sim.expected(several.strategy)
    assert float(quality.mean()) == pytest.approx(several.quality, rel=1e-9)


def test_a_sweep_keeps_one_sigma_scale_the_first_unless_another_is_clearly_better(setup):
    """Over a budget sweep, one Σ multiplier for every budget (per budget, the luckiest of several noisy fits
    would win): the sweep is that multiplier's own sweep, the first listed unless its per-query qualities are
    clearly beaten, and never one whose mean is lower than the first's."""
    table, estimator, _ = setup
    sim = Simulator(table.train(), estimator, kernel=KERNEL)
    costs = table.train().cost.mean(0)
    budgets = [float(costs[0] + f * (costs[-1] - costs[0])) for f in np.linspace(0.05, 0.9, 8)]
    scales = (0.0, 1.0, 4.0)
    for mode in ("cascade_routing", "cascade"):
        fits = calibrate_sweep(sim, mode, budgets, max_depth=3, config=CalibrationConfig(n_trials=2, sigma_scales=scales))
        chosen = {f.strategy.sigma_scale for f in fits}
        assert len(chosen) == 1
        alone = {s: calibrate_sweep(sim, mode, budgets, max_depth=3, config=CalibrationConfig(n_trials=2, sigma_scales=(s,)))
                 for s in scales}
        (scale,) = chosen
        assert [f.strategy for f in fits] == [f.strategy for f in alone[scale]]
        mean = {s: np.mean([f.quality for f in alone[s]]) for s in scales}
        assert mean[scale] >= mean[scales[0]] - 1e-12


class _SweepSim:
    """A stand-in simulator whose strategies' per-query qualities are given per Σ multiplier (its estimator has a
    Σ, so the sweep tries every multiplier)."""

    def __init__(self, quality: dict[float, torch.Tensor]) -> None:
        self.quality = quality
        self.estimator = NoisyEstimator()

    def keeping_estimates(self):
        return contextlib.nullcontext()

    def expected(self, strategy):
        q = self.quality[strategy.sigma_scale]
        return torch.zeros_like(q), q


@pytest.mark.parametrize("gain, kept", [(0.002, 0.0), (0.2, 1.0)])
def test_a_later_sigma_scale_replaces_the_first_only_when_clearly_better(monkeypatch, gain, kept):
    """A multiplier whose mean quality over the sweep is higher by less than the noise of the training queries
    (here: +0.002 with a spread of 0.3 over 200 queries) is a tie and the first one stays; a clear gain wins."""
    from router_train import calibrate as calibration

    base = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = 0.3 * torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = noise - noise.mean()
    sim = _SweepSim({0.0: base, 1.0: base + noise + gain})

    def fake_calibrate(sim, mode, budget, *, max_depth, force_order, config, memo):
        scale = config.sigma_scales[0]
        strategy = Strategy(mode="cascade_routing", max_depth=max_depth, lambdas=(1.0,) * max_depth, sigma_scale=scale,
                            budget=budget)
        return calibration.Fit(strategy, budget, float(sim.quality[scale].mean()))

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    fits = calibrate_sweep(sim, "cascade_routing", [1.0, 2.0], max_depth=3,
                           config=CalibrationConfig(sigma_scales=(0.0, 1.0)))
    assert {f.strategy.sigma_scale for f in fits} == {kept}


class _Counting(NoisyEstimator):
    """Noisy estimates that count how often each state (row, run set) was asked for."""

    def predict(self, features, rows, run):
        for row, members in zip(rows.tolist(), run.tolist()):
            self.asked[(row, tuple(members))] = self.asked.get((row, tuple(members)), 0) + 1
        return super().predict(features, rows, run)


@pytest.mark.parametrize("mode", ["cascade_routing", "cascade"])
def test_a_sweep_over_sigma_scales_asks_the_estimator_once_per_state(mode, monkeypatch):
    """The multipliers' candidate stores are built from one estimate per state (the estimator is the
    expensive part with learned networks), with the same fits as asking the estimator for each store."""
    table = random_table(60, 5, seed=7)
    estimator = _Counting("medium", seed=2).fit(table.train())
    budgets = [float(c) for c in table.cost.mean(0)[1:4]]
    config = CalibrationConfig(n_trials=2, sigma_scales=(0.0, 0.5, 1.0))
    estimator.asked = {}
    sim = Simulator(table, estimator, kernel=KERNEL, batch_size=16)
    kept = calibrate_sweep(sim, mode, budgets, max_depth=3, config=config)
    assert estimator.asked and max(estimator.asked.values()) == 1
    assert sim._kept is None  # dropped after the sweep
    monkeypatch.setattr(Simulator, "keeping_estimates", lambda self: contextlib.nullcontext())
    estimator.asked = {}
    fresh = calibrate_sweep(Simulator(table, estimator, kernel=KERNEL, batch_size=16), mode, budgets, max_depth=3,
                            config=config)
    assert max(estimator.asked.values()) > 1  # without keeping, each multiplier's store asks again
    assert [f.strategy for f in kept] == [f.strategy for f in fresh]
    assert [f.quality for f in kept] == [f.quality for f in fresh]


@pytest.mark.parametrize("mode", ["threshold_cascade", "cascade"])
def test_uncapped_cascades_calibrate_with_29_models(mode):
    """k = 29, uncapped (TPE over 28 thresholds or 29 λs): the fit keeps to the budget and runs
    models a depth cap of 3 would never reach."""
    table = random_table(60, 29, seed=5)
    sim = Simulator(table, NoisyEstimator("medium", seed=1).fit(table), kernel=KERNEL)
    budget = float(table.cost.mean(0)[:6].sum())  # enough to run the six cheapest models
    fit = calibrate(sim, mode, budget, max_depth=29, config=CalibrationConfig(n_trials=8, seed=0))
    params = fit.strategy.thresholds if mode == "threshold_cascade" else fit.strategy.lambdas
    assert fit.strategy.max_depth == 29 and len(params) == (28 if mode == "threshold_cascade" else 29)
    assert fit.cost <= budget * (1 + 1e-9)
    assert int(sim.run(fit.strategy).run.sum(1).max()) > 3


@pytest.mark.parametrize("strategy", [
    Strategy("threshold_cascade", 60, thresholds=[-5.0] * 59),  # goes on while q̂ < 6: runs all 60 models
    Strategy("cascade", 60, lambdas=[0.0] * 60),
    Strategy("cascade_routing", 3, lambdas=[100.0] * 3),
], ids=lambda s: s.mode)
def test_sixty_models_uncapped_number_the_run_sets_met_and_match_the_kernel(strategy):
    """40 queries × C(60, 30) run sets overflow int64 state keys at step 30 (one crashed before): the state
    cache numbers the run sets it meets instead, and decides as the kernel does step by step."""
    table = random_table(40, 60, seed=4)
    estimator = NoisyEstimator("medium", seed=2).fit(table)
    outcome = Simulator(table, estimator, kernel=KERNEL).run(strategy)
    run, answer = step_by_step(table, estimator, strategy, False)
    assert torch.equal(outcome.run, run) and torch.equal(outcome.answer, answer)
    if strategy.mode == "threshold_cascade":
        assert bool(run.all())  # the steps past the overflow were simulated


def test_more_models_than_the_bitmasks_hold_are_refused_naming_the_fix():
    table = random_table(10, 63, seed=1)
    with pytest.raises(ValueError, match=r"Simulator: the table: 63 models, but the decision kernel routes among at "
                                         r"most 62 .* --models"):
        Simulator(table, NoisyEstimator("low", seed=0).fit(table))
    with pytest.raises(ValueError, match=r"quality: 63 models, but .* at most 62"):
        decide(table.quality[:2].double(), table.cost[:2].double(), torch.zeros(2, 63, dtype=torch.bool),
               Strategy("routing", 1, lambdas=[1.0]))


def test_bisection_resimulates_only_queries_whose_outcome_may_change(setup, monkeypatch):
    """Each query's proved range of the scale stands in for its simulation inside it: the same fits, with
    fewer queries simulated, and bisection steps that simulate a part of the queries only."""
    table, estimator, _ = setup
    costs = table.train().cost.mean(0)
    budgets = [float(costs[1] + f * (costs[3] - costs[1])) for f in (0.2, 0.5, 0.8)]
    simulated, fits = {}, {}
    for reuse in (False, True):
        with monkeypatch.context() as patch:
            if not reuse:
                patch.setattr(RowOutcomes, "unknown", lambda self, scale: torch.arange(self.cost.numel()))
            sim = Simulator(table.train(), estimator, kernel=KERNEL)
            sizes = []
            original = sim.run
            patch.setattr(sim, "run", lambda *a, rows=None, **k: sizes.append(sim.n if rows is None else rows.numel())
                          or original(*a, rows=rows, **k))
            fits[reuse] = [
                calibrate_sweep(sim, mode, budgets, max_depth=3, config=CalibrationConfig(n_trials=4, seed=0))
                for mode in ("routing", "threshold_cascade", "cascade", "cascade_routing")
            ]
            simulated[reuse] = sizes
    assert [[f.strategy for f in fs] for fs in fits[True]] == [[f.strategy for f in fs] for fs in fits[False]]
    assert [[(f.cost, f.quality) for f in fs] for fs in fits[True]] == [[(f.cost, f.quality) for f in fs] for fs in fits[False]]
    assert sum(simulated[True]) < 0.5 * sum(simulated[False]), (sum(simulated[True]), sum(simulated[False]))
    assert any(0 < size < table.train().n for size in simulated[True])


def mid_strategy(mode: str, table) -> Strategy:
    """A strategy of `mode` at depth 3 (routing: 1) with a mid-range λ (θs 0.4, 0.6 for the thresholding cascade)."""
    if mode == "threshold_cascade":
        return Strategy(mode, 3, thresholds=[0.4, 0.6])
    depth = 1 if mode == "routing" else 3
    return Strategy(mode, depth, lambdas=[1.0 / float(table.cost.mean(0)[2])] * depth)


@pytest.mark.parametrize("mode", ["routing", "threshold_cascade", "cascade", "cascade_routing"])
def test_a_subset_of_queries_runs_as_in_the_whole_run(setup, mode):
    """`run(rows=...)` gives those queries' outcomes of the whole run, and each query's tracked range holds:
    inside it the query decides the same."""
    table, estimator, _ = setup
    train = table.train()
    sim = Simulator(train, estimator, kernel=KERNEL)
    strategy = mid_strategy(mode, train)
    whole = sim.run(strategy, track=True)
    rows = torch.randperm(train.n, generator=torch.Generator().manual_seed(0))[: train.n // 3]
    part = sim.run(strategy, track=True, rows=rows)
    for name in ("cost", "quality", "answer", "run"):
        assert torch.equal(getattr(part, name), getattr(whole, name)[rows]), name
    assert torch.equal(part.ranges, whole.ranges[:, rows])
    for bad in (torch.tensor([0, train.n]), torch.tensor([0.0, 1.0]), torch.zeros(2, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="rows must be a 1-D torch.long tensor"):
            sim.run(strategy, rows=bad)
    params = strategy.thresholds if mode == "threshold_cascade" else strategy.lambdas
    low, high = whole.ranges[0, :, 0], whole.ranges[0, :, 1]
    for side, bound in ((0, low), (1, high)):  # just inside each query's range of the first multiplier
        finite = torch.isfinite(bound) & (bound != params[0])
        probe = bound[finite][0] + (1e-7 if side == 0 else -1e-7) * (1 + abs(float(bound[finite][0])))
        query = finite.nonzero()[0]
        moved = list(params)
        moved[0] = float(probe)
        other = strategy.replace(**{"thresholds" if mode == "threshold_cascade" else "lambdas": moved})
        again = sim.run(other, rows=query)
        assert torch.equal(again.run, whole.run[query]) and torch.equal(again.answer, whole.answer[query])


class _HalfCorrelated(NoisyEstimator):
    """Noisy estimates whose Σ is full (two models correlated) for the second half of the queries: batches
    of states then come with diagonal or full Cholesky factors."""

    def predict(self, features, rows, run):
        est = super().predict(features, rows, run)
        cov = est.cov.clone()
        late = (rows >= features["cost"].shape[0] // 2) & ~run[:, 0] & ~run[:, 1]
        shared = 0.5 * torch.minimum(cov[:, 0, 0], cov[:, 1, 1])
        cov[:, 0, 1] = cov[:, 1, 0] = torch.where(late, shared, 0.0)
        return type(est)(quality=est.quality, cost=est.cost, cov=cov)


def test_states_with_diagonal_and_full_sigma_factors_share_a_store():
    """Batches of states whose Σ factors differ in layout (standard deviations or full) go to one store;
    the simulator still decides as the kernel step by step, and λ on a breakpoint (candidates rebuilt
    from the cached factors) runs."""
    table = random_table(60, 5, seed=4)
    estimator = _HalfCorrelated("medium", seed=2).fit(table.train())
    sim = Simulator(table, estimator, kernel=KERNEL, batch_size=8)
    strategy = Strategy("cascade_routing", 3, lambdas=[30.0] * 3)
    store = sim._candidate_store(strategy, 0)
    nobody = torch.zeros(30, table.k, dtype=torch.bool)
    store.lookup(torch.arange(30), nobody)  # the first half: every Σ diagonal
    store.lookup(torch.arange(30, 60), nobody)  # the second: full factors, the store turns full
    flags = store.rows["diagonal"].data
    assert store.rows["factor"].data.dim() == 3 and bool(flags[:30].all()) and not bool(flags[30:].any())
    for lam in (30.0, 400.0, 3000.0):
        outcome = sim.run(strategy.replace(lambdas=[lam] * 3))
        run, answer = step_by_step(table, estimator, strategy.replace(lambdas=[lam] * 3), False)
        assert torch.equal(outcome.run, run) and torch.equal(outcome.answer, answer)
    for query in (0, 45):  # a breakpoint of a diagonal and of a full state: those rows are rebuilt
        slot = int(store.lookup(torch.tensor([query]), nobody[:1])[0])
        own = store.lambdas.breaks[store.lambdas.offsets[slot]:store.lambdas.offsets[slot + 1]]
        lam = float(own[own > 0][0])
        _, sure, _ = store.lambdas.lookup(torch.tensor([slot]), lam, torch.zeros(1, dtype=torch.bool))
        assert not bool(sure[0])
        assert sim.run(strategy.replace(lambdas=[lam] * 3)).run[query].any()


@pytest.mark.parametrize("mode", ["routing", "threshold_cascade", "cascade", "cascade_routing"])
def test_queries_simulated_in_small_blocks_give_the_whole_run(setup, mode, monkeypatch):
    """Blocks of 7 queries (states first reached in a later block, stores grown block by block) give the
    outcomes and ranges of one block, for all queries and for a subset."""
    table, estimator, _ = setup
    train = table.train()
    strategy = mid_strategy(mode, train)
    rows = torch.randperm(train.n, generator=torch.Generator().manual_seed(1))[: train.n // 2]
    whole = Simulator(train, estimator, kernel=KERNEL)
    one = [whole.run(strategy, True, track=True), whole.run(strategy, track=True, rows=rows)]
    monkeypatch.setattr(simulate, "SIMULATION_BLOCK", 7)
    blocks = Simulator(train, estimator, kernel=KERNEL)
    several = [blocks.run(strategy, True, track=True), blocks.run(strategy, track=True, rows=rows)]
    for a, b in zip(one, several):
        for name in ("cost", "quality", "answer", "run", "ranges"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
