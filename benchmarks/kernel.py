"""Time one cascade-routing decision step: the vectorized kernel against the reference's algorithm.

    python benchmarks/kernel.py [--queries 10000] [--models 11] [--depth 5] [--samples 100] [--subset 40]
                                [--lam 300] [--repeats 3] [--threads 1,2]

Workload (issue #2): 10,000 queries, k = 11 models, depth cap 5, 100 QMC samples, diagonal Σ, the
first step (no model run yet, so every one of the 1,023 capped supermodels is a candidate). Contenders:

- reference algorithm: `reference_port.py`, the reference's per-query `_predict_model` (enumeration,
  Lemma-1 pruning, expected max) in numpy float64, on the first `--subset` queries;
- numpy per query: `numpy_per_query.py`, every candidate of one query at once, same subset;
- kernel: `router_train.kernel.decide` (default config, float32) on the whole batch, on CPU and, when
  CUDA is present, on the GPU. On CPU the default is the fused C kernel (`router_train/kernel/fused.py`);
  the torch backend it replaces (`zeta` or `levels`, whichever `auto` picks without it) runs too, and
  its decisions on the whole batch must equal the fused kernel's.

All share the kernel's samples, candidate order and tie rule (best `E[max] - λ cost`, ties within
`TIE_TOL` to the cheapest, then the first listed), so their decisions must be identical: the script
exits 1 if any contender's next model differs from the reference port's on a query of the subset.
Each contender runs once to warm up, then `--repeats` timed passes over the same inputs; the best
counts. For each `--threads` value every contender runs under that many threads (torch and numpy's
BLAS). Prints per-decision times and, last, `speedup_vs_reference_algorithm: <ratio>`: the reference
port's time per decision over the kernel's (CPU, the largest `--threads` value).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy_per_query  # noqa: E402
import reference_port  # noqa: E402

from router_train.kernel import KernelConfig, decide, subset_table  # noqa: E402
from router_train.kernel.expected_max import choose_method  # noqa: E402
from router_train.kernel.fused import available as fused_available  # noqa: E402
from router_train.strategy import Strategy  # noqa: E402


def workload(n: int, k: int, seed: int):
    """Random but realistic inputs: qualities in [0, 1], costs spanning 100x, ex-ante variances."""
    gen = torch.Generator().manual_seed(seed)
    quality = torch.rand(n, k, generator=gen, dtype=torch.float64)
    cost = 1e-5 * torch.logspace(0, 2, k, dtype=torch.float64) * (0.5 + torch.rand(n, k, generator=gen, dtype=torch.float64))
    cov = torch.diag_embed(0.05 * torch.rand(n, k, generator=gen, dtype=torch.float64))
    return quality, cost, cov


def best_time(fn: Callable[[], np.ndarray], repeats: int, sync: Callable[[], None] = lambda: None):
    """One warm-up call, then the best wall time (seconds) of `repeats` calls, and the last call's result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def per_query(module, quality, cost, cov, strategy: Strategy, n_samples: int) -> Callable[[], np.ndarray]:
    """A pass of `module.decide_query` over the given queries (first step): their next models."""
    def run() -> np.ndarray:
        return np.array([
            module.decide_query(quality[i], cost[i], [], cov[i], strategy.lambdas, strategy.max_depth,
                                force_order=strategy.force_order, n_samples=n_samples)[0]
            for i in range(len(quality))
        ])
    return run


def kernel_pass(quality, cost, cov, strategy: Strategy, config: KernelConfig, device: str) -> Callable[[], np.ndarray]:
    """A `decide` call on `device` for the whole batch (first step): the next models."""
    args = [x.to(device) for x in (quality, cost, cov)]
    run = torch.zeros(quality.shape, dtype=torch.bool, device=device)
    return lambda: decide(args[0], args[1], run, strategy, cov=args[2], config=config).next_model.cpu().numpy()


