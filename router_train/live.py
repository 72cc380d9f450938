"""Answer features from live calls: the one code path that turns a model's response into the `answer`,
`confidence`, token, cost and latency fields of a routing table row (the collector) and of a
`route_batch` observation (the gateway), so that serving sees the features training saw.

- `extract(text, kind)` reads the final answer from a response: `choice` the multiple-choice letter
  (the last "answer is X" / "answer: X", else the last standalone letter A-J), `number` the last number
  (commas dropped, integral values without decimals), `last_line` the last non-empty line, `whole` the
  whole text (stripped). It also gives the answer's character span in the text.
- `confidence` is the sum of the log-probabilities of the response tokens that overlap that span: the
  log-probability the model gave the answer it wrote (the letter's token for `choice`, every token of
  the line for `last_line`, the whole sequence for `whole`). It is None when the backend returned no
  log-probabilities, when its tokens do not spell out the response text exactly, or when no answer was
  found; the estimator treats a missing confidence as unknown.
- `features(body, backend, extractor, latency_ms)` makes a `CallResult` from an OpenAI chat completion
  body: tokens from `usage`, cost from the backend's prices.
- `Pool` calls the backends' `/chat/completions` with the `openai` client (async, over its aiohttp
  transport; its generic `post`, so backend-specific fields pass through and no time goes to typing
  each call), log-probabilities requested, at most
  `concurrency` calls in flight per model, optionally retrying 429 / 5xx / connection errors with
  exponential backoff; failures raise `BackendError` naming the model.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass

import openai

from .backends import EXTRACTORS, Backend, Backends

_STATED_CHOICE = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:=]?\s*\(?([A-J])\)?(?![A-Za-z0-9])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-J])(?![A-Za-z0-9])")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _choice(text: str) -> tuple[str, int, int] | None:
    match = (list(_STATED_CHOICE.finditer(text)) or list(_LONE_LETTER.finditer(text)) or [None])[-1]
    return None if match is None else (match.group(1), match.start(1), match.end(1))


def _number(text: str) -> tuple[str, int, int] | None:
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    value = float(match.group().replace(",", ""))
    digits = match.group().replace(",", "")
    answer = str(int(value)) if value.is_integer() and "." in digits and abs(value) < 1e15 else digits
    return answer, match.start(), match.end()


def _last_line(text: str) -> tuple[str, int, int] | None:
    end = len(text.rstrip())
    if end == 0:
        return None
    start = text.rfind("\n", 0, end) + 1
    start += len(text[start:end]) - len(text[start:end].lstrip())
    return text[start:end], start, end


def _whole(text: str) -> tuple[str, int, int] | None:
    stripped = text.strip()
    if not stripped:
        return None
    start = len(text) - len(text.lstrip())
    return stripped, start, start + len(stripped)


_EXTRACT = dict(zip(EXTRACTORS, (_choice, _number, _last_line, _whole)))


def extract(text: str, kind: str) -> tuple[str, int, int] | None:
    """The final answer in `text` and its character span `[start, end)`, or None when there is none."""
    if kind not in _EXTRACT:
        raise ValueError(f"extractor must be one of {list(EXTRACTORS)}, got {kind!r}")
    return _EXTRACT[kind](text)


def span_logprob(text: str, start: int, end: int, tokens) -> float | None:
    """Sum of the log-probabilities of the tokens overlapping characters `[start, end)` of `text`.

    `tokens` are the response's `logprobs.content` (dicts with `token`, `bytes`, `logprob`); None when
    there are none or they do not spell out `text` byte for byte.
    """
    if not tokens:
        return None
    pieces, logprobs = [], []
    for item in tokens:
        raw = item.get("bytes")
        pieces.append(bytes(raw) if raw is not None else item["token"].encode("utf-8"))
        logprobs.append(float(item["logprob"]))
    if b"".join(pieces) != text.encode("utf-8"):
        return None
    lo, hi = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
    total, offset, found = 0.0, 0, False
    for piece, logprob in zip(pieces, logprobs):
        if offset < hi and offset + len(piece) > lo:
            total, found = total + logprob, True
        offset += len(piece)
    return total if found and not math.isnan(total) else None


@dataclass
class CallResult:
    """One model's response to one query, with its features."""

    model: str  # the pool's name for the model
    text: str  # the response content
    answer: str | None  # the extracted final answer
    confidence: float | None  # log-probability of the answer's tokens
    tokens_in: int | None
    tokens_out: int | None
    cost: float | None  # USD, from the backend's prices; None without usage
    latency_ms: float  # wall time of the call (queueing for a concurrency slot excluded)
    finish_reason: str | None

    def observation(self) -> dict:
        """What `CascadeRouter.route_batch` is told about this call."""
        seen = {"model": self.model, "answer": self.answer}
        for key in ("confidence", "tokens_out", "cost"):
            if getattr(self, key) is not None:
                seen[key] = getattr(self, key)
        return seen

    def features(self) -> dict:
        """The routing table fields of this call (besides query, model, quality)."""
        row = asdict(self)
        return {key: row[key] for key in ("answer", "confidence", "tokens_in", "tokens_out", "cost", "latency_ms")}


