"""The vectorized kernel makes exactly the decisions of the plain per-query oracle."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import decide_one

from router_train.kernel import (
    COST_RTOL,
    TIE_TOL,
    KernelConfig,
    build_candidates,
    choose,
    count_subsets,
    decide,
    factorize,
    normal_samples,
    subset_table,
)
from router_train.kernel.candidates import Candidates
from router_train.kernel.decide import CHUNK_ELEMENTS, CUDA_CHUNK_ELEMENTS, chunk_rows
from router_train.kernel.subsets import count_subsets, prefix_table
from router_train.strategy import Strategy

GRID = [0.0, 0.125, 0.25, 0.5, 0.5 + 4e-7, 0.75, 1.0]  # 0.5 + 4e-7 ties 0.5 within the tolerance


@st.composite
def decision_cases(draw, modes=("routing", "cascade", "cascade_routing", "threshold_cascade"), max_depth_cap=5):
    """Random inputs with deliberate ties: grid values, equal costs, shared models, all Σ kinds; depth
    caps up to `max_depth_cap` (None: up to k + 1, uncapped)."""
    k = draw(st.integers(1, 12))
    b = draw(st.integers(1, 5))
    mode = draw(st.sampled_from(modes))
    max_depth = 1 if mode == "routing" else draw(st.integers(1, min(k + 1, max_depth_cap or k + 1)))
    value = st.one_of(st.sampled_from(GRID), st.floats(0, 1, allow_nan=False, width=32))
    quality = np.array(draw(st.lists(value, min_size=b * k, max_size=b * k)), dtype=np.float64).reshape(b, k)
    price = st.one_of(st.sampled_from([0.0, 1e-4, 2e-4, 5e-4]), st.floats(1e-6, 1e-3, allow_nan=False))
    cost = np.array(draw(st.lists(price, min_size=b * k, max_size=b * k)), dtype=np.float64).reshape(b, k)
    runs = []
    for _ in range(b):
        size = draw(st.integers(0, min(k, max_depth + 1)))  # mostly below the depth cap, sometimes at/above it
        if mode in ("cascade", "threshold_cascade"):
            runs.append(list(range(size)))
        else:
            runs.append(sorted(draw(st.permutations(range(k)))[:size]))
    sigma_kind = draw(st.sampled_from(["none", "diagonal", "full"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    cov = None
    if sigma_kind != "none":
        cov = np.zeros((b, k, k))
        for i in range(b):
            if sigma_kind == "diagonal":
                cov[i] = np.diag(rng.uniform(0, 0.1, k))
            else:
                a = rng.normal(size=(k, k)) * 0.2
                cov[i] = a @ a.T / k
            cov[i][runs[i], :] = 0.0  # post-hoc estimates of run models do not move
            cov[i][:, runs[i]] = 0.0
    lam = st.one_of(st.sampled_from([0.0, 100.0, 1000.0]), st.floats(0, 5000, allow_nan=False))
    strategy = Strategy(
        mode,
        max_depth,
        lambdas=[draw(lam) for _ in range(max_depth)] if mode != "threshold_cascade" else [],
        thresholds=[draw(st.sampled_from(GRID)) for _ in range(max_depth - 1)] if mode == "threshold_cascade" else [],
        force_order=draw(st.booleans()) if mode == "cascade_routing" else False,
    )
    expensive = np.array(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    method = draw(st.sampled_from(["levels", "zeta", "auto"]))  # auto: the fused C kernel where it compiled
    return quality, cost, runs, cov, strategy, expensive, method


def kernel_decisions(quality, cost, runs, cov, strategy, expensive, config):
    b, k = quality.shape
    run = torch.zeros(b, k, dtype=torch.bool)
    for i, r in enumerate(runs):
        run[i, r] = True
    out = decide(
        torch.tensor(quality),
        torch.tensor(cost),
        run,
        strategy,
        cov=None if cov is None else torch.tensor(cov),
        expensive=torch.tensor(expensive),
        config=config,
    )
    masks = [frozenset(i for i in range(k) if (m >> i) & 1) for m in out.supermodel.tolist()]
    return list(zip(out.next_model.tolist(), out.answer_model.tolist(), masks))


def oracle_decisions(quality, cost, runs, cov, strategy, expensive, n_samples):
    return [
        decide_one(
            quality[i],
            cost[i],
            runs[i],
            mode=strategy.mode,
            max_depth=strategy.max_depth,
            lambdas=list(strategy.lambdas),
            thresholds=list(strategy.thresholds),
            cov=None if cov is None else cov[i],
            expensive=bool(expensive[i]),
            force_order=strategy.force_order,
            n_samples=n_samples,
        )
        for i in range(len(runs))
    ]


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(decision_cases())
def test_kernel_matches_oracle(case):
    quality, cost, runs, cov, strategy, expensive, method = case
    config = KernelConfig(n_samples=24, dtype=torch.float64, method=method, chunk_size=2)
    assert kernel_decisions(quality, cost, runs, cov, strategy, expensive, config) == oracle_decisions(
        quality, cost, runs, cov, strategy, expensive, 24
    )


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(decision_cases(modes=("cascade",), max_depth_cap=None))
def test_uncapped_cascades_match_the_oracle(case):
    """Cascades with depth up to k (k <= 12): the prefix-only candidates decide as the per-query rule."""
    quality, cost, runs, cov, strategy, expensive, method = case
    config = KernelConfig(n_samples=24, dtype=torch.float64, method=method, chunk_size=2)
    assert kernel_decisions(quality, cost, runs, cov, strategy, expensive, config) == oracle_decisions(
        quality, cost, runs, cov, strategy, expensive, 24
    )


@pytest.mark.parametrize("method", ["levels", "zeta"])
@pytest.mark.parametrize("k", [1, 2, 5, 9, 12])
def test_prefix_candidates_choose_as_the_subset_table_masked_to_prefixes(k, method):
    """Depth k: the prefix-only path values the prefixes exactly as the full subset table does, in the
    same order, so each choice equals the one the subset table restricted to prefixes made."""
    rng = np.random.default_rng(k)
    b = 16
    quality = torch.tensor(rng.choice(GRID + [0.3, 0.9], (b, k)))
    cost = torch.tensor(rng.choice([0.0, 1e-4, 2e-4, 5e-4], (b, k)) + rng.uniform(0, 1e-4, (b, k)) * (k % 2))
    z = normal_samples(32, k, dtype=torch.float64)
    for t in range(k):
        run = torch.zeros(b, k, dtype=torch.bool)
        run[:, :t] = True
        a = torch.tensor(rng.normal(size=(b, k, k)) * 0.2).masked_fill(run.unsqueeze(2), 0.0)
        factor = factorize(a @ a.transpose(1, 2) / k, dtype=torch.float64)
        new = build_candidates(quality, factor, cost, run, z, max_depth=k, prefix_only=True, method=method)
        full = build_candidates(quality, factor, cost, run, z, max_depth=k, method=method)
        cols = (full.table.prefix_len >= 0).nonzero().squeeze(1)
        old = Candidates(
            t, full.table, full.comp, full.run_mask, full.value[:, cols], full.cost[:, cols], full.valid[:, cols],
            cols.expand(b, -1),
        )
        assert new.table.count == k - t + 1 and torch.equal(new.value, old.value) and torch.equal(new.valid, old.valid)
        torch.testing.assert_close(new.cost, old.cost, rtol=1e-12, atol=0.0)
        for lam in (0.0, 100.0, 1000.0, 1e5):
            for expensive in (False, True):
                pick_new, pick_old = choose(new, lam, expensive), choose(old, lam, expensive)
                assert torch.equal(new.mask(pick_new), old.mask(pick_old))
                assert torch.equal(new.next_model(pick_new), old.next_model(pick_old))


def test_uncapped_cascade_with_62_models_is_linear_in_k():
    """k = 62, depth 62: 63 prefix candidates per query, not 2^62 subsets."""
    rng = np.random.default_rng(4)
    b, k = 6, 62
    quality, cost = rng.random((b, k)), np.sort(rng.random((b, k)), axis=1) * 1e-3
    runs = [[], [0], list(range(10)), list(range(40)), list(range(61)), list(range(62))]
    cov = np.stack([np.diag(v) for v in rng.uniform(0, 0.05, (b, k))])
    for i, r in enumerate(runs):
        cov[i][r, :] = 0.0
        cov[i][:, r] = 0.0
    strategy = Strategy("cascade", k, lambdas=list(rng.uniform(0, 100, k)))
    config = KernelConfig(n_samples=16, dtype=torch.float64)
    assert chunk_rows(k, 0, strategy, config) == config.chunk_size
    assert prefix_table(k, k).count == k + 1
    expensive = np.array([False, True] * 3)
    got = kernel_decisions(quality, cost, runs, cov, strategy, expensive, config)
    assert got == oracle_decisions(quality, cost, runs, cov, strategy, expensive, 16)
    assert {nxt for nxt, _, _ in got} - {-1}, "some query goes on"


def test_cuda_chunks_are_bounded_by_their_elements_not_by_the_cpu_chunk_size():
    """On CUDA a chunk is as many queries as CUDA_CHUNK_ELEMENTS allows (few, large launches); on CPU at most
    `chunk_size`, and fewer where a query's working set is large (k = 11, depth 5: 1,024 subsets)."""
    config = KernelConfig()
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    big = Strategy("cascade_routing", 5, lambdas=(1.0,) * 5)
    per_row = count_subsets(11, 5) * config.n_samples
    assert chunk_rows(11, 0, big, config) == CHUNK_ELEMENTS // per_row < config.chunk_size
    assert chunk_rows(11, 0, big, config, cuda) == CUDA_CHUNK_ELEMENTS // per_row
    small = Strategy("cascade_routing", 2, lambdas=(1.0,) * 2)
    assert chunk_rows(4, 0, small, config) == config.chunk_size < chunk_rows(4, 0, small, config, cuda)


