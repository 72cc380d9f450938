"""The HTTP server (/route_batch) over real loopback sockets: same decisions as in process, batching under
1,000 concurrent requests, errors as 4xx with a message, a bad request failing alone, health, metrics and
a valid OpenAPI document; `--workers` processes sharing one port."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from http_fakes import ServerThread
from openapi_spec_validator import validate

from router_train import CascadeRouter
from router_train.router import OBSERVATION_FIELDS
from router_train.serve import listening_socket, main, make_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tiny_export):
    router = CascadeRouter.load(tiny_export)
    server = ServerThread(make_app(router, max_wait=0.002))
    yield router, server.url, server
    server.stop()


def post(url: str, body) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + "/route_batch", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_decisions_equal_in_process(served):
    router, url, _ = served
    queries = [f"what is {i} times {i}" for i in range(5)]
    observed = [[], [{"model": "model-0", "answer": "A", "confidence": -0.2}], [], [], []]
    status, body = post(url, {"queries": queries, "observed": observed, "budget": router.budgets[2]})
    assert status == 200
    expected = [d.to_dict() for d in router.route_batch(queries, observed, router.budgets[2])]
    assert body["decisions"] == expected


def test_a_thousand_concurrent_requests(served):
    """Bounded: 1,000 single-query requests from 32 client threads, all answered, all as in process."""
    router, url, server = served
    queries = [f"question number {i} about the dog" for i in range(1000)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda q: post(url, {"queries": [q]}), queries))
    assert all(status == 200 for status, _ in results)
    got = [body["decisions"][0]["next_model"] for _, body in results]
    assert got == [d.next_model for d in router.route_batch(queries)]


def test_bad_requests_get_400_with_the_field(served):
    _, url, _ = served
    cases = [
        ({"queries": ["a"], "observed": [[{"model": "nope"}]]}, "observed[0][0].model 'nope' is not in the checkpoint"),
        ({"queries": [1]}, "queries[0]: Input should be a valid string (got 1)"),
        ({"observed": []}, "the field 'queries' is required"),
        ({"queries": ["a"], "budget": 1e9}, "outside the calibrated range"),
        ({"queries": ["a"], "extra": 1}, "unknown field(s) ['extra']"),
    ]
    for body, message in cases:
        status, answer = post(url, body)
        assert status == 400 and message in answer["error"], answer
    # a bad request batched with good ones fails alone
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: post(url, b), [{"queries": ["x"]}, {"queries": [5]}, {"queries": ["y"]}]))
    assert [s for s, _ in results] == [200, 400, 200]


def test_health_metrics_and_a_valid_openapi_document(served):
    router, url, _ = served
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["models"] == router.models
    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as r:
        schema = json.loads(r.read())
    validate(schema)  # raises on an invalid document
    assert "/route_batch" in schema["paths"] and "/v1/chat/completions" not in schema["paths"]
    parts = schema["components"]["schemas"]
    observation = parts["Observation"]
    assert set(observation["properties"]) == set(OBSERVATION_FIELDS)
    assert observation["properties"]["model"]["enum"] == router.models
    # its own request: the server is shared by the module, whose other tests xdist may run on another worker
    assert post(url, {"queries": ["how many legs has a cat"]})[0] == 200
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'router_requests_total{endpoint="/route_batch",status="200"}' in metrics
    assert "router_route_batch_calls_total" in metrics


class FailsOn(CascadeRouter):
    """A router whose route_batch raises a TypeError for a batch holding the query "boom"."""

    def route_batch(self, queries, *args, **kwargs):
        if "boom" in queries:
            raise TypeError("the tokenizer choked")
        return super().route_batch(queries, *args, **kwargs)


@pytest.fixture(scope="module")
def limited(tiny_export):
    router = FailsOn.load(tiny_export)
    server = ServerThread(make_app(router, max_wait=0.05, chunk=100, max_queries=3000, max_body=300_000))
    yield router, server.url
    server.stop()


def test_an_exception_in_a_batch_fails_only_its_request(limited):
    router, url = limited
    bodies = [{"queries": [f"good question {i}"]} for i in range(20)]
    bodies.insert(7, {"queries": ["boom"]})
    with ThreadPoolExecutor(21) as pool:  # all arrive within the 50 ms batching window
        results = list(pool.map(lambda b: post(url, b), bodies))
    statuses = [status for status, _ in results]
    assert statuses[7] == 500 and "TypeError: the tokenizer choked" in results[7][1]["error"]
    assert statuses[:7] + statuses[8:] == [200] * 20
    assert post(url, {"queries": ["still up"]})[0] == 200


def test_caps_and_large_requests_do_not_starve_small_ones(limited):
    router, url = limited
    status, body = post(url, {"queries": ["q"] * 3001})
    assert status == 413 and "3001 queries in one request; at most 3000" in body["error"]
    request = urllib.request.Request(url + "/route_batch", data=b'{"queries": ["' + b"x" * 400_000 + b'"]}')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 413 and "over 300000 bytes" in json.loads(e.value.read())["error"]
    done = {}

    def timed(name, body):
        done[name] = (post(url, body)[0], time.perf_counter())

    big = threading.Thread(target=timed, args=("big", {"queries": [f"large request query {i}" for i in range(3000)]}))
    big.start()
    time.sleep(0.2)
    timed("small", {"queries": ["a small request"]})
    big.join()
    assert done["big"][0] == done["small"][0] == 200
    assert done["small"][1] < done["big"][1]  # routed between the large request's chunks


def test_slow_clients_neither_block_others_nor_hang(tiny_export):
    """800 clients stuck in their headers hold no thread and delay no one; a body that stops arriving is
    answered 408 after the body timeout, and its connection closed."""
    router = CascadeRouter.load(tiny_export)
    server = ServerThread(make_app(router, body_timeout=1.0))
    try:
        stuck = []
        for _ in range(800):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"POST /route_batch HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            stuck.append(sock)
        start = time.perf_counter()
        status, body = post(server.url, {"queries": ["a patient question"]})
        assert status == 200 and body["decisions"][0]["next_model"] == router.route_batch(["a patient question"])[0].next_model
        assert time.perf_counter() - start < 10
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        slow.sendall(b"POST /route_batch HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"queries\": [")
        start = time.perf_counter()
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply
        assert 0.5 < time.perf_counter() - start < 8
        for sock in [*stuck, slow]:
            sock.close()
    finally:
        server.stop()


def test_unknown_endpoints_are_404_with_a_message(served):
    _, url, _ = served
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v1/chat/completions", data=b"{}", timeout=10)
    assert e.value.code == 404 and "no endpoint POST /v1/chat/completions" in json.loads(e.value.read())["error"]["message"]


def _workers(pid: int) -> list[int]:
    """Live worker processes of the server `pid`: its children started by multiprocessing's spawn (Linux /proc;
    the resource tracker, also a child, is not one)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
            spawned = b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(parent) == pid and state != "Z" and spawned:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts worker processes through Linux /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_serves_with_one_or_more_workers_as_in_process(tiny_export, workers):
    """`python -m router_train.serve`: one process, or `--workers 2` behind one port; decisions as in
    process; a clean shutdown that leaves no worker behind."""
    router = CascadeRouter.load(tiny_export)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "router_train.serve", "--checkpoint", str(tiny_export),
                                "--port", str(port), "--workers", str(workers), "--threads", "1"],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    expected = 0 if workers == 1 else workers
    try:
        deadline = time.monotonic() + 300  # workers import torch and load the export: slow on a busy machine
        while len(_workers(process.pid)) < expected or not _healthy(url):
            assert process.poll() is None, "the server exited"
            assert time.monotonic() < deadline, f"{workers} worker(s) did not come up within 300 s"
            time.sleep(0.2)
        banner = process.stdout.readline()
        assert banner.startswith("serving") and ("2 workers" in banner) == (workers == 2)
        queries = [f"question {i} about the cat" for i in range(64)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda q: post(url, {"queries": [q]}), queries))
        assert [status for status, _ in results] == [200] * 64
        # one query per request against one batch of 64: the estimates may differ in the last bits (matrix
        # kernels pick their blocking by batch size on some CPUs), the decisions may not
        answered = [body["decisions"][0] for _, body in results]
        in_process = [d.to_dict() for d in router.route_batch(queries)]
        numbers = ("quality", "cost")
        assert [{k: v for k, v in d.items() if k not in numbers} for d in answered] == [
            {k: v for k, v in d.items() if k not in numbers} for d in in_process]
        for got, want in zip(answered, in_process):
            assert all(got[key] == pytest.approx(want[key], rel=1e-6) for key in numbers)
        counted, until = 'router_requests_total{endpoint="/route_batch",status="200"} 64', time.monotonic() + 15
        while counted not in _get(url + "/metrics"):  # whichever worker answers counts every worker's requests
            assert time.monotonic() < until, "/metrics did not count the 64 requests within 15 s"
            time.sleep(0.2)
        spawned = _workers(process.pid)
    finally:
        process.terminate()
        process.wait(60)
    assert len(spawned) == expected and not any(_alive(w) for w in spawned)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_the_workers_socket_disables_nagle_on_every_connection():
    """Replies are written in two parts (head, body); without TCP_NODELAY the second waits ~40 ms for the
    client's delayed ACK. asyncio sets it on accepted connections only when the listening socket carries
    its protocol number, which `listening_socket` gives it."""
    sock = listening_socket("127.0.0.1", 0)
    seen: list[int] = []

    async def main() -> None:
        def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_a_clear_error(tiny_export, capsys, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(tiny_export), "--port", str(port), "--workers", workers])
    assert exit_info.value.code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_server_process_takes_its_startup_objects_out_of_the_collectors_sight(tiny_export):
    """What the server loads lives as long as it does: frozen, full collections stop pausing requests."""
    import gc

    from router_train.serve import build_app, build_parser

    gc.unfreeze()
    try:
        build_app(build_parser().parse_args(["--checkpoint", str(tiny_export)]))
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_workers_metrics_merge_into_the_counts_of_one_server(tmp_path):
    """Two workers' published counts render exactly as one telemetry that saw every event."""
    from router_train.telemetry import SharedTelemetry, Telemetry

    events = [("request", "/route_batch", 200, 0.003), ("request", "/v1/chat/completions", 502, 0.7),
              ("call", "model-1", True, 0.02, 1e-5), ("call", "model-1", False, 5.0, None),
              ("call", "model-2", True, 0.3, 2.5e-4), ("routed", 7, 0.011), ("request", "/route_batch", 400, 0.0004)]
    one, workers = Telemetry(), [Telemetry(), Telemetry()]
    for i, (kind, *values) in enumerate(events):
        for target in (one, workers[i % 2]):
            {"request": target.request, "call": target.call, "routed": target.routed}[kind](*values)
    first = SharedTelemetry(workers[0], tmp_path)
    second = SharedTelemetry(workers[1], tmp_path)
    second.path = tmp_path / "other-worker.json"  # both live in this process
    second.publish()
    assert first.render() == one.render()
    assert 'router_requests_total{endpoint="/route_batch",status="200"} 1' in one.render()
