"""Routing tables: per-(query, model) quality and cost results, loaded into dense tensors.

A routing table file is in long format (one row per query and model: `query_id`, `query`, `model`,
`quality`, `cost`, and optional `source`, `split`, `answer`, `confidence`, `tokens_in`, `tokens_out`,
`latency_ms`). `load_table` reads it (Parquet, JSON/JSONL, or CSV/TSV with any of the delimiters
`,;|` or tab, through `datasets`), validates it with messages that say what is wrong, where and how to
fix it, warns about implausible costs, and pivots it into a `RoutingTable` of n queries × k models whose
columns are ordered by ascending mean train cost, the order cascades run in. Row numbers in messages
count the file's data rows from 0. `load_train_test` reads a training and a separate test table.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REQUIRED_COLUMNS = ("query_id", "query", "model", "quality", "cost")
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}
_DELIMITERS = ",;\t|"
COST_OUTLIER_FACTOR = 100.0
"""A cost over this many times its model's median cost is reported as a likely unit error."""
_CELL_COLUMNS = ("query_id", "model", "quality", "cost", "split", "answer", "confidence", "tokens_in", "tokens_out")
_MISSING_MODES = ("error", "drop")
SPLIT_MODES = ("auto", "column", "seeded")
"""How `load_table` splits train/test: the `split` column, a seeded split of query ids, or the column if it has both."""
_SPLITS = ("train", "test")
NO_FINITE_CONFIDENCE = -100.0
"""Stand-in for `-inf` confidences of a model that has no finite confidence at all."""


@dataclass(eq=False)
class RoutingTable:
    """Dense tensors of a routing table: n queries × k models.

    `models` are ordered by ascending mean cost on the train rows (ties by name), the order in which
    a cascade runs them; `subset` keeps that order.
    """

    models: list[str]
    query_ids: list[str]
    queries: list[str]
    sources: list[str]
    is_test: torch.Tensor
    quality: torch.Tensor
    cost: torch.Tensor
    answers: list[list[str | None]] | None = None
    confidence: torch.Tensor | None = None
    tokens_in: torch.Tensor | None = None
    tokens_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = len(self.query_ids), len(self.models)
        if len(self.queries) != n or len(self.sources) != n or tuple(self.is_test.shape) != (n,):
            raise ValueError(f"RoutingTable: queries, sources and is_test need length n = {n}")
        for name in ("quality", "cost", "confidence", "tokens_in", "tokens_out"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n, k):
                raise ValueError(f"RoutingTable.{name} has shape {tuple(value.shape)}, expected (n, k) = {(n, k)}")
        if self.answers is not None and (len(self.answers) != n or any(len(row) != k for row in self.answers)):
            raise ValueError(f"RoutingTable.answers must be an n × k = {n} × {k} nested list")

    @property
    def n(self) -> int:
        """Number of queries."""
        return len(self.query_ids)

    @property
    def k(self) -> int:
        """Number of models."""
        return len(self.models)

    def subset(self, rows: torch.Tensor | np.ndarray | Sequence[int] | Sequence[bool]) -> RoutingTable:
        """The table restricted to `rows` (a boolean mask of length n, or row indices); model order is kept."""
        idx = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.asarray(rows))
        if idx.dtype == torch.bool:
            if tuple(idx.shape) != (self.n,):
                raise ValueError(f"subset: a boolean mask needs shape ({self.n},), got {tuple(idx.shape)}")
            idx = idx.nonzero().squeeze(1)
        idx = idx.reshape(-1).long()
        pos = idx.tolist()
        return RoutingTable(
            models=list(self.models),
            query_ids=[self.query_ids[i] for i in pos],
            queries=[self.queries[i] for i in pos],
            sources=[self.sources[i] for i in pos],
            is_test=self.is_test[idx],
            quality=self.quality[idx],
            cost=self.cost[idx],
            answers=None if self.answers is None else [list(self.answers[i]) for i in pos],
            confidence=None if self.confidence is None else self.confidence[idx],
            tokens_in=None if self.tokens_in is None else self.tokens_in[idx],
            tokens_out=None if self.tokens_out is None else self.tokens_out[idx],
        )

    def train(self) -> RoutingTable:
        """The train rows (`is_test` False)."""
        return self.subset(~self.is_test)

    def test(self) -> RoutingTable:
        """The test rows (`is_test` True)."""
        return self.subset(self.is_test)

    def model_index(self, name: str) -> int:
        """Column of model `name`."""
        try:
            return self.models.index(name)
        except ValueError:
            raise ValueError(f"unknown model {name!r}; available models: {self.models}") from None

    def select_models(self, names: list[str]) -> RoutingTable:
        """The table restricted to the models `names`, re-ordered by ascending mean train cost."""
        _check_model_names(names, self.models)
        return self._columns([self.models.index(name) for name in names])._sorted_by_cost()

    def in_model_order(self, names: list[str]) -> RoutingTable:
        """The table with exactly the models `names`, in that order (e.g. a test table aligned to its training table)."""
        _check_model_names(names, self.models)
        return self._columns([self.models.index(name) for name in names])

    def _columns(self, cols: list[int]) -> RoutingTable:
        """The table with model columns `cols`, in that order."""
        idx = torch.tensor(cols, dtype=torch.long)
        return RoutingTable(
            models=[self.models[j] for j in cols],
            query_ids=list(self.query_ids),
            queries=list(self.queries),
            sources=list(self.sources),
            is_test=self.is_test.clone(),
            quality=self.quality[:, idx],
            cost=self.cost[:, idx],
            answers=None if self.answers is None else [[row[j] for j in cols] for row in self.answers],
            confidence=None if self.confidence is None else self.confidence[:, idx],
            tokens_in=None if self.tokens_in is None else self.tokens_in[:, idx],
            tokens_out=None if self.tokens_out is None else self.tokens_out[:, idx],
        )

    def _sorted_by_cost(self) -> RoutingTable:
        """Columns ordered by ascending mean train cost (all rows when there are no train rows), ties by name."""
        rows = ~self.is_test if bool((~self.is_test).any()) else torch.ones(self.n, dtype=torch.bool)
        means = self.cost[rows].mean(0).tolist() if bool(rows.any()) else [0.0] * self.k
        return self._columns(sorted(range(self.k), key=lambda j: (means[j], self.models[j])))


