"""Shared test set-up: make the oracle importable and keep torch single-threaded and deterministic."""

import os
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny trained export (tiny random encoder, 4 models, 5 budgets) shared by the serving tests."""
    from factories import random_frame
    from tiny_models import tiny_encoder_dir

    from router_train import train as recipe

    root = tmp_path_factory.mktemp("serve")
    random_frame(200, 4, seed=11).to_parquet(root / "table.parquet", index=False)
    config = {
        "run_name": "tiny", "output_dir": str(root / "checkpoints"),
        "data": {"train": str(root / "table.parquet")},
        "estimator": {
            "encoder": {"name_or_path": str(tiny_encoder_dir(root / "encoder")), "max_length": 64},
            "hidden": 16, "layers": 1, "heads": 2, "embedding_cache": None,
            "train": {"epochs": 3, "per_row": 2, "batch_size": 64, "variance_epochs": 1},
        },
        "calibration": {"budgets": 5, "trials": 3, "samples": 16, "bootstrap": 20, "max_depth": 3, "folds": 2},
        "wandb": {"mode": "disabled"},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return recipe.main(["--config", str(root / "tiny.yaml")])


@pytest.fixture(scope="module")
def fake():
    """An OpenAI-compatible fake backend served on loopback (tests/http_fakes.py): (backend, base URL)."""
    from http_fakes import FakeBackend, ServerThread

    backend = FakeBackend()
    server = ServerThread(backend.app)
    yield backend, server.url
    server.stop()
