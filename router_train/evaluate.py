"""Score routing strategies on a quality–cost curve, per method.md.

    python -m router_train.evaluate --data TABLE [--test-data TABLE] --estimator noisy --noise low \\
        [--models m1,m2,...] [--max-depth D] [--budgets N] [--seed S] --out DIR

For each method, one strategy per budget is calibrated on the training split and scored on the test
split (expected cost and quality, ties mixed with probability γ); the curves' AUCs come with paired
bootstrap intervals. `--max-depth` caps cascade routing only: routing runs one model, and both cascades
run uncapped (up to all k models, in cost order), as in their reference implementation. Writes
DIR/metrics.json and DIR/curves.png: into a temporary directory beside DIR that replaces DIR only
once complete, so an earlier report there survives any failure or interrupt.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from estimators import QualityEstimator, TruthEstimator

from .calibrate import CalibrationConfig, calibrate_sweep
from .cli import add_debug_flag, user_errors
from .kernel import KernelConfig, check_model_count
from .metrics import (
    auc,
    auc_bounds,
    bootstrap_aucs,
    budget_grid,
    confidence_interval,
    curve_points,
    single_model_points,
    upper_hull,
)
from .outputs import atomic_write_json, check_output_dir, staged_output_dir
from .plotting import plot_curves
from .rules import RulesBaseline
from .simulate import Simulator
from .table import SPLIT_MODES, RoutingTable, check_cost_spread, load_table, load_train_test

ESTIMATORS = ("noisy", "logreg", "knn", "learned")
METHODS = ("routing", "threshold_cascade", "cascade", "cascade_routing")
"""Calibrated methods; `linear` (hull of single models), `oracle` (routing on the true qualities,
calibrated on the test split: an upper bound) and `rules` (per-source policies fitted on the training
queries, router_train/rules.py) are always reported too."""
UNCAPPED = ("cascade", "threshold_cascade")
"""Methods run without the depth cap: a capped cascade would only ever reach the cheapest models."""


def default_workers() -> int:
    """Calibration workers by default: the CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def method_depth(mode: str, k: int, max_depth: int) -> int:
    """Most models `mode` may run per query with k models: 1 for routing, k for the cascades, else the cap."""
    if mode == "routing":
        return 1
    return k if mode in UNCAPPED else min(max_depth, k)


@dataclass
class EvaluationConfig:
    """What to evaluate and how precisely."""

    max_depth: int = 4  # depth cap of cascade routing (see `method_depth`)
    n_budgets: int = 20
    methods: tuple[str, ...] = METHODS
    force_order: bool = False
    n_bootstrap: int = 500
    seed: int = 0
    kernel: KernelConfig = field(default_factory=KernelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    workers: int = 1  # processes calibrating methods side by side (see `run_methods`)


@dataclass
class MethodResult:
    """One method's fitted strategies and their per-query expected test outcomes, one column per budget."""

    strategies: list
    cost: np.ndarray  # (n_test, n_budgets)
    quality: np.ndarray  # (n_test, n_budgets)


def run_method(
    train_sim: Simulator, test_sim: Simulator, mode: str, budgets: np.ndarray, config: EvaluationConfig
) -> MethodResult:
    """Calibrate `mode` on the training simulator at every budget and score each fit on the test one."""
    depth = method_depth(mode, train_sim.k, config.max_depth)
    fits = calibrate_sweep(
        train_sim, mode, list(budgets), max_depth=depth, force_order=config.force_order,
        config=config.calibration,
    )
    outcomes = [test_sim.expected(f.strategy) for f in fits]
    cost = torch.stack([c for c, _ in outcomes], 1).numpy()
    quality = torch.stack([q for _, q in outcomes], 1).numpy()
    return MethodResult([f.strategy for f in fits], cost, quality)


_SHARED: tuple | None = None
"""What forked calibration workers read: (train simulator, test simulator, budgets, config)."""


def _run_shared(mode: str) -> tuple[str, MethodResult, float]:
    torch.set_num_threads(1)  # one core per worker
    train_sim, test_sim, budgets, config = _SHARED
    return _timed(train_sim, test_sim, mode, budgets, config)


def run_methods(
    train_sim: Simulator, test_sim: Simulator, budgets: np.ndarray, config: EvaluationConfig, log=print
) -> dict[str, MethodResult]:
    """`run_method` for every method of the config. With `config.workers` > 1 the methods run in that
    many forked processes, longest first (each method's calibration is independent and seeded, so the
    results are those of one process). Forking is skipped where it is unavailable or unsafe: when the
    process runs other Python threads (e.g. a server), whose locks a child could inherit held; tqdm's
    idle monitor thread excepted."""
    global _SHARED
    modes = list(config.methods)
    workers = min(config.workers, len(modes))
    forkable = "fork" in multiprocessing.get_all_start_methods() and not _other_threads()
    results: dict[str, MethodResult] = {}
    if workers <= 1 or not forkable:
        for mode in modes:
            _, results[mode], seconds = _timed(train_sim, test_sim, mode, budgets, config)
            log(f"  {mode}: {len(budgets)} budgets calibrated and scored in {seconds:.1f}s")
        return results
    longest_first = sorted(modes, key=lambda m: -_EXPECTED_WORK.get(m, 0))
    _SHARED = (train_sim, test_sim, budgets, config)
    try:
        restore = _defer_interrupts()
        try:
            pool = multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1)  # frees each method's caches
        finally:
            interrupted = restore()
        with pool:
            if interrupted:
                raise KeyboardInterrupt
            for mode, result, seconds in pool.imap_unordered(_run_shared, longest_first):
                results[mode] = result
                log(f"  {mode}: {len(budgets)} budgets calibrated and scored in {seconds:.1f}s (worker process)")
    finally:
        _SHARED = None
    return {mode: results[mode] for mode in modes}