def kernel_benchmark():
    """benchmarks/kernel.py as a module (its `workload` gives the benchmark's inputs)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel.py"
    spec = importlib.util.spec_from_file_location("kernel_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_routing(quality: np.ndarray, cost: np.ndarray, lam: float, expensive: np.ndarray) -> np.ndarray:
    """argmax q̂ − λĉ per query; within TIE_TOL of the best to the cheapest (the dearest where `expensive`),
    equal costs to the first model."""
    tau = quality - lam * cost
    tied = tau >= tau.max(1, keepdims=True) - TIE_TOL
    cheap = np.where(tied, cost, np.inf).min(1, keepdims=True)
    dear = np.where(tied, cost, -np.inf).max(1, keepdims=True)
    target = np.where(expensive[:, None], dear, cheap)
    return (tied & (np.abs(cost - target) <= COST_RTOL * np.abs(target))).argmax(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", ["diagonal", "full"])
def test_routing_with_sigma_is_exactly_the_argmax(sigma, dtype):
    """A single model's expected max is its estimate, so Σ changes no routing decision: on the kernel
    benchmark's inputs (and on grid values with exact ties) routing with Σ picks argmax q̂ − λĉ."""
    n, k = 10_000, 11
    quality, cost, cov = kernel_benchmark().workload(n, k, seed=1)
    rng = np.random.default_rng(0)
    quality, cost = quality.numpy(), cost.numpy()
    tied_rows = slice(n // 2, None)  # half the queries: grid qualities and shared prices, so exact ties
    quality[tied_rows] = rng.choice(GRID, (n - n // 2, k))
    cost[tied_rows] = rng.choice([1e-5, 1e-4, 2e-4], (n - n // 2, k))
    if sigma == "full":
        a = rng.normal(size=(n, k, k)) * 0.2
        cov = torch.tensor(a @ a.transpose(0, 2, 1) / k)
    expensive = rng.random(n) < 0.5
    seen = torch.tensor(quality).to(dtype).double().numpy()  # q̂ as the kernel holds it
    config = KernelConfig(dtype=dtype)
    for lam in (0.0, 30.0, 300.0, 3000.0):
        out = decide(
            torch.tensor(quality), torch.tensor(cost), torch.zeros(n, k, dtype=torch.bool),
            Strategy("routing", 1, lambdas=[lam]), cov=cov, expensive=torch.tensor(expensive), config=config,
        )
        wrong = (out.next_model.numpy() != exact_routing(seen, cost, lam, expensive)).sum()
        assert wrong == 0, f"λ={lam}: {wrong} of {n} queries not routed to argmax q̂ − λĉ"


def test_float32_kernel_agrees_on_random_inputs():
    rng = np.random.default_rng(1)
    b, k = 64, 9
    quality, cost = rng.random((b, k)), rng.random((b, k)) * 1e-3
    cov = np.stack([np.diag(v) for v in rng.uniform(0, 0.05, (b, k))])
    strategy = Strategy("cascade_routing", 4, lambdas=[300.0] * 4)
    expensive = np.zeros(b, dtype=bool)
    got = kernel_decisions(quality, cost, [[]] * b, cov, strategy, expensive, KernelConfig())
    assert got == oracle_decisions(quality, cost, [[]] * b, cov, strategy, expensive, 100)


def test_many_models_with_a_depth_cap_run_without_the_full_mask_table():
    """k = 32 with depth 3: the work scales with the ~5.5k capped candidates, not 2^32."""
    rng = np.random.default_rng(2)
    b, k = 3, 32
    quality, cost = rng.random((b, k)), rng.random((b, k)) * 1e-3
    cov = np.stack([np.diag(v) for v in rng.uniform(0, 0.05, (b, k))])
    runs = [[], [5], [3, 30]]
    strategy = Strategy("cascade_routing", 3, lambdas=[50.0] * 3)
    expensive = np.zeros(b, dtype=bool)
    config = KernelConfig(n_samples=16, dtype=torch.float64)
    assert count_subsets(32, 3) == 1 + 32 + 496 + 4960
    got = kernel_decisions(quality, cost, runs, cov, strategy, expensive, config)
    assert got == oracle_decisions(quality, cost, runs, cov, strategy, expensive, 16)
    with pytest.raises(ValueError, match="too many"):
        kernel_decisions(quality, cost, runs, cov, strategy, expensive, KernelConfig(method="zeta"))


def test_backends_agree_in_value():
    from router_train.kernel.candidates import build_candidates

    torch.manual_seed(0)
    b, k = 7, 8
    quality = torch.rand(b, k, dtype=torch.float64)
    sd = torch.rand(b, k, dtype=torch.float64) * 0.3
    run = torch.zeros(b, k, dtype=torch.bool)
    run[:, 2] = True
    z = normal_samples(50, k, dtype=torch.float64)
    values = [
        build_candidates(quality, sd, torch.rand(b, k), run, z, max_depth=4, method=m).value for m in ("levels", "zeta")
    ]
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-12)


def test_subset_table_order_and_parents():
    table = subset_table(4, 2)
    assert table.count == 1 + 4 + 6
    assert table.bits[0].sum() == 0 and table.first[0] == -1
    for i in range(1, table.count):
        parent = int(table.parent[i])
        assert table.size[parent] == table.size[i] - 1
        assert (table.bits[i] & ~table.bits[parent]).nonzero().squeeze(1).tolist() == [int(table.first[i])]
    assert table.prefix_len.tolist()[:7] == [0, 1, -1, -1, -1, 2, -1]
    assert torch.equal(table.added, table.first)


def test_prefix_table_adds_one_model_per_level():
    table = prefix_table(5, 3)
    assert table.count == 4 and table.level_starts == (0, 1, 2, 3, 4)
    assert table.prefix_len.tolist() == [0, 1, 2, 3] and table.first.tolist() == [-1, 0, 0, 0]
    for i in range(1, table.count):
        parent = int(table.parent[i])
        assert parent == i - 1
        assert (table.bits[i] & ~table.bits[parent]).nonzero().squeeze(1).tolist() == [int(table.added[i])]
    assert prefix_table(2, 5).count == 3


def test_qmc_samples_are_deterministic_and_standard_normal():
    z = normal_samples(4096, 3, seed=7)
    assert torch.equal(z, normal_samples(4096, 3, seed=7))
    assert not torch.equal(z, normal_samples(4096, 3, seed=8))
    assert z.mean(0).abs().max() < 0.01 and (z.std(0) - 1).abs().max() < 0.02
    assert normal_samples(100, 11).mean(0).abs().max() < 1e-15  # centred: a model's samples average to q̂


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quality=torch.full((2, 3), float("nan"))), "quality of query 0"),
        (dict(cost=-torch.ones(2, 3)), "cost of query 0 is negative"),
        (dict(run=torch.zeros(2, 4, dtype=torch.bool)), "run must be a bool tensor"),
        (dict(cov=torch.ones(2, 3, 3) * torch.tensor([1.0, -1.0]).view(2, 1, 1)), "negative variance"),
    ],
)
def test_bad_inputs_name_the_field(kwargs, message):
    args = dict(quality=torch.rand(2, 3), cost=torch.rand(2, 3), run=torch.zeros(2, 3, dtype=torch.bool))
    args.update(kwargs)
    cov = args.pop("cov", None)
    with pytest.raises(ValueError, match=message):
        decide(args["quality"], args["cost"], args["run"], Strategy("routing", 1, lambdas=[1.0]), cov=cov)


