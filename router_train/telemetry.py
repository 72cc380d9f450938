"""Serving metrics in the Prometheus text format (`GET /metrics`): requests by endpoint and status with
their latency, backend calls per model and outcome with their latency, spend per model, and the size of
the `route_batch` calls. Updated from the server's event loop only. Under several worker processes each
publishes a `snapshot()` to a shared folder and /metrics renders their `merged` sum (`SharedTelemetry`)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

from .outputs import atomic_write_bytes

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    """Cumulative bucket counts, sum and count of observations (seconds)."""

    def __init__(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.sum, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.sum += seconds
        self.count += 1

    def add(self, other: dict) -> None:
        """Add a snapshot's counts (`snapshot()`) to these."""
        self.buckets = [a + b for a, b in zip(self.buckets, other["buckets"])]
        self.sum += other["sum"]
        self.count += other["count"]

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "sum": self.sum, "count": self.count}

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{bound}"}} {n}' for bound, n in zip(LATENCY_BUCKETS, self.buckets)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out += [f"{name}_sum{{{labels}}} {self.sum!r}", f"{name}_count{{{labels}}} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Telemetry:
    """Counters and histograms of one server."""

    def __init__(self) -> None:
        self.requests: Counter = Counter()  # (endpoint, status)
        self.request_seconds: dict[str, _Histogram] = defaultdict(_Histogram)
        self.calls: Counter = Counter()  # (model, outcome)
        self.call_seconds: dict[str, _Histogram] = defaultdict(_Histogram)
        self.spend: Counter = Counter()  # model -> USD
        self.route_calls = 0
        self.route_queries = 0
        self.route_seconds = 0.0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, str(status)] += 1
        self.request_seconds[endpoint].observe(seconds)

    def call(self, model: str, ok: bool, seconds: float, cost: float | None) -> None:
        self.calls[model, "ok" if ok else "error"] += 1
        self.call_seconds[model].observe(seconds)
        if cost:
            self.spend[model] += cost

    def routed(self, queries: int, seconds: float) -> None:
        self.route_calls += 1
        self.route_queries += queries
        self.route_seconds += seconds

    def snapshot(self) -> dict:
        """Every count as JSON-able data, for another process to merge."""
        return {
            "requests": [[e, st, n] for (e, st), n in self.requests.items()],
            "request_seconds": {e: h.snapshot() for e, h in self.request_seconds.items()},
            "calls": [[m, o, n] for (m, o), n in self.calls.items()],
            "call_seconds": {m: h.snapshot() for m, h in self.call_seconds.items()},
            "spend": dict(self.spend),
            "route": [self.route_calls, self.route_queries, self.route_seconds],
        }

    @staticmethod
    def merged(snapshots: list[dict]) -> "Telemetry":
        """One Telemetry holding the sums of several processes' snapshots."""
        total = Telemetry()
        for snap in snapshots:
            total.requests.update({(e, st): n for e, st, n in snap["requests"]})
            for e, h in snap["request_seconds"].items():
                total.request_seconds[e].add(h)
            total.calls.update({(m, o): n for m, o, n in snap["calls"]})
            for m, h in snap["call_seconds"].items():
                total.call_seconds[m].add(h)
            total.spend.update(snap["spend"])
            calls, queries, seconds = snap["route"]
            total.route_calls += calls
            total.route_queries += queries
            total.route_seconds += seconds
        return total

    def render(self) -> str:
        lines = ["# HELP router_requests_total HTTP requests by endpoint and status.",
                 "# TYPE router_requests_total counter"]
        lines += [f'router_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP router_request_seconds HTTP request latency by endpoint.",
                  "# TYPE router_request_seconds histogram"]
        for endpoint, hist in sorted(self.request_seconds.items()):
            lines += hist.lines("router_request_seconds", f'endpoint="{_label(endpoint)}"')
        lines += ["# HELP router_backend_calls_total Backend calls by model and outcome.",
                  "# TYPE router_backend_calls_total counter"]
        lines += [f'router_backend_calls_total{{model="{_label(m)}",outcome="{o}"}} {n}'
                  for (m, o), n in sorted(self.calls.items())]
        lines += ["# HELP router_backend_seconds Backend call latency by model.",
                  "# TYPE router_backend_seconds histogram"]
        for model, hist in sorted(self.call_seconds.items()):
            lines += hist.lines("router_backend_seconds", f'model="{_label(model)}"')
        lines += ["# HELP router_spend_usd_total Cost of the backend calls by model (USD, from the prices).",
                  "# TYPE router_spend_usd_total counter"]
        lines += [f'router_spend_usd_total{{model="{_label(m)}"}} {v!r}' for m, v in sorted(self.spend.items())]
        lines += ["# HELP router_route_batch_calls_total route_batch calls (one per batch of concurrent requests).",
                  "# TYPE router_route_batch_calls_total counter", f"router_route_batch_calls_total {self.route_calls}",
                  "# HELP router_route_batch_queries_total Queries routed by route_batch calls.",
                  "# TYPE router_route_batch_queries_total counter",
                  f"router_route_batch_queries_total {self.route_queries}",
                  "# HELP router_route_batch_seconds_total Time spent in route_batch calls.",
                  "# TYPE router_route_batch_seconds_total counter",
                  f"router_route_batch_seconds_total {self.route_seconds!r}"]
        return "\n".join(lines) + "\n"


class SharedTelemetry:
    """The telemetry of one worker among several: its snapshot is written to `folder/<pid>.json` (at most
    every `interval` seconds, and whenever /metrics is read), and /metrics renders the sum over every
    worker's file, so a scrape answered by any worker counts the whole server (others' counts up to
    `interval` seconds old). Files of workers that exited stay: counters never go back."""

    def __init__(self, telemetry: Telemetry, folder: str | os.PathLike, interval: float = 1.0) -> None:
        self.telemetry, self.folder, self.interval = telemetry, Path(folder), interval
        self.path = self.folder / f"{os.getpid()}.json"

    def publish(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.telemetry.snapshot()).encode())

    def render(self) -> str:
        self.publish()
        snapshots = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                snapshots.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):  # a worker's file is replaced atomically; a vanished one is skipped
                continue
        return Telemetry.merged(snapshots).render()


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by endpoint and response status, with its latency."""

    def __init__(self, app, telemetry: Telemetry, endpoints: set[str]) -> None:
        self.app, self.telemetry, self.endpoints = app, telemetry, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def observe(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.telemetry.request(endpoint, status, time.perf_counter() - start)
