"""Calibration wall time and memory: the bundled-size real tables, and how both grow with the queries.

    python benchmarks/calibration.py tables [--workers N] [--repeats 2]
    python benchmarks/calibration.py scaling [--sizes 10000,100000,1000000] [--workers N]

`tables`: `python -m router_train.evaluate` as a user runs it (noisy estimator, 20 budgets, every
method, `--threads 2`) on `llmrouter` (9 models, depth 4) and `mmlu_pro` (29 models, depth 3,
`--missing drop`), from `../shared/data`; prints each run's wall time as evaluate reports it.

`scaling`: synthetic tables of k = 9 models (qualities correlated through a per-query difficulty,
costs rising with the model), cascade routing capped at depth 3, the noisy estimator, 20 budgets,
every method (evaluate's pipeline, scored on a 1,000-query test table). Each size runs in its own
process, so its peak memory (max RSS of the process and of its calibration workers) is its own.
Prints wall time, peak memory and, between consecutive sizes, their growth against the growth in
queries (≤ 1: at most linear).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimators import NoisyEstimator  # noqa: E402
from router_train.evaluate import EvaluationConfig, default_workers, evaluate  # noqa: E402
from router_train.table import RoutingTable  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TABLES = {
    "llmrouter": ["--data", str(DATA / "llmrouter.parquet"), "--max-depth", "4"],
    "mmlu_pro": ["--data", str(DATA / "mmlu_pro.parquet"), "--missing", "drop", "--max-depth", "3"],
}


def synthetic_table(n: int, k: int = 9, seed: int = 0) -> RoutingTable:
    """n queries × k models: model j is right with probability rising with j and falling with the
    query's difficulty; costs double from one model to the next, ±25 % per query."""
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.35, 0.9, k)
    difficulty = rng.random((n, 1))
    quality = (rng.random((n, k)) < skill * (1.25 - 0.7 * difficulty)).astype(np.float64)
    cost = 1e-5 * 2.0 ** np.arange(k) * (1 + 0.5 * (rng.random((n, k)) - 0.5))
    ids = [f"q{i}" for i in range(n)]
    return RoutingTable(
        models=[f"model-{j}" for j in range(k)], query_ids=ids, queries=ids, sources=[f"task{i % 5}" for i in range(n)],
        is_test=torch.zeros(n, dtype=torch.bool), quality=torch.tensor(quality), cost=torch.tensor(cost),
    )


def peak_rss_mib() -> tuple[float, float]:
    """Max RSS of this process and of its largest finished child (Linux reports KiB)."""
    scale = 1 / 1024 if platform.system() == "Linux" else 1 / 1024**2
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, children


def one_size(n: int, workers: int, budgets: int = 20, test_size: int = 1000) -> dict:
    """Calibrate every method on a synthetic table of n queries; wall time and peak memory."""
    torch.set_num_threads(1)
    train, test = synthetic_table(n, seed=0), synthetic_table(test_size, seed=1)
    estimator = NoisyEstimator("low", seed=0).fit(train)
    config = EvaluationConfig(max_depth=3, n_budgets=budgets, n_bootstrap=100, workers=workers)
    start = time.perf_counter()
    evaluate(train, test, estimator, config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    own, children = peak_rss_mib()
    return {"queries": n, "seconds": seconds, "peak_mib": own, "worker_peak_mib": children}


def scaling(sizes: list[int], workers: int, budgets: int, test_size: int) -> None:
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "one", "--size", str(n), "--workers", str(workers), "--budgets", str(budgets),
             "--test-size", str(test_size)],
            check=True, stdout=subprocess.PIPE, text=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>9,d} queries: {row['seconds']:8.1f} s   peak {row['peak_mib']:8.0f} MiB "
              f"(workers {row['worker_peak_mib']:.0f} MiB)", flush=True)
    for a, b in zip(rows, rows[1:]):
        growth = b["queries"] / a["queries"]
        print(f"{a['queries']:,} -> {b['queries']:,} ({growth:.0f}x queries): time x{b['seconds'] / a['seconds']:.2f} "
              f"(vs linear {b['seconds'] / a['seconds'] / growth:.2f}), memory x"
              f"{max(b['peak_mib'], b['worker_peak_mib']) / max(a['peak_mib'], a['worker_peak_mib']):.2f}")


def tables(workers: int, repeats: int) -> None:
    for name, args in TABLES.items():
        for _ in range(repeats):
            out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"calibration-bench-{name}"
            cmd = [sys.executable, "-m", "router_train.evaluate", *args, "--estimator", "noisy", "--threads", "2",
                   "--workers", str(workers), "--out", str(out_dir), "--overwrite"]
            result = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
            wall = [line for line in result.stdout.splitlines() if line.startswith("wall time")][-1]
            timings = [line.strip() for line in result.stderr.splitlines() if "calibrated and scored" in line]
            print(f"{name}: {wall.split(' -> ')[0]}   ({'; '.join(timings)})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["tables", "scaling", "one"])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--budgets", type=int, default=20, help="budgets per method (scaling)")
    p.add_argument("--test-size", type=int, default=1000, help="queries of the synthetic test table (scaling)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, workers {args.workers}",
          file=sys.stderr)
    if args.what == "one":
        print(json.dumps(one_size(args.size, args.workers, args.budgets, args.test_size)))
    elif args.what == "scaling":
        scaling([int(x) for x in args.sizes.split(",")], args.workers, args.budgets, args.test_size)
    else:
        tables(args.workers, args.repeats)


if __name__ == "__main__":
    main()