def _defer_interrupts():
    """Hold a Ctrl-C (SIGINT) back while the main thread forks: raised inside a fork's at-fork hooks it would
    leave `logging`'s lock held, and the next fork (the pool replaces each finished worker) would hang.
    Returns a function that restores the handler and says whether an interrupt came meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: False
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))

    def restore() -> bool:
        signal.signal(signal.SIGINT, previous)
        return bool(caught)

    return restore


def _other_threads() -> list[threading.Thread]:
    """Python threads besides the main one and tqdm's monitor (started by progress bars, e.g. of `datasets`)."""
    return [t for t in threading.enumerate() if t is not threading.main_thread() and type(t).__name__ != "TMonitor"]


def _timed(train_sim, test_sim, mode, budgets, config) -> tuple[str, MethodResult, float]:
    start = time.perf_counter()
    return mode, run_method(train_sim, test_sim, mode, budgets, config), time.perf_counter() - start


_EXPECTED_WORK = {"cascade": 3, "threshold_cascade": 2, "cascade_routing": 2, "routing": 1}
"""Relative calibration time per method (uncapped cascades search the most multipliers), for scheduling."""


def run_rules(train: RoutingTable, test: RoutingTable, budgets: np.ndarray) -> MethodResult:
    """Fit the per-source rules on `train`, calibrate them at every budget and score each fit on `test`."""
    rules = RulesBaseline().fit(train)
    strategies = rules.calibrate(budgets)
    return MethodResult(strategies, *rules.expected_sweep(test, strategies))


