"""Fuzzing and fault injection (issue 11): random malformed routing tables, HTTP requests and damaged
checkpoints get a clear error naming the column, field or file (never another exception, a 5xx or a
hang); 2,000 concurrent requests with malformed ones mixed in leave the server up and every good request
correctly answered; a SIGINT at any stage of `train` or `evaluate` leaves the user's earlier outputs
byte-identical and nothing stray beside them, and the next run succeeds.

The default profile is sized for CI (derandomized examples). `ROUTER_TRAIN_FUZZ=long` runs ten times
the examples, random ones, and interrupts at many more points (a few minutes).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from factories import random_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from http_fakes import FakeBackend, ServerThread, default_answer
from test_gateway import ROUTER_ID, served_id, write_backends

from router_train import CascadeRouter
from router_train import evaluate as evaluate_cli
from router_train import train as train_cli
from router_train.backends import load_backends
from router_train.manifest import SEAL
from router_train.serve import make_app
from router_train.table import REQUIRED_COLUMNS, load_table

PROFILE = os.environ.get("ROUTER_TRAIN_FUZZ", "ci") or "ci"
if PROFILE not in ("ci", "long"):
    raise ValueError(f"ROUTER_TRAIN_FUZZ must be 'ci' (the default) or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"
ROOT = Path(__file__).resolve().parents[1]


def fuzz(examples: int):
    """Hypothesis settings: `examples` derandomized examples by default, ten times as many random ones
    (remembered in .hypothesis/) in the long profile."""
    extra = {} if LONG else {"derandomize": True, "database": None}
    return settings(max_examples=examples * (10 if LONG else 1), deadline=None, **extra,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class Hang(Exception):
    """A call that did not return within its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `Hang` in the block after `seconds` (main thread only, as pytest runs tests)."""
    def expire(signum, frame):
        raise Hang(f"no result within {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- routing tables ------------------------------------------------------------------------------------

BASE = random_frame(6, 3, seed=0)
"""6 queries × 3 models with every optional column, both splits in the split column."""
BAD_CELLS = {
    "quality": [None, math.nan, math.inf, -math.inf, -0.5, 1.5, "abc", "", [1], {"a": 1}],
    "cost": [None, math.nan, math.inf, -math.inf, -1e-5, "abc", "", "1e-5 USD", [1], {"a": 1}],
    "confidence": [math.inf, "abc", [0.5], {"a": 1}],
    "tokens_in": [-1, -math.inf, math.inf, "many"],
    "tokens_out": [-3.5, math.inf, "x", [2]],
    "query_id": [None],
    "query": [None],
    "model": [None, "", "   ", [1]],
    "split": ["validation", "TRAIN", 3, ""],
}
"""Values that make a cell of each column invalid."""
FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")


def write_frame(df, path: Path) -> Path:
    """Write `df` in the format its suffix names (JSON as Python writes it: NaN and Infinity tokens)."""
    fmt = path.suffix[1:]
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    elif fmt in ("csv", "tsv"):
        df.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    else:
        records = [json.dumps(r) for r in df.to_dict("records")]
        path.write_text("\n".join(records) if fmt == "jsonl" else "[" + ",\n".join(records) + "]")
    return path


@dataclass
class Malformed:
    """One malformed table: how it is made, and what its error must name (a column, or the file)."""

    kind: str
    fmt: str
    detail: tuple
    names: tuple[str, ...]  # the message names one of these; "{path}" stands for the file
    may_load: bool = False  # a truncated text file can end on a row boundary: a smaller, valid table

    def write(self, directory: Path) -> Path:
        path = directory / f"table.{self.fmt}"
        df = BASE.copy()
        if self.kind == "cell":
            column, row, value = self.detail
            df[column] = df[column].astype(object)
            df.at[row, column] = value
        elif self.kind == "drop":
            df = df.drop(columns=self.detail[0])
        elif self.kind == "rename":
            df = df.rename(columns={self.detail[0]: self.detail[1]})
        elif self.kind == "duplicate":
            df = df.iloc[[*range(len(df)), self.detail[0]]]
        elif self.kind == "remove":
            df = df.drop(index=self.detail[0])
        if self.kind == "delimiter":
            df.to_csv(path, index=False, sep=self.detail[0])
        elif self.kind == "garbage":
            path.write_bytes(self.detail[0])
        else:
            try:
                write_frame(df, path)
            except Exception:  # noqa: BLE001 - Parquet cannot hold this column's mix of types: JSON lines can
                self.fmt = "jsonl"
                return self.write(directory)
        if self.kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: int(self.detail[0] * len(data))])
        return path

    def expected(self, path: Path) -> list[str]:
        return [str(path) if name == "{path}" else name for name in self.names]


@st.composite
def malformed_tables(draw, loadable: bool = True) -> Malformed:
    """Malformed tables of every kind; `loadable=False` leaves out truncated text files (they may be valid)."""
    kinds = ["cell", "drop", "rename", "duplicate", "remove", "delimiter", "truncate", "garbage"]
    kind = draw(st.sampled_from(kinds))
    fmt = draw(st.sampled_from(FORMATS))
    rows = st.integers(0, len(BASE) - 1)
    if kind == "cell":
        column = draw(st.sampled_from(sorted(BAD_CELLS)))
        value = draw(st.sampled_from(BAD_CELLS[column]))
        return Malformed(kind, fmt, (column, draw(rows), value), (f"'{column}'",))
    if kind in ("drop", "rename"):
        column = draw(st.sampled_from(REQUIRED_COLUMNS))
        other = draw(st.sampled_from([column.upper(), column + " ", "_" + column]))
        return Malformed(kind, fmt, (column, other), (f"'{column}'",))
    if kind in ("duplicate", "remove"):
        return Malformed(kind, fmt, (draw(rows),), ("columns 'query_id', 'model'",))
    if kind == "delimiter":
        return Malformed(kind, "csv", (draw(st.sampled_from([":", "#", "~", " ", "^", "\x1f"])),), ("{path}",))
    if kind == "truncate":
        fmt = fmt if loadable else "parquet"
        cut = draw(st.floats(0.0, 1.0, exclude_max=True))
        names = ("{path}", *(f"'{c}'" for c in BASE.columns))
        return Malformed(kind, fmt, (cut,), names, may_load=fmt != "parquet")
    junk = draw(st.binary(max_size=300) | st.sampled_from([b"", b"\n", b"[]", b"{}", b"null", b"PAR1", b"\xef\xbb\xbf"]))
    return Malformed("garbage", fmt, (junk,), ("{path}", "column"))


@fuzz(60)
@given(case=malformed_tables())
def test_malformed_tables_raise_a_value_error_naming_the_column(case):
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stderr(io.StringIO()):
        path = case.write(Path(d))
        try:
            with time_limit(30):
                table = load_table(path)
        except ValueError as e:
            message = str(e)
        else:
            assert case.may_load, f"{case} loaded"
            assert table.n <= BASE.query_id.nunique() and set(table.models) <= set(BASE.model)
            return
    assert "\n" not in message and any(name in message for name in case.expected(path)), (case, message)


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> Path:
    """A recipe whose table --train-data replaces; queries lacking a model's row are an error, as in
    `load_table` (the encoder is never reached)."""
    root = tmp_path_factory.mktemp("cli")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run_name": "fuzz", "output_dir": str(root / "checkpoints"),
                                    "data": {"missing": "error"}, "wandb": {"mode": "disabled"}}))
    return path


def cli_error(main, argv: list[str]) -> str:
    """Run a CLI's main expecting a user error: exit status 2, no traceback; returns its last stderr line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), time_limit(60):
        with pytest.raises(SystemExit) as info:
            main(argv)
    assert info.value.code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
    last = err.getvalue().strip().splitlines()[-1]
    assert last.startswith("error: "), err.getvalue()
    return last.removeprefix("error: ")


