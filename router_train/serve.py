"""HTTP serving of `CascadeRouter.route_batch` with the standard library, batching concurrent requests.

    python -m router_train.serve --checkpoint checkpoints/default [--host 127.0.0.1 --port 8000]

- `POST /route_batch` with `{"queries": [...], "observed": [[{"model", "answer", "confidence"?,
  "tokens_out"?, "cost"?}, ...], ...], "budget"?: float, "mode"?: str, "sources"?: [...]}` answers
  `{"decisions": [{"next_model", "answer_model", "step", "quality", "cost", "plan"}, ...]}`; bad input
  gets 400 with `{"error": message}`.
- `GET /health` and `GET /openapi.json`.
Requests that arrive together are merged into one `route_batch` call per (budget, mode): one encoder
and kernel pass for all of them.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .router import SERVING_MODES, CascadeRouter

MAX_BODY = 32 * 1024 * 1024


@dataclass
class _Job:
    queries: list
    observed: list | None
    budget: float | None
    mode: str | None
    sources: list | None
    future: Future = field(default_factory=Future)


class Batcher:
    """Collects concurrent requests for up to `max_wait` seconds (or `max_queries`) and routes them together."""

    def __init__(self, router: CascadeRouter, *, max_wait: float = 0.005, max_queries: int = 4096) -> None:
        self.router, self.max_wait, self.max_queries = router, max_wait, max_queries
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="route-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: _Job) -> Future:
        self._jobs.put(job)
        return job.future

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs, size = [job], len(job.queries)
            while size < self.max_queries:
                try:
                    nxt = self._jobs.get(timeout=self.max_wait)
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                jobs.append(nxt)
                size += len(nxt.queries)
            self._route(jobs)

    def _route(self, jobs: list[_Job]) -> None:
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            try:  # a bad request fails alone, not the batch it arrived with
                job.observed = self.router.check(job.queries, job.observed, job.sources)
                self.router.strategy(job.budget, job.mode)
            except ValueError as e:
                job.future.set_exception(e)
                continue
            groups.setdefault((job.budget, job.mode), []).append(job)
        for (budget, mode), group in groups.items():
            queries = [q for j in group for q in j.queries]
            observed = [o for j in group for o in j.observed]
            sources = [s for j in group for s in (j.sources or [""] * len(j.queries))]
            try:
                decisions = self.router.route_batch(queries, observed, budget, mode=mode, sources=sources)
            except Exception as e:  # noqa: BLE001 - report the failure to every waiting request
                for j in group:
                    j.future.set_exception(e)
                continue
            start = 0
            for j in group:
                j.future.set_result(decisions[start : start + len(j.queries)])
                start += len(j.queries)


def openapi_schema(router: CascadeRouter) -> dict:
    """The OpenAPI 3 description of the three endpoints."""
    observation = {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": {"type": "string", "enum": router.models},
            "answer": {"type": ["string", "null"]},
            "confidence": {"type": "number", "description": "log-probability of the answer"},
            "tokens_out": {"type": "number", "minimum": 0},
            "cost": {"type": "number", "minimum": 0, "description": "USD actually spent on this call"},
        },
    }
    decision = {
        "type": "object",
        "properties": {
            "next_model": {"type": ["string", "null"]},
            "answer_model": {"type": ["string", "null"]},
            "step": {"type": "integer"},
            "quality": {"type": "object", "additionalProperties": {"type": "number"}},
            "cost": {"type": "object", "additionalProperties": {"type": "number"}},
            "plan": {"type": "array", "items": {"type": "string"}},
        },
    }
    lo, hi = router.budget_range
    request = {
        "type": "object",
        "required": ["queries"],
        "properties": {
            "queries": {"type": "array", "items": {"type": "string"}},
            "observed": {"type": "array", "items": {"type": "array", "items": observation}},
            "budget": {"type": "number", "minimum": lo, "maximum": hi},
            "mode": {"type": "string", "enum": [m for m in SERVING_MODES if m in router.manifest["strategies"]]},
            "sources": {"type": "array", "items": {"type": "string"}},
        },
    }
    error = {"type": "object", "properties": {"error": {"type": "string"}}}

    def body(schema):
        return {"content": {"application/json": {"schema": schema}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "router-train", "version": router.manifest.get("package_version", "")},
        "paths": {
            "/route_batch": {
                "post": {
                    "summary": "Next model (or stop) for a batch of in-flight queries",
                    "requestBody": {"required": True, **body(request)},
                    "responses": {
                        "200": {"description": "one decision per query",
                                **body({"type": "object", "properties": {"decisions": {"type": "array", "items": decision}}})},
                        "400": {"description": "invalid input", **body(error)},
                    },
                }
            },
            "/health": {"get": {"summary": "Liveness and what is loaded", "responses": {"200": {"description": "ok"}}}},
            "/openapi.json": {"get": {"summary": "This schema", "responses": {"200": {"description": "ok"}}}},
        },
    }


def make_server(router: CascadeRouter, host: str = "127.0.0.1", port: int = 8000, **batching) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) routing through one shared batcher; `server.batcher.close()` stops it."""
    batcher = Batcher(router, **batching)
    schema = json.dumps(openapi_schema(router)).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - keep the console quiet per request
            pass

        def _send(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode())

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                lo, hi = router.budget_range
                self._json(200, {"status": "ok", "models": router.models, "budget_range": [lo, hi],
                                 "mode": router.mode, "budget": router.budget})
            elif self.path == "/openapi.json":
                self._send(200, schema)
            else:
                self._json(404, {"error": f"no such endpoint {self.path}; see /openapi.json"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/route_batch":
                self._json(404, {"error": f"no such endpoint {self.path}; POST /route_batch"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if not 0 < length <= MAX_BODY:
                    raise ValueError(f"request body must be 1 byte to {MAX_BODY} bytes of JSON")
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict):
                    raise ValueError("request body must be a JSON object with a 'queries' field")
                unknown = sorted(set(request) - {"queries", "observed", "budget", "mode", "sources"})
                if unknown:
                    raise ValueError(f"unknown field(s) {unknown}; see /openapi.json")
                if "queries" not in request:
                    raise ValueError("the field 'queries' is required")
                job = _Job(request["queries"], request.get("observed"), request.get("budget"),
                           request.get("mode"), request.get("sources"))
                decisions = batcher.submit(job).result()
            except (ValueError, json.JSONDecodeError) as e:
                self._json(400, {"error": str(e)})
                return
            self._json(200, {"decisions": [d.to_dict() for d in decisions]})

    server = _Server((host, port), Handler)
    server.batcher = batcher
    return server


class _Server(ThreadingHTTPServer):
    """A thread per connection, and a listen backlog deep enough for bursts of concurrent clients."""

    daemon_threads = True
    request_queue_size = 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m router_train.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="an export directory (checkpoints/<run>)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--budget", type=float, help="default budget (USD per query); default: mid-range")
    p.add_argument("--mode", default="cascade_routing", choices=SERVING_MODES)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request may wait for others to batch with")
    args = p.parse_args(argv)
    router = CascadeRouter.load(args.checkpoint, device=args.device, budget=args.budget, mode=args.mode)
    server = make_server(router, args.host, args.port, max_wait=args.max_wait_ms / 1000)
    print(f"serving {args.checkpoint} on http://{args.host}:{server.server_port} (POST /route_batch)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.close()


if __name__ == "__main__":
    main()
