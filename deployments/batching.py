"""Load-driven batching of concurrent calls, for the ingress.

`@serve.batch` cuts a batch on its timer even when no worker is free to run it
(Ray 2.60: the loop forms the next batch while the previous one waits on the
`max_concurrent_batches` semaphore). Measured here with 30 /predict requests
inside the replica, it formed batches of 1.3 on average, and each paid the
three handle hops. `LoadBatcher` forms a batch only when a worker is free: an
idle service adds no delay, and under load every call that arrived while the
workers were busy goes into the next batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class LoadBatcher(Generic[T, R]):
    """``await batcher.submit(item)`` -> the handler's result for that item.

    ``handler(items)`` gets at most ``max_batch_size`` items and must return one
    result per item, in order; at most ``max_concurrent_batches`` run at once. An
    exception of the handler is raised in every caller of that batch.
    """

    def __init__(self, handler: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int = 64,
                 max_concurrent_batches: int = 2) -> None:
        self._handler = handler
        self.configure(max_batch_size, max_concurrent_batches)
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running: set[asyncio.Task[None]] = set()

    def configure(self, max_batch_size: int, max_concurrent_batches: int) -> None:
        if max_batch_size < 1 or max_concurrent_batches < 1:
            raise ValueError("max_batch_size and max_concurrent_batches must be at least 1")
        self.max_batch_size, self.max_concurrent_batches = max_batch_size, max_concurrent_batches

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._waiting and len(self._running) < self.max_concurrent_batches:
            n = min(len(self._waiting), self.max_batch_size)
            batch = [self._waiting.popleft() for _ in range(n)]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_batches()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._handler([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # every caller of the batch gets it
            for _, future in batch:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # a caller that went away has a cancelled future
                future.set_result(result)
