"""Cascade routing of chat completions: for each request, route (step 0) → call the chosen model → its
answer features → route again … until the router stops, then answer with the chosen model's response.

Concurrent requests share each step's `route_batch` call through the `Batcher`. A backend that fails or
times out is recorded as run without an answer and the cascade goes on; when the router then stops on
it, the answered model with the best estimated quality gives the answer. When the router stops before
any model answered, the untried model with the best estimated quality is called (failover), so an
outage of some backends costs answers only when every backend fails; then the request fails with the
failed backends named (HTTP 502).
"""

from __future__ import annotations

import time
import uuid

from .api import ChatCompletionRequest, ChatMessage
from .batching import Batcher
from .live import BackendError, CallResult, Pool
from .router import CascadeRouter, Decision
from .telemetry import Telemetry


class GatewayError(Exception):
    """A request that cannot be answered; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def query_text(messages: list[ChatMessage]) -> str:
    """The text the router reads: a lone user message's content (as the collector sends queries), else
    the conversation as `role: content` lines."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].text()
    return "\n".join(f"{m.role}: {m.text()}" for m in messages)


class Gateway:
    """Answers chat completion requests by cascading over the pool."""

    def __init__(self, router: CascadeRouter, batcher: Batcher, pool: Pool, telemetry: Telemetry, model_id: str) -> None:
        self.router, self.batcher, self.pool, self.telemetry = router, batcher, pool, telemetry
        self.model_id = model_id

    async def complete(self, request: ChatCompletionRequest, budget: float, mode: str, source: str) -> dict:
        """The chat completion body (with its `router` object) for a validated request."""
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        params = request.backend_params()
        calls: list[dict] = []
        results: list[CallResult] = []
        if request.model != self.model_id:  # one model of the pool, called directly
            result = await self._call(request.model, messages, params, calls)
            if result is None:
                raise GatewayError(502, f"backend {calls[0]['error']}")
            return self._response(result, [result], calls, None, budget, "direct")
        query, observed = query_text(request.messages), []
        while True:
            (decision,) = await self.batcher.route([query], [observed], [source], budget, mode)
            model = decision.next_model
            if model is None and not results:
                tried = {call["model"] for call in calls}
                untried = [m for m in self.router.models if m not in tried]
                model = max(untried, key=lambda m: decision.quality[m]) if untried else None
            if model is None:
                break
            if any(call["model"] == model for call in calls):
                raise RuntimeError(f"the router chose {model} again after it ran")
            result = await self._call(model, messages, params, calls)
            observed.append({"model": model, "answer": None} if result is None else result.observation())
            if result is not None:
                results.append(result)
        answer = self._answer(decision, results)
        if answer is None:
            failed = "; ".join(call["error"] for call in calls) or "the router chose no model"
            raise GatewayError(502, f"no backend answered: {failed}")
        return self._response(answer, results, calls, decision, budget, mode)

    async def _call(self, model: str, messages: list[dict], params: dict, calls: list[dict]) -> CallResult | None:
        """Call one backend; record the call (or its failure) in `calls` and the telemetry."""
        start = time.perf_counter()
        try:
            result = await self.pool.call(model, messages, **params)
        except BackendError as e:
            seconds = time.perf_counter() - start
            self.telemetry.call(model, False, seconds, None)
            calls.append({"model": model, "ok": False, "error": str(e), "latency_ms": 1000 * seconds})
            return None
        self.telemetry.call(model, True, result.latency_ms / 1000, result.cost)
        calls.append({"model": model, "ok": True, **result.features()})
        return result

    @staticmethod
    def _answer(decision: Decision, results: list[CallResult]) -> CallResult | None:
        """The answer model's result; if it has none (it failed), the answered model estimated best."""
        answered = {r.model: r for r in results}
        if decision.answer_model in answered:
            return answered[decision.answer_model]
        if not answered:
            return None
        return answered[max(answered, key=lambda m: decision.quality.get(m, float("-inf")))]

    def _response(self, answer: CallResult, results: list[CallResult], calls: list[dict],
                  decision: Decision | None, budget: float, mode: str) -> dict:
        prompt = sum(r.tokens_in or 0 for r in results)
        completion = sum(r.tokens_out or 0 for r in results)
        router = {
            "mode": mode, "budget": budget, "answer_model": answer.model,
            "models": [call["model"] for call in calls], "calls": calls,
            "cost": sum(r.cost or 0.0 for r in results),
            "estimates": None if decision is None else {"quality": decision.quality, "cost": decision.cost,
                                                        "plan": decision.plan},
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id if decision is not None else answer.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "logprobs": None, "finish_reason": answer.finish_reason or "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "router": router,
        }


def stream_chunks(completion: dict, include_usage: bool) -> list[dict]:
    """A finished completion as `chat.completion.chunk` events: the whole answer in one chunk, then the
    finish reason with the `router` object (and the usage when asked for)."""
    head = {key: completion[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice = completion["choices"][0]
    first = head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                                 "finish_reason": None}]}
    last = head | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
                   "router": completion["router"]}
    if include_usage:
        last["usage"] = completion["usage"]
    return [first, last]
