"""The HTTP server over real loopback sockets: same decisions as in process, batching under 1,000
concurrent requests, errors as 400 with a message, health and OpenAPI endpoints."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from router_train import CascadeRouter
from router_train.router import OBSERVATION_FIELDS
from router_train.serve import make_server


@pytest.fixture(scope="module")
def served(tiny_export):
    router = CascadeRouter.load(tiny_export)
    server = make_server(router, "127.0.0.1", 0, max_wait=0.002)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield router, f"http://127.0.0.1:{server.server_port}", server
    server.shutdown()
    server.server_close()
    server.batcher.close()


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
        ({"queries": [1]}, "queries[0] must be a string"),
        ({"observed": []}, "'queries' is required"),
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


def test_health_and_openapi(served):
    router, url, _ = served
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["models"] == router.models
    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as r:
        schema = json.loads(r.read())
    assert schema["openapi"].startswith("3.") and "/route_batch" in schema["paths"]
    request = schema["paths"]["/route_batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    observation = request["properties"]["observed"]["items"]["items"]
    assert set(observation["properties"]) == set(OBSERVATION_FIELDS)