@fuzz(12)
@given(case=malformed_tables(loadable=False))
def test_the_clis_report_a_malformed_table_in_one_line(case, train_config):
    with tempfile.TemporaryDirectory() as d:
        path = case.write(Path(d))
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(ValueError) as direct:
            load_table(path)
        out = Path(d) / "report"
        assert cli_error(evaluate_cli.main, ["--data", str(path), "--out", str(out)]) == str(direct.value)
        assert not out.exists()
        message = cli_error(train_cli.main, ["--config", str(train_config), "--train-data", str(path),
                                             "--output-dir", d])
        assert any(name in message for name in case.expected(path)), (case, message)
        assert sorted(os.listdir(d)) == [path.name]  # nothing written


# -- checkpoints ---------------------------------------------------------------------------------------

EXPORT_FILES = ("curves.png", "estimator.json", "estimator.safetensors", "manifest.json", "metrics.json")


class Files(dict):
    """File contents by name, shown by their names only (in hypothesis' reports)."""

    def __repr__(self) -> str:
        return f"Files({sorted(self)})"


@pytest.fixture(scope="module")
def pristine(tiny_export) -> Files:
    files = Files((p.name, p.read_bytes()) for p in sorted(tiny_export.iterdir()))
    assert tuple(files) == EXPORT_FILES
    return files


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