def holdout(table: RoutingTable, share: float, seed: int) -> tuple[RoutingTable, RoutingTable]:
    """(rest, held): a seeded random `share` of the queries held back, e.g. to calibrate λ on queries
    an estimator was not trained on."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"holdout share must be in (0, 1), got {share}")
    order = torch.randperm(table.n, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, int(round(share * table.n)))
    return table.subset(order[n_held:].sort().values), table.subset(order[:n_held].sort().values)


def load_table(
    path: str | os.PathLike,
    *,
    models: list[str] | None = None,
    missing: str = "error",
    split: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
    all_split: str | None = None,
) -> RoutingTable:
    """Read and validate a long-format routing table file and pivot it into a `RoutingTable`.

    `models` keeps only those models (before the completeness check). `missing="drop"` drops queries
    lacking a row for some model instead of failing. `split` is "column" (the `split` column),
    "seeded" (a random `test_fraction` of the file's query ids, fixed by `seed`, independent of row
    order and of `models`/`missing`) or "auto" (the column when it has both train and test rows, else
    seeded). `all_split="train"`/`"test"` puts every query in that split.
    """
    if missing not in _MISSING_MODES:
        raise ValueError(f"missing must be one of {_MISSING_MODES}, got {missing!r}")
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if all_split is not None and all_split not in _SPLITS:
        raise ValueError(f"all_split must be None, 'train' or 'test', got {all_split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    df = read_frame(path)
    if len(df) == 0:
        raise ValueError(f"{path}: the table is empty (no rows); it needs one row per (query, model)")
    absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if absent:
        raise ValueError(
            f"{path}: missing required column(s) {absent}; columns present: {list(df.columns)}. "
            f"A routing table needs one row per (query, model) with columns {list(REQUIRED_COLUMNS)}: "
            "rename or add them"
        )
    for col in ("query_id", "model", "query"):
        df[col] = _strings(df, col)
    empty = (df["model"].str.strip() == "").to_numpy()
    if empty.any():
        i = int(np.argmax(empty))
        raise ValueError(
            f"column 'model': {int(empty.sum())} empty model name(s), e.g. at {_where(df, i)}; every row needs "
            "the name of the model it scores: fill them in or remove those rows"
        )

    # Queries are numbered over the whole file, so a query with no row for the chosen models counts as incomplete.
    qcode, qids = pd.factorize(df["query_id"], sort=False)
    query_ids = np.asarray(qids, dtype=object)
    first_row = np.unique(qcode, return_index=True)[1]
    texts = df["query"].iloc[first_row].to_numpy(dtype=object)
    sources = None
    if "source" in df.columns:
        sources = df["source"].iloc[first_row].fillna("").astype(str).to_numpy(dtype=object)
    # Only the per-cell columns from here on: filtering long text columns row by row is slow.
    df = df[[c for c in _CELL_COLUMNS if c in df.columns]]
    file_test_ids = seeded_test_ids(query_ids, test_fraction, seed)

    available = sorted(df["model"].unique().tolist())
    if models is not None:
        _check_model_names(models, available, where=f"models (of {path})")
        used = df["model"].isin(models).to_numpy()
        df, qcode = df[used], qcode[used]
        names = list(models)
    else:
        names = available
    mcode = pd.Categorical(df["model"], categories=names).codes.astype(np.int64)

    quality = _numeric(df, "quality")
    cost = _numeric(df, "cost")
    bad = np.isnan(quality) | (quality < 0) | (quality > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"column 'quality': {int(bad.sum())} value(s) are NaN or outside [0, 1], e.g. {quality[i]} at "
            f"{_where(df, i)}; quality must be a score in [0, 1] (1 = correct): rescale or fix those rows"
        )
    bad = ~np.isfinite(cost) | (cost < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"column 'cost': {int(bad.sum())} value(s) are NaN, infinite or negative, e.g. {cost[i]} at "
            f"{_where(df, i)}; cost must be a finite amount in USD >= 0: fill in or fix those rows"
        )
    optional = {c: _numeric(df, c) for c in ("confidence", "tokens_in", "tokens_out") if c in df.columns}
    for col in ("tokens_in", "tokens_out"):
        if col in optional:
            values = optional[col]
            bad = np.isinf(values) | (values < 0)
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(
                    f"column '{col}': {int(bad.sum())} value(s) are infinite or negative, e.g. {values[i]} at "
                    f"{_where(df, i)}; token counts must be integers >= 0, or null when unknown: fix those rows"
                )
    if "confidence" in optional:
        bad = optional["confidence"] == np.inf
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"column 'confidence': {int(bad.sum())} value(s) are +inf, e.g. at {_where(df, i)}; a log-probability "
                "confidence must be finite, -inf (replaced by the model's lowest) or null: fix those rows"
            )

    k = len(names)
    cell = qcode * k + mcode
    dup = pd.Series(cell).duplicated().to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        first = int(np.argmax(cell == cell[i]))
        raise ValueError(
            f"columns 'query_id', 'model': {int(dup.sum())} duplicate (query_id, model) row(s), e.g. {_where(df, i)} "
            f"repeats row {df.index[first]}; keep exactly one row per (query, model): deduplicate the file"
        )

    present = np.zeros((len(query_ids), k), dtype=bool)
    present[qcode, mcode] = True
    incomplete = ~present.all(axis=1)
    if incomplete.any():
        q = int(np.argmax(incomplete))
        example = f"query {query_ids[q]} lacks {names[int(np.argmax(~present[q]))]}"
        count = f"{int(incomplete.sum())} of {len(query_ids)} queries"
        if missing == "error":
            raise ValueError(
                f"columns 'query_id', 'model': {count} lack a row for some model (e.g. {example}); pass "
                'missing="drop" (CLI: --missing drop) to drop those queries, or models=[...] to keep only models '
                "every query has"
            )
        print(f"dropped {count} missing a model's row (e.g. {example})", file=sys.stderr)
    keep = ~incomplete
    if not keep.any():
        raise ValueError(
            f"{path}: no query has a row for every model of {names}; pass models=[...] with models the queries share"
        )

    # Re-number the kept queries 0..n-1 and scatter the kept rows into dense (n, k) arrays.
    new_index = np.cumsum(keep) - 1
    rows = keep[qcode]
    df, qi, mi = df[rows], new_index[qcode[rows]], mcode[rows]
    n = int(keep.sum())

    def dense(values: np.ndarray) -> np.ndarray:
        out = np.full((n, k), np.nan)
        out[qi, mi] = values[rows]
        return out

    if all_split is not None:
        is_test = np.full(n, all_split == "test")
    else:
        is_test = _split_column(df, qi, n, k, split=split, path=path, test_fraction=test_fraction, seed=seed)
        if is_test is None:
            is_test = pd.Series(query_ids[keep]).isin(file_test_ids).to_numpy()

    confidence = None
    if "confidence" in optional:
        confidence = _replace_neg_inf(dense(optional["confidence"]), names)
    answers = None
    if "answer" in df.columns:
        answer = df["answer"]
        given = answer.notna().to_numpy()
        if given.any():
            grid = np.full((n, k), None, dtype=object)
            grid[qi, mi] = np.where(given, answer.astype(str).to_numpy(dtype=object), None)
            answers = grid.tolist()

    def tensor(values: np.ndarray | None) -> torch.Tensor | None:
        return None if values is None or np.isnan(values).all() else torch.from_numpy(values)

    table = RoutingTable(
        models=names,
        query_ids=query_ids[keep].tolist(),
        queries=texts[keep].tolist(),
        sources=[""] * n if sources is None else sources[keep].tolist(),
        is_test=torch.from_numpy(is_test.astype(bool)),
        quality=torch.from_numpy(dense(quality)),
        cost=torch.from_numpy(dense(cost)),
        answers=answers,
        confidence=tensor(confidence),
        tokens_in=tensor(dense(optional["tokens_in"]) if "tokens_in" in optional else None),
        tokens_out=tensor(dense(optional["tokens_out"]) if "tokens_out" in optional else None),
    )
    _warn_cost_outliers(table, path)
    return table._sorted_by_cost()


def load_train_test(
    train_path: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    models: list[str] | None = None,
    missing: str = "error",
    seed: int = 0,
) -> tuple[RoutingTable, RoutingTable]:
    """A training table and a separate test table (every query in its file's split), the test table's
    models in the training table's order; raises when one table lacks a model of the other."""
    kw = dict(models=models, missing=missing, seed=seed)
    train = load_table(train_path, all_split="train", **kw)
    test = load_table(test_path, all_split="test", **kw)
    lacks = [m for m in train.models if m not in test.models]
    adds = [m for m in test.models if m not in train.models]
    if lacks or adds:
        what = []
        if lacks:
            what.append(f"lacks model(s) {lacks} of the training table {train_path}")
        if adds:
            what.append(f"adds model(s) {adds} that the training table {train_path} lacks")
        shared = [m for m in train.models if m in test.models]
        raise ValueError(
            f"the test table {test_path} {' and '.join(what)}; both need the same models: add the rows, or keep the "
            f"shared ones with models=[...] (CLI: --models, recipe: data.models): {shared}"
        )
    _note_new_sources(train, test, train_path, test_path)
    return train, test.in_model_order(train.models)


def _note_new_sources(train: RoutingTable, test: RoutingTable, train_path: str | os.PathLike,
                      test_path: str | os.PathLike) -> None:
    """Say on stderr how many test queries come from sources the training table lacks: the estimators and
    rules serve them with their pooled fits, so a user sees why such queries may be routed less well."""
    seen = set(train.sources)
    new = [s for s in test.sources if s and s not in seen]  # no source: nothing to name
    if new:
        names = sorted(set(new))
        print(
            f"note: {len(new)} of {test.n} queries of the test table {test_path} come from source(s) "
            f"{names[:10]}{' …' if len(names) > 10 else ''} absent from the training table {train_path}: their "
            "estimates and rules use what was fitted on all training sources pooled; to route them by their own "
            "results, add some of those queries to the training table",
            file=sys.stderr,
        )


def check_cost_spread(table: RoutingTable, where: str) -> None:
    """Raise unless `table` has two models of different mean cost: a budget sweep runs between the
    cheapest and the most expensive model, so one model (or equally priced ones) leaves nothing to route."""
    means = sorted(set(table.cost.mean(0).tolist())) if table.n else []
    if len(means) < 2:
        raise ValueError(
            f"{where}: routing needs at least two models of different mean cost, got {table.k} model(s) "
            f"{table.models}" + (f" all at mean cost {means[0]:.6g}" if table.k > 1 and means else "")
            + "; add models (or choose more with --models / data.models)"
        )


def _warn_cost_outliers(table: RoutingTable, path: str | os.PathLike) -> None:
    """Warn on stderr about costs over COST_OUTLIER_FACTOR × their model's median (a unit error in a log
    shifts every budget and AUC), naming each such model's largest cell."""
    cost = table.cost.numpy()
    if cost.size == 0:
        return
    median = np.median(cost, axis=0)
    outlier = (cost > COST_OUTLIER_FACTOR * median) & (median > 0)
    details = []
    for j in np.flatnonzero(outlier.any(axis=0)):
        i = int(np.argmax(cost[:, j]))
        details.append(
            f"model {table.models[j]!r}: {int(outlier[:, j].sum())} cell(s), largest {cost[i, j]:.6g} at query_id "
            f"{table.query_ids[i]!r} (median {median[j]:.6g})"
        )
    if details:
        print(
            f"warning: {path}: column 'cost' has values over {COST_OUTLIER_FACTOR:g}x their model's median cost "
            f"({'; '.join(details)}); a unit error? they shift every budget: check those rows",
            file=sys.stderr,
        )


def _split_column(
    df: pd.DataFrame, qi: np.ndarray, n: int, k: int, *, split: str, path: str | os.PathLike, test_fraction: float,
    seed: int,
) -> np.ndarray | None:
    """Per-query is_test from the `split` column, or None when a seeded split should be used instead.

    The column counts as absent when it is entirely null; "auto" also falls back when it lacks train
    or test rows (printing a note). Raises on values other than train/test or a query split both ways.
    """
    if split == "seeded":
        return None
    column = df["split"] if "split" in df.columns and df["split"].notna().any() else None
    fallback = f"using a seeded random split ({test_fraction:.0%} of the queries in test, seed {seed})"
    if column is None:
        if split == "column":
            raise ValueError(
                f"column 'split': {path} has no split column (or it is all null); add one with train/test per "
                'row, or pass split="seeded" (or "auto") for a seeded random split'
            )
        print(f"note: {path} has no split column; {fallback}", file=sys.stderr)
        return None
    values = column.to_numpy(dtype=object)
    bad = ~np.isin(values, _SPLITS)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"column 'split': {int(bad.sum())} value(s) are not 'train' or 'test', e.g. {values[i]!r} at "
            f'{_where(df, i)}; map them to train/test, or pass split="seeded" to ignore the column'
        )
    test_rows = np.bincount(qi, weights=(values == "test").astype(np.float64), minlength=n)
    mixed = (test_rows > 0) & (test_rows < k)
    if mixed.any():
        i = int(np.argmax(mixed[qi]))
        raise ValueError(
            f"column 'split': the rows of a query disagree on its split, e.g. {_where(df, i)} and other rows of "
            'that query; give all rows of a query the same split, or pass split="seeded" to ignore the column'
        )
    is_test = test_rows == k
    if split == "auto" and (is_test.all() or not is_test.any()):
        only = "test" if is_test.all() else "train"
        print(f"note: the split column of {path} has only {only} rows; {fallback}", file=sys.stderr)
        return None
    return is_test


