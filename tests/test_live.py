"""Answer features from live calls: the extractors and their spans, the confidence as the log-probability
of the answer's tokens, cost and tokens from usage, and calls over real HTTP with bounded concurrency,
retries on 429/5xx and failures that name the model."""

import asyncio

import pytest
import yaml
from http_fakes import default_answer

from router_train.backends import load_backends
from router_train.live import BackendError, Pool, extract, features, span_logprob


@pytest.mark.parametrize(
    "kind, text, answer",
    [
        ("choice", "I think the answer is (C), not D.", "C"),
        ("choice", "Answer: B", "B"),
        ("choice", "Options A and B are wrong; so D", "D"),
        ("choice", "the answer is a dog", None),
        ("number", "12 apples, then 1,234.0 pears", "1234"),
        ("number", "It is -3.25 or so.", "-3.25"),
        ("number", "no digits here", None),
        ("last_line", "work\n\n  final line  \n\n", "final line"),
        ("last_line", "   \n ", None),
        ("whole", "  all of it \n", "all of it"),
    ],
)
def test_extractors(kind, text, answer):
    found = extract(text, kind)
    assert (found and found[0]) == answer or (found is None and answer is None)
    if found:
        _, start, end = found
        assert text[start:end] == answer or kind == "number"


def test_unknown_extractor():
    with pytest.raises(ValueError, match="extractor must be one of"):
        extract("x", "regex")


def test_confidence_is_the_answers_token_logprobs():
    text = "Café.\nThe answer is B."
    tokens = [{"token": t, "logprob": lp, "bytes": list(t.encode())}
              for t, lp in [("Caf", -0.1), ("é", -0.2), (".\n", -0.3), ("The", -0.4), (" answer", -0.5),
                            (" is", -0.6), (" B", -0.7), (".", -0.8)]]
    _, start, end = extract(text, "choice")
    assert span_logprob(text, start, end, tokens) == pytest.approx(-0.7)
    _, start, end = extract(text, "last_line")
    assert span_logprob(text, start, end, tokens) == pytest.approx(-0.4 - 0.5 - 0.6 - 0.7 - 0.8)
    _, start, end = extract(text, "whole")
    assert span_logprob(text, start, end, tokens) == pytest.approx(-3.6)
    # a multi-byte character split across tokens: offsets count bytes
    split = [{"token": "Caf", "logprob": -0.1, "bytes": list(b"Caf\xc3")},
             {"token": "", "logprob": -0.2, "bytes": list(b"\xa9")}] + tokens[2:]
    assert span_logprob(text, 0, 4, split) == pytest.approx(-0.3)
    assert span_logprob(text, start, end, None) is None  # no log-probabilities
    assert span_logprob(text, start, end, tokens[:-1]) is None  # tokens do not spell the text


def response(text: str, logprobs: list[tuple[str, float]] | None, usage=(100, 20)) -> dict:
    return {
        "choices": [{"message": {"content": text}, "finish_reason": "stop",
                     "logprobs": None if logprobs is None else {"content": [
                         {"token": t, "logprob": lp, "bytes": None} for t, lp in logprobs]}}],
        "usage": None if usage is None else {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
    }


@pytest.fixture
def backends(tmp_path):
    def make(url: str, extractor: str = "choice", **settings):
        doc = {"extractor": extractor, "models": {
            name: {"base_url": url + "/v1", "model": f"id-{name}", "price_in": 1.0, "price_out": 3.0, **settings}
            for name in ("small", "big")}}
        path = tmp_path / "backends.yaml"
        path.write_text(yaml.safe_dump(doc))
        return load_backends(path)
    return make


def test_features_of_a_response(backends):
    pool = backends("http://127.0.0.1:9")
    small = pool.models["small"]
    result = features(response("The answer is B", [("The", -1.0), (" answer", -0.5), (" is", -0.2), (" B", -0.25)]),
                      small, "choice", 12.5)
    assert (result.answer, result.confidence, result.tokens_in, result.tokens_out) == ("B", -0.25, 100, 20)
    assert result.cost == pytest.approx((100 * 1.0 + 20 * 3.0) / 1e6) and result.latency_ms == 12.5
    assert result.observation() == {"model": "small", "answer": "B", "confidence": -0.25, "tokens_out": 20,
                                    "cost": result.cost}
    bare = features(response("no letter here", None, usage=None), small, "choice", 1.0)
    assert (bare.answer, bare.confidence, bare.cost) == (None, None, None)
    assert bare.observation() == {"model": "small", "answer": None}
    with pytest.raises(BackendError, match="small: the response has no choices"):
        features({"choices": []}, small, "choice", 1.0)


def test_calls_over_http_give_the_features_of_the_response(fake, backends):
    backend, url = fake
    prompt = "Which letter? (A) one (B) two"
    text, tokens, prompt_tokens = default_answer("id-small", prompt)

    async def run():
        pool = Pool(backends(url))
        try:
            return await pool.call("small", [{"role": "user", "content": prompt}])
        finally:
            await pool.close()

    result = asyncio.run(run())
    expected = features(response(text, tokens, usage=(prompt_tokens, len(tokens))), backends(url).models["small"],
                        "choice", result.latency_ms)
    assert result == expected and result.answer in "ABCD" and result.confidence == tokens[-1][1]


def test_retries_on_429_and_5xx_then_fails_naming_the_model(fake, backends):
    backend, url = fake

    async def run(pool_kw, model="small"):
        pool = Pool(backends(url), backoff=0.01, **pool_kw)
        try:
            return await pool.call(model, [{"role": "user", "content": "q"}])
        finally:
            await pool.close()

    backend.errors["id-small"] = [429, 503]
    assert asyncio.run(run({"retries": 2})).answer in "ABCD"
    backend.errors["id-small"] = [429]
    with pytest.raises(BackendError, match="small: HTTP 429"):
        asyncio.run(run({"retries": 0}))
    backend.errors["id-small"] = [400, 400]
    with pytest.raises(BackendError, match="small: HTTP 400"):  # not retried
        asyncio.run(run({"retries": 3}))
    assert backend.errors["id-small"] == [400]
    backend.errors.clear()


def test_timeouts_and_refused_connections(fake, backends):
    backend, url = fake
    backend.delay["id-big"] = 2.0

    async def run(pool):
        try:
            return await pool.call("big", [{"role": "user", "content": "q"}])
        finally:
            await pool.close()

    with pytest.raises(BackendError, match="big: timed out after 0.2 s"):
        asyncio.run(run(Pool(backends(url, timeout=0.2))))
    backend.delay.clear()
    with pytest.raises(BackendError, match="big: cannot connect to http://127.0.0.1:9/v1"):
        asyncio.run(run(Pool(backends("http://127.0.0.1:9"))))


def test_concurrency_is_bounded_per_model(fake, backends):
    backend, url = fake
    backend.delay["id-small"] = 0.1

    async def run():
        pool = Pool(backends(url, concurrency=4))
        try:
            start = asyncio.get_running_loop().time()
            await asyncio.gather(*(pool.call("small", [{"role": "user", "content": f"q{i}"}]) for i in range(12)))
            return asyncio.get_running_loop().time() - start
        finally:
            await pool.close()

    assert asyncio.run(run()) >= 0.3  # 12 calls, 4 at a time, 0.1 s each
    backend.delay.clear()