@fuzz(200)
@given(name=st.sampled_from(EXPORT_FILES), truncate=st.booleans(), data=st.data())
def test_a_damaged_checkpoint_fails_naming_the_file(pristine, name, truncate, data):
    content = bytearray(pristine[name])
    offset = data.draw(st.integers(0, len(content) - 1), label="offset")
    if truncate:
        del content[offset:]
    else:
        content[offset] ^= data.draw(st.integers(1, 255), label="xor")
    with tempfile.TemporaryDirectory() as d:
        directory = Path(d)
        for file, original in pristine.items():
            (directory / file).write_bytes(content if file == name else original)
        try:
            with time_limit(60):
                router = CascadeRouter.load(directory)
        except ValueError as e:
            assert str(e).startswith(str(directory / name)), str(e)
            return
    # loaded: only a change that leaves every field of the manifest as it was (whitespace, the seal's name)
    assert name == "manifest.json", f"a damaged {name} loaded"
    original = json.loads(pristine[name])
    assert all(canonical(router.manifest.get(key)) == canonical(value) for key, value in original.items()
               if key != SEAL)


# -- HTTP requests -------------------------------------------------------------------------------------

SPECIAL = [None, True, False, 0, -1, 10**400, -(10**30), 2**63, 1e308, -1e308, math.nan, math.inf, -math.inf, "",
           "\ud800", "a\udfffb", "model-0", "routing", "cascade_routing", [], {}, [[]], [{}], [None], ["q"]]
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(SPECIAL))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
"""JSON of every type: null, booleans, huge and negative numbers, NaN and infinities (as Python writes
them), text with lone surrogates, lists and nested objects."""


def edit(body: dict, path: tuple, value, delete: bool) -> dict:
    """A deep copy of `body` with the value at `path` replaced (or deleted, when there is one)."""
    body = copy.deepcopy(body)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    if delete and (path[-1] in parent if isinstance(parent, dict) else path[-1] < len(parent)):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return body


def encode(body) -> bytes:
    """JSON as Python's json module writes it: lone surrogates escaped, NaN and Infinity as bare tokens."""
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def gateway(tiny_export, tmp_path_factory):
    """The tiny checkpoint served with /route_batch and /v1 over an in-process fake backend."""
    router = CascadeRouter.load(tiny_export)
    backend = ServerThread(FakeBackend().app)
    path = tmp_path_factory.mktemp("fuzz-gateway") / "backends.yaml"
    write_backends(path, backend.url)
    server = ServerThread(make_app(router, load_backends(path, router.models), max_wait=0.002, max_body=1 << 20))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield router, client
    server.stop()
    backend.stop()


def route_body(router: CascadeRouter) -> dict:
    return {"queries": ["what is the capital of france", "two plus two"],
            "observed": [[], [{"model": router.models[0], "answer": "A", "confidence": -0.5, "tokens_out": 3,
                               "cost": 1e-5}]],
            "budget": router.budgets[2], "mode": "cascade_routing", "sources": ["", "task1"]}


ROUTE_PATHS = [("queries",), ("queries", 0), ("observed",), ("observed", 1), ("observed", 1, 0),
               *(("observed", 1, 0, key) for key in ("model", "answer", "confidence", "tokens_out", "cost")),
               ("budget",), ("mode",), ("sources",), ("sources", 1), ("unknown field",)]


def in_process(router: CascadeRouter, body: dict) -> list[dict]:
    """What `route_batch` answers in process for a request body."""
    return [d.to_dict() for d in router.route_batch(body["queries"], body.get("observed"), body.get("budget"),
                                                    mode=body.get("mode"), sources=body.get("sources"))]


