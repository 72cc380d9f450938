"""The OpenAI-compatible cascade gateway over real HTTP: fake OpenAI-compatible backends (uvicorn on
loopback, deterministic answers with log-probabilities, one slow, one failing) driven with the official
`openai` client. End to end against a tiny trained checkpoint, 1,000 concurrent requests without a lost
or mixed-up response, a backend outage mid-run, bad requests answered 4xx with a message, and
/route_batch surviving malformed JSON of every type."""

import asyncio
import json
import time

import httpx
import openai
import pytest
import yaml
from http_fakes import FakeBackend, FakeProcess, ServerThread, default_answer, digest
from openapi_spec_validator import validate

from router_train import CascadeRouter
from router_train.backends import load_backends
from router_train.serve import make_app

MODELS = [f"model-{j}" for j in range(4)]


def served_id(model: str) -> str:
    return "served-" + model


def write_backends(path, url: str, **overrides) -> None:
    """model-j served as `served-model-j` by the fake, priced like the tiny table (≈ 1.2e-5 · 2^j USD a call)."""
    models = {m: {"base_url": url + "/v1", "model": served_id(m), "price_in": 0.7 * 2**j, "price_out": 0.7 * 2**j,
                  **overrides.get(m, {})} for j, m in enumerate(MODELS)}
    # a generous timeout: on a loaded 2-core CI machine a healthy fake backend can take seconds to answer, which
    # must not read as a failure (the slow-backend test sets its own short one)
    path.write_text(yaml.safe_dump({"extractor": "choice", "defaults": {"timeout": 30, "concurrency": 64},
                                    "models": models}))


@pytest.fixture(scope="module")
def stack(tiny_export, tmp_path_factory):
    """Fake backends (in their own process) and the gateway over them."""
    fake = FakeProcess()
    path = tmp_path_factory.mktemp("gateway") / "backends.yaml"
    write_backends(path, fake.url)
    router = CascadeRouter.load(tiny_export)
    gateway = ServerThread(make_app(router, load_backends(path, router.models), max_wait=0.002,
                                    max_body=1024 * 1024))
    yield router, fake, gateway.url
    gateway.stop()
    fake.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


ROUTER_ID = "router-train/tiny"


def test_end_to_end_chat_completion(stack):
    router, fake, url = stack
    query = "what is the capital of france"
    with client(url) as c:
        assert [m.id for m in c.models.list()] == [ROUTER_ID, *MODELS]
        response = c.chat.completions.create(model=ROUTER_ID, messages=[{"role": "user", "content": query}],
                                             extra_body={"budget": router.budgets[-1]})
    info = response.model_extra["router"]
    calls = info["calls"]
    assert info["mode"] == "cascade_routing" and info["budget"] == router.budgets[-1]
    assert info["models"] == [call["model"] for call in calls] and all(call["ok"] for call in calls)
    assert response.model == ROUTER_ID and info["answer_model"] in info["models"]
    assert response.choices[0].message.content == default_answer(served_id(info["answer_model"]), query)[0]
    assert response.usage.prompt_tokens == sum(call["tokens_in"] for call in calls)
    assert response.usage.completion_tokens == sum(call["tokens_out"] for call in calls)
    assert info["cost"] == pytest.approx(sum(call["cost"] for call in calls))
    assert set(info["estimates"]["quality"]) == set(MODELS)
    # the same cascade as route_batch called in process with the calls' features
    observed = []
    for call in calls:
        (decision,) = router.route_batch([query], [observed], router.budgets[-1], sources=[""])
        assert decision.next_model == call["model"]
        observed.append({"model": call["model"], "answer": call["answer"], "confidence": call["confidence"],
                         "tokens_out": call["tokens_out"], "cost": call["cost"]})
    (decision,) = router.route_batch([query], [observed], router.budgets[-1], sources=[""])
    assert decision.next_model is None and decision.answer_model == info["answer_model"]