def parse_threads(text: str) -> list[int]:
    """`"1,2"` -> [1, 2]; a clear error for anything that is not a list of positive integers."""
    try:
        values = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated positive integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise SystemExit(f"--threads must be comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--models", type=int, default=11)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--subset", type=int, default=40, help="queries timed with the per-query contenders")
    p.add_argument("--lam", type=float, default=300.0, help="cost multiplier λ_0")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per contender (after one warm-up)")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="thread counts, e.g. 1,2")
    args = p.parse_args(argv)
    if not 1 <= args.subset <= args.queries or args.repeats < 1:
        raise SystemExit("need 1 <= --subset <= --queries and --repeats >= 1")
    threads = parse_threads(args.threads)

    quality, cost, cov = workload(args.queries, args.models, seed=0)
    strategy = Strategy("cascade_routing", args.depth, lambdas=[args.lam] * args.depth)
    config = KernelConfig(n_samples=args.samples)
    torch_config = KernelConfig(
        n_samples=args.samples, method=choose_method(args.models, args.samples, subset_table(args.models, args.depth))
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {load}")
    print(f"kernel: {'fused C kernel' if fused_available() else 'torch backends (no C compiler)'}; "
          f"torch backend for comparison: {torch_config.method}")
    print(f"workload: {args.queries} queries, k={args.models}, depth {args.depth}, {args.samples} samples, "
          f"diagonal Σ, λ={args.lam:g}; per-query contenders on the first {args.subset}; best of {args.repeats}")

    s = args.subset
    q, c, sigma = quality[:s].numpy(), cost[:s].numpy(), cov[:s].numpy()
    contenders = {
        "reference algorithm (port)": per_query(reference_port, q, c, sigma, strategy, args.samples),
        "numpy per query": per_query(numpy_per_query, q, c, sigma, strategy, args.samples),
    }
    decisions: dict[str, np.ndarray] = {}
    ratio = float("nan")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        with threadpool_limits(limits=n_threads):
            times = {}
            for name, fn in contenders.items():
                seconds, decisions[f"{name}, {n_threads} thread(s)"] = best_time(fn, args.repeats)
                times[name] = seconds / s
                print(f"{name}, {n_threads} thread(s): {times[name] * 1e3:.3f} ms/decision")
            seconds, out = best_time(kernel_pass(quality, cost, cov, strategy, config, "cpu"), args.repeats)
            torch_seconds, torch_out = best_time(
                kernel_pass(quality, cost, cov, strategy, torch_config, "cpu"), args.repeats
            )
        decisions[f"kernel cpu, {n_threads} thread(s)"] = out[:s]
        whole = np.flatnonzero(out != torch_out)
        if whole.size:
            print(f"DECISIONS DIFFER: kernel vs torch backend on {whole.size} of {args.queries} queries, e.g. "
                  f"{whole[:10].tolist()}", file=sys.stderr)
            return 1
        print(f"torch backend ({torch_config.method}), {n_threads} thread(s): "
              f"{torch_seconds / args.queries * 1e6:.1f} us/decision; identical decisions on all {args.queries} queries")
        kernel = seconds / args.queries
        ratio = times["reference algorithm (port)"] / kernel
        print(f"kernel cpu, {n_threads} thread(s): {seconds * 1e3:.1f} ms for {args.queries} queries = "
              f"{kernel * 1e6:.1f} us/decision; {ratio:.0f}x the reference algorithm, "
              f"{times['numpy per query'] / kernel:.0f}x numpy per query")
    if torch.cuda.is_available():
        seconds, out = best_time(kernel_pass(quality, cost, cov, strategy, config, "cuda"), args.repeats,
                                 torch.cuda.synchronize)
        decisions["kernel cuda"] = out[:s]
        print(f"kernel cuda ({torch.cuda.get_device_name()}): {seconds * 1e3:.1f} ms = "
              f"{seconds / args.queries * 1e6:.2f} us/decision; "
              f"{times['reference algorithm (port)'] / (seconds / args.queries):.0f}x the reference algorithm")

    first = next(iter(decisions))
    differ = {name: np.flatnonzero(d != decisions[first]) for name, d in decisions.items()}
    differ = {name: rows for name, rows in differ.items() if rows.size}
    if differ:
        for name, rows in differ.items():
            print(f"DECISIONS DIFFER: {name} vs {first} on queries {rows.tolist()}: "
                  f"{decisions[name][rows].tolist()} vs {decisions[first][rows].tolist()}", file=sys.stderr)
        return 1
    print(f"decisions: identical next models for all {len(decisions)} runs on the {s} subset queries")
    print(f"speedup_vs_reference_algorithm: {ratio:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
