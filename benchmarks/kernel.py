"""Time one cascade-routing decision step for many queries: vectorized kernel vs the per-query rule.

    python benchmarks/kernel.py [--queries 10000] [--models 11] [--depth 5] [--samples 100] [--subset 40]

Workload (issue #2): 10,000 queries, k = 11 models, depth cap 5, 100 QMC samples, diagonal Σ, the
first step (no model run yet, so every one of the 1,023 capped supermodels is a candidate). The plain
per-query implementation (tests/oracle.py: itertools over candidates, numpy per candidate) runs on the
first `--subset` queries of the same batch; its decisions are checked against the kernel's. Prints
per-decision times and, last, `speedup_vs_per_query: <ratio>` (per-query time / kernel time, CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from oracle import decide_one  # noqa: E402

from router_train.kernel import KernelConfig, decide  # noqa: E402
from router_train.strategy import Strategy  # noqa: E402


def workload(n: int, k: int, seed: int):
    """Random but realistic inputs: qualities in [0, 1], costs spanning 100x, ex-ante variances."""
    gen = torch.Generator().manual_seed(seed)
    quality = torch.rand(n, k, generator=gen, dtype=torch.float64)
    cost = 1e-5 * torch.logspace(0, 2, k, dtype=torch.float64) * (0.5 + torch.rand(n, k, generator=gen, dtype=torch.float64))
    cov = torch.diag_embed(0.05 * torch.rand(n, k, generator=gen, dtype=torch.float64))
    return quality, cost, cov


def time_kernel(quality, cost, cov, strategy, config, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-`repeats` wall time of one decide() call on `device`, and its decisions."""
    args = [x.to(device) for x in (quality, cost, cov)]
    run = torch.zeros(quality.shape, dtype=torch.bool, device=device)
    out = decide(args[0], args[1], run, strategy, cov=args[2], config=config)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = decide(args[0], args[1], run, strategy, cov=args[2], config=config)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out.next_model.cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--models", type=int, default=11)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--subset", type=int, default=40, help="queries timed with the per-query implementation")
    p.add_argument("--lam", type=float, default=300.0, help="cost multiplier λ_0")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    quality, cost, cov = workload(args.queries, args.models, seed=0)
    strategy = Strategy("cascade_routing", args.depth, lambdas=[args.lam] * args.depth)
    config = KernelConfig(n_samples=args.samples)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"workload: {args.queries} queries, k={args.models}, depth {args.depth}, {args.samples} samples, diagonal Σ")

    q, c, s = quality.numpy(), cost.numpy(), cov.numpy()
    start = time.perf_counter()
    reference = [
        decide_one(q[i], c[i], [], mode="cascade_routing", max_depth=args.depth, lambdas=list(strategy.lambdas),
                   cov=s[i], n_samples=args.samples)[0]
        for i in range(args.subset)
    ]
    per_query = (time.perf_counter() - start) / args.subset
    print(f"per-query implementation: {per_query * 1e3:.2f} ms/decision ({args.subset} queries)")

    results = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        seconds, decisions = time_kernel(quality, cost, cov, strategy, config, "cpu", args.repeats)
        agree = float(np.mean(decisions[: args.subset].numpy() == np.array(reference)))
        results[threads] = seconds / args.queries
        print(
            f"kernel cpu, {threads} thread(s): {seconds * 1e3:.1f} ms for {args.queries} queries = "
            f"{results[threads] * 1e6:.1f} us/decision, {per_query / results[threads]:.0f}x; "
            f"agreement with per-query on the subset: {agree:.3f}"
        )
    if torch.cuda.is_available():
        seconds, decisions = time_kernel(quality, cost, cov, strategy, config, "cuda", args.repeats)
        agree = float(np.mean(decisions[: args.subset].numpy() == np.array(reference)))
        print(
            f"kernel cuda ({torch.cuda.get_device_name()}): {seconds * 1e3:.1f} ms = "
            f"{seconds / args.queries * 1e6:.2f} us/decision, {per_query / (seconds / args.queries):.0f}x; "
            f"agreement {agree:.3f}"
        )
    best_cpu = results[max(results)]
    print(f"speedup_vs_per_query: {per_query / best_cpu:.1f}")


if __name__ == "__main__":
    main()
