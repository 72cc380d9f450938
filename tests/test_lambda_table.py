"""The λ table decides exactly as `choose`, or flags the row; the simulator built on it matches the kernel."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_simulate import KERNEL, setup, step_by_step  # noqa: F401 (setup: a fixture)

from router_train.calibrate import CalibrationConfig, calibrate
from router_train.kernel import fused
from router_train.kernel.candidates import Candidates, choose
from router_train.kernel.lambda_table import LambdaTable
from router_train.kernel.prune import prune
from router_train.kernel.subsets import subset_table
from router_train.simulate import Simulator
from router_train.strategy import Strategy


def candidates(value, cost, valid) -> Candidates:
    b, m = value.shape
    return Candidates(0, subset_table(6, 6), torch.arange(6).expand(b, -1), torch.zeros(b, dtype=torch.long),
                      value, cost, valid, torch.arange(m).expand(b, -1))


def tie_heavy(seed: int, b: int, m: int):
    """Grid values and costs (exact and near ties, equal costs), some continuous rows, one row with none valid."""
    rng = np.random.default_rng(seed)
    value = rng.choice([0.2, 0.5, 0.7, 0.7 + 5e-7, 0.9, 0.9 - 5e-7, 0.9 + 1e-6], size=(b, m))
    cost = rng.choice([0.0, 0.001, 0.002, 0.004, 0.01], size=(b, m))
    smooth = rng.random((b, 1)) < 0.3
    value = torch.tensor(np.where(smooth, value + rng.random((b, m)), value))
    cost = torch.tensor(np.where(smooth, cost + rng.random((b, m)) * 0.01, cost))
    valid = torch.tensor(rng.random((b, m)) < 0.8)
    valid[0] = False
    return value, cost, valid


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 2**16), st.integers(1, 12))
def test_the_table_picks_as_choose_wherever_it_is_sure(seed, m):
    value, cost, valid = tie_heavy(seed, 8, m)
    table = LambdaTable.build(value, cost, valid)
    lams = [0.0, 1.0, 10.0, 55.5, 300.0, 1e4, 1e7, 1e30]
    for x in table.breaks.tolist():  # at, just beside and a little away from every breakpoint
        lams += [x, np.nextafter(x, np.inf), x * (1 + 1e-13), x * (1 - 1e-9), x + 1e-3]
    rows = torch.arange(8)
    for lam in (x for x in lams if x >= 0):
        for dear in (False, True):
            expensive = torch.full((8,), dear)
            pick, sure, _ = table.lookup(rows, lam, expensive)
            want = choose(candidates(value, cost, valid), lam, expensive)
            assert torch.equal(pick[sure], want[sure]), (lam, dear)


def test_the_table_is_sure_away_from_breakpoints():
    """Continuous values: only λs at a breakpoint are left to `choose`."""
    rng = np.random.default_rng(0)
    value, cost = torch.tensor(rng.random((200, 10))), torch.tensor(rng.random((200, 10)) * 0.01)
    valid = torch.ones(200, 10, dtype=torch.bool)
    table = LambdaTable.build(value, cost, valid)
    rows = torch.arange(200)
    for lam in rng.exponential(50.0, 30).tolist():
        _, sure, _ = table.lookup(rows, lam, torch.zeros(200, dtype=torch.bool))
        assert bool(sure.all())
    at = float(table.breaks[table.offsets[5]])  # state 5's first breakpoint
    _, sure, _ = table.lookup(rows, at, torch.zeros(200, dtype=torch.bool))
    assert not bool(sure[5])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 2**16))
def test_pruned_rows_of_mixed_widths_keep_every_decision(seed):
    """Rows are built in groups by width; the table is returned in the rows' own order."""
    rng = np.random.default_rng(seed)
    b, m = 40, 40
    value, cost = torch.tensor(rng.random((b, m))), torch.tensor(rng.random((b, m)) * 0.01)
    valid = torch.tensor(rng.random((b, m)) < rng.random((b, 1)))
    valid[torch.arange(b), torch.tensor(rng.integers(0, m, b))] = True  # as in the kernel: never none valid
    full = candidates(value, cost, valid)
    pruned = prune(full)
    table = LambdaTable.build(pruned.value, pruned.cost, pruned.valid)
    for lam in [0.0, *rng.exponential(100.0, 10).tolist(), 1e9]:
        for dear in (False, True):
            expensive = torch.full((b,), dear)
            pick, sure, _ = table.lookup(torch.arange(b), lam, expensive)
            want = full.subsets(choose(full, lam, expensive))
            assert torch.equal(pruned.subsets(pick)[sure], want[sure])


