"""Real HTTP on loopback for the serving tests and benchmarks: a fake OpenAI-compatible backend (FastAPI)
with deterministic answers and log-probabilities, run in a background thread or in its own process (so
that it does not share the test's interpreter lock), and uvicorn servers run in background threads."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

Answer = tuple[str, list[tuple[str, float]], int] | tuple[str, list[tuple[str, float]], int, int]
"""A response: its text, its tokens with their log-probabilities (spelling the text), prompt tokens, and
optionally completion tokens (default: the number of tokens)."""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def default_answer(model: str, prompt: str) -> Answer:
    """A multiple-choice answer that depends on (model, prompt) only, tagged with the prompt's digest so
    that a response given to the wrong request is caught."""
    h = hashlib.sha256(f"{model}\0{prompt}".encode()).digest()
    text = f"[{digest(prompt)[:12]}] Let me think, café.\nThe answer is {'ABCD'[h[0] % 4]}."
    tokens = re.findall(r"\s*\S+", text)
    return text, [(t, -2.0 * h[1 + i % 30] / 255) for i, t in enumerate(tokens)], len(prompt.split())


def message_text(message: dict) -> str:
    """A chat message's text, as OpenAI accepts it: a string, a list of text parts, or no content."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content)
    return content or ""


class FakeBackend:
    """Serves every model id it is asked for. `delay[id]` seconds of latency, ids in `down` answer 500,
    `errors[id]` lists statuses to answer before succeeding (429, 503, ...); `calls` counts calls per id.
    `POST /control` with any of `{"delay", "down", "errors"}` replaces them."""

    def __init__(self, answer: Callable[[str, str], Answer] = default_answer) -> None:
        self.answer = answer
        self.delay: dict[str, float] = {}
        self.down: set[str] = set()
        self.errors: dict[str, list[int]] = {}
        self.calls: Counter = Counter()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)
        self.app.post("/control")(self.control)

    async def control(self, request: Request):
        state = await request.json()
        self.delay = state.get("delay", self.delay)
        self.down = set(state.get("down", self.down))
        self.errors = state.get("errors", self.errors)
        return {"ok": True}

    async def complete(self, request: Request):
        body = await request.json()
        model = body["model"]
        self.calls[model] += 1
        if self.delay.get(model):
            await asyncio.sleep(self.delay[model])
        if model in self.down or self.errors.get(model):
            status = self.errors[model].pop(0) if self.errors.get(model) else 500
            return JSONResponse({"error": {"message": f"{model} is unavailable", "type": "server_error"}}, status)
        prompt = "\n".join(message_text(m) for m in body["messages"])
        text, tokens, prompt_tokens, *completion = self.answer(model, prompt)
        completion_tokens = completion[0] if completion else len(tokens)
        logprobs = None
        if body.get("logprobs"):
            content = [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in tokens]
            logprobs = {"content": content}
        return {
            "id": f"cmpl-{digest(model + prompt)[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, app, **config) -> None:
        config = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "access_log": False, "backlog": 4096,
                  **config}
        self.server = uvicorn.Server(uvicorn.Config(app, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class FakeProcess:
    """A `FakeBackend` (default answers) in a child process; `control(...)` posts to its /control."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.process.kill()
            raise RuntimeError("the fake backend process did not start")
        self.url = f"http://127.0.0.1:{line.strip()}"

    def control(self, **state) -> None:
        httpx.post(self.url + "/control", json=state, timeout=10).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


if __name__ == "__main__":
    server = ServerThread(FakeBackend().app)
    print(server.port, flush=True)
    server.thread.join()
