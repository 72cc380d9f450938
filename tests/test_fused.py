"""The fused C kernel decides exactly as the torch `levels` backend, and falls back cleanly without a compiler."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router_train.kernel import KernelConfig, decide, fused
from router_train.strategy import Strategy

GRID = [0.0, 0.25, 0.5, 0.5 + 4e-7, 0.75, 1.0]  # 0.5 + 4e-7 ties 0.5 within the tolerance

needs_compiler = pytest.mark.skipif(not fused.available(), reason="no working C compiler here: the fused kernel is off")


@st.composite
def batches(draw):
    """A batch with rows at every step, ties (grid qualities, shared prices), every kind of Σ."""
    k = draw(st.integers(1, 12))
    depth = draw(st.integers(1, min(k, 5)))
    b = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    tied = draw(st.booleans())
    quality = rng.choice(GRID, (b, k)) if tied else rng.random((b, k))
    cost = rng.choice([1e-5, 1e-4, 2e-4], (b, k)) if tied else rng.random((b, k)) * 1e-3
    run = np.zeros((b, k), dtype=bool)
    for row in range(b):
        run[row, rng.choice(k, rng.integers(0, depth), replace=False)] = True
    kind = draw(st.sampled_from(["none", "diagonal", "full"]))
    cov = None
    if kind != "none":
        a = rng.normal(size=(b, k, k)) * 0.2
        cov = a @ a.transpose(0, 2, 1) / k if kind == "full" else np.stack([np.diag(d) for d in rng.uniform(0, 0.05, (b, k))])
        cov[run] = 0.0
        cov.transpose(0, 2, 1)[run] = 0.0
    lam = draw(st.sampled_from([0.0, 100.0, 1000.0, 5000.0]))
    strategy = Strategy("cascade_routing" if depth > 1 else "routing", depth, lambdas=[lam] * depth,
                        force_order=draw(st.booleans()) and depth > 1)
    expensive = torch.tensor(rng.random(b) < 0.5)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    tensors = (torch.tensor(quality), torch.tensor(cost), torch.tensor(run), None if cov is None else torch.tensor(cov))
    return tensors, strategy, expensive, dtype


def decisions(case, method: str):
    (quality, cost, run, cov), strategy, expensive, dtype = case
    out = decide(quality, cost, run, strategy, cov=cov, expensive=expensive,
                 config=KernelConfig(n_samples=24, dtype=dtype, method=method))
    return out.next_model.tolist(), out.answer_model.tolist(), out.supermodel.tolist()


@needs_compiler
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_fused_decides_as_the_levels_backend(case):
    assert decisions(case, "fused") == decisions(case, "levels")


@needs_compiler
def test_rows_split_over_threads_decide_as_one_thread():
    gen = torch.Generator().manual_seed(0)
    b, k = 1000, 9
    quality, cost = torch.rand(b, k, generator=gen, dtype=torch.float64), torch.rand(b, k, generator=gen, dtype=torch.float64) * 1e-3
    cov = torch.diag_embed(0.05 * torch.rand(b, k, generator=gen, dtype=torch.float64))
    run = torch.zeros(b, k, dtype=torch.bool)
    strategy = Strategy("cascade_routing", 3, lambdas=[300.0] * 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decide(quality, cost, run, strategy, cov=cov, config=KernelConfig(method="fused")).supermodel
        torch.set_num_threads(4)  # more threads than cores still splits the rows into disjoint ranges
        four = decide(quality, cost, run, strategy, cov=cov, config=KernelConfig(method="fused")).supermodel
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)


def test_without_a_compiler_auto_falls_back_and_fused_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ROUTER_TRAIN_CACHE", str(tmp_path / "cache"))  # nothing compiled there yet
    fused.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused decision kernel is unavailable"):
            assert not fused.available()
        quality, cost = torch.rand(6, 4, dtype=torch.float64), torch.rand(6, 4, dtype=torch.float64) * 1e-3
        run = torch.zeros(6, 4, dtype=torch.bool)
        strategy = Strategy("cascade_routing", 2, lambdas=[100.0, 100.0])
        auto = decide(quality, cost, run, strategy, config=KernelConfig(method="auto"))
        levels = decide(quality, cost, run, strategy, config=KernelConfig(method="levels"))
        assert torch.equal(auto.supermodel, levels.supermodel)
        with pytest.raises(ValueError, match="needs a working C compiler"):
            decide(quality, cost, run, strategy, config=KernelConfig(method="fused"))
    finally:
        monkeypatch.undo()
        fused.library.cache_clear()  # the next caller loads the real one again


@needs_compiler
def test_compiled_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTER_TRAIN_CACHE", str(tmp_path))
    fused.library.cache_clear()
    try:
        assert fused.available()
        (built,) = (tmp_path / "kernels").glob("fused-*.so")
        stamp = built.stat().st_mtime_ns
        fused.library.cache_clear()
        def no_compiling(*args):
            raise AssertionError("compiled again although a build was cached")

        monkeypatch.setattr(fused, "_compile", no_compiling)
        assert fused.available() and built.stat().st_mtime_ns == stamp
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]  # no temporary files left
    finally:
        monkeypatch.undo()
        fused.library.cache_clear()


def test_method_names_are_checked():
    with pytest.raises(ValueError, match="KernelConfig.method"):
        KernelConfig(method="fast")


@needs_compiler
@pytest.mark.parametrize("prefix_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidate_values_are_the_levels_backends(prefix_only, dtype):
    """`build_candidates(method="fused")` (what the simulator caches): the same candidates, costs and
    validity as the `levels` backend, values equal up to the rounding of the sample means."""
    from router_train.kernel import build_candidates, normal_samples
    from router_train.kernel.decide import factorize

    gen = torch.Generator().manual_seed(3)
    b, k = 50, 9
    quality = torch.rand(b, k, generator=gen, dtype=torch.float64)
    cost = torch.rand(b, k, generator=gen, dtype=torch.float64) * 1e-3
    a = torch.randn(b, k, k, generator=gen, dtype=torch.float64) * 0.2
    factor = factorize(a @ a.transpose(1, 2) / k, dtype=dtype)
    z = normal_samples(40, k, 0, dtype=dtype)
    for t in range(3):
        run = torch.zeros(b, k, dtype=torch.bool)
        run[:, :t] = True  # a prefix: valid for both tables
        args = (quality.to(dtype), factor, cost, run, z)
        got = build_candidates(*args, max_depth=4, prefix_only=prefix_only, method="fused")
        ref = build_candidates(*args, max_depth=4, prefix_only=prefix_only, method="levels")
        assert got.value.dtype == ref.value.dtype and got.value.shape == ref.value.shape
        finite = torch.isfinite(ref.value)
        assert torch.equal(finite, torch.isfinite(got.value))
        assert torch.allclose(got.value[finite], ref.value[finite], atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert torch.equal(got.cost, ref.cost) and torch.equal(got.valid, ref.valid)
        assert torch.equal(got.run_mask, ref.run_mask) and torch.equal(got.comp, ref.comp)