def test_cascade_needs_prefix_run_sets():
    run = torch.tensor([[False, True, False]])
    with pytest.raises(ValueError, match="not a prefix"):
        decide(torch.rand(1, 3), torch.rand(1, 3), run, Strategy("cascade", 2, lambdas=[1.0, 1.0]))


def test_non_psd_covariance_is_reported():
    cov = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="query 0 is not positive semi-definite"):
        factorize(cov)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    b, k = 512, 10
    quality, cost = torch.rand(b, k), torch.rand(b, k) * 1e-3
    cov = torch.diag_embed(torch.rand(b, k) * 0.05)
    run = torch.rand(b, k) < 0.2
    strategy = Strategy("cascade_routing", 4, lambdas=[200.0] * 4)
    cpu = decide(quality, cost, run, strategy, cov=cov, config=KernelConfig(dtype=torch.float64))
    gpu = decide(
        quality.cuda(), cost.cuda(), run.cuda(), strategy, cov=cov.cuda(), config=KernelConfig(dtype=torch.float64)
    )
    assert torch.equal(cpu.next_model, gpu.next_model.cpu())
    assert torch.equal(cpu.supermodel, gpu.supermodel.cpu())


@pytest.mark.parametrize("expensive, expected", [(False, 0), (True, 1)])
def test_near_ties_within_tolerance_follow_the_tie_break(expensive, expected):
    quality = torch.tensor([[0.5, 0.5 + 4e-7, 0.2]])
    cost = torch.tensor([[1e-4, 2e-4, 1e-5]])
    out = decide(
        quality, cost, torch.zeros(1, 3, dtype=torch.bool), Strategy("routing", 1, lambdas=[0.0]),
        expensive=torch.tensor([expensive]),
    )
    assert out.next_model.tolist() == [expected]


