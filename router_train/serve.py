"""The HTTP server (FastAPI on uvicorn): routing decisions, and with a backends file an OpenAI-compatible
cascade gateway.

    python -m router_train.serve --checkpoint checkpoints/default [--backends configs/backends.yaml]
        [--host 127.0.0.1 --port 8000] [--workers N]

- `POST /route_batch` with `{"queries": [...], "observed"?: [[{"model", "answer"?, "confidence"?,
  "tokens_out"?, "cost"?}, ...], ...], "budget"?: float, "mode"?: str, "sources"?: [...]}` answers
  `{"decisions": [{"next_model", "answer_model", "step", "quality", "cost", "plan"}, ...]}`.
- With `--backends`: `POST /v1/chat/completions` (cascade routing per request; the response is a chat
  completion plus a `router` object; budget, mode and source per request in the body or the
  X-Router-Budget / X-Router-Mode / X-Router-Source headers) and `GET /v1/models`.
- `GET /health`, `GET /metrics` (Prometheus text format), `GET /openapi.json`.

Each request is validated on its own before it joins a batch; bad input gets 400 with a message
(`{"error": message}` on /route_batch, OpenAI's `{"error": {"message", "type", ...}}` on /v1), a body
over `max_body` bytes or a /route_batch request of more than `max_queries` queries 413, a body that
does not arrive within `body_timeout` seconds 408.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import math
import os
import shutil
import socket
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.supervisors import Multiprocess

from .api import ChatCompletionRequest, RouteBatchRequest, RouteBatchResponse
from .backends import Backends, load_backends
from .batching import Batcher
from .cli import add_debug_flag, user_errors
from .gateway import Gateway, GatewayError, stream_chunks
from .live import Pool
from .router import SERVING_MODES, CascadeRouter
from .telemetry import RequestMetrics, SharedTelemetry, Telemetry

MAX_BODY = 32 * 1024 * 1024
MAX_QUERIES = 10_000
BODY_TIMEOUT = 30.0


class ApiError(Exception):
    """A request answered with `status` and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(path: str, status: int, message: str) -> JSONResponse:
    """An error in the endpoint's style: OpenAI's object under /v1, `{"error": message}` elsewhere."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)
    return JSONResponse({"error": message}, status)


def describe_errors(errors) -> str:
    """One message for pydantic's validation errors, naming each field (`observed[0][1].confidence`)."""
    unknown, parts = [], []
    for error in errors:
        loc = [p for p in error["loc"] if p != "body"]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        kind = error["type"]
        if kind == "json_invalid":
            return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
        if not path:
            return "the request body must be a JSON object; see /openapi.json"
        if kind == "extra_forbidden":
            unknown.append(path)
        elif kind == "missing":
            parts.append(f"the field {path!r} is required")
        else:
            got = error.get("input")
            shown = type(got).__name__ if isinstance(got, (dict, list)) else repr(got)[:60]
            parts.append(f"{path}: {error['msg']} (got {shown})")
    if unknown:
        parts.insert(0, f"unknown field(s) {unknown}; see /openapi.json")
    return "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")


