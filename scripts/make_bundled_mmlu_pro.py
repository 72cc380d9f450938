"""Build the bundled `mmlu_pro_sample` table (router_train/data/mmlu_pro_sample.parquet) from the
MMLU-Pro routing table: the recipe `configs/answers.yaml` trains on it.

    python scripts/make_bundled_mmlu_pro.py --source ../shared/data/mmlu_pro.parquet

The source is the long-format conversion of the MMLU-Pro evaluation outputs (TIGER-AI-Lab/MMLU-Pro,
`eval_results/`, Apache-2.0; see router_train/data/NOTICE.md). The sample keeps 8 models spanning
the cost and quality range, only queries that have a row for each of them, and a seeded share of those
queries in every (source, split) group, so each category and both splits keep their proportions. The
output is the same for the same source file and seed.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd

from router_train.outputs import atomic_write_bytes

MODELS = (  # cheapest to dearest by the source's estimated cost
    "gemini-1.5-flash-002",
    "Phi-3-mini-4k-instruct",
    "DeepSeek-Coder-V2",
    "Meta-Llama-3_1-8B-Instruct",
    "mathstral-7B",
    "Mixtral-8x7B-Instruct-v0.1",
    "Meta-Llama-3_1-70B-Instruct",
    "gemini-1.5-pro-002",
)
COLUMNS = ("query_id", "query", "model", "quality", "cost", "source", "split", "answer", "tokens_in", "tokens_out")
"""Kept columns; the source's `confidence` and `latency_ms` are empty for MMLU-Pro and are left out."""
OUTPUT = Path(__file__).resolve().parents[1] / "router_train" / "data" / "mmlu_pro_sample.parquet"


def subsample(frame: pd.DataFrame, models: tuple[str, ...], n_queries: int, seed: int) -> pd.DataFrame:
    """Rows of `models` for about `n_queries` queries that have a row for every one of them, drawn per
    (source, split) group in proportion to its size (at least one query per group), by `seed`."""
    absent = sorted(set(models) - set(frame["model"]))
    if absent:
        raise ValueError(f"models {absent} are not in the table; it has {sorted(frame['model'].unique())}")
    rows = frame[frame["model"].isin(models)]
    counts = rows.groupby("query_id")["model"].nunique()
    complete = rows[rows["query_id"].isin(counts.index[counts == len(models)])]
    queries = complete.drop_duplicates("query_id")[["query_id", "source", "split"]].sort_values("query_id")
    if n_queries > len(queries):
        raise ValueError(f"n_queries={n_queries} exceeds the {len(queries)} queries that have all {len(models)} models")
    share = n_queries / len(queries)
    rng = np.random.default_rng(seed)
    chosen = []
    for _, group in queries.groupby(["source", "split"], sort=True):
        ids = group["query_id"].to_numpy()
        take = max(1, int(round(share * len(ids))))
        chosen.extend(ids[rng.permutation(len(ids))[:take]])
    kept = complete[complete["query_id"].isin(chosen)]
    order = {m: j for j, m in enumerate(models)}
    kept = kept.assign(_model=kept["model"].map(order)).sort_values(["query_id", "_model"]).drop(columns="_model")
    return kept[[c for c in COLUMNS if c in kept.columns]].reset_index(drop=True)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="the long-format MMLU-Pro table (mmlu_pro.parquet)")
    p.add_argument("--out", type=Path, default=OUTPUT, help=f"output file (default {OUTPUT})")
    p.add_argument("--queries", type=int, default=2000, help="about how many queries to keep (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sample = subsample(pd.read_parquet(args.source), MODELS, args.queries, args.seed)
    buffer = io.BytesIO()
    sample.to_parquet(buffer, index=False, compression="zstd")
    atomic_write_bytes(args.out, buffer.getvalue())
    per_split = sample.drop_duplicates("query_id")["split"].value_counts().to_dict()
    print(f"{args.out}: {sample['query_id'].nunique()} queries ({per_split}) x {sample['model'].nunique()} models, "
          f"{sample['source'].nunique()} sources, {args.out.stat().st_size / 1e6:.2f} MB")
    return args.out


if __name__ == "__main__":
    main()
