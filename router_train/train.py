"""The training recipe behind `make train`: from a routing table to an exported, calibrated router.

    python -m router_train.train --config configs/default.yaml [--train-data TABLE --test-data TABLE]
        [--run-name NAME] [--overwrite] [--threads N]
    torchrun --nproc_per_node N -m router_train.train --config ...     (or accelerate launch --num_processes N)

Steps: load the tables; embed the queries (cached); train the learned estimator on all training
queries with accelerate (resumable: re-running after an interruption continues from the last epoch)
and fit Σ; train K more on K − 1 folds each (cross-fitting) and calibrate λ/γ for every method over a
budget sweep on their out-of-fold estimates of the training queries; evaluate on the test split;
export `checkpoints/<run>/` with `estimator.safetensors`, `estimator.json`, `manifest.json` (with the
SHA-256 of every other file), `metrics.json` and `curves.png`.

`checkpoints/<run>` is a symlink to a version directory in `checkpoints/.<run>.versions/`; a new export
is written into a fresh version and published by renaming one symlink over the old one, so the run path
always holds a complete export, and an interrupted run leaves nothing behind (the next run removes any
leftover). Training state for resuming lives in `checkpoints/.<run>.partial`, kept only while the recipe,
the data files and the number of processes are unchanged.

Launched as N processes (GPUs, or CPU processes over gloo), they embed the queries a share each and
train every estimator together (data-parallel, router_train/distributed.py); the main process alone
writes the caches and the resume state, calibrates, evaluates and exports, while the others wait.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch

from estimators.crossfit import CrossFitted
from estimators.encoder import MemoEmbedder, ShardedEmbedder, TextEncoder
from estimators.learned import LearnedEstimator

from . import __version__, distributed
from . import manifest as manifest_format
from .calibrate import CalibrationConfig
from .cli import add_debug_flag, user_errors
from .config import TrainConfig, load_config, to_dict
from .evaluate import EvaluationConfig, default_workers, evaluate, spend_suffix, write_report
from .kernel import KernelConfig, check_model_count
from .outputs import atomic_write_json, new_version, publish_version, remove_stale_versions
from .table import RoutingTable, check_cost_spread, load_table, load_train_test

BUNDLED = "bundled"
"""`data.train: bundled` names the default table shipped in the package (router_train/data/llmrouter.parquet);
`bundled:NAME` names router_train/data/NAME.parquet (see router_train/data/NOTICE.md)."""
DEFAULT_BUNDLED = "llmrouter"


def bundled_names() -> list[str]:
    """Names of the tables shipped in the package, for `data.train: bundled:NAME`."""
    return sorted(p.name.removesuffix(".parquet") for p in (resources.files("router_train") / "data").iterdir()
                  if p.name.endswith(".parquet"))


def bundled_dataset(name: str = DEFAULT_BUNDLED) -> Path:
    """Path of a bundled routing table: the default LLMRouter one (MIT), or another by name (e.g.
    `mmlu_pro_sample`, Apache-2.0); attribution in router_train/data/NOTICE.md."""
    names = bundled_names()
    if name not in names:
        listed = ", ".join(f"{BUNDLED}:{n}" for n in names)
        raise ValueError(f"data.train: no bundled table named {name!r}; the bundled tables are {listed} "
                         f"(`{BUNDLED}` alone is {BUNDLED}:{DEFAULT_BUNDLED}), or give the path of a routing table")
    return Path(str(resources.files("router_train") / "data" / f"{name}.parquet"))


def train_path(train: str) -> Path:
    """The file `data.train` names: `bundled` (or empty), `bundled:NAME`, or a table path."""
    if train in ("", BUNDLED):
        return bundled_dataset()
    if train.startswith(f"{BUNDLED}:"):
        return bundled_dataset(train.removeprefix(f"{BUNDLED}:"))
    return Path(train)


def data_paths(config: TrainConfig) -> list[Path]:
    """The table files a recipe reads: the training table (the bundled one by default), then any test table."""
    data = config.data
    return [train_path(data.train)] + ([Path(data.test)] if data.test else [])


def load_tables(config: TrainConfig) -> tuple[RoutingTable, RoutingTable]:
    """Training and test tables of a recipe."""
    data = config.data
    path = data_paths(config)[0]
    kw = dict(models=data.models, missing=data.missing, seed=config.seed)
    if data.test:
        return load_train_test(path, data.test, **kw)
    table = load_table(path, split=data.split, test_fraction=data.test_fraction, **kw)
    return table.train(), table.test()


def config_fingerprint(config: TrainConfig) -> str:
    """Short hash of a recipe: training state is resumed only under the same one."""
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(paths: list[Path]) -> str:
    """Short hash of the bytes of the table files: training state is resumed only on the same data."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def start_wandb(config: TrainConfig, directory: Path):
    """An offline-by-default wandb run (WANDB_MODE from the environment wins); None when disabled (then
    wandb, slow to import, is not imported)."""
    mode = os.environ.get("WANDB_MODE", config.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=config.wandb.project, name=config.run_name, mode=mode, dir=str(directory),
                      config=to_dict(config), reinit="finish_previous")


