"""The collector against fake OpenAI-compatible backends over real HTTP: a graded routing table with the
live features, retries on 429/5xx, resuming after failures and after a killed process without repeating
a finished call, the same features as the gateway computes, and collect → train → serve end to end."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pandas as pd
import pytest
import yaml
from http_fakes import ServerThread, default_answer
from tiny_models import tiny_encoder_dir

from router_train import CascadeRouter
from router_train import collect as collector
from router_train import train as recipe
from router_train.backends import load_backends
from router_train.live import extract
from router_train.serve import make_app
from router_train.table import load_table

MODELS = [f"model-{j}" for j in range(4)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(fake, tmp_path):
    """A backends file over the fake (model-j served as served-model-j) and 80 multiple-choice queries."""
    backend, url = fake
    backend.calls.clear()
    models = {m: {"base_url": url + "/v1", "model": f"served-{m}", "price_in": 0.7 * 2**j, "price_out": 0.7 * 2**j}
              for j, m in enumerate(MODELS)}
    (tmp_path / "backends.yaml").write_text(yaml.safe_dump(
        {"extractor": "choice", "defaults": {"concurrency": 4}, "models": models}))
    queries = [{"query_id": f"q{i:03d}", "query": f"question {i} about the dog and the cat",
                "reference": "ABCD"[i % 4], "source": f"task{i % 2}"} for i in range(80)]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    return backend, tmp_path, queries


def run(tmp_path: Path, out: str = "table.parquet", **kw):
    return collector.collect(str(tmp_path / "backends.yaml"), str(tmp_path / "queries.jsonl"), "choice",
                             str(tmp_path / out), **kw)


def test_collect_writes_a_graded_routing_table(setup):
    backend, tmp_path, queries = setup
    frame = run(tmp_path)
    assert not (tmp_path / "table.parquet.partial.jsonl").exists()
    table = load_table(tmp_path / "table.parquet", split="seeded")
    assert (table.n, table.k) == (80, 4) and set(table.sources) == {"task0", "task1"}
    assert dict(backend.calls) == {f"served-{m}": 80 for m in MODELS}
    backends = load_backends(tmp_path / "backends.yaml")
    expected_rows = {(q["query_id"], m) for q in queries for m in MODELS}
    assert set(zip(frame.query_id, frame.model)) == expected_rows and len(frame) == 320
    for row in frame.itertuples():
        query = queries[int(row.query_id[1:])]
        text, tokens, prompt_tokens = default_answer(f"served-{row.model}", query["query"])
        assert row.answer == extract(text, "choice")[0]
        assert row.quality == float(row.answer == query["reference"])
        assert row.confidence == pytest.approx(tokens[-1][1])  # the letter's token " X."
        assert (row.tokens_in, row.tokens_out) == (prompt_tokens, len(tokens))
        assert row.cost == pytest.approx(backends.models[row.model].cost(prompt_tokens, len(tokens)))
    assert 0.1 < frame.quality.mean() < 0.5


def test_retries_failures_and_resume(setup, capsys):
    backend, tmp_path, queries = setup
    backend.errors["served-model-1"] = [429, 503, 500]  # retried with backoff
    backend.down.add("served-model-2")  # fails after its retries
    try:
        assert run(tmp_path, retries=3, backoff=0.001) is None
    finally:
        backend.down.clear()
        backend.errors.clear()
    out = capsys.readouterr().out
    assert "80 of 320 calls failed after 3 retries" in out and "model-2: HTTP 500" in out
    assert not (tmp_path / "table.parquet").exists()
    assert backend.calls["served-model-1"] == 83 and backend.calls["served-model-2"] == 80 * 4
    backend.calls.clear()
    frame = run(tmp_path)
    assert "resuming from" in capsys.readouterr().out
    assert dict(backend.calls) == {"served-model-2": 80}  # only the failed calls again
    assert len(frame) == 320 and frame.model.value_counts().to_dict() == {m: 80 for m in MODELS}


def test_a_killed_run_resumes_without_repeating_a_finished_call(setup):
    backend, tmp_path, queries = setup
    backend.delay.update({f"served-{m}": 0.01 for m in MODELS})
    partial = tmp_path / "table.parquet.partial.jsonl"
    args = [sys.executable, "-m", "router_train.collect", "--backends", str(tmp_path / "backends.yaml"),
            "--queries", str(tmp_path / "queries.jsonl"), "--grader", "choice", "--out", str(tmp_path / "table.parquet")]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not partial.exists() or len(partial.read_bytes().splitlines()) < 60:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        backend.delay.clear()
    with open(partial, "ab") as f:
        f.write(b'{"query_id": "q001", "model": "mo')  # a write cut short by the kill
    finished = len(partial.read_bytes().splitlines()) - 2  # the header and the cut line
    assert finished < 320
    settled = None  # requests the killed run had sent may still be read by the fake server: count them first
    while settled != (settled := sum(backend.calls.values())):
        time.sleep(0.3)
    backend.calls.clear()
    frame = run(tmp_path)
    assert sum(backend.calls.values()) == 320 - finished
    assert len(frame) == 320 and not frame.duplicated(["query_id", "model"]).any()
    fresh = run(tmp_path, out="fresh.parquet")
    columns = ["query_id", "model", "quality", "answer", "confidence", "tokens_in", "tokens_out", "cost"]
    pd.testing.assert_frame_equal(frame[columns], fresh[columns])


def test_collector_and_gateway_compute_identical_features(setup, tiny_export):
    backend, tmp_path, queries = setup
    frame = run(tmp_path).set_index(["query_id", "model"])
    router = CascadeRouter.load(tiny_export)
    gateway = ServerThread(make_app(router, load_backends(tmp_path / "backends.yaml", router.models)))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused") as client:
            for query in queries[:5]:
                for model in MODELS:
                    response = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": query["query"]}])
                    (call,) = response.model_extra["router"]["calls"]
                    row = frame.loc[(query["query_id"], model)]
                    for key in ("answer", "confidence", "tokens_in", "tokens_out", "cost"):
                        assert call[key] == row[key], (key, call[key], row[key])
    finally:
        gateway.stop()


def test_collect_train_and_serve_end_to_end(setup):
    """The loop of the README: collect a table, train the tiny recipe on it, serve it behind the gateway."""
    backend, tmp_path, queries = setup
    assert collector.main(["--backends", str(tmp_path / "backends.yaml"), "--queries", str(tmp_path / "queries.jsonl"),
                           "--grader", "choice", "--out", str(tmp_path / "table.parquet")]) == 0
    config = {
        "run_name": "collected", "output_dir": str(tmp_path / "checkpoints"),
        "data": {"train": str(tmp_path / "table.parquet"), "split": "seeded"},
        "estimator": {
            "encoder": {"name_or_path": str(tiny_encoder_dir(tmp_path / "encoder")), "max_length": 64},
            "hidden": 16, "layers": 1, "heads": 2, "embedding_cache": None,
            "train": {"epochs": 2, "per_row": 2, "batch_size": 64, "variance_epochs": 1},
        },
        "calibration": {"budgets": 3, "trials": 2, "samples": 16, "bootstrap": 10, "max_depth": 2, "folds": 2},
        "wandb": {"mode": "disabled"},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    export = recipe.main(["--config", str(tmp_path / "tiny.yaml")])
    router = CascadeRouter.load(export)
    gateway = ServerThread(make_app(router, load_backends(tmp_path / "backends.yaml", router.models)))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused") as client:
            prompt = "a new question about the dog"
            response = client.chat.completions.create(model="router-train/collected",
                                                      messages=[{"role": "user", "content": prompt}])
    finally:
        gateway.stop()
    info = response.model_extra["router"]
    assert info["answer_model"] in MODELS and info["calls"]
    assert response.choices[0].message.content == default_answer(f"served-{info['answer_model']}", prompt)[0]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"query_id": "a", "query": "q"}], r"missing column\(s\) \['reference'\]"),
        ([{"query_id": "a", "query": "q", "reference": "B"}] * 2, "query_id 'a' appears more than once"),
        ([{"query_id": "a", "query": " ", "reference": "B"}], "row 0 has no query"),
        ([{"query_id": "a", "query": "q", "reference": "maybe"}], "holds no a letter A-J, as --grader choice needs"),
    ],
)
def test_bad_query_files_are_one_line_errors(setup, rows, message, capsys):
    backend, tmp_path, queries = setup
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as e:
        collector.main(["--backends", str(tmp_path / "backends.yaml"), "--queries", str(tmp_path / "bad.jsonl"),
                        "--grader", "choice", "--out", str(tmp_path / "t.parquet")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_a_partial_output_of_other_inputs_is_not_resumed(setup):
    backend, tmp_path, queries = setup
    backend.down.add("served-model-0")
    try:
        assert run(tmp_path, retries=0) is None
    finally:
        backend.down.clear()
    queries[0]["query"] = "an edited question"
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    with pytest.raises(ValueError, match="collected with other queries, backends or extractor"):
        run(tmp_path)


@pytest.mark.parametrize(
    "grader, text, answer, reference, quality",
    [
        ("choice", "so the answer is (B).", "B", "B", 1.0),
        ("choice", "so the answer is (B).", "B", "(C)", 0.0),
        ("number", "that makes 1,234.0 apples", "1234", "1234", 1.0),
        ("number", "that makes 12 apples", "12", "12.5", 0.0),
        ("exact", "Paris", "Paris.", "paris", 1.0),
        ("exact", "Paris", None, "paris", 0.0),
        ("contains", "The capital is  PARIS, of course", None, "Paris", 1.0),
        ("contains", "The capital is Lyon", None, "Paris", 0.0),
    ],
)
def test_graders(grader, text, answer, reference, quality):
    assert collector.grade(grader, text, answer, reference) == quality
