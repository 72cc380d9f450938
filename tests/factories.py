"""Small synthetic routing tables for tests: correlated qualities, cost-ordered models, answers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from router_train.table import RoutingTable, load_table


def random_frame(n: int = 80, k: int = 5, *, seed: int = 0, test_fraction: float = 0.3) -> pd.DataFrame:
    """A long-format table: model j answers correctly with probability rising with j, costs rising with j."""
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.3, 0.85, k)
    difficulty = rng.random(n)
    rows = []
    for q in range(n):
        truth = "ABCD"[rng.integers(4)]
        for j in range(k):
            correct = rng.random() < skill[j] * (1.2 - 0.6 * difficulty[q])
            answer = truth if correct else "ABCD"[rng.integers(4)]
            rows.append(
                {
                    "query_id": f"q{q:04d}",
                    "query": f"question {q} about topic {q % 7} with difficulty {difficulty[q]:.2f}",
                    "model": f"model-{j}",
                    "quality": float(answer == truth),
                    "cost": 1e-5 * (2.0**j) * (1 + 0.5 * rng.random()),
                    "source": f"task{q % 3}",
                    "split": "test" if q < int(n * test_fraction) else "train",
                    "answer": answer,
                    "confidence": float(np.log(rng.uniform(0.5, 1.0)) if correct else np.log(rng.uniform(0.05, 0.7))),
                    "tokens_in": 50 + q % 13,
                    "tokens_out": 5 + (q + j) % 11,
                }
            )
    return pd.DataFrame(rows)


def random_table(n: int = 80, k: int = 5, *, seed: int = 0) -> RoutingTable:
    """The frame of `random_frame` as a RoutingTable (through the real loader)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "table.parquet"
        random_frame(n, k, seed=seed).to_parquet(path, index=False)
        return load_table(path)

