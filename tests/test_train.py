"""The training recipe end to end on a tiny table with a tiny random encoder: the export it promises,
no silent overwrite, an export replaced atomically, resume only on the same recipe and data, and config
errors that name the key."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from factories import random_frame
from tiny_models import tiny_encoder_dir

from estimators.encoder import TextEncoder
from estimators.learned import LearnedEstimator
from router_train import evaluate as evaluate_cli
from router_train import outputs
from router_train import train as recipe
from router_train.config import load_config


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (following a symlink at the top), by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


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
        "calibration": {"budgets": 3, "trials": 2, "samples": 16, "bootstrap": 20, "max_depth": 2, "folds": 2},
        "wandb": {"mode": "disabled"},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def test_recipe_exports_a_loadable_run(tiny_recipe, capsys):
    root, path = tiny_recipe
    run_dir = recipe.main(["--config", str(path)])
    err = capsys.readouterr().err
    assert "post-hoc move gains: models run" in err
    spend = json.loads((run_dir / "metrics.json").read_text())["spend"]["cascade_routing"]
    assert "cascade_routing  AUC" in err and f"test spend {min(spend):.2f}-{max(spend):.2f} x budget" in err
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
    # the run path is a symlink to the only version; no temporary or partial directories left behind
    assert run_dir.is_symlink() and [p.name for p in (root / "checkpoints").glob(".tiny*")] == [".tiny.versions"]
    assert list((root / "checkpoints" / ".tiny.versions").iterdir()) == [run_dir.resolve()]
    assert set(manifest["files"]) == {"curves.png", "estimator.json", "estimator.safetensors", "metrics.json"}

    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", str(path)])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
    before = (run_dir / "manifest.json").read_text()
    recipe.main(["--config", str(path), "--overwrite"])
    assert (run_dir / "manifest.json").read_text() != before  # replaced (new timestamp)
    assert list((root / "checkpoints" / ".tiny.versions").iterdir()) == [run_dir.resolve()]  # the old one removed


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
                                ("calibration", {"min_spend": 2}, "calibration.min_spend is a share"),
                                ("calibration", {"cascade_routing_trials": -1},
                                 "calibration.cascade_routing_trials must be >= 0"),
                                ("calibration", {"workers": 0}, "calibration.workers must be at least 1")):
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


def test_each_query_is_embedded_once_per_run(tiny_recipe, tmp_path, monkeypatch):
    root, path = tiny_recipe
    encoded: list[str] = []
    original = TextEncoder.encode

    def spy(self, texts, **kwargs):
        encoded.extend(texts)
        return original(self, texts, **kwargs)
    monkeypatch.setattr(TextEncoder, "encode", spy)
    config = load_config(path)
    config.output_dir, config.estimator.embedding_cache = str(tmp_path), str(tmp_path / "cache")
    recipe.run(config, log=lambda m: None)
    train, test = recipe.load_tables(config)
    assert sorted(encoded) == sorted(train.queries + test.queries)  # not again for each cross-fitting fold
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the training and the test queries


def write_export(tag: str):
    """A stand-in for the recipe's export writer: two files, then optionally an interrupt."""
    def write(directory: Path) -> None:
        (directory / "estimator.json").write_text(tag)
        (directory / "manifest.json").write_text(tag * 2)
    return write


def test_an_interrupted_export_keeps_the_old_one_and_leaves_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "tiny"
    recipe.export(run_dir, write_export("old"), overwrite=False)
    before = snapshot(run_dir)

    def interrupted(directory: Path) -> None:
        write_export("new")(directory)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        recipe.export(run_dir, interrupted, overwrite=True)
    assert snapshot(run_dir) == before

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(outputs.os, "replace", interrupt)  # just before the symlink swap
    with pytest.raises(KeyboardInterrupt):
        recipe.export(run_dir, write_export("new"), overwrite=True)
    monkeypatch.undo()
    assert snapshot(run_dir) == before
    assert os.listdir(tmp_path / ".tiny.versions") == [os.readlink(run_dir).split("/")[-1]]
    assert sorted(os.listdir(tmp_path)) == [".tiny.versions", "tiny"]

    recipe.export(run_dir, write_export("new"), overwrite=True)
    assert snapshot(run_dir) == {"estimator.json": b"new", "manifest.json": b"newnew"}
    assert len(os.listdir(tmp_path / ".tiny.versions")) == 1