def test_budget_and_mode_by_body_or_header_and_a_pool_model_directly(stack):
    router, fake, url = stack
    message = [{"role": "user", "content": "how many legs has a dog"}]
    with client(url) as c:
        routed = c.chat.completions.create(model=ROUTER_ID, messages=message, extra_body={"mode": "routing"})
        assert len(routed.model_extra["router"]["models"]) == 1 and routed.model_extra["router"]["mode"] == "routing"
        headed = c.chat.completions.create(model=ROUTER_ID, messages=message,
                                           extra_headers={"X-Router-Mode": "routing",
                                                          "X-Router-Budget": str(router.budgets[0])})
        assert headed.model_extra["router"]["mode"] == "routing"
        assert headed.model_extra["router"]["budget"] == router.budgets[0]
        direct = c.chat.completions.create(model="model-2", messages=message)
        assert direct.model == "model-2" and direct.model_extra["router"]["models"] == ["model-2"]
        assert direct.choices[0].message.content == default_answer("served-model-2", message[0]["content"])[0]
        chunks = list(c.chat.completions.create(model=ROUTER_ID, messages=message, stream=True,
                                                stream_options={"include_usage": True}))
    plain = client(url).chat.completions.create(model=ROUTER_ID, messages=message)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert chunks[-1].model_extra["router"]["models"] == plain.model_extra["router"]["models"]


def test_a_thousand_concurrent_chat_requests(stack):
    """Every response is the one for its own prompt (its digest tag and the answer model's text)."""
    router, fake, url = stack
    prompts = [f"question {i} about the dog and the cat" for i in range(1000)]

    async def run():  # 10 clients of 100 connections each: one pool of 1,000 costs the client O(n²) scans
        clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
                   for _ in range(10)]
        try:
            return await asyncio.gather(*(
                clients[i % 10].chat.completions.create(model=ROUTER_ID, messages=[{"role": "user", "content": p}])
                for i, p in enumerate(prompts)))
        finally:
            for c in clients:
                await c.close()

    start = time.perf_counter()
    responses = asyncio.run(run())
    seconds = time.perf_counter() - start
    for prompt, response in zip(prompts, responses):
        answer_model = response.model_extra["router"]["answer_model"]
        assert response.choices[0].message.content == default_answer(served_id(answer_model), prompt)[0]
        assert f"[{digest(prompt)[:12]}]" in response.choices[0].message.content
    print(f"1,000 concurrent chat requests in {seconds:.1f} s")
    with httpx.Client() as h:
        metrics = h.get(url + "/metrics").text
    batches = float(metrics.split("\nrouter_route_batch_calls_total ")[1].split()[0])
    assert batches < 1000  # concurrent steps were routed together


def test_a_backend_outage_mid_run(stack):
    router, fake, url = stack
    prompts = [f"outage question {i} about the river" for i in range(200)]
    high = router.budgets[-1]

    async def run():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
            async def one(p):
                try:
                    return await c.chat.completions.create(model=ROUTER_ID, messages=[{"role": "user", "content": p}],
                                                           extra_body={"budget": high})
                except openai.APIStatusError as e:
                    return e

            tasks = [asyncio.create_task(one(p)) for p in prompts]
            await asyncio.sleep(0.05)
            fake.control(down=["served-model-1"])  # the first model of most cascades here goes down mid-run
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
    finally:
        fake.control(down=[])
    skipped = 0
    for prompt, result in zip(prompts, results):
        assert not isinstance(result, openai.APIStatusError), result.message  # another model answers
        info = result.model_extra["router"]
        failed = [call for call in info["calls"] if not call["ok"]]
        # only the model taken down fails: HTTP 500, or under load its connection reset while going down
        assert all(call["model"] == "model-1" and call["error"].startswith("model-1:") for call in failed), failed
        skipped += bool(failed)
        assert result.choices[0].message.content == default_answer(served_id(info["answer_model"]), prompt)[0]
    assert skipped > 0
    with httpx.Client() as h:
        metrics = h.get(url + "/metrics").text
    assert 'router_backend_calls_total{model="model-1",outcome="error"}' in metrics
    # every backend down: 502 naming them
    fake.control(down=[served_id(m) for m in MODELS])
    try:
        with client(url) as c, pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model=ROUTER_ID, messages=[{"role": "user", "content": "nobody answers"}])
    finally:
        fake.control(down=[])
    assert e.value.status_code == 502 and "no backend answered" in e.value.message
    assert all(f"{m}: HTTP 500" in e.value.message for m in MODELS)