def seeded_test_ids(query_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The ids of a seeded random `test_fraction` of the queries (`load_table`'s seeded split); sorting first makes it
    independent of row order."""
    ordered = np.sort(query_ids.astype(str))
    n_test = int(round(test_fraction * len(ordered)))
    return ordered[np.random.default_rng(seed).permutation(len(ordered))[:n_test]]


def _replace_neg_inf(confidence: np.ndarray, names: list[str]) -> np.ndarray:
    """Replace `-inf` confidences (underflowed log-probabilities) by the lowest finite confidence of their model."""
    neg = confidence == -np.inf
    if not neg.any():
        return confidence
    lowest = np.where(np.isfinite(confidence), confidence, np.inf).min(axis=0)
    floor = np.where(np.isfinite(lowest), lowest, NO_FINITE_CONFIDENCE)
    counts = neg.sum(axis=0)
    detail = ", ".join(f"{names[j]}: {counts[j]} -> {floor[j]:.4g}" for j in np.flatnonzero(counts))
    print(
        f"replaced {int(neg.sum())} -inf confidences with the lowest finite confidence of their model ({detail})",
        file=sys.stderr,
    )
    return np.where(neg, floor[None, :], confidence)


def read_frame(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a Parquet, JSON/JSONL or CSV routing table file as they are (CSV columns as text), read through
    `datasets` with its cache in a temporary directory; `load_table` validates and pivots them."""
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported file extension {Path(path).suffix!r} for {path}; save the routing table as "
            f"{', '.join(_FORMATS)}"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"routing table not found: {path}")
    sep = _delimiter(path) if fmt == "csv" else ","
    try:
        if _has_no_rows(path, fmt, sep):  # `datasets` fails on files without rows
            return pd.DataFrame()
        with tempfile.TemporaryDirectory() as cache, _quiet_datasets():
            common = {"keep_in_memory": True, "cache_dir": cache}
            if fmt == "parquet":
                dataset = datasets.Dataset.from_parquet(str(path), **common)
            elif fmt == "json":
                rows = _json_rows(path)
                if not rows:
                    return pd.DataFrame()
                lines = Path(cache) / "rows.jsonl"
                lines.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
                # One block for the whole file, so column types are inferred from all rows, not only the first block.
                dataset = datasets.Dataset.from_json(str(lines), chunksize=os.path.getsize(lines) + 1, **common)
            else:
                # Every CSV column as text (parsed by `_numeric` later): per-chunk type inference would disagree.
                header = pd.read_csv(path, nrows=0, sep=sep).columns
                features = datasets.Features({c: datasets.Value("string") for c in header})
                dataset = datasets.Dataset.from_csv(str(path), features=features, sep=sep, **common)
            return dataset.to_pandas()
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError, RecursionError) as e:
        # parser errors (RecursionError: arrays nested too deep for the json module)
        hint = f" (delimiter {sep!r}: quote the fields that contain it)" if fmt == "csv" else ""
        raise ValueError(f"{path}: cannot read it as a {fmt} table{hint}: {_root_cause(e)}") from None