def evaluate(
    train: RoutingTable,
    test: RoutingTable,
    estimator: QualityEstimator,
    config: EvaluationConfig = EvaluationConfig(),
    log=print,
    *,
    calibration_estimator: QualityEstimator | None = None,
) -> dict:
    """Calibrate every method on `train` with a fitted `estimator`, score on `test`; returns metrics.json's dict.

    `calibration_estimator` (default: `estimator`) gives the estimates λ/γ are calibrated on, e.g. the
    out-of-fold estimates of a `CrossFitted` estimator of `train`.

    Its `max_depth` is the depth cap of cascade routing, `method_depth` the most models each method may run.
    """
    if train.models != test.models:
        raise ValueError(f"train and test tables have different models: {train.models} vs {test.models}")
    config.max_depth = min(config.max_depth, train.k)
    train_points = single_model_points(train.quality, train.cost)
    budgets = budget_grid(train_points[:, 0], train_points[:, 1], config.n_budgets)
    train_sim = Simulator(train, calibration_estimator or estimator, kernel=config.kernel)
    test_sim = Simulator(test, estimator, kernel=config.kernel)
    results = run_methods(train_sim, test_sim, budgets, config, log)
    truth = TruthEstimator().fit(test)
    oracle_sim = Simulator(test, truth, kernel=config.kernel)
    results["oracle"] = run_method(oracle_sim, oracle_sim, "routing", budgets, config)
    start = time.perf_counter()
    results["rules"] = run_rules(train, test, budgets)
    log(f"  rules: {len(budgets)} budgets calibrated and scored in {time.perf_counter() - start:.1f}s")

    test_points = single_model_points(test.quality, test.cost)
    bounds = auc_bounds(test_points)
    curves = {name: curve_points(r.cost, r.quality) for name, r in results.items()}
    curves["linear"] = upper_hull(test_points)
    aucs = {name: auc(curve, *bounds) for name, curve in curves.items()}
    samples = bootstrap_aucs(
        {name: (r.cost, r.quality) for name, r in results.items()},
        test.quality.numpy(),
        test.cost.numpy(),
        n_resamples=config.n_bootstrap,
        seed=config.seed,
    )
    order = ["linear", "oracle", "rules", *config.methods]
    fitted = order[1:]  # every method with strategies (the linear hull has none)
    return {
        "auc": {name: aucs[name] for name in order},
        "auc_ci": {name: list(confidence_interval(samples[name])) for name in order},
        "curves": {name: curves[name].tolist() for name in order},
        "models": list(test.models),
        "n_train": train.n,
        "n_test": test.n,
        "budgets": [float(b) for b in budgets],
        "spend": {name: budget_spend(results[name].cost, budgets) for name in fitted},
        "max_depth": config.max_depth,
        "method_depth": {name: results[name].strategies[0].max_depth for name in ["oracle", *config.methods]},
        "strategies": {name: [s.to_dict() for s in results[name].strategies] for name in fitted},
        "single_models": {m: {"cost": float(c), "quality": float(q)} for m, (c, q) in zip(test.models, test_points)},
    }


def budget_spend(cost: np.ndarray, budgets: np.ndarray) -> list[float | None]:
    """Per budget, the mean test cost over the budget it was calibrated for on training queries: whether a
    budget still holds on unseen queries (1 = met exactly, above 1 = over-spent; None for a zero budget)."""
    return [float(c) / float(b) if b > 0 else None for c, b in zip(np.asarray(cost).mean(axis=0), budgets)]


def spend_summary(spend: list[float | None]) -> str:
    """`spend` as the CLI prints it: the range of test cost / budget over the (non-zero) budgets."""
    ratios = [r for r in spend if r is not None]
    return f"test spend {min(ratios):.2f}-{max(ratios):.2f} x budget" if ratios else "test spend n/a (zero budgets)"


def spend_suffix(metrics: dict, name: str) -> str:
    """What follows method `name`'s AUC in the printed report: its test spend range (none for `linear`)."""
    return f"  {spend_summary(metrics['spend'][name])}" if name in metrics["spend"] else ""