def assert_route_answer(router, response: httpx.Response, body: dict, field: str) -> None:
    """200 with the in-process decisions, or 4xx with a message naming `field`; never 5xx."""
    if response.status_code == 200:
        assert response.json()["decisions"] == in_process(router, body)
        return
    assert 400 <= response.status_code < 500, response.text
    message = response.json()["error"]
    assert field in message or (field == "unknown field" and "unknown field(s)" in message), message


@fuzz(120)
@given(path=st.sampled_from(ROUTE_PATHS), value=JSON_VALUES, delete=st.booleans())
def test_route_batch_answers_any_json_with_a_decision_or_a_4xx_naming_the_field(gateway, path, value, delete):
    router, client = gateway
    body = edit(route_body(router), path, value, delete)
    response = client.post("/route_batch", content=encode(body))
    assert_route_answer(router, response, body, path[0])


@fuzz(120)
@given(path=st.sampled_from(ROUTE_PATHS[:-1]), value=JSON_VALUES, delete=st.booleans())
def test_route_batch_in_process_raises_only_value_errors_naming_the_argument(gateway, path, value, delete):
    router, _ = gateway
    body = edit(route_body(router), path, value, delete)
    try:
        with time_limit(30):
            in_process(router, {"queries": None, **body})
    except ValueError as e:
        assert path[0] in str(e), str(e)


@fuzz(40)
@given(raw=st.binary(max_size=200) | st.text(max_size=60).map(str.encode), endpoint=st.sampled_from(
    ["/route_batch", "/v1/chat/completions"]))