def _json_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON array or JSON-lines file, read by Python's json module and checked to be objects,
    for `datasets` to read as JSON lines: pyarrow's reader crashes the process on a row that is `null`,
    and `datasets` re-encodes arrays with ujson, which turns `Infinity` into null (a +inf confidence would
    silently become unknown) and may round a float's last digit."""
    text = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {number}: {e}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i} is {json.dumps(row)[:40]}, not an object of column values")
    return rows


def _delimiter(path: str | os.PathLike) -> str:
    """The delimiter of a delimiter-separated file, sniffed from its header line (a comma when unclear)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = f.readline()
    try:
        return csv.Sniffer().sniff(header, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (`datasets` wraps the parser's own message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _has_no_rows(path: str | os.PathLike, fmt: str, sep: str) -> bool:
    """Whether the file holds no data rows (an empty Parquet table, a CSV header alone, an empty JSON list)."""
    if fmt == "parquet":
        return pq.read_metadata(path).num_rows == 0
    if fmt == "csv":
        try:
            return pd.read_csv(path, nrows=1, dtype=str, sep=sep).empty
        except pd.errors.EmptyDataError:
            return True
    with open(path, "rb") as f:
        return b"".join(f.read(64).split()) in (b"", b"[]")


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the `datasets` progress bars and log lines while reading (a parse error is reported once, by
    `read_frame`), restoring the caller's settings."""
    enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if enabled:
            datasets.enable_progress_bars()