def test_a_slow_backend_is_skipped_after_its_timeout(stack, tmp_path):
    """model-3 answers after 2 s, its timeout is 0.3 s: cascades that reach it answer with the best model so far."""
    router, fake, url = stack
    path = tmp_path / "backends.yaml"
    write_backends(path, fake.url, **{"model-3": {"timeout": 0.3}})
    gateway = ServerThread(make_app(router, load_backends(path, router.models)))
    fake.control(delay={"served-model-3": 2.0})
    prompts = [f"slow question {i} about the sun" for i in range(6)]
    try:
        with client(gateway.url) as c:
            responses = [c.chat.completions.create(model=ROUTER_ID, messages=[{"role": "user", "content": p}],
                                                   extra_body={"budget": router.budgets[-1]}) for p in prompts]
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model="model-3", messages=[{"role": "user", "content": "slow sun"}])
    finally:
        fake.control(delay={})
        gateway.stop()
    reached = 0
    for prompt, response in zip(prompts, responses):
        info = response.model_extra["router"]
        for call in info["calls"]:
            assert call["ok"] == (call["model"] != "model-3")
            if call["model"] == "model-3":
                reached += 1
                assert "model-3: timed out after 0.3 s" in call["error"]
        assert info["answer_model"] != "model-3"
        assert response.choices[0].message.content == default_answer(served_id(info["answer_model"]), prompt)[0]
    assert reached > 0
    assert e.value.status_code == 502 and "model-3: timed out" in e.value.message


def test_bad_chat_requests_get_4xx_with_a_message(stack):
    router, fake, url = stack
    message = [{"role": "user", "content": "hello"}]
    cases = [
        ({"model": ROUTER_ID, "messages": []}, openai.BadRequestError, "messages"),
        ({"model": "gpt-nope", "messages": message}, openai.NotFoundError, "'gpt-nope' is not served here"),
        ({"model": ROUTER_ID, "messages": message, "extra_body": {"budget": -1.0}}, openai.BadRequestError,
         "outside the calibrated range"),
        ({"model": ROUTER_ID, "messages": message, "extra_body": {"budget": "1e-4"}}, openai.BadRequestError,
         "budget: Input should be a valid number"),
        ({"model": ROUTER_ID, "messages": message, "extra_body": {"mode": "fastest"}}, openai.BadRequestError, "mode"),
        ({"model": ROUTER_ID, "messages": message, "extra_headers": {"X-Router-Budget": "lots"}},
         openai.BadRequestError, "X-Router-Budget header must be a number"),
        ({"model": ROUTER_ID, "messages": message, "n": 2}, openai.BadRequestError, "n: "),
    ]
    with client(url) as c:
        for kwargs, error, text in cases:
            with pytest.raises(error) as e:
                c.chat.completions.create(**kwargs)
            assert text in e.value.message, (kwargs, e.value.message)
    with httpx.Client(timeout=60) as h:
        surrogate = h.post(url + "/v1/chat/completions", content=b'{"model": "%s", "messages": [{"role": "user", '
                           b'"content": "\\ud800"}]}' % ROUTER_ID.encode(), headers={"Content-Type": "application/json"})
        assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
        big = h.post(url + "/v1/chat/completions", content=b'{"model": "x", "messages": ["' + b"a" * 50_000_000 + b'"]}',
                     headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and "over 1048576 bytes" in big.json()["error"]["message"]
        assert h.get(url + "/health").json()["status"] == "ok"


JSON_VALUES = [None, True, 0, -1, 1.5, 1e308, "", "text", "\ud800", [], [None], [1], ["q"], [[]], {}, {"model": []},
               [[{"model": "model-0", "answer": 5}]], [[{"model": ["model-0"]}]], [[{"model": "model-0", "x": 1}]]]


def test_route_batch_survives_malformed_json(stack):
    router, fake, url = stack
    bodies = [b"", b"{", b"null", b"[1, 2]", b"5", b'"queries"', b"\xff\xfe\x00", b'{"queries": ["a"],}',
              b'{"queries": ["\\ud800"]}', b'{"queries": ["a"], "budget": NaN}', b'{"queries": {"a": 1}}']
    for field in ("queries", "observed", "budget", "mode", "sources"):
        for value in JSON_VALUES:
            body = {"queries": ["a question"]} | {field: value}
            bodies.append(json.dumps(body).encode())
    good = json.dumps({"queries": ["a question"]}).encode()
    with httpx.Client(timeout=30) as h:
        statuses = []
        for body in bodies:
            response = h.post(url + "/route_batch", content=body, headers={"Content-Type": "application/json"})
            statuses.append(response.status_code)
            if response.status_code != 200:
                assert 400 <= response.status_code < 500 and response.json()["error"], (body, response.text)
        assert statuses.count(200) < len(bodies) // 4 and 500 not in statuses
        assert h.post(url + "/route_batch", content=good).status_code == 200
        assert h.get(url + "/health").json()["status"] == "ok"


def test_openapi_document_of_the_gateway_is_valid(stack):
    router, fake, url = stack
    with httpx.Client() as h:
        schema = h.get(url + "/openapi.json").json()
    validate(schema)
    assert {"/route_batch", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])


