"""Benchmark scripts on tiny tables: estimator_signal (every estimator gets a row, the test split is never read),
repeated_splits (its summary is the mean and paired differences of the per-run metrics; its shifted splits), the kernel
benchmark (its baselines make the kernel's decisions; it exits 0 and prints its ratio last), and
agreement_ceiling (its policies' figures, from the training split alone)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from factories import random_frame
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_encoder_dir

from router_train.kernel import KernelConfig, decide
from router_train.strategy import Strategy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy_per_query  # noqa: E402
import reference_port  # noqa: E402


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


TINY_SWEEP = ("--max-depth", "2", "--budgets", "3", "--samples", "16", "--bootstrap", "10", "--methods", "routing",
              "--threads", "1", "--workers", "1")
"""evaluate options of the repeated-split tests that only check which queries each run trains and tests on."""


def _shift_inputs(per_source: int, sources: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = per_source * sources
    ids = np.array([f"q{i:05d}" for i in range(n)], dtype=object)
    lengths = rng.integers(10, 2000, n)
    tags = np.array([f"task{i % sources}" for i in range(n)], dtype=object)
    return ids, lengths, tags


def test_shifted_splits_draw_the_source_mix_or_favour_long_prompts():
    module = _load("repeated_splits")
    ids, lengths, tags = _shift_inputs(400)
    shares = []
    for seed in range(4):
        test = module.shifted_test_ids(ids, lengths, tags, "mix", 0.5, seed)
        share = {t: np.mean([i in test for i in ids[tags == t]]) for t in sorted(set(tags))}
        assert all(0.2 - 1e-9 <= v <= 0.8 + 1e-9 for v in share.values())
        shares.append(share)
        order = np.random.default_rng(seed).permutation(len(ids))  # the same split whatever the row order
        assert module.shifted_test_ids(ids[order], lengths[order], tags[order], "mix", 0.5, seed) == test
    assert len({round(v, 3) for s in shares for v in s.values()}) > 6  # shares differ by source and by seed
    assert shares[0] != shares[1]

    ranks = []
    for seed in range(3):
        test = module.shifted_test_ids(ids, lengths, tags, "length", 0.5, seed)
        in_test = np.array([i in test for i in ids])
        for t in sorted(set(tags)):
            members = tags == t
            assert in_test[members].sum() == 200  # the mix is kept
            rank = np.argsort(np.argsort(lengths[members])) / (members.sum() - 1)
            ranks.append(rank[in_test[members]].mean())
    assert min(ranks) > 0.6  # long prompts are drawn more often (0.5 for a uniform draw)
    with pytest.raises(module.ShiftError, match="at least 2 distinct"):
        module.shifted_test_ids(ids, lengths, np.array([""] * len(ids), dtype=object), "mix", 0.5, 0)

    for seed, tag in enumerate(sorted(set(tags))):  # `source`: seed s tests on the s-th source alone
        assert module.shifted_test_ids(ids, lengths, tags, "source", 0.5, seed) == set(ids[tags == tag])
    with pytest.raises(module.ShiftError, match="--repeats at most 3"):
        module.shifted_test_ids(ids, lengths, tags, "source", 0.5, 3)


def test_repeated_splits_evaluates_the_shifted_split_it_writes(tmp_path, capsys):
    frame = random_frame(150, 3, seed=4)
    frame["query"] = frame["query"] + frame["query_id"].map(lambda q: " word" * (int(q[1:]) % 40))
    frame.to_csv(tmp_path / "table.csv", index=False)
    out = tmp_path / "shifted"
    module = _load("repeated_splits")
    args = ["--data", str(tmp_path / "table.csv"), "--estimators", "noisy", "--repeats", "2", "--shift", "mix",
            "--out", str(out), *TINY_SWEEP]
    summary = module.main(args)
    assert summary["shift"] == "mix" and "test shifted by mix" in capsys.readouterr().out
    for seed in (0, 1):
        written = pd.read_parquet(out / "splits" / f"mix-{seed}.parquet")
        per_query = written.groupby("query_id")["split"].first()
        first = written.drop_duplicates("query_id").set_index("query_id")
        expected = module.shifted_test_ids(per_query.index.to_numpy(dtype=object),
                                           first.loc[per_query.index, "query"].str.len().to_numpy(),
                                           first.loc[per_query.index, "source"].to_numpy(dtype=object),
                                           "mix", 0.5, seed)
        assert set(per_query.index[per_query == "test"]) == expected
        assert json.loads((out / f"noisy-{seed}" / "metrics.json").read_text())["n_test"] == len(expected)
        assert len(written) == len(frame) and set(written.columns) == set(frame.columns)
    one_source = frame.assign(source="all")
    one_source.to_parquet(tmp_path / "one.parquet", index=False)
    with pytest.raises(SystemExit):
        module.main(["--data", str(tmp_path / "one.parquet"), "--estimators", "noisy", "--repeats", "2",
                     "--shift", "mix", "--out", str(tmp_path / "one")])
    assert "at least 2 distinct" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 4 held-out sources asked of a table with 3: refused before any run
        module.main([*args[:4], "--repeats", "4", "--shift", "source", "--out", str(tmp_path / "loso")])
    assert "--repeats at most 3" in capsys.readouterr().err
    assert not list((tmp_path / "loso").glob("noisy-*"))


def test_inner_splits_never_read_an_outer_test_query(tmp_path, capsys):
    from router_train.table import seeded_test_ids

    frame = random_frame(120, 3, seed=6)
    frame.to_parquet(tmp_path / "table.parquet", index=False)
    out = tmp_path / "inner"
    module = _load("repeated_splits")
    args = ["--data", str(tmp_path / "table.parquet"), "--estimators", "noisy", "--repeats", "2", "--inner", "2",
            "--out", str(out), *TINY_SWEEP]
    summary = module.main(args)
    every = frame["query_id"].astype(str).unique().astype(object)
    inner_tests = []
    for s in (0, 1):
        outer_test = set(seeded_test_ids(every, 0.5, s).tolist())  # what `evaluate --split seeded --seed s` tests on
        for j in (0, 1):
            written = pd.read_parquet(out / "splits" / f"inner-{s}-{j}.parquet")
            per_query = written.groupby("query_id")["split"].first()
            assert not outer_test & set(per_query.index)  # the outer test half is never read
            assert set(per_query.index) | outer_test == set(every)  # the whole training half is
            assert (per_query == "test").sum() == round(0.5 * len(per_query))
            inner_tests.append(frozenset(per_query.index[per_query == "test"]))
            assert json.loads((out / f"noisy-{s}-{j}" / "metrics.json").read_text())["n_test"] == (per_query == "test").sum()
    assert len(set(inner_tests)) == 4  # four different inner splits
    assert summary["repeats"] == 4 and summary["inner"] == 2
    assert "inner splits (2 of each of 2 outer training halves" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main([*args, "--shift", "mix"])
    assert "--inner" in capsys.readouterr().err


GRID = [0.0, 0.25, 0.5, 0.5 + 4e-7, 0.75, 1.0]  # 0.5 + 4e-7 ties 0.5 within the tolerance


@st.composite
def routing_cases(draw):
    """Cascade-routing inputs for one query: k, depth cap, run set, Σ none / diagonal / full, λ, force_order;
    grid qualities, zero and equal costs and λ = 0 make exact ties."""
    k = draw(st.integers(1, 8))
    depth = draw(st.integers(1, min(k + 1, 5)))
    quality = np.array(draw(st.lists(st.one_of(st.sampled_from(GRID), st.floats(0, 1, width=32)), min_size=k,
                                     max_size=k)))
    cost = np.array(draw(st.lists(st.one_of(st.sampled_from([0.0, 1e-4, 2e-4]), st.floats(1e-6, 1e-3)),
                                  min_size=k, max_size=k)))
    run = sorted(draw(st.permutations(range(k)))[: draw(st.integers(0, min(k, depth)))])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["none", "diagonal", "full"]))
    cov = None
    if kind == "diagonal":
        cov = np.diag(rng.uniform(0, 0.1, k))
    elif kind == "full":
        a = rng.normal(size=(k, k)) * 0.2
        cov = a @ a.T / k
    if cov is not None:
        cov[run, :] = 0.0  # post-hoc estimates of run models do not move
        cov[:, run] = 0.0
    lam = st.one_of(st.sampled_from([0.0, 100.0, 1000.0]), st.floats(0, 5000))
    strategy = Strategy("cascade_routing", depth, lambdas=[draw(lam) for _ in range(depth)],
                        force_order=draw(st.booleans()))
    return quality, cost, run, cov, strategy


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(routing_cases())
@example((np.array([0.5, 0.5 + 4e-7, 0.1]), np.full(3, 1e-4), [], None,
          Strategy("cascade_routing", 1, lambdas=[100.0])))
def test_reference_port_and_numpy_per_query_make_the_kernels_decisions(case):
    """Same decisions as the kernel, ties included (the example: within the tolerance, equal costs, the first)."""
    quality, cost, run, cov, strategy = case
    k = len(quality)
    mask = torch.zeros(1, k, dtype=torch.bool)
    mask[0, run] = True
    out = decide(torch.tensor(quality)[None], torch.tensor(cost)[None], mask, strategy,
                 cov=None if cov is None else torch.tensor(cov)[None],
                 config=KernelConfig(n_samples=24, dtype=torch.float64))
    chosen = int(out.supermodel[0])
    kernel = (int(out.next_model[0]), tuple(i for i in range(k) if (chosen >> i) & 1 and i not in run))
    for module in (reference_port, numpy_per_query):
        got = module.decide_query(quality, cost, run, cov, strategy.lambdas, strategy.max_depth,
                                  force_order=strategy.force_order, n_samples=24)
        assert got == kernel, module.__name__


def test_reference_port_prunes_like_the_reference(monkeypatch):
    """Lemma 1: a model that adds less than λ times its cost to a supermodel is not added to it, nor to
    anything built on it; the decision is unchanged (it could not have won)."""
    quality, cost = np.array([0.9, 0.2, 0.3, 0.1]), np.array([1e-4, 1e-4, 1e-4, 1e-4])
    z = reference_port.normal_samples(32, 4).numpy()
    factor = reference_port.joint_factor(np.diag([0.01, 0.01, 0.01, 0.01]))
    evaluated = []
    original = reference_port.supermodel_quality

    def spy(q, f, samples, members):
        evaluated.append(tuple(members))
        return original(q, f, samples, members)

    monkeypatch.setattr(reference_port, "supermodel_quality", spy)
    decision = reference_port.predict_model(quality, cost, [], factor, z, 100.0, 4)
    assert decision == (0, (0,))  # m0 alone: the others barely ever beat it and each costs 0.01
    assert evaluated[:4] == [(0,), (1,), (2,), (3,)]  # singletons are never pruned
    assert (0, 1, 2) not in evaluated and len(evaluated) < 2**4 - 1


def test_kernel_benchmark_exits_0_and_prints_the_ratio_last():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel.py"), "--queries", "64", "--models", "6", "--depth", "3",
         "--samples", "16", "--subset", "8", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("reference algorithm (port), 1 thread(s): ") for line in lines)
    runs = 3 + torch.cuda.is_available()  # port, numpy per query, kernel on CPU; on CUDA too where present
    assert f"identical next models for all {runs} runs" in lines[-2]
    name, value = lines[-1].split(": ")
    assert name == "speedup_vs_reference_algorithm" and float(value) > 0


def test_calibration_benchmark_runs_a_size_in_a_process_of_its_own(tmp_path):
    """benchmarks/calibration.py: the synthetic table has rising costs and qualities; one size reports its
    time and peak memory as JSON, last."""
    import calibration

    table = calibration.synthetic_table(3000, seed=0)
    assert (table.n, table.k) == (3000, 9)
    costs, qualities = table.cost.mean(0), table.quality.mean(0)
    assert bool((costs[1:] > costs[:-1]).all()) and float(qualities[-1]) > float(qualities[0])
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "calibration.py"), "one", "--size", "300", "--workers", "1", "--budgets", "3",
         "--test-size", "100"],
        check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    row = json.loads(out.strip().splitlines()[-1])
    assert row["queries"] == 300 and row["seconds"] > 0 and row["peak_mib"] > 0


def test_agreement_ceiling_scores_its_policies_on_training_queries_only(tmp_path):
    ceiling = _load("agreement_ceiling")
    frame = random_frame(300, 4, seed=7)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    argv = ["--data", str(tmp_path / "t.parquet"), "--models", "model-1,model-2,model-3"]
    result = ceiling.main(argv)
    train = frame[frame["split"] == "train"]
    wide = {f: train.pivot(index="query_id", columns="model", values=f) for f in ("quality", "cost", "answer")}
    q, c, a = wide["quality"], wide["cost"], wide["answer"]
    agree = a["model-1"] == a["model-2"]
    expected = (q["model-1"].where(agree, q["model-3"]).mean(),
                (c["model-1"] + c["model-2"] + c["model-3"].where(~agree, 0.0)).mean())
    assert result["first two agree, else last"] == pytest.approx(expected)
    assert result["model-3 alone"] == pytest.approx((q["model-3"].mean(), c["model-3"].mean()))
    # a majority among three answers is kept; where all three differ, the best of them is (model-3 here)
    listed = a[["model-1", "model-2", "model-3"]]
    truth = a.where(q == 1).bfill(axis=1).iloc[:, 0]  # the answer of any model that was right (NaN: none was)
    majority = listed.apply(lambda r: r.duplicated().any(), axis=1)
    voted = np.where(majority, listed.mode(axis=1)[0] == truth, q["model-3"] == 1)
    assert result["majority vote"][0] == pytest.approx(voted.mean())
    assert result["best per (source, agreement)"][0] >= result["model-1 alone"][0]

    flipped = frame.copy()
    test_rows = flipped["split"] == "test"
    flipped.loc[test_rows, "quality"] = 1.0 - flipped.loc[test_rows, "quality"]
    flipped.to_parquet(tmp_path / "t.parquet", index=False)
    assert ceiling.main(argv) == result  # the test split is never read

    pair = ceiling.main(["--data", str(tmp_path / "t.parquet"), "--models", "model-1,model-2"])
    assert pair["first two agree, else last"][1] == pytest.approx((c["model-1"] + c["model-2"]).mean())  # no third call
    with pytest.raises(SystemExit, match="unknown: \\['gpt'\\]"):
        ceiling.main(["--data", str(tmp_path / "t.parquet"), "--models", "model-1,gpt"])
    frame.drop(columns=["answer"]).to_parquet(tmp_path / "bare.parquet", index=False)
    with pytest.raises(SystemExit, match="no `answer` column"):
        ceiling.main(["--data", str(tmp_path / "bare.parquet"), "--models", "model-1,model-2"])
