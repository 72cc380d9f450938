"""What running a few models on every query and keeping one answer could reach, on training queries only.

    python benchmarks/agreement_ceiling.py --data ../shared/data/mmlu_pro.parquet --missing drop \
        --models gemini-1.5-flash-002,DeepSeek-Coder-V2,gemini-1.5-pro-002

A yardstick for cascade routing's gain over routing on a pool: if keeping the right one of a few answers
gains little over routing by source on the training queries, no router over those models gains much more.
K-fold by query over the training split (the test split is never read); every choice is fitted on the
other folds. Printed, mean quality and mean cost per query of: each listed model alone; routing by
source (each source's best model of the whole table); a majority vote among the listed models (no
majority: the best of them by mean quality); keeping, per (source, pattern of agreement among the listed
models), the listed model best in that cell (the source's best listed model where the cell has fewer than
`--min-cell` fitted queries: a handful of queries picks by chance); and the cascade
"run the first two listed, keep the first's answer when they agree, else run the last listed" (with two
listed, the second's answer, already paid for).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from estimators.features import answer_features
from router_train.table import SPLIT_MODES, load_table


def group_ids(groups: list) -> np.ndarray:
    """Integer id of each row's group (hashable labels), numbered in order of first appearance."""
    index: dict = {}
    return np.array([index.setdefault(g, len(index)) for g in groups])


def best_by_group(ids: np.ndarray, quality: np.ndarray, fit: np.ndarray, min_rows: int = 1) -> dict[int, int]:
    """Column of `quality` with the highest mean over the `fit` rows of each group id with at least `min_rows`."""
    out = {}
    for g in np.unique(ids[fit]):
        rows = fit & (ids == g)
        if rows.sum() >= min_rows:
            out[int(g)] = int(quality[rows].mean(0).argmax())
    return out


def ceilings(quality: np.ndarray, cost: np.ndarray, agree: np.ndarray, sources: list[str],
             models: list[str], listed: list[int], folds: int, seed: int,
             min_cell: int = 20) -> dict[str, tuple[float, float]]:
    """(mean quality, mean cost) of each policy of the module docstring, every choice fitted out of fold;
    `agree` (n, k, k) says which answers agree (`AnswerFeatures.agree`: a missing answer agrees with none,
    an answer with itself), `listed` the columns of the models run on every query."""
    n = len(quality)
    fold = np.random.default_rng(seed).integers(0, folds, n)
    pairs = list(itertools.combinations(listed, 2))
    source = group_ids(sources)
    cell = group_ids([(s, tuple(row)) for s, row in zip(sources, np.stack([agree[:, a, b] for a, b in pairs], 1))])
    support = agree[:, listed][:, :, listed].sum(2)  # listed answers equal to each listed model's, itself included
    majority = support.max(1) * 2 > len(listed)
    voted = np.array(listed)[support.argmax(1)]
    pick = {name: np.zeros(n, dtype=int) for name in ("route", "vote", "pattern")}
    for f in range(folds):
        fit, held = fold != f, fold == f
        by_source = best_by_group(source, quality, fit)
        overall = int(quality[fit].mean(0).argmax())
        listed_best = listed[int(quality[fit][:, listed].mean(0).argmax())]
        source_listed = {s: listed[j] for s, j in best_by_group(source, quality[:, listed], fit).items()}
        by_cell = {c: listed[j] for c, j in best_by_group(cell, quality[:, listed], fit, min_cell).items()}
        for i in np.flatnonzero(held):
            pick["route"][i] = by_source.get(source[i], overall)
            pick["vote"][i] = voted[i] if majority[i] else listed_best
            pick["pattern"][i] = by_cell.get(cell[i], source_listed.get(source[i], listed_best))
    rows = np.arange(n)
    every = cost[:, listed].sum(1).mean()
    out = {f"{models[j]} alone": (float(quality[:, j].mean()), float(cost[:, j].mean())) for j in listed}
    out["routing by source"] = (float(quality[rows, pick["route"]].mean()), float(cost[rows, pick["route"]].mean()))
    out["majority vote"] = (float(quality[rows, pick["vote"]].mean()), float(every))
    out["best per (source, agreement)"] = (float(quality[rows, pick["pattern"]].mean()), float(every))
    first, second, last = listed[0], listed[1], listed[-1]
    agreed = agree[:, first, second]
    out["first two agree, else last"] = (
        float(np.where(agreed, quality[:, first], quality[:, last]).mean()),
        float((cost[:, first] + cost[:, second] + np.where(agreed | (last == second), 0.0, cost[:, last])).mean()),
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Print the table; returns (mean quality, mean cost) by policy."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True, help="comma-separated: two or more models of the table")
    p.add_argument("--split", default="auto", choices=SPLIT_MODES)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--missing", default="error", choices=["error", "drop"])
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-cell", type=int, default=20,
                   help="fitted queries a (source, agreement) cell needs to choose its own model")
    args = p.parse_args(argv)
    table = load_table(args.data, missing=args.missing, split=args.split, test_fraction=args.test_fraction,
                       seed=args.seed).train()
    if table.answers is None:
        raise SystemExit(f"{args.data} has no `answer` column: agreement needs the models' answers")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in table.models]
    if len(names) < 2 or unknown:
        raise SystemExit(f"--models needs two or more of the table's models {table.models}; unknown: {unknown}")
    if args.folds < 2:
        raise SystemExit(f"--folds must be at least 2, got {args.folds}")
    agree = answer_features(table.answers, None, table.n, table.k).agree.bool().numpy()
    result = ceilings(table.quality.numpy(), table.cost.numpy(), agree, table.sources, table.models,
                      [table.models.index(m) for m in names], args.folds, args.seed, args.min_cell)
    print(f"{table.n} training queries, {args.folds}-fold; quality ×100, cost per query")
    print("| policy | quality | cost |\n|---|---|---|")
    for name, (q, c) in result.items():
        print(f"| {name} | {100 * q:.2f} | {c:.3g} |")
    return result


if __name__ == "__main__":
    main()