def test_calibrated_strategies_sit_on_breakpoints_and_still_match_the_kernel(setup):
    """Bisection drives λ to within 1e-12 of a breakpoint, where the simulator falls back to `choose`."""
    table, estimator, _ = setup
    sim = Simulator(table, estimator, kernel=KERNEL)
    costs = table.cost.mean(0)
    for mode in ("routing", "cascade", "cascade_routing"):
        fit = calibrate(sim, mode, float(costs[1] + 0.4 * (costs[3] - costs[1])), max_depth=3,
                        config=CalibrationConfig(n_trials=4, seed=0))
        for dear in (False, True):
            outcome = sim.run(fit.strategy, dear)
            run, answer = step_by_step(table, estimator, fit.strategy, dear)
            assert torch.equal(outcome.run, run)
            assert torch.equal(outcome.answer, answer)


def test_a_lambda_on_a_breakpoint_is_decided_by_choose_and_matches_the_kernel(setup):
    table, estimator, _ = setup
    sim = Simulator(table, estimator, kernel=KERNEL)
    probe = Strategy("cascade_routing", 3, lambdas=[100.0] * 3)
    sim.run(probe)
    store = sim._candidate_store(probe, 0)
    slots = store.root
    breaks = store.lambdas.breaks[store.lambdas.offsets[slots[0]]:store.lambdas.offsets[slots[0] + 1]]
    assert breaks.numel() > 0
    for lam in breaks[breaks >= 0].tolist():
        _, sure, _ = store.lambdas.lookup(slots[:1], lam, torch.zeros(1, dtype=torch.bool))
        assert not bool(sure[0])  # query 0 is left to `choose` ...
        strategy = probe.replace(lambdas=[lam] * 3)
        for dear in (False, True):  # ... and the outcome is still the kernel's
            outcome = sim.run(strategy, dear)
            run, answer = step_by_step(table, estimator, strategy, dear)
            assert torch.equal(outcome.run, run)
            assert torch.equal(outcome.answer, answer)


def test_a_cascade_lambda_on_a_breakpoint_is_decided_by_choose_and_matches_the_kernel(setup):
    """The cascades read every decision at once (`Simulator._run_prefix`); rows on a breakpoint still go to `choose`."""
    table, estimator, _ = setup
    sim = Simulator(table, estimator, kernel=KERNEL)
    probe = Strategy("cascade", table.k, lambdas=[100.0] * table.k)
    sim.run(probe)
    store = sim._candidate_store(probe, 1)
    slot = sim._prefix_states(probe).slots[1][0]  # query 0 after its first model
    breaks = store.lambdas.breaks[store.lambdas.offsets[slot]:store.lambdas.offsets[slot + 1]]
    assert breaks.numel() > 0
    for lam in breaks[breaks >= 0].tolist():
        strategy = probe.replace(lambdas=[100.0, lam] + [100.0] * (table.k - 2))
        for dear in (False, True):
            outcome = sim.run(strategy, dear)
            run, answer = step_by_step(table, estimator, strategy, dear)
            assert torch.equal(outcome.run, run)
            assert torch.equal(outcome.answer, answer)


