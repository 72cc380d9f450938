"""The training recipe end to end on a tiny table with a tiny random encoder: the export it promises,
no silent overwrite, and config errors that name the key."""

import json

import pytest
import yaml
from factories import random_frame
from tiny_models import tiny_encoder_dir

from estimators.learned import LearnedEstimator
from router_train import evaluate as evaluate_cli
from router_train import train as recipe
from router_train.config import load_config


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    random_frame(160, 4, seed=8).to_parquet(root / "table.parquet", index=False)
    config = {
        "run_name": "tiny",
        "output_dir": str(root / "checkpoints"),
        "data": {"train": str(root / "table.parquet")},
        "estimator": {
            "encoder": {"name_or_path": str(tiny_encoder_dir(root / "encoder")), "max_length": 64},
            "hidden": 16, "layers": 1, "heads": 2,
            "embedding_cache": str(root / "cache"),
            "train": {"epochs": 2, "per_row": 2, "batch_size": 64, "variance_epochs": 1},
        },
        "calibration": {"budgets": 3, "trials": 2, "samples": 16, "bootstrap": 20, "max_depth": 2},
        "wandb": {"mode": "disabled"},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def test_recipe_exports_a_loadable_run(tiny_recipe):
    root, path = tiny_recipe
    run_dir = recipe.main(["--config", str(path)])
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "curves.png", "estimator.json", "estimator.safetensors", "manifest.json", "metrics.json",
    ]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["models"] == [f"model-{j}" for j in range(4)]
    assert manifest["max_depth"] == 2 and len(manifest["budgets"]) == 3
    assert set(manifest["strategies"]) == {"routing", "threshold_cascade", "cascade", "cascade_routing"}
    depths = {mode: {s["max_depth"] for s in fits} for mode, fits in manifest["strategies"].items()}
    assert depths == {"routing": {1}, "threshold_cascade": {4}, "cascade": {4}, "cascade_routing": {2}}
    assert all(len(s) == 3 and s[0]["budget"] == manifest["budgets"][0] for s in manifest["strategies"].values())
    assert manifest["package_version"] and manifest["encoder"]["revision"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"auc", "auc_ci", "curves", "models", "n_train", "n_test"} <= set(metrics)
    LearnedEstimator.load(run_dir)
    evaluated = evaluate_cli.main(
        ["--data", str(root / "table.parquet"), "--estimator", "learned", "--checkpoint", str(run_dir),
         "--out", str(root / "eval"), "--budgets", "3", "--trials", "2", "--samples", "16", "--bootstrap", "20",
         "--max-depth", "2", "--methods", "routing,cascade_routing"]
    )
    assert evaluated["estimator"]["checkpoint"] == str(run_dir) and evaluated["models"] == manifest["models"]
    assert not list((root / "checkpoints").glob(".tiny*")), "no temporary or partial directories left behind"

    with pytest.raises(SystemExit, match="--overwrite"):
        recipe.main(["--config", str(path)])
    before = (run_dir / "manifest.json").read_text()
    recipe.main(["--config", str(path), "--overwrite"])
    assert (run_dir / "manifest.json").read_text() != before  # replaced (new timestamp)


def test_data_overrides_and_unknown_config_keys(tiny_recipe, tmp_path):
    root, path = tiny_recipe
    config = yaml.safe_load(path.read_text())
    config["estimator"]["hiden"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"estimator: unknown key\(s\) \['hiden'\]"):
        load_config(bad)
    config["estimator"].pop("hiden")
    config["calibration"]["budgets"] = "many"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="calibration.budgets must be int"):
        load_config(bad)
    config["calibration"]["budgets"] = 3
    for key, value, message in (("data", {"split": "random"}, "data.split must be auto, column or seeded"),
                                ("calibration", {"min_spend": 2}, "calibration.min_spend is a share")):
        bad.write_text(yaml.safe_dump({**config, key: {**config[key], **value}}))
        with pytest.raises(ValueError, match=message):
            load_config(bad)
    seeded = load_config(path)
    seeded.data.split, seeded.data.test_fraction = "seeded", 0.5
    train, test = recipe.load_tables(seeded)
    assert test.n == 80 and train.n == 80  # half of the 160 queries, not the split column's 30 %

    frame = random_frame(160, 4, seed=8)
    frame[frame.split == "train"].to_parquet(tmp_path / "train.parquet", index=False)
    frame[frame.split == "test"].to_csv(tmp_path / "test.csv", index=False)
    run_dir = recipe.main(["--config", str(path), "--train-data", str(tmp_path / "train.parquet"),
                           "--test-data", str(tmp_path / "test.csv"), "--run-name", "split-files"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["n_test"] == int((frame.split == "test").sum() / 4)
