"""How much each quality estimator knows about which model suits a query, measured on training data only.

    python benchmarks/estimator_signal.py --data ../shared/data/llmrouter.parquet [--split auto] [--config ...]

The training split is divided as `evaluate` divides it (estimators fit on 1 − holdout, the rest held
back). On the held-back queries each estimator's ex-ante estimates route every query to
argmax_j q̂_j − λ ĉ_j for a sweep of λ; the AUC of the resulting curve (λ chosen with hindsight, so no
calibration noise) measures how well the estimates rank the models per query. Also printed: log-loss,
the MSE of per-query centred qualities (q̂_j − mean_j q̂ against the same for the truth: the part of the
estimate routing uses), and a paired bootstrap interval of each AUC's difference from `logreg`.
Estimators: the source-tag means alone, the neighbour prior at several K, `logreg`, `knn`, `learned`
(with `--learned-seeds N`: also the learned estimator trained at seeds 1..N−1 and the mean of the N
seeds' estimates, a deep ensemble); the priors and `knn` use the learned estimator's encoder
(fine-tuned, when the recipe fine-tunes).
The test split is never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from estimators.encoder import cached
from estimators.knn import KNNEstimator
from estimators.learned import LearnedConfig, LearnedEstimator
from estimators.logreg import LogRegEstimator
from estimators.neighbors import NeighborPrior
from router_train.config import load_config
from router_train.metrics import auc, auc_bounds, single_model_points, upper_hull
from router_train.table import SPLIT_MODES, holdout, load_table

LAMBDAS = np.concatenate([[0.0], np.geomspace(1e-3, 1e6, 200)])


def routing_choices(q_hat: np.ndarray, c_hat: np.ndarray) -> np.ndarray:
    """(n_lambda, n) model chosen per query at each λ of the sweep."""
    return np.stack([(q_hat - lam * c_hat).argmax(1) for lam in LAMBDAS])


def sweep_auc(choices: np.ndarray, quality: np.ndarray, cost: np.ndarray, rows: np.ndarray) -> float:
    """AUC of the hindsight-λ routing curve on `rows` (indices, repeats allowed)."""
    picked = choices[:, rows]
    q = quality[rows[None, :], picked].mean(1)
    c = cost[rows[None, :], picked].mean(1)
    return auc(upper_hull(np.stack([c, q], 1)), *auc_bounds(single_model_points(quality[rows], cost[rows])))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Print the comparison table; returns its rows by estimator name."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="auto", choices=SPLIT_MODES)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--missing", default="error", choices=["error", "drop"])
    p.add_argument("--config", default="configs/default.yaml", help="recipe whose estimator section `learned` uses")
    p.add_argument("--holdout", type=float, default=0.25)
    p.add_argument("--max-depth", type=int, default=3)
    p.add_argument("--neighbors", default="0,30,100", help="K of the neighbour priors to compare (0: tag means)")
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learned-seeds", type=int, default=1, help="N > 1: also learned at N training seeds and their mean")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    try:
        neighbor_counts = [int(x) for x in args.neighbors.split(",")]
    except ValueError:
        p.error(f"--neighbors takes comma-separated integers, got {args.neighbors!r}")
    if args.learned_seeds < 1:
        p.error(f"--learned-seeds must be >= 1, got {args.learned_seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_table(args.data, split=args.split, test_fraction=args.test_fraction, missing=args.missing, seed=args.seed)
    fit, held = holdout(table.train(), args.holdout, args.seed)
    config: LearnedConfig = load_config(args.config).estimator
    print(f"{args.data}: estimators fit on {fit.n} training queries, scored on {held.n} held-back ones, {fit.k} models")

    rows, none_run = torch.arange(held.n), torch.zeros(held.n, held.k, dtype=torch.bool)
    learned = LearnedEstimator(config)
    start = time.perf_counter()
    learned.fit(fit, progress=True)
    learned_s = time.perf_counter() - start
    held_features = learned.featurize(held)
    learned_estimate = learned.predict(held_features, rows, none_run)
    estimates: dict[str, tuple[torch.Tensor, float]] = {}  # ex-ante quality estimates (held.n, k), fit seconds
    embed_fit, src_fit = learned.embed(list(fit.queries)), learned.source_index(fit.sources)
    for n_neighbors in neighbor_counts:
        prior = NeighborPrior(n_neighbors, config.neighbor_shrink).fit(
            embed_fit, fit.quality.float(), src_fit, len(learned.sources)
        )
        name = "tag means" if n_neighbors == 0 else f"neighbour prior K={n_neighbors}"
        estimates[name] = (prior.probabilities(held_features["embedding"], held_features["source"]), 0.0)

    def ex_ante(build) -> tuple[torch.Tensor, float]:
        """Fit an estimator with `build()`: its ex-ante estimates of the held-back queries, and the fit seconds."""
        start = time.perf_counter()
        est = build()
        seconds = time.perf_counter() - start
        return est.predict(est.featurize(held), rows, none_run).quality, seconds

    others = {
        "logreg": lambda: LogRegEstimator(max_depth=args.max_depth, seed=args.seed).fit(fit),
        "knn": lambda: KNNEstimator(cached(learned.encoder, config.embedding_cache), seed=args.seed).fit(fit),
    }
    for name, build in others.items():
        estimates[name] = ex_ante(build)
    estimates["learned"] = (learned_estimate.quality, learned_s)
    seeds = range(config.train.seed + 1, config.train.seed + args.learned_seeds)
    shared = None if config.finetune else learned.encoder  # a fine-tuned encoder is each seed's own
    for seed in seeds:
        other = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
        estimates[f"learned seed {seed}"] = ex_ante(lambda: LearnedEstimator(other, encoder=shared).fit(fit))
    if seeds:
        members = [estimates["learned"][0], *(estimates[f"learned seed {seed}"][0] for seed in seeds)]
        estimates[f"learned, mean of {len(members)} seeds"] = (torch.stack(members).mean(0), 0.0)

    quality, true_cost = held.quality.double().numpy(), held.cost.double().numpy()
    cost = learned_estimate.cost.double().numpy()  # the same cost model in every estimator
    results = {}
    for name, (q_hat, seconds) in estimates.items():
        q_hat = q_hat.double().numpy()
        log_loss = -np.mean(quality * np.log(np.clip(q_hat, 1e-4, 1)) + (1 - quality) * np.log(np.clip(1 - q_hat, 1e-4, 1)))
        centred = np.mean(((q_hat - q_hat.mean(1, keepdims=True)) - (quality - quality.mean(1, keepdims=True))) ** 2)
        results[name] = (routing_choices(q_hat, cost), log_loss, centred, seconds)

    gen = np.random.default_rng(args.seed)
    samples = [gen.integers(0, held.n, held.n) for _ in range(args.bootstrap)]
    everything = np.arange(held.n)
    base = sweep_auc(results["logreg"][0], quality, true_cost, everything)
    base_samples = np.array([sweep_auc(results["logreg"][0], quality, true_cost, s) for s in samples])
    table_rows = {}
    print("| estimator | routing AUC (hindsight λ) | − logreg [95 % bootstrap] | log-loss | centred MSE | fit s |")
    print("|---|---|---|---|---|---|")
    for name, (choices, log_loss, centred, seconds) in results.items():
        value = sweep_auc(choices, quality, true_cost, everything)
        diff = np.array([sweep_auc(choices, quality, true_cost, s) for s in samples]) - base_samples
        lo, hi = np.percentile(diff, [2.5, 97.5])
        table_rows[name] = {"auc": value, "vs_logreg": value - base, "vs_logreg_ci": (lo, hi),
                            "log_loss": log_loss, "centred_mse": centred}
        fit_s = f"{seconds:.1f}" if seconds else "–"
        print(f"| {name} | {value:.2f} | {value - base:+.2f} [{lo:+.2f}, {hi:+.2f}] | {log_loss:.4f} | {centred:.5f} | {fit_s} |")
    return table_rows


if __name__ == "__main__":
    main()