@pytest.mark.skipif(not fused.available(), reason="no working C compiler here: the torch build is the only one")
@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_the_c_build_is_the_torch_build_bit_for_bit(seed, tied, valid_first):
    """`LambdaTable.build` runs per state in C where it compiled: the same breakpoints, picks and safe
    ranges, to the bit, as the torch build (ties, invalid columns, mixed widths)."""
    rng = np.random.default_rng(seed)
    b, w = int(rng.integers(1, 25)), int(rng.integers(1, 40))
    value = rng.choice([0.2, 0.5, 0.7, 0.7 + 5e-7, 0.9, 0.9 - 5e-7], (b, w)) if tied else rng.random((b, w))
    cost = rng.choice([0.0, 0.001, 0.002, 0.004, 0.01], (b, w)) if tied else rng.random((b, w)) * 0.01
    if valid_first:
        valid = torch.arange(w).unsqueeze(0) < torch.tensor(rng.integers(0, w + 1, b)).unsqueeze(1)
    else:
        valid = torch.tensor(rng.random((b, w)) < 0.8)
    value, cost = torch.tensor(value), torch.tensor(cost)
    in_c = LambdaTable.build(value, cost, valid)
    available = fused.available
    try:
        fused.available = lambda: False
        in_torch = LambdaTable.build(value, cost, valid)
    finally:
        fused.available = available
    for field in ("breaks", "offsets", "pick", "safe"):
        assert torch.equal(getattr(in_c, field), getattr(in_torch, field)), field


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.integers(0, 40))
def test_breakpoints_below_lambda_are_counted_alike_for_few_and_many_states(seed, looked_up):
    """`lookup` counts a state's breakpoints <= λ by a binary search when few states of a large table are
    looked up, by one pass otherwise: both give the count of a plain comparison, at and beside breakpoints."""
    rng = np.random.default_rng(seed)
    b, w = int(rng.integers(1, 300)), int(rng.integers(1, 20))
    table = LambdaTable.build(torch.tensor(rng.random((b, w))), torch.tensor(rng.random((b, w)) * 0.01),
                              torch.tensor(rng.random((b, w)) < 0.8))
    slots = torch.tensor(rng.integers(0, b, looked_up))
    span = table.span.index_select(0, slots)
    for lam in [0.0, 55.5, 1e4, *table.breaks[:3].tolist()]:
        expected = [int((table.breaks[s:e] <= lam).sum()) for s, e in span[:, :2].tolist()]
        assert table._count_below(span, lam).tolist() == expected


@pytest.mark.skipif(not fused.available(), reason="no working C compiler here: the torch lookup is the only one")
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.integers(0, 40))
def test_the_c_lookup_is_the_torch_lookup(seed, looked_up):
    """`lookup` runs in C where it compiled: the same picks, certainty and per-state ranges as the torch
    code, at, beside and away from breakpoints, for either tie-break."""
    rng = np.random.default_rng(seed)
    b, w = int(rng.integers(1, 60)), int(rng.integers(1, 12))
    value, cost, valid = tie_heavy(seed, b, w)
    table = LambdaTable.build(value, cost, valid)
    slots = torch.tensor(rng.integers(0, b, looked_up))
    expensive = torch.tensor(rng.random(looked_up) < 0.5)
    lams = [0.0, 1.0, 55.5, 1e4, 1e30]
    for x in table.breaks[:6].tolist():
        lams += [x, np.nextafter(x, np.inf), x * (1 - 1e-9)]
    available = fused.available
    for lam in (x for x in lams if x >= 0):
        for stable in (False, True):
            in_c = table.lookup(slots, lam, expensive, stable=stable)
            try:
                fused.available = lambda: False
                in_torch = table.lookup(slots, lam, expensive, stable=stable)
            finally:
                fused.available = available
            assert torch.equal(in_c[0], in_torch[0]) and torch.equal(in_c[1], in_torch[1])
            assert (in_c[2] is None) == (not stable) and (not stable or torch.equal(in_c[2], in_torch[2]))