def test_replaying_the_test_split_through_the_gateway_matches_the_serving_loop(tiny_export, tmp_path):
    """Fake backends answer with the table's stored answers, confidences, output tokens and costs: the
    gateway runs the same models and returns the same answers as examples/serving_loop.py."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import serving_loop

    router = CascadeRouter.load(tiny_export)
    table = serving_loop.test_split(router.manifest, None).in_model_order(router.models)
    row = {q: i for i, q in enumerate(table.queries)}

    def stored(model: str, prompt: str):
        i, j = row[prompt], router.models.index(model.removeprefix("served-"))
        answer = table.answers[i][j]
        # price_in is 1e-6 USD per million tokens: the prompt tokens carry the stored cost
        return answer, [(answer, float(table.confidence[i, j]))], round(float(table.cost[i, j]) * 1e12), \
            int(table.tokens_out[i, j])

    fake = FakeBackend(answer=stored)
    backend_server = ServerThread(fake.app)
    models = {m: {"base_url": backend_server.url + "/v1", "model": served_id(m), "price_in": 1e-6, "price_out": 0.0}
              for m in router.models}
    (tmp_path / "backends.yaml").write_text(yaml.safe_dump({"extractor": "whole", "models": models}))
    gateway = ServerThread(make_app(router, load_backends(tmp_path / "backends.yaml", router.models)))
    budget = router.budgets[2]

    async def serve(mode: str):
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(
                c.chat.completions.create(model=ROUTER_ID, messages=[{"role": "user", "content": q}],
                                          extra_body={"budget": budget, "mode": mode, "source": s})
                for q, s in zip(table.queries, table.sources)))

    try:
        for mode in ("cascade_routing", "cascade", "routing"):
            cost, quality, run = serving_loop.replay(router, table, budget, mode)
            responses = asyncio.run(serve(mode))
            served_run = torch.zeros_like(run)
            served_quality, served_cost = torch.zeros_like(quality), torch.zeros_like(cost)
            for i, response in enumerate(responses):
                info = response.model_extra["router"]
                for m in info["models"]:
                    served_run[i, router.models.index(m)] = True
                answer = router.models.index(info["answer_model"])
                served_quality[i] = table.quality[i, answer]
                served_cost[i] = info["cost"]
                assert response.choices[0].message.content == table.answers[i][answer]
            assert torch.equal(served_run, run), mode
            assert torch.equal(served_quality, quality), mode
            assert torch.allclose(served_cost, cost, rtol=1e-6), mode
    finally:
        gateway.stop()
        backend_server.stop()
