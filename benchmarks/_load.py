"""A small closed-loop HTTP load generator shared by the benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int  # answers other than 200, and requests that got no answer
    seconds: float
    latencies_ms: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else float("nan")

    def row(self, name: str) -> str:
        return (f"{name:<28} c={self.concurrency:<3} {self.rps:8.1f} req/s   p50 {self.pct(50):7.2f} ms"
                f"   p99 {self.pct(99):7.2f} ms   errors {self.errors}")

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                "seconds": self.seconds, "rps": self.rps, "p50_ms": self.pct(50), "p99_ms": self.pct(99)}


async def _run(url: str, body_for: Callable[[int], dict], concurrency: int, total: int,
               headers: dict | None) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as client:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                start = time.perf_counter()
                try:
                    response = await client.post(url, json=body_for(i))
                    failed = response.status_code != 200
                except httpx.HTTPError:  # no answer (timeout, reset): an error, timed as the others
                    failed = True
                latencies.append((time.perf_counter() - start) * 1e3)
                errors += failed
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LoadResult(concurrency, len(latencies), errors, seconds, np.array(latencies))


def run_load(url: str, body_for: Callable[[int], dict], concurrency: int, total: int,
             headers: dict | None = None, warmup: int = 20) -> LoadResult:
    asyncio.run(_run(url, body_for, min(concurrency, warmup), warmup, headers))
    return asyncio.run(_run(url, body_for, concurrency, total, headers))
