"""Routing overhead of the cascade gateway: what a chat completion through the gateway costs beyond the
backend calls it makes, at 1, 64 and 1,024 concurrent requests, against calling the backend directly.

    python benchmarks/gateway.py --checkpoint checkpoints/default [--levels 1,64,1024] [--budget B]
        [--out runs/gateway.json]

An instant fake OpenAI-compatible backend (tests/http_fakes.py: answers at once, with log-probabilities)
serves every model of the checkpoint on loopback, in its own process; the gateway runs as
`python -m router_train.serve --checkpoint ... --backends ...` in another; this process is the load
generator: `c` clients, each on its own keep-alive connection, send requests one after another, each
with a new query. Per request, overhead = gateway latency − the time of its backend calls (the `router`
object's `latency_ms`, measured by the gateway around each call): HTTP handling, validation, waiting to
be batched, `route_batch` (encoder, estimator, kernel) at every step. The same load naming one model of
the pool instead of the router (routing bypassed: the same HTTP server, validation and backend client,
one call) gives the *bypass* overhead: the floor set by the serving stack itself on this machine.
Printed: p50 / p99 of the direct backend latency, the gateway latency, the overhead and the bypass
overhead, the mean number of calls per request, throughput and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from http_fakes import FakeProcess  # noqa: E402


class Connection:
    """One keep-alive HTTP/1.1 connection: a load generator that costs little CPU per request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = json.dumps(body).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        payload = await self.reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), json.loads(payload)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(port: int, path: str, make_body, clients: int, per_client: int) -> list[tuple[float, dict | None]]:
    """`clients` concurrent clients sending `per_client` requests each; (seconds, body or None on error)."""
    results: list[tuple[float, dict | None]] = []

    async def client(c: int) -> None:
        connection = Connection(port)
        try:
            for r in range(per_client):
                start = time.perf_counter()
                try:
                    status, body = await connection.post(path, make_body(c * per_client + r))
                except (OSError, asyncio.IncompleteReadError, KeyError):
                    status, body = 0, None
                results.append((time.perf_counter() - start, body if status == 200 else None))
        finally:
            connection.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    return results


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return 1000 * cuts[49], 1000 * cuts[98]


def overheads(answered: list[tuple[float, dict]]) -> list[float]:
    """Per request: its latency minus the backend calls the gateway timed (the `router` object's)."""
    return [s - sum(c["latency_ms"] for c in body["router"]["calls"]) / 1000 for s, body in answered]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(checkpoint: str, backends: Path, port: int, workers: int = 1) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "router_train.serve", "--checkpoint", checkpoint,
                                "--backends", str(backends), "--port", str(port), "--threads", "1",
                                "--workers", str(workers)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the gateway exited; run its command by hand to see why")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the gateway did not start within 300 s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/default")
    p.add_argument("--levels", default="1,64,1024", help="concurrent requests")
    p.add_argument("--requests", type=int, default=2000, help="requests per level at least (200 at level 1)")
    p.add_argument("--backend-concurrency", type=int, default=32, help="calls in flight per model")
    p.add_argument("--budget", type=float, help="USD per query (default: the gateway's, mid-range); a higher "
                   "budget makes longer cascades")
    p.add_argument("--workers", type=int, default=1, help="gateway processes (`serve --workers`)")
    p.add_argument("--out", help="write the figures as JSON")
    args = p.parse_args(argv)
    manifest = json.loads((Path(args.checkpoint) / "manifest.json").read_text())
    fake = FakeProcess()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    backends = tmp / "backends.yaml"
    backends.write_text(yaml.safe_dump({
        "extractor": "choice", "defaults": {"concurrency": args.backend_concurrency, "timeout": 60},
        "models": {m: {"base_url": fake.url + "/v1", "model": m, "price_in": 0.2, "price_out": 0.2}
                   for m in manifest["models"]}}))
    port = free_port()
    gateway = start_gateway(args.checkpoint, backends, port, args.workers)
    router_id = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    fake_port = int(fake.url.rsplit(":", 1)[1])
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; checkpoint {args.checkpoint} "
          f"({len(manifest['models'])} models), {args.workers} gateway worker(s); latencies in ms")
    print("| concurrent | direct p50 | direct p99 | gateway p50 | gateway p99 | overhead p50 | overhead p99 "
          "| bypass overhead p50 | bypass overhead p99 | calls/request | requests/s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        for level in [int(x) for x in args.levels.split(",")]:
            per_client = max(1, (200 if level == 1 else args.requests) // level)
            tag = f"L{level}"

            def chat(i: int, tag=tag) -> dict:
                body = {"model": router_id, "messages": [{"role": "user", "content": f"{tag} question {i}: what "
                                                          f"is {i} plus {i % 7}, and why?"}]}
                return body if args.budget is None else {**body, "budget": args.budget}

            def direct(i: int, tag=tag) -> dict:
                return {"model": manifest["models"][0], "messages": chat(i, tag)["messages"], "logprobs": True}

            asyncio.run(load(port, "/v1/chat/completions", lambda i: chat(i, "warm"), min(level, 64), 2))
            baseline = asyncio.run(load(fake_port, "/v1/chat/completions", direct, level, per_client))
            bypassed = [(s, b) for s, b in asyncio.run(load(port, "/v1/chat/completions", direct, level, per_client))
                        if b is not None]
            start = time.perf_counter()
            routed = asyncio.run(load(port, "/v1/chat/completions", chat, level, per_client))
            wall = time.perf_counter() - start
            ok = [(s, body) for s, body in routed if body is not None]
            row = {
                "concurrent": level, "requests": len(routed), "errors": len(routed) - len(ok),
                "direct": percentiles([s for s, b in baseline if b is not None]),
                "gateway": percentiles([s for s, _ in ok]), "overhead": percentiles(overheads(ok)),
                "bypass_overhead": percentiles(overheads(bypassed)),
                "calls_per_request": statistics.mean(len(b["router"]["calls"]) for _, b in ok),
                "requests_per_s": len(routed) / wall,
            }
            rows.append(row)
            print(f"| {level} | {row['direct'][0]:.1f} | {row['direct'][1]:.1f} | {row['gateway'][0]:.1f} | "
                  f"{row['gateway'][1]:.1f} | {row['overhead'][0]:.1f} | {row['overhead'][1]:.1f} | "
                  f"{row['bypass_overhead'][0]:.1f} | {row['bypass_overhead'][1]:.1f} | "
                  f"{row['calls_per_request']:.2f} | {row['requests_per_s']:.0f} | {row['errors']} |", flush=True)
    finally:
        gateway.terminate()
        gateway.wait(30)
        fake.stop()
    result = {"checkpoint": args.checkpoint, "budget": args.budget, "workers": args.workers, "cpus": os.cpu_count(),
              "levels": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
