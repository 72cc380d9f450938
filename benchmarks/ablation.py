"""Which parts of the learned estimator earn their place: log-loss of variants on held-back TRAINING queries.

    python benchmarks/ablation.py --data ../shared/data/rlc_train.parquet --split seeded --test-fraction 0.5 \\
        [--config configs/default.yaml] [--seeds 0,1,2] [--threads 1]

For each seed, the training split of the table (its test split is never read) is divided into 70 % to
fit and 30 % held back; every variant is fitted on the first part and scored on the second, at the
states a cascade router meets (cascade prefixes and random run sets up to the depth cap): binary
cross-entropy of the estimates of the models that have run (post-hoc) and of those that have not
(ex-ante, given the answers seen). Variants, each the recipe's estimator with one part removed:
`full`; `no_transformer` (`layers: 0`: model tokens without attention); `no_deep` (`epochs: 0`: no
ex-ante MLP, no token readout: prior + wide regression); `no_neighbors` (`neighbors: 0`: per-source
means as the prior); and the `logreg` baseline. Prints one row per variant: mean over seeds, and the
mean paired difference from `full` with its range over seeds.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from estimators.learned import LearnedConfig, LearnedEstimator
from estimators.logreg import LogRegEstimator
from estimators.run_sets import sample_run_sets
from router_train.config import load_config
from router_train.table import SPLIT_MODES, holdout, load_table

VARIANTS = ("full", "no_transformer", "no_deep", "no_neighbors", "logreg")


def variant_config(base: LearnedConfig, name: str) -> LearnedConfig:
    """The recipe's estimator config with one part removed."""
    config = copy.deepcopy(base)
    if name == "no_transformer":
        config.layers = 0
    elif name == "no_deep":
        config.train.epochs = 0
    elif name == "no_neighbors":
        config.neighbors = 0
    return config


def score(estimator, table, seed: int, max_depth: int) -> dict[str, float]:
    """Log-loss of post-hoc (run) and ex-ante (not run) estimates at sampled states of `table`."""
    rows, run = sample_run_sets(table.n, table.k, max_depth, 2, torch.Generator().manual_seed(seed + 1))
    quality = estimator.predict(estimator.featurize(table), rows, run).quality.clamp(1e-6, 1 - 1e-6)
    loss = F.binary_cross_entropy(quality, table.quality[rows].to(quality.dtype), reduction="none")
    return {
        "all": float(loss.mean()),
        "post_hoc": float(loss[run].mean()),
        "ex_ante": float(loss[~run].mean()),
        "first_step": float(loss[run.sum(1) == 0].mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="auto", choices=SPLIT_MODES)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--missing", default="error", choices=["error", "drop"])
    p.add_argument("--config", default="configs/default.yaml", help="recipe whose `estimator` section is ablated")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split of the table and of its training part)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.config).estimator
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: --variants has unknown names {unknown}; choose from {list(VARIANTS)}")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in (int(s) for s in args.seeds.split(",")):
        table = load_table(args.data, split=args.split, test_fraction=args.test_fraction, missing=args.missing,
                           seed=seed)
        fit, held = holdout(table.train(), 0.3, seed)
        depth = base.train.max_depth
        for name in variants:
            start = time.perf_counter()
            if name == "logreg":
                estimator = LogRegEstimator(max_depth=depth, seed=seed).fit(fit)
            else:
                estimator = LearnedEstimator(variant_config(base, name)).fit(fit)
            row = score(estimator, held, seed, depth) | {"fit_s": time.perf_counter() - start}
            results[name].append(row)
            print(f"seed {seed} {name:>15s}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    print(f"\n| variant | all | post-hoc | ex-ante | first step | all − full (min, max over {len(results[variants[0]])} seeds) |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        rows = results[name]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("all", "post_hoc", "ex_ante", "first_step")}
        line = f"| {name} | {mean['all']:.4f} | {mean['post_hoc']:.4f} | {mean['ex_ante']:.4f} | {mean['first_step']:.4f} |"
        if "full" in results and name != "full":
            diffs = [r["all"] - f["all"] for r, f in zip(rows, results["full"])]
            line += f" {sum(diffs) / len(diffs):+.4f} ({min(diffs):+.4f}, {max(diffs):+.4f}) |"
        else:
            line += " |"
        print(line)
    return results


if __name__ == "__main__":
    main()
