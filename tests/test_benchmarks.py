"""Benchmark scripts on tiny tables: estimator_signal (every estimator gets a row, the test split is never read)
and repeated_splits (its summary is the mean and paired differences of the per-run metrics)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from factories import random_frame
from tiny_models import tiny_encoder_dir

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal")
    config = {
        "estimator": {
            "encoder": {"name_or_path": str(tiny_encoder_dir(root / "encoder")), "max_length": 64},
            "hidden": 16, "layers": 1, "heads": 2, "neighbors": 5,
            "embedding_cache": str(root / "cache"),
            "train": {"epochs": 1, "per_row": 1, "batch_size": 64, "variance_epochs": 1},
        },
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def _run(root: Path, frame, *extra: str) -> dict:
    frame.to_parquet(root / "table.parquet", index=False)
    return _load("estimator_signal").main(
        ["--data", str(root / "table.parquet"), "--config", str(root / "tiny.yaml"), "--neighbors", "0,5",
         "--bootstrap", "20", "--max-depth", "2", *extra]
    )


def test_estimator_signal_compares_every_estimator_on_training_rows_only(tiny_setup, capsys):
    frame = random_frame(160, 4, seed=3)
    rows = _run(tiny_setup, frame)
    assert list(rows) == ["tag means", "neighbour prior K=5", "logreg", "knn", "learned"]
    assert rows["logreg"]["vs_logreg"] == 0.0 and rows["logreg"]["vs_logreg_ci"] == (0.0, 0.0)
    assert all(np.isfinite(r["auc"]) and 0 < r["log_loss"] and 0 <= r["centred_mse"] for r in rows.values())
    assert "| learned |" in capsys.readouterr().out

    flipped = frame.copy()
    test_rows = flipped["split"] == "test"
    flipped.loc[test_rows, "quality"] = 1.0 - flipped.loc[test_rows, "quality"]
    again = _run(tiny_setup, flipped)
    assert {n: r["auc"] for n, r in again.items()} == {n: r["auc"] for n, r in rows.items()}


def test_estimator_signal_scores_learned_seeds_and_their_ensemble(tiny_setup):
    rows = _run(tiny_setup, random_frame(160, 4, seed=3), "--learned-seeds", "2")
    assert list(rows)[-3:] == ["learned", "learned seed 1", "learned, mean of 2 seeds"]
    members = [rows["learned"]["log_loss"], rows["learned seed 1"]["log_loss"]]
    assert members[0] != members[1]  # another seed, another network
    assert rows["learned, mean of 2 seeds"]["log_loss"] <= np.mean(members) + 1e-12  # log-loss is convex in q̂
    with pytest.raises(SystemExit):
        _run(tiny_setup, random_frame(160, 4, seed=3), "--learned-seeds", "0")


def test_repeated_splits_summarizes_the_per_run_metrics_and_resumes(tmp_path, monkeypatch):
    random_frame(120, 4, seed=5).to_parquet(tmp_path / "table.parquet", index=False)
    out = tmp_path / "repeats"
    module = _load("repeated_splits")
    args = ["--data", str(tmp_path / "table.parquet"), "--estimators", "noisy,logreg", "--repeats", "2",
            "--test-fraction", "0.5", "--out", str(out), "--max-depth", "2", "--budgets", "4", "--trials", "3",
            "--samples", "16", "--bootstrap", "20", "--methods", "routing,cascade_routing", "--threads", "1"]
    summary = module.main(args)
    runs = {(e, s): json.loads((out / f"{e}-{s}" / "metrics.json").read_text()) for e in ("noisy", "logreg")
            for s in (0, 1)}
    assert runs["noisy", 0]["auc"]["linear"] != runs["noisy", 1]["auc"]["linear"]  # two different splits
    assert summary["methods"] == ["linear", "oracle", "rules", "routing", "cascade_routing"]
    for (e, s), metrics in runs.items():
        for m, value in metrics["auc"].items():
            assert summary["auc"][e][m]["values"][s] == value
    for e in ("noisy", "logreg"):
        for m in summary["methods"]:
            values = [runs[e, s]["auc"][m] for s in (0, 1)]
            assert summary["auc"][e][m]["mean"] == pytest.approx(np.mean(values))
            assert summary["auc"][e][m]["sd"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))
    differences = {d["name"]: d for d in summary["differences"]}
    assert list(differences) == ["noisy cascade_routing − rules", "noisy cascade_routing − routing",
                                 "logreg cascade_routing − rules", "logreg cascade_routing − routing",
                                 "cascade_routing: noisy − logreg"]
    diff = [runs["noisy", s]["auc"]["cascade_routing"] - runs["logreg", s]["auc"]["cascade_routing"] for s in (0, 1)]
    d = differences["cascade_routing: noisy − logreg"]
    assert d["values"] == pytest.approx(diff) and d["mean"] == pytest.approx(np.mean(diff))
    half = 12.7062 * np.std(diff, ddof=1) / np.sqrt(2)  # t quantile .975 with 1 degree of freedom
    assert d["ci"] == pytest.approx([np.mean(diff) - half, np.mean(diff) + half], rel=1e-4, abs=1e-9)
    assert "| cascade_routing: noisy − logreg |" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))

    def no_rerun(argv):
        raise AssertionError(f"evaluate ran again: {argv}")

    monkeypatch.setattr(module.evaluate, "main", no_rerun)
    assert module.main(args) == summary
    with pytest.raises(SystemExit):
        module.main([*args, "--seed", "3"])