def write_report(metrics: dict, out_dir, title: str = "") -> None:
    """Write metrics.json and curves.png into an existing directory."""
    atomic_write_json(out_dir / "metrics.json", metrics)
    points = np.array([[v["cost"], v["quality"]] for v in metrics["single_models"].values()])
    plot_curves(
        {name: np.array(c) for name, c in metrics["curves"].items()},
        out_dir / "curves.png",
        model_points=points,
        model_names=list(metrics["single_models"]),
        aucs=metrics["auc"],
        title=title,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router_train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="routing table (Parquet, JSONL or CSV); its split column gives train/test")
    p.add_argument("--test-data", help="a separate test table: --data is then all training data")
    p.add_argument("--estimator", default="noisy", choices=ESTIMATORS, help="quality estimator (default noisy)")
    p.add_argument("--noise", default="low", choices=["low", "medium", "high"], help="noise level of --estimator noisy")
    p.add_argument("--checkpoint", help="--estimator learned: a trained export (checkpoints/<run>) instead of training")
    p.add_argument("--quantize", choices=["int8"],
                   help="knn, learned: the text encoder dynamically int8-quantized (CPU), e.g. to score its effect")
    p.add_argument("--config", help="knn, learned: YAML recipe whose `estimator` section (encoder, network) to use")
    p.add_argument("--encoder", help="text encoder (local folder or hub id) for knn and learned; default all-MiniLM-L6-v2")
    p.add_argument("--folds", type=int, default=5,
                   help="trained estimators (logreg, knn, learned): λ/γ are calibrated on out-of-fold estimates of "
                   "all training queries from this many folds; the tested estimator is fitted on all of them")
    p.add_argument("--models", help="comma-separated model names to keep (default: all)")
    p.add_argument("--missing", default="error", choices=["error", "drop"], help="queries lacking some model's row")
    p.add_argument("--max-depth", type=int, default=4,
                   help="most models cascade routing runs per query (default 4); the cascades run uncapped")
    p.add_argument("--budgets", type=int, default=20, help="number of budgets on the curve (default 20)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--force-order", action="store_true", help="cascade routing runs models in cost order only")
    p.add_argument("--samples", type=int, default=100, help="quasi-Monte-Carlo samples of E[max] (default 100)")
    p.add_argument("--trials", type=int, default=50, help="TPE trials for per-step multipliers (default 50)")
    p.add_argument("--cascade-routing-trials", type=int, default=0,
                   help="TPE trials for cascade routing's per-step λ (default 0: one λ for every step, as the "
                   "training recipes do; on 5 rlc_train splits as good as 30 trials and ~10x faster)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes that calibrate the methods side by side (default: the CPU cores available, "
                   f"here {default_workers()}; 1: all in this process)")
    p.add_argument("--sigma-scales", help="comma-separated Σ multipliers for cascade and cascade routing: the first is "
                   "kept unless another answers the training queries clearly better over the budgets (default: 1 for "
                   "the noisy estimator, 0,0.5,1 for trained estimators)")
    p.add_argument("--min-spend", type=float, default=0.0,
                   help="a cheaper strategy with a higher calibration quality replaces the budget-meeting one only "
                   "if it spends at least this share of the budget (default 0: any; 1: spend exactly the budget)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the AUC intervals")
    p.add_argument("--split", default="auto", choices=SPLIT_MODES,
                   help="train/test: the split column, a seeded split of query ids, or auto (column if it has both)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share of a seeded split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 when sharing the CPU)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and curves.png")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    add_debug_flag(p)
    return p


def load_split(args) -> tuple[RoutingTable, RoutingTable]:
    """Training and test tables from --data / --test-data."""
    models = args.models.split(",") if args.models else None
    kw = dict(models=models, missing=args.missing, seed=args.seed)
    if args.test_data:
        return load_train_test(args.data, args.test_data, **kw)
    table = load_table(args.data, split=args.split, test_fraction=args.test_fraction, **kw)
    return table.train(), table.test()


def build_estimator(args, train: RoutingTable) -> tuple[QualityEstimator, QualityEstimator]:
    """The fitted estimator named by the CLI, and the one whose estimates of `train` λ is calibrated on.

    The simulated estimator is fitted and calibrated on all training queries, as in the paper; so is a
    trained checkpoint. Estimators trained here are fitted on all training queries, and calibrated on
    out-of-fold estimates (cross-fitting, `--folds`), so that calibration never sees in-sample estimates.
    """
    from estimators import NoisyEstimator
    from estimators.crossfit import CrossFitted
    from estimators.encoder import MemoEmbedder, TextEncoder, cached
    from estimators.knn import KNNEstimator
    from estimators.learned import LearnedConfig, LearnedEstimator
    from estimators.logreg import LogRegEstimator

    if args.estimator == "noisy":
        estimator = NoisyEstimator(args.noise, seed=args.seed).fit(train)
        return estimator, estimator
    if args.estimator == "learned" and args.checkpoint:
        estimator = LearnedEstimator.load(args.checkpoint, quantize=args.quantize)
        return estimator, estimator
    if args.estimator == "logreg":
        build = lambda: LogRegEstimator(max_depth=args.max_depth, seed=args.seed)  # noqa: E731
    else:
        if args.config:
            from .config import load_config

            config = load_config(args.config).estimator
        else:
            config = LearnedConfig()
        if args.encoder:
            config.encoder.name_or_path = args.encoder
        config.encoder.quantize = args.quantize
        if args.estimator == "knn":
            embedder = cached(MemoEmbedder(TextEncoder(config.encoder)), config.embedding_cache)  # each query once
            build = lambda: KNNEstimator(embedder, seed=args.seed)  # noqa: E731
        else:
            # frozen: one shared encoder that embeds each query once; the folds skip the on-disk cache (keyed
            # by the whole list of texts, which their subsets would miss)
            frozen = not config.finetune
            encoder = MemoEmbedder(TextEncoder(config.encoder)) if frozen else None
            member = dataclasses.replace(config, embedding_cache=None) if frozen else config
            fold = lambda: LearnedEstimator(member, encoder)  # noqa: E731
            return LearnedEstimator(config, encoder).fit(train), CrossFitted(fold, args.folds, args.seed).fit(train)
    return build().fit(train), CrossFitted(build, args.folds, args.seed).fit(train)


