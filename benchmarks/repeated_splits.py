"""AUCs over N seeded query splits: mean ± sd per estimator and method, and paired differences with intervals.

    python benchmarks/repeated_splits.py --data T.parquet --estimators learned,logreg --repeats 5 \\
        --test-fraction 0.5 --max-depth 3 [--missing drop] [--config configs/default.yaml] [--threads 1] \\
        [--shift mix|length|source] --out runs/rlc-repeats

For seed s in 0..N−1 and each estimator E it runs `python -m router_train.evaluate` (through its `main`,
with an argv list) on the seeded split of seed s into DIR/E-s; options it does not know are passed
through to evaluate. `--shift` makes the test queries differ from the training ones, as a user's next
month of traffic may: `mix` draws each source's test share anew per seed (uniform within
`test_fraction` ± 60 % of its distance to 0 or 1: 0.2–0.8 at 0.5), so the sources a router saw least
can dominate its test; `length` puts a source's longer prompts in test more often than its shorter
ones (each query's chance of being drawn grows as e^(3·r), r its length rank in the source, 0–1);
`source` tests on one source the router never saw (seed s holds out the s-th source tag in sorted
order, so `--repeats` is at most the number of sources; `--test-fraction` is not used).
The split is written to DIR/splits/<shift>-<seed>.parquet (the table with its `split` column set) and
evaluated with `--split column`. A run whose metrics.json exists is not repeated, so an interrupted
sweep resumes (use a fresh DIR when changing those options or `--shift`).
`--inner J` compares candidates without reading any test split: for each outer seed s, the queries
of that split's test half are dropped, and its training half is split again J times (seeds 100..100+J−1,
the same `--test-fraction`), written to DIR/splits/inner-<s>-<j>.parquet and evaluated into
DIR/<estimator>-<s>-<j>. The summary then covers the N·J inner splits (inner splits of one outer
split share queries, so their intervals are a little narrow); choose on them, confirm on the outer splits.
Printed and written to DIR/summary.md and DIR/summary.json: mean ± sd of every method's AUC per
estimator (linear, oracle and rules included), and paired differences over the N splits with 95 %
t-intervals: per estimator cascade_routing − rules and cascade_routing − routing, and the first
estimator's cascade_routing minus each other's. A difference whose interval excludes 0 is not noise
(at that level, on these splits).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from router_train import evaluate
from router_train.outputs import atomic_write_bytes, atomic_write_json
from router_train.table import read_frame, seeded_test_ids

OWN_OPTIONS = ("--data", "--test-data", "--estimator", "--estimators", "--repeats", "--split", "--test-fraction",
               "--seed", "--out", "--shift", "--inner")
"""Options this script sets (or, --test-data, excludes) for every run; passing them through to evaluate is refused."""
LEVEL = 0.95
SHIFTS = ("none", "mix", "length", "source")
MIX_WIDTH = 0.6
"""`mix`: each source's test share is uniform within test_fraction ± MIX_WIDTH × min(test_fraction,
1 − test_fraction)."""
INNER_SEED = 100
"""`--inner`: the j-th inner split of an outer training half is seeded INNER_SEED + j (also evaluate's --seed)."""
LENGTH_TILT = 3.0
"""`length`: a query's weight in the draw of test queries is e^(LENGTH_TILT × its length rank in its source)."""


def t_quantile(p: float, df: int) -> float:
    """Quantile `p` (in (0.5, 1)) of Student's t with `df` degrees of freedom: bisection on its CDF, whose
    density is integrated by Simpson's rule (self-contained, precise to ~1e-6 for the levels used here)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
        weights = np.ones_like(t)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        return 0.5 + float(weights @ density) * (x / 4000) / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def paired(values: list[float]) -> dict:
    """Mean, sample sd and the 95 % t-interval of the mean of N paired differences (N >= 2)."""
    x = np.asarray(values, dtype=np.float64)
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile((1 + LEVEL) / 2, len(x) - 1) * sd / math.sqrt(len(x))
    return {"mean": mean, "sd": sd, "ci": [mean - half, mean + half], "values": x.tolist()}


class ShiftError(ValueError):
    """A table `--shift` or `--inner` cannot read or split."""


def shifted_test_ids(
    query_ids: np.ndarray, lengths: np.ndarray, sources: np.ndarray, shift: str, test_fraction: float, seed: int
) -> set[str]:
    """The test queries of one shifted split (see the module's docstring): per source, a seeded draw of
    round(share × its queries), with the share drawn per source (`mix`) or the draw tilted towards long
    prompts (`length`); or every query of the seed-th source (`source`)."""
    rng = np.random.default_rng(seed)
    groups = sorted(set(sources))
    if shift in ("mix", "source") and len(groups) < 2:
        raise ShiftError(f"--shift {shift} needs a `source` column with at least 2 distinct values; use "
                         "--shift length, or no --shift")
    if shift == "source":
        if seed >= len(groups):
            raise ShiftError(f"--shift source holds out one source per seed: --repeats at most {len(groups)} "
                             f"(the table's sources: {groups})")
        return set(query_ids[sources == groups[seed]].tolist())
    width = MIX_WIDTH * min(test_fraction, 1.0 - test_fraction)
    test: set[str] = set()
    for group in groups:
        members = np.flatnonzero(sources == group)
        members = members[np.argsort(query_ids[members], kind="stable")]  # independent of row order
        share = rng.uniform(test_fraction - width, test_fraction + width) if shift == "mix" else test_fraction
        n_test = int(round(share * len(members)))
        if shift == "length":
            rank = np.argsort(np.argsort(lengths[members], kind="stable"), kind="stable") / max(len(members) - 1, 1)
            # a draw weighted by e^(tilt·rank) (Efraimidis–Spirakis keys: the largest are drawn)
            keys = np.log(rng.random(len(members))) / np.exp(LENGTH_TILT * rank)
        else:
            keys = rng.random(len(members))
        test.update(query_ids[members[np.argsort(-keys, kind="stable")[:n_test]]].tolist())
    return test


def read_for_splits(data: str, option: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """The table at `data`, which `option` (--shift or --inner) splits; it needs `columns`."""
    try:
        frame = read_frame(data)
    except (OSError, ValueError) as e:
        raise ShiftError(str(e)) from None
    for column in columns:
        if column not in frame.columns:
            raise ShiftError(f"{data}: {option} needs the column {column!r} (one row per query and model)")
    return frame


def write_split(frame: pd.DataFrame, is_test: np.ndarray, path: Path) -> Path:
    """`frame` with its `split` column set from the per-row `is_test`, written atomically as Parquet to `path`."""
    buffer = io.BytesIO()
    frame.assign(split=np.where(is_test, "test", "train")).to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_shifted_splits(data: str, shift: str, test_fraction: float, repeats: int, out: Path) -> list[Path]:
    """The table at `data` with its `split` column set to the shifted split of each seed 0..repeats−1, saved
    as Parquet under `out`; the table is read once for all of them."""
    frame = read_for_splits(data, "--shift", ("query_id", "query"))
    ids = frame["query_id"].astype(str).to_numpy(dtype=object)
    first = pd.Series(np.arange(len(frame))).groupby(ids, sort=True).first().to_numpy()
    sources = (frame["source"].fillna("").astype(str) if "source" in frame.columns
               else pd.Series([""] * len(frame))).to_numpy(dtype=object)
    lengths = frame["query"].fillna("").astype(str).str.len().to_numpy()
    tests = [shifted_test_ids(ids[first], lengths[first], sources[first], shift, test_fraction, seed)
             for seed in range(repeats)]  # every split drawn before any is written: one that fails, fails first
    return [write_split(frame, pd.Series(ids).isin(test).to_numpy(), out / "splits" / f"{shift}-{seed}.parquet")
            for seed, test in enumerate(tests)]


def write_inner_splits(data: str, test_fraction: float, repeats: int, inner: int, out: Path) -> list[tuple[str, Path, int]]:
    """For each outer seed s < repeats, the table without the test queries of evaluate's seeded split s, its
    `split` column set to the j-th seeded split (seed INNER_SEED + j) of the remaining (training) queries,
    j < inner: (name "s-j", path, inner seed)."""
    frame = read_for_splits(data, "--inner", ("query_id",))
    ids = frame["query_id"].astype(str)
    every = ids.unique().astype(object)
    written = []
    for seed in range(repeats):
        keep = ~ids.isin(set(seeded_test_ids(every, test_fraction, seed).tolist()))
        train_ids = np.array(sorted(set(ids[keep])), dtype=object)
        for j in range(inner):
            test = set(seeded_test_ids(train_ids, test_fraction, INNER_SEED + j).tolist())
            path = write_split(frame[keep.to_numpy()], ids[keep].isin(test).to_numpy(),
                               out / "splits" / f"inner-{seed}-{j}.parquet")
            written.append((f"{seed}-{j}", path, INNER_SEED + j))
    return written


def run_all(args: argparse.Namespace, passthrough: list[str]) -> dict[str, list[dict]]:
    """metrics.json of every (estimator, split), running evaluate for those not already on disk."""
    out = Path(args.out)
    runs: dict[str, list[dict]] = {e: [] for e in args.estimators}
    if args.inner:
        splits = [(name, ["--data", str(path), "--split", "column"], seed)
                  for name, path, seed in write_inner_splits(args.data, args.test_fraction, args.repeats, args.inner, out)]
    elif args.shift == "none":
        seeded = ["--data", args.data, "--split", "seeded", "--test-fraction", str(args.test_fraction)]
        splits = [(str(seed), seeded, seed) for seed in range(args.repeats)]
    else:  # every split made before any run, so that a table --shift cannot split fails at once
        paths = write_shifted_splits(args.data, args.shift, args.test_fraction, args.repeats, out)
        splits = [(str(seed), ["--data", str(path), "--split", "column"], seed) for seed, path in enumerate(paths)]
    for name, split, seed in splits:
        for estimator in args.estimators:
            run_dir = out / f"{estimator}-{name}"
            path = run_dir / "metrics.json"
            if path.exists():
                print(f"{run_dir.name}: done before, reading {path}", file=sys.stderr)
            else:
                print(f"{run_dir.name}: evaluating", file=sys.stderr)
                evaluate.main([
                    *split, "--seed", str(seed), "--estimator", estimator, "--out", str(run_dir), "--overwrite",
                    *passthrough,
                ])  # --overwrite: a run dir without metrics.json is left over from an interrupted run
            runs[estimator].append(json.loads(path.read_text()))
    return runs


def summarize(runs: dict[str, list[dict]], test_fraction: float, evaluate_args: list[str], shift: str,
              inner: int = 0) -> dict:
    """Mean ± sd per (estimator, method) and the paired differences, from the per-run metrics."""
    estimators = list(runs)
    methods = list(runs[estimators[0]][0]["auc"])
    for e in estimators:
        for seed, r in enumerate(runs[e]):
            if set(r["auc"]) != set(methods):
                raise SystemExit(
                    f"error: {e}-{seed}/metrics.json has methods {sorted(r['auc'])}, other runs {sorted(methods)}: "
                    "runs made with other options; use a fresh --out or delete the runs that differ"
                )
    aucs = {e: {m: [r["auc"][m] for r in runs[e]] for m in methods} for e in estimators}
    table = {
        e: {m: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "values": v} for m, v in aucs[e].items()}
        for e in estimators
    }
    pairs = []
    for e in estimators:
        pairs += [((e, "cascade_routing"), (e, other)) for other in ("rules", "routing")]
    pairs += [((estimators[0], "cascade_routing"), (e, "cascade_routing")) for e in estimators[1:]]
    differences = []
    for (ea, ma), (eb, mb) in pairs:
        if ma in aucs[ea] and mb in aucs[eb]:
            name = f"{ea} {ma} − {mb}" if ea == eb else f"{ma}: {ea} − {eb}"
            diff = [a - b for a, b in zip(aucs[ea][ma], aucs[eb][mb])]
            differences.append({"name": name, "a": [ea, ma], "b": [eb, mb], **paired(diff)})
    return {"repeats": len(runs[estimators[0]]), "test_fraction": test_fraction, "shift": shift, "inner": inner,
            "evaluate_args": evaluate_args,
            "level": LEVEL, "estimators": estimators, "methods": methods, "auc": table, "differences": differences}


def markdown(summary: dict) -> str:
    """The summary as two markdown tables."""
    n, methods = summary["repeats"], summary["methods"]
    if summary.get("inner"):
        splits = (f"inner splits ({summary['inner']} of each of {n // summary['inner']} outer training halves, "
                  f"{summary['test_fraction']:.0%} of their queries in test; no outer test query read)")
    elif summary["shift"] == "source":
        splits = "splits, each testing on one source that training did not see"
    else:
        shifted = "" if summary["shift"] == "none" else f", test shifted by {summary['shift']}"
        splits = f"seeded splits ({summary['test_fraction']:.0%} of the queries in test{shifted})"
    lines = [f"AUC over {n} {splits}: mean ± sd", "",
             "| estimator | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for e, row in summary["auc"].items():
        lines.append(f"| {e} | " + " | ".join(f"{row[m]['mean']:.2f} ± {row[m]['sd']:.2f}" for m in methods) + " |")
    lines += ["", f"Paired differences over the {n} splits: mean, {summary['level']:.0%} t-interval, sd, per split",
              "", "| difference | mean | interval | sd | per split |", "|---|---|---|---|---|"]
    for d in summary["differences"]:
        per_split = ", ".join(f"{v:+.2f}" for v in d["values"])
        lo, hi = d["ci"]
        lines.append(f"| {d['name']} | {d['mean']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {d['sd']:.2f} | {per_split} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other options (e.g. --max-depth 3 --missing drop --threads 1) go to evaluate.")
    p.add_argument("--data", required=True, help="routing table; its queries are split anew for every seed")
    p.add_argument("--estimators", required=True, help=f"comma-separated, from {','.join(evaluate.ESTIMATORS)}")
    p.add_argument("--repeats", type=int, default=5, help="number of seeded splits, seeds 0..N-1 (default 5)")
    p.add_argument("--test-fraction", type=float, default=0.5, help="test share of each split (default 0.5)")
    p.add_argument("--shift", choices=SHIFTS, default="none",
                   help="mix: each source's test share drawn per seed; length: longer prompts more often in test; "
                        "source: seed s tests on the s-th source alone, trained on the others "
                        "(default none: a uniform random split)")
    p.add_argument("--inner", type=int, default=0,
                   help="J >= 1: split each outer training half again J times and evaluate on those only, never "
                        "reading an outer test query (to choose between candidates; default 0: the outer splits)")
    p.add_argument("--out", required=True, help="folder for the runs (DIR/<estimator>-<seed>) and the summary")
    args, passthrough = p.parse_known_args(argv)
    args.estimators = [e for e in args.estimators.split(",") if e]
    unknown = sorted(set(args.estimators) - set(evaluate.ESTIMATORS))
    if unknown or not args.estimators or len(set(args.estimators)) != len(args.estimators):
        p.error(f"--estimators: give distinct names from {list(evaluate.ESTIMATORS)}, got {args.estimators}")
    if args.repeats < (1 if args.inner else 2):
        p.error(f"--repeats: an interval needs at least 2 splits, got {args.repeats}")
    if args.inner < 0 or (args.inner and args.shift != "none"):
        p.error(f"--inner: give J >= 1 inner splits of uniform outer splits (no --shift), got {args.inner}"
                + (f" with --shift {args.shift}" if args.shift != "none" else ""))
    if args.inner and args.repeats * args.inner < 2:
        p.error("--inner: an interval needs at least 2 inner splits in all")
    clash = sorted({a.split("=")[0] for a in passthrough} & set(OWN_OPTIONS))
    if clash:
        p.error(f"{clash} are set by this script for every run; do not pass them through")
    try:
        runs = run_all(args, passthrough)
    except ShiftError as e:
        p.error(str(e))
    summary = summarize(runs, args.test_fraction, passthrough, args.shift, args.inner)
    text = markdown(summary)
    atomic_write_json(Path(args.out) / "summary.json", summary)
    atomic_write_bytes(Path(args.out) / "summary.md", text.encode())
    print(text)
    return summary


if __name__ == "__main__":
    main()
