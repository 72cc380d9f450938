"""End-to-end: the evaluate CLI on a tiny table writes the promised report, guards its output (an
earlier report survives every failure) and reports user errors in one line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import random_frame

from estimators import NoisyEstimator, QualityEstimator
from estimators.base import Estimate
from router_train import evaluate as evaluate_cli
from router_train import outputs
from router_train.calibrate import CalibrationConfig
from router_train.kernel import KernelConfig
from router_train.rules import RulesBaseline
from router_train.table import load_table

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--budgets", "4", "--trials", "3", "--samples", "16", "--bootstrap", "50", "--max-depth", "3", "--folds", "2"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit status 2 and one `error: ...` line, no traceback."""
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "table.parquet"
    random_frame(120, 5, seed=4).to_parquet(path, index=False)
    return path


def test_cli_writes_metrics_and_plot(table_path, tmp_path, capsys):
    out = tmp_path / "report"
    evaluate_cli.main(["--data", str(table_path), "--estimator", "noisy", "--noise", "low", "--out", str(out), *TINY])
    metrics = json.loads((out / "metrics.json").read_text())
    names = {"linear", "oracle", "rules", "routing", "threshold_cascade", "cascade", "cascade_routing"}
    assert set(metrics["auc"]) == names and set(metrics["auc_ci"]) == names and set(metrics["curves"]) == names
    for name in names:
        lo, hi = metrics["auc_ci"][name]
        assert lo <= metrics["auc"][name] + 1e-9 and metrics["auc"][name] <= hi + 1e-9
        assert 0.0 <= metrics["auc"][name] <= 100.0
    assert len(metrics["curves"]["routing"]) == 4 and len(metrics["curves"]["rules"]) == 4
    assert [s["budget"] for s in metrics["strategies"]["rules"]] == metrics["budgets"]
    assert metrics["models"] == [f"model-{j}" for j in range(5)]
    assert (metrics["n_train"], metrics["n_test"]) == (84, 36)
    # --max-depth caps cascade routing only; the cascades run uncapped, through all 5 models
    assert metrics["max_depth"] == 3
    assert metrics["method_depth"] == {"oracle": 1, "routing": 1, "threshold_cascade": 5, "cascade": 5,
                                       "cascade_routing": 3}
    for name, depth in metrics["method_depth"].items():
        assert {s["max_depth"] for s in metrics["strategies"][name]} == {depth}
    assert metrics["auc"]["oracle"] >= max(metrics["auc"][m] for m in names - {"oracle"}) - 1e-9
    # test spend over budget: each curve point's mean test cost divided by the budget it was fitted for
    assert set(metrics["spend"]) == names - {"linear"}
    for name, spend in metrics["spend"].items():
        expected = [point[0] / budget for point, budget in zip(metrics["curves"][name], metrics["budgets"])]
        assert spend == pytest.approx(expected, rel=1e-9)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "wall time:" in printed
    routing = metrics["spend"]["routing"]
    assert f"test spend {min(routing):.2f}-{max(routing):.2f} x budget" in next(
        line for line in printed.splitlines() if line.strip().startswith("routing"))
    assert "test spend" not in next(line for line in printed.splitlines() if line.strip().startswith("linear"))


def test_budget_spend_is_test_cost_over_budget():
    cost = np.array([[1.0, 4.0, 0.0], [3.0, 2.0, 5.0]])  # (queries, budgets): means 2, 3, 2.5
    spend = evaluate_cli.budget_spend(cost, np.array([2.0, 4.0, 0.0]))
    assert spend == [1.0, 0.75, None]  # a zero budget has no ratio
    assert evaluate_cli.spend_summary(spend) == "test spend 0.75-1.00 x budget"
    assert evaluate_cli.spend_summary([None]) == "test spend n/a (zero budgets)"