def main(argv: list[str] | None = None) -> dict:
    """The CLI: a user error (bad argument, table, checkpoint or output path) prints `error: ...` and exits 2."""
    args = build_parser().parse_args(argv)
    with user_errors(args.debug):
        return run(args)


def check_args(args) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate the arguments that need no file; returns the methods and the Σ scales."""
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods has unknown names {unknown}; choose from {list(METHODS)}")
    if not 0.0 <= args.min_spend <= 1.0:
        raise ValueError(f"--min-spend is a share of the budget in [0, 1], got {args.min_spend}")
    if args.checkpoint and args.estimator != "learned":
        raise ValueError("--checkpoint needs --estimator learned")
    if args.quantize and args.estimator not in ("knn", "learned"):
        raise ValueError("--quantize applies to the text encoder of --estimator knn or learned")
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1 (1: calibrate in this process), got {args.workers}")
    default_scales = "1" if args.estimator == "noisy" else "0,0.5,1"
    try:
        sigma_scales = tuple(float(x) for x in (args.sigma_scales or default_scales).split(","))
    except ValueError:
        raise ValueError(f"--sigma-scales must be comma-separated numbers, got {args.sigma_scales!r}") from None
    return methods, sigma_scales


def run(args) -> dict:
    """Evaluate as the parsed arguments say; everything that can fail early (arguments, --out, the
    tables) is checked before any work, and --out is replaced only by a complete report."""
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, sigma_scales = check_args(args)
    check_output_dir(args.out, overwrite=args.overwrite)
    train, test = load_split(args)
    if train.n == 0 or test.n == 0:
        raise ValueError(f"need training and test queries, got {train.n} and {test.n}; check --data/--test-data")
    check_model_count(train.k, f"the training queries of {args.data}")
    check_cost_spread(train, f"the training queries of {args.data}")
    estimator, calibration_estimator = build_estimator(args, train)
    train, test = train.in_model_order(estimator.models), test.in_model_order(estimator.models)
    config = EvaluationConfig(
        max_depth=args.max_depth,
        n_budgets=args.budgets,
        methods=methods,
        force_order=args.force_order,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        workers=args.workers,
        kernel=KernelConfig(n_samples=args.samples, seed=args.seed),
        calibration=CalibrationConfig(n_trials=args.trials, cascade_routing_trials=args.cascade_routing_trials,
                                      seed=args.seed, sigma_scales=sigma_scales, min_spend=args.min_spend),
    )
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"evaluating {len(methods)} methods: calibrating on {train.n} queries, testing on {test.n}, "
        f"{train.k} models, estimator {args.estimator}")
    metrics = evaluate(train, test, estimator, config, log=log, calibration_estimator=calibration_estimator)
    metrics["estimator"] = {"name": args.estimator}
    if args.estimator == "noisy":
        metrics["estimator"]["noise"] = args.noise
    if args.checkpoint:
        metrics["estimator"]["checkpoint"] = str(args.checkpoint)
    metrics["wall_time_s"] = time.perf_counter() - start
    label = f"{args.estimator} ({args.noise})" if args.estimator == "noisy" else args.estimator
    with staged_output_dir(args.out, overwrite=args.overwrite) as staging:
        write_report(metrics, staging, title=f"{args.data} · {label}")
    for name, value in metrics["auc"].items():
        lo, hi = metrics["auc_ci"][name]
        print(f"{name:>18s}  AUC {value:6.2f}  [{lo:6.2f}, {hi:6.2f}]{spend_suffix(metrics, name)}")
    print(f"wall time: {metrics['wall_time_s']:.1f}s -> {args.out}")
    return metrics


if __name__ == "__main__":
    main()