def test_equal_costs_within_a_tie_go_to_the_first_listed():
    quality = torch.tensor([[0.5, 0.5 + 4e-7]])
    cost = torch.tensor([[1e-4, 1e-4]])
    out = decide(quality, cost, torch.zeros(1, 2, dtype=torch.bool), Strategy("routing", 1, lambdas=[10.0]))
    assert out.next_model.tolist() == [0]


def test_sigma_scale_multiplies_the_covariance():
    torch.manual_seed(3)
    b, k = 40, 6
    quality, cost = torch.rand(b, k, dtype=torch.float64), torch.rand(b, k, dtype=torch.float64) * 1e-3
    cov = torch.diag_embed(torch.rand(b, k, dtype=torch.float64) * 0.05)
    run = torch.zeros(b, k, dtype=torch.bool)
    base = Strategy("cascade_routing", 3, lambdas=[200.0] * 3)
    config = KernelConfig(dtype=torch.float64)
    for scale, reference_cov in ((0.0, None), (2.5, cov * 2.5)):
        scaled = decide(quality, cost, run, base.replace(sigma_scale=scale), cov=cov, config=config)
        reference = decide(quality, cost, run, base, cov=reference_cov, config=config)
        assert torch.equal(scaled.supermodel, reference.supermodel)
    with pytest.raises(ValueError, match="sigma_scale must be finite and >= 0"):
        base.replace(sigma_scale=-1.0)