def manifest(config: TrainConfig, estimator: LearnedEstimator, metrics: dict, sizes: dict, files: dict) -> dict:
    """Everything a serving process needs to know about an export besides the weights; `files` maps the
    export's other files to their SHA-256, checked at load, and the manifest is sealed with its own."""
    strategies = {mode: metrics["strategies"][mode] for mode in config.calibration.methods}
    return manifest_format.seal({
        "format": manifest_format.FORMAT,
        "manifest_version": manifest_format.VERSION,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": list(estimator.models),
        "prices": estimator.cost_model.config(),
        "encoder": estimator.describe()["encoder_identity"],
        "feature_spec": {
            "embedding_dim": estimator.net.config.embed_dim,
            "answer_features": ["has_answer", "confidence (log-prob)", "length", "agree", "overlap"],
            "observed_fields": ["model", "answer", "confidence", "tokens_out"],
        },
        "max_depth": config.calibration.max_depth,
        "kernel": {"n_samples": config.calibration.samples, "seed": config.seed},
        "budgets": metrics["budgets"],
        "strategies": strategies,
        "estimator_files": list(manifest_format.ESTIMATOR_FILES),
        "files": files,
        "data": sizes,
        "config": to_dict(config),
    })


def clean_leftovers(run_dir: Path, log=print) -> None:
    """Repair what interrupted runs left: versions no longer linked, and the `.<run>.old` / `.<run>.export`
    directories of earlier router-train versions (the old export is put back when the run path is missing)."""
    old, work = run_dir.with_name(f".{run_dir.name}.old"), run_dir.with_name(f".{run_dir.name}.export")
    if old.is_dir():
        if os.path.lexists(run_dir):
            shutil.rmtree(old)
        else:
            os.replace(old, run_dir)
            log(f"restored {run_dir} from {old}, left there by an interrupted run")
    if work.is_dir():
        shutil.rmtree(work)
    remove_stale_versions(run_dir)


def export(run_dir: Path, write, overwrite: bool) -> None:
    """Publish a new export at `run_dir`: `write(directory)` fills a fresh version directory, then one
    symlink rename makes it the run's export. On any failure or interrupt the new version is removed and
    the old export stays as it was."""
    if os.path.lexists(run_dir) and not overwrite:
        raise FileExistsError(f"{run_dir} already exists; pass --overwrite to replace it")
    version = new_version(run_dir)
    try:
        write(version)
        publish_version(run_dir, version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise


FINGERPRINT_PARTS = {"config": "the recipe", "data": "the data files", "processes": "the number of processes"}
SAVED_BEFORE_PROCESSES = {"processes": 1}
"""What a fingerprint saved before it named the number of processes means: one."""


def resume_state(state: Path, fingerprint: dict, log=print) -> None:
    """Keep the training state in `state` only if it was saved under the same recipe, data files and
    number of processes (a multi-process state holds the data-parallel wrapper's weights)."""
    if state.exists():
        path = state / "fingerprint.json"
        saved = SAVED_BEFORE_PROCESSES | (json.loads(path.read_text()) if path.exists() else {})
        changed = [what for what in FINGERPRINT_PARTS if saved.get(what) != fingerprint[what]]
        if changed:
            reason = " and ".join(FINGERPRINT_PARTS[what] for what in changed)
            log(f"discarding training state in {state}: {reason} changed since it was saved; training afresh")
            shutil.rmtree(state)
        elif (state / "train" / "progress.json").exists():
            epoch = json.loads((state / "train" / "progress.json").read_text())["epoch"]
            log(f"resuming training from the checkpoint after epoch {epoch} in {state}")
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state / "fingerprint.json", fingerprint)