def test_cli_refuses_to_overwrite_without_the_flag(table_path, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--data", str(table_path), "--out", str(out), "--methods", "routing", *TINY]
    evaluate_cli.main(args)
    before = (out / "metrics.json").read_text()
    assert "--overwrite" in user_error(capsys, args)
    assert (out / "metrics.json").read_text() == before
    evaluate_cli.main([*args, "--overwrite"])
    assert sorted(os.listdir(tmp_path)) == ["report"]  # no staging or old copies left beside it


def test_earlier_results_survive_every_failure(table_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    args = ["--out", str(out), "--overwrite", "--methods", "routing", *TINY]
    evaluate_cli.main(["--data", str(table_path), *args])
    before = snapshot(out)
    bad = tmp_path / "bad.csv"
    bad.write_text("query_id,query,model,quality,cost\nq0,x,a,7,0.1\n")
    for data in (tmp_path / "nope.parquet", bad):
        user_error(capsys, ["--data", str(data), *args])
        assert snapshot(out) == before
    # a failure or interrupt while the new report is being written: the old one stays, nothing is left beside it
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        def fail(*a, error=error, **k):
            raise error
        monkeypatch.setattr(evaluate_cli, "plot_curves", fail)  # after metrics.json is written
        with pytest.raises(type(error)):
            evaluate_cli.main(["--data", str(table_path), *args])
        assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["bad.csv", "report"]
    monkeypatch.undo()
    # a Ctrl-C (a real SIGINT) just as the staging directory is made: it is removed all the same
    mkdtemp = outputs.tempfile.mkdtemp

    def signalled(*a, **k):
        made = mkdtemp(*a, **k)
        if k.get("prefix", "").startswith(".report."):
            signal.raise_signal(signal.SIGINT)
        return made
    monkeypatch.setattr(outputs.tempfile, "mkdtemp", signalled)
    with pytest.raises(KeyboardInterrupt):
        evaluate_cli.main(["--data", str(table_path), *args])
    monkeypatch.undo()
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["bad.csv", "report"]
    # a file at --out is refused, never deleted, even with --overwrite
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert "is not a directory" in user_error(capsys, ["--data", str(table_path), *args[2:], "--out", str(a_file)])
    assert a_file.read_text() == "mine"
    # a new report into a directory that does not exist yet
    evaluate_cli.main(["--data", str(table_path), *args[2:], "--out", str(tmp_path / "a" / "b")])
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["curves.png", "metrics.json"]


def test_cli_with_separate_test_data_and_model_subset(table_path, tmp_path):
    frame = load_table(table_path)
    train_path, test_path = tmp_path / "train.csv", tmp_path / "test.jsonl"
    df = random_frame(120, 5, seed=4)
    df[df["split"] == "train"].drop(columns="split").to_csv(train_path, index=False)
    df[df["split"] == "test"].drop(columns="split").to_json(test_path, orient="records", lines=True)
    metrics = evaluate_cli.main(
        ["--data", str(train_path), "--test-data", str(test_path), "--models", "model-4,model-0,model-2",
         "--out", str(tmp_path / "r"), "--methods", "routing,cascade_routing", *TINY]
    )
    assert metrics["models"] == ["model-0", "model-2", "model-4"]
    assert (metrics["n_train"], metrics["n_test"]) == (frame.train().n, frame.test().n)
    assert set(metrics["auc"]) == {"linear", "oracle", "rules", "routing", "cascade_routing"}


def test_cli_rejects_unknown_methods(table_path, tmp_path, capsys):
    argv = ["--data", str(table_path), "--out", str(tmp_path / "x"), "--methods", "magic"]
    assert "--methods has unknown names ['magic']" in user_error(capsys, argv)
    with pytest.raises(ValueError, match="unknown names"):
        evaluate_cli.main([*argv, "--debug"])
    assert not (tmp_path / "x").exists()


def test_table_errors_are_one_line(table_path, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x"), *TINY]
    semicolons = tmp_path / "semi.csv"
    random_frame(30, 3, seed=1).to_csv(semicolons, sep=";", index=False)
    evaluate_cli.main(["--data", str(semicolons), *out])  # the delimiter is sniffed
    assert "at least two models of different mean cost" in user_error(
        capsys, ["--data", str(table_path), "--models", "model-1", *out, "--overwrite"])
    df = random_frame(120, 5, seed=4)
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    df[df.split == "train"].to_parquet(train, index=False)
    df[(df.split == "test") & (df.model != "model-4")].to_parquet(test, index=False)
    message = user_error(capsys, ["--data", str(train), "--test-data", str(test), *out, "--overwrite"])
    assert "test.parquet lacks model(s) ['model-4'] of the training table" in message
    many = tmp_path / "many.parquet"
    random_frame(20, 63, seed=2).to_parquet(many, index=False)
    message = user_error(capsys, ["--data", str(many), *out, "--overwrite"])
    assert "63 models, but the decision kernel routes among at most 62" in message and "--models" in message


def test_noisy_estimator_recalibrates_on_training_rows_only(table_path):
    table = load_table(table_path)
    train = table.train()
    est = NoisyEstimator("high", seed=3).fit(train)
    changed = table.test()
    changed.quality = 1.0 - changed.quality
    est2 = NoisyEstimator("high", seed=3).fit(train)
    est2.featurize(changed)
    assert torch.equal(est.coef_before, est2.coef_before) and torch.equal(est.variance, est2.variance)
    # the noise of a cell depends on the seed and query id only, not on the row order
    feats = est.featurize(train)
    flipped = est.featurize(train.subset(torch.arange(train.n - 1, -1, -1)))
    assert torch.equal(feats["ante"].flip(0), flipped["ante"])
    assert not torch.equal(feats["ante"], NoisyEstimator("high", seed=4).fit(train).featurize(train)["ante"])
    # recalibrated estimates are unbiased on the training rows; Σ is zero for run models
    np.testing.assert_allclose(feats["ante"].mean(0), train.quality.mean(0), atol=1e-9)
    run = torch.zeros(3, table.k, dtype=torch.bool)
    run[:, 1] = True
    estimate = est.predict(feats, torch.arange(3), run)
    assert torch.all(estimate.cov[:, 1, 1] == 0) and torch.all(estimate.cov[:, 0, 0] > 0)
    assert torch.equal(estimate.quality[:, 1], feats["post"][:3, 1])


def test_noisy_estimator_rejects_unknown_levels():
    with pytest.raises(ValueError, match="noise must be one of"):
        NoisyEstimator("extreme")


@pytest.mark.parametrize("estimator", ["logreg", "learned"])
def test_cli_trains_other_estimators(table_path, tmp_path, estimator):
    from tiny_models import tiny_encoder_dir

    args = ["--data", str(table_path), "--estimator", estimator, "--out", str(tmp_path / "r"),
            "--methods", "routing,cascade_routing", *TINY]
    if estimator == "learned":
        config = tmp_path / "c.yaml"
        config.write_text(
            "estimator:\n  encoder: {name_or_path: %s, max_length: 64}\n  hidden: 16\n  layers: 1\n  heads: 2\n"
            "  embedding_cache: %s\n  train: {epochs: 1, per_row: 1, variance_epochs: 1}\n"
            % (tiny_encoder_dir(tmp_path / "enc"), tmp_path / "cache")
        )
        args += ["--config", str(config)]
    metrics = evaluate_cli.main(args)
    assert metrics["estimator"]["name"] == estimator
    assert metrics["n_train"] == 84  # out-of-fold estimates of every training query are calibrated on
    assert set(metrics["auc"]) == {"linear", "oracle", "rules", "routing", "cascade_routing"}
    # the rules are fitted on all 84 training queries
    rules = RulesBaseline().fit(load_table(table_path).train())
    assert metrics["strategies"]["rules"] == [s.to_dict() for s in rules.calibrate(metrics["budgets"])]


def test_cli_rejects_a_checkpoint_for_other_estimators(table_path, tmp_path, capsys):
    argv = ["--data", str(table_path), "--checkpoint", "x", "--out", str(tmp_path / "r")]
    assert "--checkpoint needs --estimator learned" in user_error(capsys, argv)


def test_worker_processes_give_the_report_of_one_process(table_path, tmp_path):
    """Methods calibrated side by side in forked workers: the same strategies, curves and AUCs. Run as
    the CLI in fresh processes (the test process may hold other threads, where evaluate does not fork)."""
    reports = {}
    for workers in ("1", "2"):
        out = tmp_path / f"report-{workers}"
        done = subprocess.run(
            [sys.executable, "-m", "router_train.evaluate", "--data", str(table_path), "--estimator", "noisy",
             "--noise", "low", "--out", str(out), "--workers", workers, *TINY],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr
        assert ("(worker process)" in done.stderr) == (workers == "2")
        reports[workers] = json.loads((out / "metrics.json").read_text())
        del reports[workers]["wall_time_s"]
    assert reports["1"] == reports["2"]


def test_workers_must_be_positive(table_path, tmp_path, capsys):
    line = user_error(capsys, ["--data", str(table_path), "--workers", "0", "--out", str(tmp_path / "r"), *TINY])
    assert "--workers must be at least 1" in line


class ZeroSigma(QualityEstimator):
    """The noisy estimator's estimates with Σ = 0 everywhere; `uncertain` says so or not."""

    def __init__(self, uncertain: bool) -> None:
        self.inner, self.says = NoisyEstimator("low", seed=1), uncertain

    @property
    def uncertain(self) -> bool:
        return self.says

    def fit(self, table):
        self.inner.fit(table)
        self.models = self.inner.models
        return self

    def featurize(self, table):
        return self.inner.featurize(table)

    def predict(self, features, rows, run):
        est = self.inner.predict(features, rows, run)
        return Estimate(quality=est.quality, cost=est.cost, cov=torch.zeros_like(est.cov))


def test_an_estimator_without_sigma_calibrates_one_sigma_multiplier_and_reports_the_same(table_path, monkeypatch):
    """With Σ = 0 every multiplier calibrates the same strategies: an estimator that says it has no Σ (a learned
    one trained without answers) gets only the first multiplier tried, and the same report."""
    from router_train import calibrate as calibration

    table = load_table(table_path)
    train, test = table.train(), table.test()
    tried = []
    one_budget = calibration.calibrate

    def spy(sim, mode, budget, *, config, **kwargs):
        tried.append((mode, config.sigma_scales))
        return one_budget(sim, mode, budget, config=config, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", spy)
    reports = {}
    for uncertain in (True, False):
        tried.clear()
        config = evaluate_cli.EvaluationConfig(
            max_depth=3, n_budgets=4, n_bootstrap=50, workers=1, kernel=KernelConfig(n_samples=16),
            calibration=CalibrationConfig(n_trials=3, sigma_scales=(0.0, 0.5, 1.0)))
        reports[uncertain] = evaluate_cli.evaluate(train, test, ZeroSigma(uncertain).fit(train), config, log=lambda m: None)
        expected = (0.0, 0.5, 1.0) if uncertain else (0.0,)
        for mode in ("cascade", "cascade_routing"):
            scales = tuple(sorted({s for m, one in tried if m == mode for s in one}))
            assert scales == expected, tried
    assert reports[True] == reports[False]