def test_leftovers_of_interrupted_runs_are_cleaned(tmp_path):
    run_dir = tmp_path / "tiny"
    # an export of the earlier layout interrupted between its two renames: old and new export hidden
    (tmp_path / ".tiny.old").mkdir()
    (tmp_path / ".tiny.old" / "estimator.json").write_text("old")
    (tmp_path / ".tiny.export").mkdir()
    logs = []
    recipe.clean_leftovers(run_dir, logs.append)
    assert snapshot(run_dir) == {"estimator.json": b"old"} and "restored" in logs[0]
    assert sorted(os.listdir(tmp_path)) == ["tiny"]
    # a real directory at the run path becomes a version; a stale version of a killed run is removed
    recipe.export(run_dir, write_export("new"), overwrite=True)
    stale = outputs.new_version(run_dir)
    (stale / "estimator.json").write_text("half")
    recipe.clean_leftovers(run_dir)
    assert run_dir.is_symlink() and snapshot(run_dir) == {"estimator.json": b"new", "manifest.json": b"newnew"}
    assert os.listdir(tmp_path / ".tiny.versions") == [run_dir.resolve().name]


def test_resume_only_on_the_same_data(tiny_recipe, tmp_path, monkeypatch):
    root, path = tiny_recipe
    config = load_config(path)
    config.run_name, config.output_dir = "resume", str(tmp_path)
    config.data.train = str(tmp_path / "table.parquet")
    random_frame(160, 4, seed=8).to_parquet(config.data.train, index=False)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(recipe, "evaluate", interrupt)  # after training: the state holds the last epoch
    with pytest.raises(KeyboardInterrupt):
        recipe.run(config, log=lambda m: None)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        recipe.run(config, log=logs.append)
    assert any(m.startswith("resuming training") for m in logs)

    frame = random_frame(160, 4, seed=8)
    frame["source"] = [f"task{int(q[1:]) % 5}" for q in frame["query_id"]]  # another set of sources
    frame.to_parquet(config.data.train, index=False)
    monkeypatch.undo()
    logs = []
    run_dir = recipe.run(config, log=logs.append)
    assert any("the data files changed since it was saved; training afresh" in m for m in logs)
    assert not any(m.startswith("resuming training") for m in logs)
    assert (run_dir / "manifest.json").exists() and not (tmp_path / ".resume.partial").exists()


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tiny_recipe, tmp_path, capsys):
    root, path = tiny_recipe
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: config file") and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        recipe.main(["--config", str(tmp_path / "nope.yaml"), "--debug"])
    single = tmp_path / "one.parquet"
    frame = random_frame(40, 4, seed=1)
    frame[frame.model == "model-0"].to_parquet(single, index=False)
    with pytest.raises(SystemExit):
        recipe.main(["--config", str(path), "--train-data", str(single), "--run-name", "single",
                     "--output-dir", str(tmp_path)])
    assert "at least two models of different mean cost" in capsys.readouterr().err
    many = tmp_path / "many.parquet"
    random_frame(20, 63, seed=2).to_parquet(many, index=False)
    with pytest.raises(SystemExit):
        recipe.main(["--config", str(path), "--train-data", str(many), "--run-name", "many", "--output-dir", str(tmp_path)])
    assert "63 models, but the decision kernel routes among at most 62" in capsys.readouterr().err
    assert not (tmp_path / "many").exists()
    with pytest.raises(SystemExit):
        recipe.main(["--config", str(path), "--run-name", "../elsewhere"])
    assert "run_name must be a plain name" in capsys.readouterr().err


def test_bundled_tables_are_named_by_bundled_colon_name(tiny_recipe, tmp_path, capsys):
    root, path = tiny_recipe
    assert {"llmrouter", "mmlu_pro_sample"} <= set(recipe.bundled_names())
    assert recipe.train_path("bundled") == recipe.train_path("") == recipe.bundled_dataset("llmrouter")
    assert recipe.train_path("bundled:mmlu_pro_sample").name == "mmlu_pro_sample.parquet"
    assert recipe.train_path("t/bundled.csv") == Path("t/bundled.csv")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "answers.yaml")
    assert (config.run_name, config.data.train, config.calibration.max_depth) == (
        "answers", "bundled:mmlu_pro_sample", 3)
    assert recipe.data_paths(config) == [recipe.bundled_dataset("mmlu_pro_sample")]
    train, test = recipe.load_tables(config)
    assert train.k == 8 and train.n + test.n == 1999 and test.n > 350
    assert set(train.sources) == set(test.sources) and len(set(train.sources)) == 14
    present = sum(a is not None for row in train.answers for a in row)
    assert present > 0.95 * train.n * train.k  # answers for the post-hoc features

    for name in ("nope", "../llmrouter", "NOTICE"):
        config.data.train = f"bundled:{name}"
        with pytest.raises(ValueError, match=rf"no bundled table named '{re.escape(name)}'; the bundled tables "
                                             r"are bundled:llmrouter, bundled:mmlu_pro_sample"):
            recipe.data_paths(config)
    with pytest.raises(SystemExit):
        recipe.main(["--config", str(path), "--train-data", "bundled:nope", "--output-dir", str(tmp_path)])
    assert capsys.readouterr().err.startswith("error: data.train: no bundled table named 'nope'")