def test_any_bytes_get_a_4xx_with_a_message(gateway, raw, endpoint):
    router, client = gateway
    response = client.post(endpoint, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert (error["message"] if endpoint.startswith("/v1") else error).strip()


def chat_body(router: CascadeRouter) -> dict:
    return {"model": ROUTER_ID, "messages": [{"role": "user", "content": "what is the capital of france"}],
            "budget": router.budgets[2]}


CHAT_PATHS = [("model",), ("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
              *((key,) for key in ("budget", "mode", "source", "stream", "stream_options", "n", "max_tokens",
                                   "max_completion_tokens", "temperature", "top_p", "stop", "seed"))]
HEADERS = {"X-Router-Budget": "budget", "X-Router-Mode": "mode", "X-Router-Source": "source"}


def assert_chat_answer(response: httpx.Response, names: tuple[str, ...]) -> None:
    """A completion (streamed or not), or 4xx with a message naming one of `names`; never 5xx."""
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        else:
            completion = response.json()
            assert completion["object"] == "chat.completion" and completion["choices"][0]["message"]["content"]
        return
    assert 400 <= response.status_code < 500, response.text
    message = response.json()["error"]["message"]
    assert any(name in message for name in names), message


@fuzz(80)
@given(path=st.sampled_from(CHAT_PATHS), value=JSON_VALUES, delete=st.booleans())
def test_chat_completions_answer_any_json_or_a_4xx_naming_the_field(gateway, path, value, delete):
    router, client = gateway
    body = edit(chat_body(router), path, value, delete)
    assert_chat_answer(client.post("/v1/chat/completions", content=encode(body)), (path[0],))


@fuzz(20)
@given(header=st.sampled_from(sorted(HEADERS)),
       value=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=12).map(str.strip))
def test_router_headers_answer_any_text_or_a_4xx_naming_them(gateway, header, value):
    router, client = gateway
    body = chat_body(router)
    del body["budget"]
    response = client.post("/v1/chat/completions", content=encode(body), headers={header: value.encode("latin-1")})
    assert_chat_answer(response, (header, HEADERS[header]))


def test_after_the_fuzzing_good_requests_get_the_right_answers(gateway):
    router, client = gateway
    body = route_body(router)
    response = client.post("/route_batch", content=encode(body))
    assert response.status_code == 200 and response.json()["decisions"] == in_process(router, body)
    chat = client.post("/v1/chat/completions", content=encode(chat_body(router))).json()
    first = router.route_batch([chat_body(router)["messages"][0]["content"]], None, router.budgets[2],
                               sources=[""])[0]
    assert chat["router"]["models"][0] == first.next_model
    answer = chat["router"]["answer_model"]
    assert chat["choices"][0]["message"]["content"] == default_answer(served_id(answer), "what is the capital of france")[0]
    assert client.get("/health").json()["status"] == "ok"


SOAK_MALFORMED = [b'{"queries": null}', b'{"queries": 5}', b'{"queries": ["\\ud800"]}', b"not json", b"[]",
                  b'{"queries": ["a"], "observed": [[{"model": ["model-0"]}]]}', b'{"queries": ["a"], "budget": "1e-4"}',
                  b'{"queries": ["a"], "budget": 1e9}', b'{"queries": ["a"], "mode": "fastest"}',
                  b'{"queries": ["a"], "observed": [[{"model": "nope"}]]}', b'{"queries": ["a", "b"], "sources": ["x"]}',
                  b'{"queries": ["a"], "observed": [[{"model": "model-0", "tokens_out": -1}]]}']


def test_soak_2000_requests_from_64_threads_with_5_percent_malformed(gateway):
    """Every good request gets the in-process decisions, every malformed one a 4xx, and the server stays up."""
    router, client = gateway
    budgets = [*router.budgets, (router.budgets[0] + router.budgets[1]) / 2]
    requests: list[tuple[bytes, dict | None]] = []
    for i in range(2000):
        if i % 20 == 7:
            requests.append((SOAK_MALFORMED[(i // 20) % len(SOAK_MALFORMED)], None))
            continue
        n = 1 + i % 3
        body = {"queries": [f"soak question {i} part {j} about the dog and the {'cat' if j else 'sun'}" for j in range(n)],
                "observed": [[{"model": router.models[0], "answer": "ABCD"[i % 4], "confidence": -0.1 * (i % 7)}]
                             if (i + j) % 2 else [] for j in range(n)],
                "budget": budgets[i % len(budgets)]}
        requests.append((encode(body), body))
    local = threading.local()

    def send(request: tuple[bytes, dict | None]) -> tuple[int, dict]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=str(client.base_url), timeout=60)
        response = local.client.post("/route_batch", content=request[0])
        return response.status_code, response.json()

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(send, requests))
    seconds = time.perf_counter() - start
    statuses = Counter(status for status, _ in results)
    print(f"soak: 2,000 requests from 64 threads in {seconds:.1f} s, statuses {dict(statuses)}")
    # the correct decisions, in process: one call per budget over all good requests
    expected: dict[int, dict] = {}
    for budget in budgets:
        group = [i for i, (_, body) in enumerate(requests) if body is not None and body["budget"] == budget]
        queries = [q for i in group for q in requests[i][1]["queries"]]
        observed = [o for i in group for o in requests[i][1]["observed"]]
        decisions = iter(router.route_batch(queries, observed, budget))
        for i in group:
            expected[i] = [next(decisions).to_dict() for _ in requests[i][1]["queries"]]
    for i, ((_, body), (status, answer)) in enumerate(zip(requests, results)):
        if body is None:
            assert 400 <= status < 500 and answer["error"], (requests[i][0], answer)
            continue
        assert status == 200, answer
        for got, want in zip(answer["decisions"], expected[i], strict=True):
            assert {k: got[k] for k in ("next_model", "answer_model", "step", "plan")} == \
                {k: want[k] for k in ("next_model", "answer_model", "step", "plan")}
            for key in ("quality", "cost"):
                assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12)
    assert statuses[200] == 1900 and sum(statuses.values()) == 2000
    assert client.get("/health").json()["status"] == "ok"


# -- interrupts ----------------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory` (following a symlink at the top), by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class Driver:
    """tests/interrupt_driver.py in a child process: CLI runs one after another, each interruptible."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "interrupt_driver.py")], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.output: list[str] = []
        self._until(lambda line: line.startswith("@@driver READY"), 120)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _until(self, stop, timeout: float, trigger=None, delay: float = 0.0) -> str:
        """Read output lines up to the one `stop` accepts; SIGINT `delay` s after the first line `trigger` accepts."""
        deadline, sent = time.monotonic() + timeout, False
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"hang: no end of the run within {timeout} s\n" + "\n".join(self.output[-30:])) from None
            if line is None:
                raise AssertionError("the driver died:\n" + "\n".join(self.output[-30:]))
            self.output.append(line)
            if stop(line):
                return line
            if trigger is not None and not sent and trigger(line):
                time.sleep(delay)
                self.process.send_signal(signal.SIGINT)
                sent = True

    def run(self, cli: str, argv: list[str], trigger: str | None = None, delay: float = 0.0,
            timeout: float = 300) -> str:
        """One run; with `trigger` (a regex), SIGINT `delay` s after the first output line it matches
        ("@@driver START": the start of the run). Returns the outcome: ok, interrupted or exit-<status>."""
        self.output.clear()
        self.process.stdin.write(json.dumps([cli, argv]) + "\n")
        self.process.stdin.flush()
        pattern = None if trigger is None else re.compile(trigger)
        end = self._until(lambda line: line.startswith("@@driver END"), timeout,
                          None if pattern is None else (lambda line: pattern.search(line) is not None), delay)
        return end.split()[-1]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:  # stuck in a run that a failed test left behind
            self.process.kill()
            self.process.wait(60)


@pytest.fixture(scope="module")
def driver():
    process = Driver()
    yield process
    process.close()


TRAIN_STAGES = [r"^data: ", r"epoch 1: train loss", r"epoch 2: train loss", r"estimator trained in",
                r"out-of-fold estimators", r"^  routing: ", r"^  cascade_routing: ", r"^  rules: ",
                r"calibrated and evaluated in"]
EVALUATE_STAGES = [r"^evaluating \d+ methods", r"^  routing: ", r"^  cascade: ", r"^  cascade_routing: ",
                   r"^  rules: "]
"""Lines that each CLI prints as it passes a stage (the exports and reports are written after the last)."""


def interrupt_points(stages: list[str], ci: list[tuple[str, float]], seed: int) -> list[tuple[str, float]]:
    """(trigger, delay) pairs: `ci` by default; in the long profile every stage at several delays, and
    random delays after the start of the run."""
    if not LONG:
        return ci
    rng = random.Random(seed)
    return ([(stage, delay) for stage in stages for delay in (0.0, 0.05, 0.2)]
            + [(stages[-1], rng.uniform(0.0, 0.6)) for _ in range(8)]  # the outputs are written in this window
            + [("@@driver START", rng.uniform(0.0, 6.0)) for _ in range(6)])


def complete(output: Path) -> bool:
    """Whether an output is whole: an export loads (its checksums hold), a report has its AUCs and a PNG
    to the end."""
    if (output / "manifest.json").exists():
        return bool(CascadeRouter.load(output).models)
    metrics = json.loads((output / "metrics.json").read_text())
    return bool(metrics["auc"]) and (output / "curves.png").read_bytes().endswith(b"IEND\xaeB`\x82")


def outputs_now(directory: Path, name: str) -> tuple[dict[str, str], list[str]]:
    """The output's files (hashes) and the entries beside it."""
    return snapshot(directory / name), sorted(os.listdir(directory))


def interrupted_runs(driver: Driver, cli: str, argv: list[str], points, out_dir: Path, name: str,
                     allowed_hidden: set[str]) -> Counter:
    """Interrupt a run at each point: the earlier output stays byte-identical (or, when the interrupt
    came after the new output was in place, is the complete new one), and nothing stray is left beside it."""
    outcomes: Counter = Counter()
    before, entries = outputs_now(out_dir, name)
    visible = [e for e in entries if not e.startswith(".")]
    for trigger, delay in points:
        outcome = driver.run(cli, argv, trigger, delay)
        assert outcome in ("interrupted", "ok"), (trigger, delay, outcome, driver.output[-20:])
        after, entries = outputs_now(out_dir, name)
        hidden = {e for e in entries if e.startswith(".")}
        assert sorted(set(entries) - hidden) == visible and hidden <= allowed_hidden, (trigger, delay, entries)
        if after == before:
            outcomes["kept"] += 1
        else:
            assert set(after) == set(before) and complete(out_dir / name), (trigger, delay, after, before)
            outcomes["replaced"] += 1
            before = after
    return outcomes


def test_interrupting_evaluate_keeps_the_earlier_report(driver, tmp_path):
    frame = random_frame(80, 4, seed=3)
    frame.to_parquet(tmp_path / "table.parquet", index=False)
    out_dir = tmp_path / "runs"
    argv = ["--data", str(tmp_path / "table.parquet"), "--out", str(out_dir / "report"), "--overwrite",
            "--threads", "1", "--budgets", "4", "--trials", "3", "--samples", "16", "--bootstrap", "200",
            "--max-depth", "3", "--methods", "routing,cascade,cascade_routing"]
    assert driver.run("evaluate", argv) == "ok"
    points = interrupt_points(EVALUATE_STAGES, [(r"^evaluating", 0.0), (r"^  rules: ", 0.0), (r"^  rules: ", 0.2)],
                              seed=1)
    outcomes = interrupted_runs(driver, "evaluate", argv, points, out_dir, "report", set())
    print(f"evaluate interrupted at {len(points)} points: {dict(outcomes)}")
    assert outcomes["kept"] >= 1
    assert driver.run("evaluate", argv) == "ok" and os.listdir(out_dir) == ["report"]
    assert complete(out_dir / "report")


def train_recipe(tiny_export: Path, root: Path) -> tuple[list[str], Path]:
    """The train CLI's arguments for a cheaper variant of the shared tiny recipe, whose export (copied to
    root/checkpoints) is the earlier export; returns them and the output directory."""
    config = yaml.safe_load((tiny_export.parent.parent / "tiny.yaml").read_text())
    out_dir = root / "checkpoints"
    shutil.copytree(tiny_export.parent, out_dir, symlinks=True)
    config["output_dir"] = str(out_dir)
    config["estimator"]["train"]["epochs"] = 2
    config["calibration"].update(budgets=3, trials=2, bootstrap=10, methods=["routing", "cascade_routing"])
    (root / "recipe.yaml").write_text(yaml.safe_dump(config))
    return ["--config", str(root / "recipe.yaml"), "--overwrite"], out_dir


def test_interrupting_train_keeps_the_earlier_export(driver, tiny_export, tmp_path):
    argv, out_dir = train_recipe(tiny_export, tmp_path)
    points = interrupt_points(TRAIN_STAGES, [(r"epoch 1: train loss", 0.0), (r"calibrated and evaluated in", 0.1)],
                              seed=2)
    outcomes = interrupted_runs(driver, "train", argv, points, out_dir, "tiny", {".tiny.versions", ".tiny.partial"})
    print(f"train interrupted at {len(points)} points: {dict(outcomes)}")
    assert outcomes["kept"] >= 1
    assert driver.run("train", argv) == "ok"
    assert {".tiny.versions", "tiny"} <= set(os.listdir(out_dir)) and not (out_dir / ".tiny.partial").exists()
    assert complete(out_dir / "tiny")
    assert os.listdir(out_dir / ".tiny.versions") == [(out_dir / "tiny").resolve().name]


@pytest.mark.skipif(not LONG, reason="long profile: each run pays the imports")
@pytest.mark.parametrize("cli, seed", [("evaluate", 0), ("evaluate", 1), ("evaluate", 2), ("train", 3), ("train", 4)])
def test_interrupting_python_dash_m_at_random_times(tiny_export, tmp_path, cli, seed):
    """`python -m router_train.<cli>` itself, SIGINT at a random time, the imports included: the earlier
    output stays (or is the complete new one, when the interrupt came after the swap), and the next run
    succeeds."""
    if cli == "evaluate":
        random_frame(60, 4, seed=seed).to_parquet(tmp_path / "table.parquet", index=False)
        out_dir, name = tmp_path / "runs", "report"
        argv = ["--data", str(tmp_path / "table.parquet"), "--out", str(out_dir / name), "--overwrite",
                "--threads", "1", "--budgets", "3", "--trials", "2", "--samples", "16", "--bootstrap", "50"]
    else:
        (argv, out_dir), name = train_recipe(tiny_export, tmp_path), "tiny"
    command = [sys.executable, "-m", f"router_train.{cli}", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    before, entries = outputs_now(out_dir, name)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.0, 15.0))
    process.send_signal(signal.SIGINT)
    process.wait(120)
    after, now = outputs_now(out_dir, name)
    assert [e for e in now if not e.startswith(".")] == [e for e in entries if not e.startswith(".")]
    assert after == before or (set(after) == set(before) and complete(out_dir / name))  # earlier, or whole new
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