def features(body: dict, backend: Backend, extractor: str, latency_ms: float) -> CallResult:
    """Features of an OpenAI chat completion body (parsed JSON) from `backend`."""
    choices = body.get("choices") or []
    if not choices:
        raise BackendError(backend.name, "the response has no choices")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    found = extract(text, extractor)
    tokens = (choice.get("logprobs") or {}).get("content")
    usage = body.get("usage") or {}
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    cost = backend.cost(tokens_in, tokens_out) if tokens_in is not None and tokens_out is not None else None
    return CallResult(
        model=backend.name, text=text,
        answer=None if found is None else found[0],
        confidence=None if found is None else span_logprob(text, found[1], found[2], tokens),
        tokens_in=tokens_in, tokens_out=tokens_out, cost=cost, latency_ms=latency_ms,
        finish_reason=choice.get("finish_reason"),
    )


class BackendError(Exception):
    """A backend call that failed (after any retries); names the model."""

    def __init__(self, model: str, reason: str, *, status: int | None = None) -> None:
        super().__init__(f"{model}: {reason}")
        self.model, self.reason, self.status = model, reason, status


def _retryable(error: Exception) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)


def _retry_after(error: Exception) -> float | None:
    """Seconds asked for by a Retry-After header, when given in seconds."""
    response = getattr(error, "response", None)
    try:
        return float(response.headers["retry-after"]) if response is not None else None
    except (KeyError, ValueError):
        return None


def _refused(error: BaseException) -> OSError | None:
    """The connection failure behind a client error, if any: the aiohttp transport reports a refused or
    unreachable host as a connect *timeout*, with the OS error further down the chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(error: Exception, backend: Backend) -> BackendError:
    refused = _refused(error) if isinstance(error, openai.APIConnectionError) else None
    if refused is not None:
        return BackendError(backend.name, f"cannot connect to {backend.base_url}: {refused}")
    if isinstance(error, openai.APITimeoutError):
        return BackendError(backend.name, f"timed out after {backend.timeout:g} s")
    if isinstance(error, openai.APIStatusError):
        return BackendError(backend.name, f"HTTP {error.status_code}: {error.message}", status=error.status_code)
    if isinstance(error, openai.APIConnectionError):
        return BackendError(backend.name, f"cannot connect to {backend.base_url}: {error.__cause__ or error}")
    return BackendError(backend.name, f"{type(error).__name__}: {error}")


class Pool:
    """The backends' clients: async calls with log-probabilities, bounded concurrency per model and
    optional retries with exponential backoff. Create and use it inside one event loop."""

    def __init__(self, backends: Backends, *, retries: int = 0, backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        self.backends = backends
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._clients = {
            name: openai.AsyncOpenAI(base_url=b.base_url, api_key=b.api_key(), timeout=b.timeout, max_retries=0,
                               http_client=openai.DefaultAioHttpClient())  # aiohttp: less CPU a call than httpx
            for name, b in backends.models.items()
        }
        self._slots = {name: asyncio.Semaphore(b.concurrency) for name, b in backends.models.items()}

    async def call(self, model: str, messages: list[dict], **params) -> CallResult:
        """Call `model` with `messages`; `params` (max_tokens, temperature, ...) override the backend's."""
        backend = self.backends.models[model]
        request = {"max_tokens": backend.max_tokens, "temperature": backend.temperature, **params}
        attempt = 0
        while True:
            async with self._slots[model]:
                start = time.perf_counter()
                try:  # the client's generic POST: no per-call typing of the request and response (2 ms a call)
                    raw = await self._clients[model].post(
                        "/chat/completions", cast_to=bytes,
                        body={"model": backend.model, "messages": messages, "logprobs": True, **request})
                except openai.OpenAIError as e:
                    error = e
                else:
                    latency_ms = 1000 * (time.perf_counter() - start)
                    try:
                        response = json.loads(raw)
                    except ValueError:
                        raise BackendError(model, f"the response is not JSON: {raw[:80]!r}") from None
                    return features(response, backend, self.backends.extractor, latency_ms)
            if attempt == self.retries or not _retryable(error):
                raise _describe(error, backend) from error
            wait = _retry_after(error) or self.backoff * 2**attempt * (1 + random.random())
            await asyncio.sleep(min(wait, self.max_backoff))
            attempt += 1

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