def _strings(df: pd.DataFrame, col: str) -> pd.Series:
    """Required text column `col` as strings (ids may be numbers in CSV/JSON); raises on nulls."""
    column = df[col]
    null = column.isna().to_numpy()
    if null.any():
        i = int(np.argmax(null))
        raise ValueError(
            f"column '{col}': {int(null.sum())} null value(s), e.g. at row {df.index[i]}; every row needs a "
            "query_id, query and model: fill them in or remove those rows"
        )
    return column.astype(str)


def _numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    """Column `col` as float64 with NaN for nulls; raises on values that are not numbers."""
    column = df[col]
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    # Python's float() is correctly rounded, so a CSV number equals its Parquet twin; pandas' own text
    # parser (`to_numeric`) is off by an ulp on some versions
    values = pd.Series([_float_or_nan(v) for v in column], index=column.index, dtype=np.float64)
    bad = (values.isna() & column.notna()).to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"column '{col}': {int(bad.sum())} value(s) are not numbers, e.g. {column.iat[i]!r} at "
            f"{_where(df, i)}; write numbers (leave optional values empty/null when unknown)"
        )
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _float_or_nan(value) -> float:
    """A cell as a float; NaN for a null or a value that is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _where(df: pd.DataFrame, i: int) -> str:
    """Where the i-th remaining row of `df` sits in the file, for error messages."""
    return f"row {df.index[i]} (query_id {df['query_id'].iat[i]!r}, model {df['model'].iat[i]!r})"


def _check_model_names(names: list[str], available: list[str], where: str = "models") -> None:
    """Raise a ValueError when `names` is empty, repeats a name or names a model not in `available`."""
    if not names:
        raise ValueError(f"{where}: choose at least one model; available models: {available}")
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise ValueError(f"{where}: {repeated} given more than once; available models: {available}")
    unknown = [m for m in names if m not in available]
    if unknown:
        raise ValueError(f"{where}: unknown model(s) {unknown}; available models: {available}")