class BodyReader:
    """ASGI middleware: reads each request body up front, answering 413 above `max_bytes` (by its
    Content-Length, or as it arrives) and 408 when it takes more than `timeout` seconds; the body is then
    read as JSON whatever its Content-Type (`curl -d` sends form-encoded)."""

    def __init__(self, app, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        too_large = f"the request body is over {self.max_bytes} bytes; send less per request"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(path, 413, too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_bytes:
                        await error_response(path, 413, too_large)(scope, receive, send)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await error_response(path, 408, f"the request body did not arrive within {self.timeout:g} s")(
                scope, receive, send)
            return
        body, replayed = b"".join(chunks), False
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _budget_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        budget = float(value)
    except ValueError:
        raise ApiError(400, f"the X-Router-Budget header must be a number (USD per query), got {value!r}") from None
    if not math.isfinite(budget):
        raise ApiError(400, f"the X-Router-Budget header must be a finite number, got {value!r}")
    return budget


def make_app(
    router: CascadeRouter,
    backends: Backends | None = None,
    *,
    model_id: str | None = None,
    max_wait: float = 0.0,
    max_batch: int = 2048,
    chunk: int = 256,
    max_queries: int = MAX_QUERIES,
    max_body: int = MAX_BODY,
    body_timeout: float = BODY_TIMEOUT,
    metrics_dir: str | None = None,
):
    """The server as an ASGI app: /route_batch, /health, /metrics, /openapi.json and, with `backends`
    (whose models must be the checkpoint's), the OpenAI-compatible /v1 endpoints. `metrics_dir`: a folder
    shared with the server's other worker processes, so that /metrics counts all of them."""
    if backends is not None and set(backends.names) != set(router.models):
        raise ValueError(f"the backends list {sorted(backends.names)}, the checkpoint routes {router.models}")
    if model_id is None:
        model_id = f"router-train/{router.path.name if router.path else 'router'}"
    telemetry = Telemetry()
    shared = SharedTelemetry(telemetry, metrics_dir) if metrics_dir else None
    state: dict = {}

    async def publish_metrics() -> None:
        published = None
        while True:
            await asyncio.sleep(shared.interval)
            seen = sum(telemetry.requests.values())
            if seen != published:
                shared.publish()
                published = seen

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = batcher = Batcher(router, telemetry, max_wait=max_wait, max_batch=max_batch, chunk=chunk)
        batcher.start()
        if backends is not None:
            pool = Pool(backends)
            state["gateway"] = Gateway(router, batcher, pool, telemetry, model_id)
        publisher = asyncio.create_task(publish_metrics()) if shared else None
        try:
            yield
        finally:
            if publisher is not None:
                publisher.cancel()
            await batcher.close()
            if backends is not None:
                await pool.close()

    app = FastAPI(title="router-train", version=router.manifest.get("package_version", ""), lifespan=lifespan,
                  docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(request.url.path, error.status, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code in (404, 405):
            message = f"no endpoint {request.method} {request.url.path}; see /openapi.json"
        else:
            message = f"{error.detail}; the body must be UTF-8 JSON" if error.status_code == 400 else str(error.detail)
        return error_response(request.url.path, error.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return error_response(request.url.path, 400, describe_errors(error.errors()))

    @functools.lru_cache(maxsize=1024)
    def checked(budget: float | None, mode: str | None) -> tuple[float, str]:
        return router.strategy(budget, mode).budget, mode or router.mode

    def settings(budget: float | None, mode: str | None) -> tuple[float, str]:
        """The request's budget and mode, defaults filled in, checked against the checkpoint (cached: most
        requests use a few)."""
        try:
            return checked(budget, mode)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    errors = {400: {"description": "invalid input"}, 413: {"description": "body or batch too large"}}

    @app.post("/route_batch", response_model=RouteBatchResponse, responses=errors,
              summary="Next model (or stop) for a batch of in-flight queries")
    async def route_batch(body: RouteBatchRequest):
        n = len(body.queries)
        if n > max_queries:
            raise ApiError(413, f"{n} queries in one request; at most {max_queries}: split it into smaller requests")
        budget, mode = settings(body.budget, body.mode)
        observed = None if body.observed is None else [
            [o.model_dump(exclude_none=True) for o in seen] for seen in body.observed]
        try:
            observed = router.check(body.queries, observed, body.sources)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        sources = body.sources or [""] * n
        try:
            decisions = await state["batcher"].route(body.queries, observed, sources, budget, mode)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - this request alone failed; the server goes on
            raise ApiError(500, f"routing this request failed: {type(e).__name__}: {e}") from None
        return JSONResponse({"decisions": [d.to_dict() for d in decisions]})

    @app.get("/health", summary="Liveness and what is loaded")
    async def health():
        lo, hi = router.budget_range
        return {"status": "ok", "models": router.models, "budget_range": [lo, hi], "mode": router.mode,
                "budget": router.budget, "model_id": model_id if backends is not None else None}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        text = (shared or telemetry).render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    if backends is not None:
        @app.get("/v1/models", summary="The router's id and the pool's models (OpenAI format)")
        async def models():
            ids = [model_id, *router.models]
            return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "router-train"}
                                               for i in ids]}

        @app.post("/v1/chat/completions", responses={**errors, 404: {"description": "unknown model"},
                                                     502: {"description": "no backend answered"}},
                  summary="Chat completion by cascade routing over the pool (OpenAI-compatible)")
        async def chat(body: ChatCompletionRequest,
                       x_router_budget: str | None = Header(None, description="budget, USD per query"),
                       x_router_mode: str | None = Header(None, description="mode: " + ", ".join(SERVING_MODES)),
                       x_router_source: str | None = Header(None, description="task tag of the query")):
            if body.model != model_id and body.model not in router.models:
                raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists "
                                    f"{[model_id, *router.models]}")
            budget = body.budget if body.budget is not None else _budget_header(x_router_budget)
            budget, mode = settings(budget, body.mode or x_router_mode)
            try:
                completion = await state["gateway"].complete(body, budget, mode, body.source or x_router_source or "")
            except GatewayError as e:
                raise ApiError(e.status, str(e)) from None
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            except Exception as e:  # noqa: BLE001 - this request alone failed; the server goes on
                raise ApiError(500, f"routing this request failed: {type(e).__name__}: {e}") from None
            if not body.stream:
                return JSONResponse(completion)
            usage = bool((body.stream_options or {}).get("include_usage"))
            events = [f"data: {json.dumps(chunk)}\n\n" for chunk in stream_chunks(completion, usage)]
            return StreamingResponse(iter([*events, "data: [DONE]\n\n"]), media_type="text/event-stream")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="Cascade routing decisions and an OpenAI-compatible cascade gateway.")
            parts = schema["components"]["schemas"]
            lo, hi = router.budget_range
            for name in ("RouteBatchRequest", "ChatCompletionRequest"):
                if name in parts:
                    budget = parts[name]["properties"]["budget"]
                    budget["description"] += f" This checkpoint: [{lo:.6g}, {hi:.6g}]."
            parts["Observation"]["properties"]["model"]["enum"] = list(router.models)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    endpoints = {"/route_batch", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/chat/completions"}
    return RequestMetrics(BodyReader(app, max_body, body_timeout), telemetry, endpoints)


WORKER_ARGS = "ROUTER_TRAIN_SERVE_ARGS"
"""Environment variable through which `--workers` hands the parsed arguments to each worker process."""
WORKER_HEALTHCHECK_S = 120
"""How long uvicorn's supervisor waits for a worker's answer to its health ping before it kills and restarts the
worker (uvicorn's default: 5 s). A spawned worker answers only once it has re-imported this module (torch, the
router) and built its app; on a busy 2-core machine that can take longer than 5 s, and the test suite's
2-worker test, run beside the other tests, timed out at 300 s twice with only one worker's export loaded (most
likely workers killed and restarted in a loop)."""


def build_app(args: argparse.Namespace):
    """The app the command-line arguments describe (the checkpoint, its backends, the server's caps), for
    a process that serves it until it exits."""
    if args.threads:
        torch.set_num_threads(args.threads)
    router = CascadeRouter.load(
        args.checkpoint, device=args.device, budget=args.budget, mode=args.mode, quantize=args.quantize
    )
    backends = load_backends(args.backends, router.models) if args.backends else None
    app = make_app(router, backends, model_id=args.model_id, max_wait=args.max_wait_ms / 1000,
                   max_queries=args.max_queries, max_body=int(args.max_body_mb * 2**20),
                   metrics_dir=args.metrics_dir)
    # the millions of objects of torch, the encoder and the router live as long as the server: out of the
    # garbage collector's sight, its full collections no longer stall requests (p99 halved, benchmarks)
    gc.collect()
    gc.freeze()
    return app


def worker_app():
    """One worker's app under `--workers N` (uvicorn imports it in each process): built from the arguments
    the parent checked and passed in the environment."""
    return build_app(argparse.Namespace(**json.loads(os.environ[WORKER_ARGS])))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m router_train.serve`."""
    p = argparse.ArgumentParser(prog="python -m router_train.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="an export directory (checkpoints/<run>)")
    p.add_argument("--backends", help="backends file (configs/backends.example.yaml): serve /v1/chat/completions")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--budget", type=float, help="default budget (USD per query); default: mid-range")
    p.add_argument("--mode", default="cascade_routing", choices=SERVING_MODES)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quantize", choices=["int8"], help="int8: a dynamically quantized encoder, faster on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 when sharing the CPU)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port, each with its own copy of the router and its own "
                        "batches, for machines with cores to spare (one process is CPU-bound); /metrics sums over "
                        "the workers")
    p.add_argument("--model-id", help="the router's model id in /v1 (default: router-train/<checkpoint name>)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="how long a request may wait for others to batch with")
    p.add_argument("--max-queries", type=int, default=MAX_QUERIES, help="most queries per /route_batch request")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY / 2**20, help="largest request body (MiB)")
    p.add_argument("--metrics-dir", help=argparse.SUPPRESS)  # set by --workers: the workers' shared counts
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = build_parser()
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    with user_errors(args.debug):
        app = build_app(args)  # with several workers too: a bad checkpoint or backends file fails here, once
        sock = listening_socket(args.host, args.port)
    what = "POST /route_batch" + (", POST /v1/chat/completions" if args.backends else "")
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    print(f"serving {Path(args.checkpoint)} on http://{args.host}:{args.port} ({what}{workers})", flush=True)
    options = dict(log_level="warning", access_log=False, backlog=2048)
    try:
        if args.workers == 1:
            uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])
        else:  # each worker builds its own app; the supervisor keeps none
            del app
            gc.unfreeze()
            gc.collect()
            args.metrics_dir = tempfile.mkdtemp(prefix="router-train-metrics-")  # each worker's counts
            os.environ[WORKER_ARGS] = json.dumps(vars(args))
            config = uvicorn.Config("router_train.serve:worker_app", factory=True, workers=args.workers,
                                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_S, **options)
            try:
                Multiprocess(config, sockets=[sock]).run()
            finally:
                shutil.rmtree(args.metrics_dir, ignore_errors=True)
    except KeyboardInterrupt:
        pass


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's TCP socket (shared by the workers), created with its protocol number so that asyncio
    sets TCP_NODELAY on every connection it accepts (uvicorn's own socket for several workers lacks it,
    and replies then wait ~40 ms for delayed ACKs); a taken port is a clear error before serving."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host or --port") from None
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
