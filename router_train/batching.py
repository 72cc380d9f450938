"""Batching of concurrent `route_batch` work inside the server's event loop.

Requests (already validated, each on its own) queue their queries; a single task takes everything that
arrives within `max_wait` seconds (up to `max_batch` queries) and routes it with one
`CascadeRouter.route_batch` call per (budget, mode), in a worker thread so the event loop keeps serving.
A request of more than `chunk` queries is routed chunk after chunk, so the small requests that arrive
meanwhile are routed between its chunks instead of waiting for all of it. When a batch raises, it is
split in halves and retried, so the exception reaches only the request that caused it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .router import CascadeRouter, Decision
from .telemetry import Telemetry


@dataclass
class _Job:
    queries: list[str]
    observed: list[list[dict]]
    sources: list[str]
    budget: float
    mode: str
    future: asyncio.Future


class Batcher:
    """Routes the queries of concurrent requests together; `start()` and `close()` inside the event loop."""

    def __init__(self, router: CascadeRouter, telemetry: Telemetry, *, max_wait: float = 0.0,
                 max_batch: int = 2048, chunk: int = 256) -> None:
        if max_wait < 0 or max_batch < 1 or chunk < 1:
            raise ValueError("max_wait must be >= 0 and max_batch, chunk >= 1")
        self.router, self.telemetry = router, telemetry
        self.max_wait, self.max_batch, self.chunk = max_wait, max_batch, chunk
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="route-batch")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def route(self, queries: list[str], observed: list[list[dict]], sources: list[str],
                    budget: float, mode: str) -> list[Decision]:
        """Decisions for one validated request (see `CascadeRouter.check` and `strategy`)."""
        loop = asyncio.get_running_loop()
        decisions: list[Decision] = []
        for start in range(0, len(queries), self.chunk):
            part = slice(start, start + self.chunk)
            job = _Job(queries[part], observed[part], sources[part], budget, mode, loop.create_future())
            self._queue.put_nowait(job)
            decisions += await job.future
        return decisions

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            await asyncio.sleep(0)  # let requests that are ready to queue do so first
            size, deadline = len(jobs[0].queries), loop.time() + self.max_wait
            while size < self.max_batch:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    jobs.append(self._queue.get_nowait())
                size += len(jobs[-1].queries)
            groups: dict[tuple[float, str], list[_Job]] = {}
            for job in jobs:
                if not job.future.done():  # a request whose client went away is not routed
                    groups.setdefault((job.budget, job.mode), []).append(job)
            for group in groups.values():
                await self._route(group)

    async def _route(self, group: list[_Job]) -> None:
        """Route a group with one call; on an exception, each half again, down to the job that raises."""
        queries = [q for job in group for q in job.queries]
        start = time.perf_counter()
        try:
            decisions = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: self.router.route_batch(
                    queries, [o for job in group for o in job.observed], group[0].budget, mode=group[0].mode,
                    sources=[s for job in group for s in job.sources]))
        except Exception as error:  # noqa: BLE001 - isolated below, reported to the request that caused it
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_exception(error)
                return
            half = len(group) // 2
            await self._route(group[:half])
            await self._route(group[half:])
            return
        self.telemetry.routed(len(queries), time.perf_counter() - start)
        offset = 0
        for job in group:
            if not job.future.done():
                job.future.set_result(decisions[offset : offset + len(job.queries)])
            offset += len(job.queries)