def check_run_name(name: str) -> None:
    """A run name is one plain path component: it names `<output_dir>/<run_name>` and its hidden siblings."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"run_name must be a plain name (no '/', not starting with '.'), got {name!r}")


def run(config: TrainConfig, *, overwrite: bool = False, log=print, threads: int | None = None) -> Path:
    """Execute a recipe end to end; returns the export path (a symlink to the export's version directory).

    Under a multi-process launcher every process calls this; only the main one logs and writes, and each
    returns once the export is published. `threads`: torch CPU threads per process (see distributed.init)."""
    start = time.perf_counter()
    check_run_name(config.run_name)
    distributed.init(threads)
    if not distributed.is_main():
        log = _silent
    out = Path(config.output_dir)
    run_dir = out / config.run_name
    distributed.on_main(lambda: clean_leftovers(run_dir, log))
    if os.path.lexists(run_dir) and not overwrite:
        raise FileExistsError(f"{run_dir} already exists; pass --overwrite to replace it (or --run-name)")
    train, test = load_tables(config)
    check_model_count(train.k, f"the training queries of {data_paths(config)[0]}")
    check_cost_spread(train, f"the training queries of {data_paths(config)[0]}")
    state = out / f".{config.run_name}.partial"
    distributed.on_main(lambda: resume_state(state, {
        "config": config_fingerprint(config), "data": data_fingerprint(data_paths(config)),
        "processes": distributed.world_size(),
    }, log))

    folds = config.calibration.folds
    processes = f" in {distributed.world_size()} processes" if distributed.active() else ""
    log(f"data: {train.n} queries to train the estimator and calibrate on ({folds}-fold cross-fitting), "
        f"{test.n} to test, {train.k} models{processes}")
    # logs go to <output_dir>/wandb and outlive the run's state
    wandb_run = start_wandb(config, out) if distributed.is_main() else None
    logger = (lambda record: wandb_run.log(record)) if wandb_run is not None else None

    def log_epoch(record: dict) -> None:
        if logger is not None:
            logger(record)
        if "val_loss" in record:
            log(f"  epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}")
        if "move_gain_run" in record:  # how much the answers seen move the estimates (1: as trained, 0: not at all)
            log(f"  post-hoc move gains: models run {record['move_gain_run']:.2f}, others {record['move_gain_not_run']:.2f}")

    # A frozen encoder serves the estimator and every fold, and embeds each query once (the folds' subsets
    # would miss the on-disk cache, keyed by the whole list of texts, so the folds skip it); several
    # processes embed a share of the queries each.
    frozen = not config.estimator.finetune
    shared = MemoEmbedder(ShardedEmbedder(TextEncoder(config.estimator.encoder))) if frozen else None
    member = dataclasses.replace(config.estimator, embedding_cache=None) if frozen else config.estimator
    estimator = LearnedEstimator(config.estimator, shared)
    t0 = time.perf_counter()
    estimator.fit(train, state_dir=state / "train", log=log_epoch, progress=distributed.is_main())
    log(f"estimator trained in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    out_of_fold = CrossFitted(lambda: LearnedEstimator(member, shared), folds, config.seed).fit(train)
    log(f"{folds} out-of-fold estimators for calibration trained in {time.perf_counter() - t0:.1f}s")
    if frozen and distributed.active():
        estimator.embed(list(test.queries))  # a share each now, so the main process finds them all below

    cal = config.calibration
    eval_config = EvaluationConfig(
        max_depth=cal.max_depth,
        n_budgets=cal.budgets,
        methods=tuple(cal.methods),
        n_bootstrap=cal.bootstrap,
        seed=config.seed,
        workers=cal.workers or default_workers(),
        kernel=KernelConfig(n_samples=cal.samples, seed=config.seed),
        calibration=CalibrationConfig(n_trials=cal.trials, cascade_routing_trials=cal.cascade_routing_trials,
                                      seed=config.seed, sigma_scales=tuple(cal.sigma_scales), min_spend=cal.min_spend),
    )

    def finish() -> None:
        """Calibrate, evaluate and export: once, on the main process."""
        t0 = time.perf_counter()
        metrics = evaluate(train, test, estimator, eval_config, log=log, calibration_estimator=out_of_fold)
        log(f"calibrated and evaluated in {time.perf_counter() - t0:.1f}s")
        metrics["estimator"] = {"name": "learned", "history": estimator.history}
        metrics["wall_time_s"] = time.perf_counter() - start
        if wandb_run is not None:
            wandb_run.summary.update({f"auc/{k}": v for k, v in metrics["auc"].items()})
            wandb_run.finish()

        sizes = {"train": str(config.data.train or BUNDLED), "test": config.data.test, "n_estimator": train.n,
                 "n_calibration": train.n, "calibration_folds": folds, "n_test": test.n}

        def write(directory: Path) -> None:
            estimator.save(directory)
            write_report(metrics, directory, title=f"{config.run_name} · learned estimator")
            files = manifest_format.checksums(directory)
            atomic_write_json(directory / "manifest.json", manifest(config, estimator, metrics, sizes, files))

        export(run_dir, write, overwrite)
        shutil.rmtree(state, ignore_errors=True)
        for name, value in metrics["auc"].items():
            log(f"{name:>18s}  AUC {value:6.2f}{spend_suffix(metrics, name)}")
        log(f"wall time: {time.perf_counter() - start:.1f}s -> {run_dir}")

    distributed.on_main(finish)
    return run_dir


def _silent(message: str) -> None:
    """The log of the processes other than the main one: it alone reports."""


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m router_train.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/default.yaml")
    p.add_argument("--train-data", help="override data.train (a routing table path, bundled or bundled:NAME)")
    p.add_argument("--test-data", help="override data.test (then --train-data/data.train is all training data)")
    p.add_argument("--run-name", help="override run_name (the export goes to <output_dir>/<run_name>)")
    p.add_argument("--output-dir", help="override output_dir (default checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export of the same run name")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice; in a "
                   "multi-process CPU run, this machine's cores divided among its processes)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    with user_errors(args.debug):
        config = load_config(args.config)
        if args.train_data:
            config.data.train = args.train_data
        if args.test_data:
            config.data.test = args.test_data
        if args.run_name:
            config.run_name = args.run_name
        if args.output_dir:
            config.output_dir = args.output_dir
        return run(config, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr, flush=True),
                   threads=args.threads)


if __name__ == "__main__":
    main()
