"""Time to fit one learned estimator, with stage 0 (the wide regression's L-BFGS) on sparse raw features
(the default on the CPU from `training.SPARSE_MIN_FEATURES` features on) against the dense standardized ones,
in the same run.

    python benchmarks/fit_time.py [--data ../shared/data/mmlu_pro.parquet] [--missing drop] [--queries 2000] \\
        [--config configs/default.yaml] [--threads 2]

Fits one network (`ensemble` forced to 1) on the first `--queries` training queries of the table (its
`split` column, else a seeded split), once per variant, after a warm-up fit of the first variant on a
tenth of them (imports, embedding cache). Prints per variant the whole fit and stage 0 alone (wall
seconds), the largest difference of their quality estimates over 1,000 sampled states (the two solve the
same regression, so it is small but not 0: L-BFGS follows a slightly different float path), and last
`stage0_dense_over_sparse: <ratio>`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import estimators.training as training
from estimators.learned import LearnedEstimator
from estimators.run_sets import sample_run_sets
from router_train.config import load_config
from router_train.table import load_table


def fit(table, config, sparse: bool) -> tuple[LearnedEstimator, float, float]:
    """(the fitted estimator, whole fit seconds, stage-0 seconds) with stage 0 sparse or dense."""
    original, spent = training.fit_shallow, []

    def stage0(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs, sparse=sparse)
        finally:
            spent.append(time.perf_counter() - start)

    training.fit_shallow = stage0
    try:
        start = time.perf_counter()
        estimator = LearnedEstimator(config).fit(table)
        return estimator, time.perf_counter() - start, sum(spent)
    finally:
        training.fit_shallow = original


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/mmlu_pro.parquet")
    p.add_argument("--missing", default="drop", choices=["error", "drop"])
    p.add_argument("--queries", type=int, default=2000, help="training queries fitted on (the first ones)")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_table(args.data, missing=args.missing, split="auto").train()
    table = table.subset(torch.arange(min(args.queries, table.n)))
    config = load_config(args.config).estimator
    config.ensemble = 1
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"workload: {table.n} queries x {table.k} models of {args.data}, one network ({args.config})")
    fit(table.subset(torch.arange(max(table.n // 10, 20))), config, sparse=False)  # warm-up
    results = {}
    for name, sparse in (("dense", False), ("sparse", True)):
        estimator, whole, stage0 = fit(table, config, sparse)
        results[name] = (estimator, stage0)
        print(f"{name:>6s} stage 0: fit {whole:7.1f} s, of which stage 0 {stage0:7.1f} s")
    rows, run = sample_run_sets(table.n, table.k, 3, 1, torch.Generator().manual_seed(0))
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))[:1000]
    estimates = [r[0].predict(r[0].featurize(table), rows[pick], run[pick]).quality for r in results.values()]
    print(f"largest difference of the quality estimates: {float((estimates[0] - estimates[1]).abs().max()):.2e}")
    print(f"stage0_dense_over_sparse: {results['dense'][1] / results['sparse'][1]:.2f}")


if __name__ == "__main__":
    main()
