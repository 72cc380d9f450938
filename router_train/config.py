"""Training recipes are YAML files (configs/*.yaml) read into typed dataclasses, with unknown or
mistyped keys reported by their dotted path."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from estimators.learned import LearnedConfig

from .evaluate import METHODS
from .dataclass_dicts import from_dict
from .table import SPLIT_MODES


@dataclass
class DataConfig:
    """Which routing tables to train and test on."""

    # table path, or bundled[:NAME] (router_train/data/NAME.parquet); its split column (or a seeded split)
    # gives the test rows unless `test` is set
    train: str = ""
    split: str = "auto"  # "column", "seeded" (of query ids, by `seed`), or "auto": the column if it has both
    test: str | None = None
    models: list[str] | None = None
    missing: str = "drop"
    test_fraction: float = 0.2


@dataclass
class CalibrationSettings:
    """Budget calibration and evaluation of the exported strategies."""

    folds: int = 5  # λ/γ are calibrated on out-of-fold estimates of all training queries (cross-fitting)
    max_depth: int = 3  # depth cap of cascade routing; the cascades run uncapped
    budgets: int = 20
    trials: int = 30  # TPE trials for the per-step thresholds / λ of the cascades
    cascade_routing_trials: int | None = 0  # the same for cascade routing (0: one shared λ; None: `trials`)
    samples: int = 100
    bootstrap: int = 500
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    sigma_scales: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # Σ multipliers to calibrate
    min_spend: float = 0.0  # share of a budget a fitted strategy spends at least on the calibration queries
    workers: int | None = None  # processes calibrating the methods side by side (None: the CPU cores available)


@dataclass
class WandbConfig:
    """Experiment logging; WANDB_MODE in the environment wins over `mode`."""

    project: str = "router-train"
    mode: str = "offline"


@dataclass
class TrainConfig:
    """A whole `make train` run."""

    run_name: str = "default"
    output_dir: str = "checkpoints"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    estimator: LearnedConfig = field(default_factory=LearnedConfig)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a YAML recipe; relative data paths are resolved against the working directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    config = from_dict(TrainConfig, data, where=str(path))
    unknown = sorted(set(config.calibration.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"{path}: calibration.methods has unknown names {unknown}; choose from {list(METHODS)}")
    if config.data.split not in SPLIT_MODES:
        raise ValueError(f"{path}: data.split must be auto, column or seeded, got {config.data.split!r}")
    if config.calibration.folds < 2:
        raise ValueError(f"{path}: calibration.folds must be at least 2, got {config.calibration.folds}")
    for key in ("trials", "cascade_routing_trials"):
        value = getattr(config.calibration, key)
        if value is not None and value < 0:
            raise ValueError(f"{path}: calibration.{key} must be >= 0 (0: one multiplier for every step), got {value}")
    if config.calibration.workers is not None and config.calibration.workers < 1:
        raise ValueError(f"{path}: calibration.workers must be at least 1 (or null: the CPU cores available), "
                         f"got {config.calibration.workers}")
    if not 0.0 <= config.calibration.min_spend <= 1.0:
        raise ValueError(f"{path}: calibration.min_spend is a share of the budget in [0, 1], "
                         f"got {config.calibration.min_spend}")
    return config


def to_dict(config) -> dict:
    """Plain nested dict of a config (for wandb and the manifest)."""
    return dataclasses.asdict(config)
