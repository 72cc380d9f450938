"""Replay a routing table's test split through `CascadeRouter.route_batch`, step by step, as a serving
stack would: the stored answers stand in for calling the models. Prints the realized mean cost and
quality against the requested budget and the offline evaluation's figures for it.

    python examples/serving_loop.py --checkpoint checkpoints/default [--budget B] [--mode cascade_routing]
        [--data TABLE]   # default: the table the checkpoint was trained on (its test split)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from router_train import CascadeRouter
from router_train.config import TrainConfig, from_dict
from router_train.table import RoutingTable
from router_train.train import load_tables


def replay(
    router: CascadeRouter, table: RoutingTable, budget: float, mode: str = "cascade_routing"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Serve every query of `table` to completion; returns per-query (cost, quality, models run)."""
    table = table.in_model_order(router.models)
    n, k = table.n, table.k
    observed: list[list[dict]] = [[] for _ in range(n)]
    run = torch.zeros(n, k, dtype=torch.bool)
    answer = torch.full((n,), -1, dtype=torch.long)
    active = list(range(n))
    while active:
        decisions = router.route_batch(
            [table.queries[i] for i in active], [observed[i] for i in active], budget,
            mode=mode, sources=[table.sources[i] for i in active],
        )
        still = []
        for i, d in zip(active, decisions):
            if d.next_model is None:
                answer[i] = router.models.index(d.answer_model)
                continue
            j = router.models.index(d.next_model)  # "call" the model: read its stored result
            run[i, j] = True
            observed[i].append(_result(table, i, j))
            still.append(i)
        active = still
    cost = (table.cost * run).sum(1)
    quality = table.quality.gather(1, answer.unsqueeze(1)).squeeze(1)
    return cost, quality, run


def _result(table: RoutingTable, i: int, j: int) -> dict:
    """What a serving stack knows after calling model j on query i."""
    item = {"model": table.models[j], "answer": table.answers[i][j] if table.answers else None,
            "cost": float(table.cost[i, j])}
    for key, values in (("confidence", table.confidence), ("tokens_out", table.tokens_out)):
        if values is not None and bool(torch.isfinite(values[i, j])):
            item[key] = float(values[i, j])
    return item


def test_split(manifest: dict, data: str | None) -> RoutingTable:
    """The checkpoint's own test split (or, with `data`, that table's test split under the same recipe)."""
    config = from_dict(TrainConfig, manifest["config"], where="manifest.config")
    if data is not None:
        config.data.train, config.data.test = data, None
    return load_tables(config)[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--budget", type=float, help="USD per query (default: the middle calibrated budget)")
    p.add_argument("--mode", default="cascade_routing", choices=["routing", "cascade", "cascade_routing"])
    p.add_argument("--data", help="routing table to replay (its test split); default: the checkpoint's")
    args = p.parse_args(argv)
    router = CascadeRouter.load(args.checkpoint)
    budgets = router.budgets
    budget = args.budget if args.budget is not None else budgets[len(budgets) // 2]
    table = test_split(router.manifest, args.data)
    start = time.perf_counter()
    cost, quality, run = replay(router, table, budget, args.mode)
    seconds = time.perf_counter() - start
    result = {
        "budget": budget, "mode": args.mode, "queries": table.n,
        "mean_cost": float(cost.mean()), "mean_quality": float(quality.mean()),
        "mean_models_run": float(run.sum(1).double().mean()), "seconds": seconds,
    }
    print(f"replayed {table.n} test queries in {seconds:.1f}s ({args.mode}, budget {budget:.6g} USD/query)")
    print(f"  realized: mean cost {result['mean_cost']:.6g} ({result['mean_cost'] / budget - 1:+.1%} vs budget), "
          f"mean quality {result['mean_quality']:.4f}, {result['mean_models_run']:.2f} models per query")
    metrics_path = Path(args.checkpoint) / "metrics.json"
    if budget in budgets and metrics_path.exists():
        offline_cost, offline_quality = json.loads(metrics_path.read_text())["curves"][args.mode][budgets.index(budget)]
        result.update(offline_cost=offline_cost, offline_quality=offline_quality)
        print(f"  offline evaluation at this budget: mean cost {offline_cost:.6g} "
              f"({result['mean_cost'] / offline_cost - 1:+.1%}), mean quality {offline_quality:.4f} "
              f"({100 * (result['mean_quality'] - offline_quality):+.2f} points)")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
