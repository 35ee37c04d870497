"""LoadBatcher: batches grow with the load, an idle caller never waits, errors reach every caller."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batching import LoadBatcher


class Recorder:
    """A handler that records its batches and blocks until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        return [i * 10 for i in items]


def test_an_idle_batcher_runs_a_single_call_at_once():
    async def main():
        handler = Recorder()
        handler.release.set()
        batcher = LoadBatcher(handler, max_batch_size=8, max_concurrent_batches=1)
        assert await asyncio.wait_for(batcher.submit(3), 1.0) == 30
        return handler.batches

    assert asyncio.run(main()) == [[3]]


def test_calls_arriving_while_workers_are_busy_form_the_next_batch_in_order():
    async def main():
        handler = Recorder()
        batcher = LoadBatcher(handler, max_batch_size=4, max_concurrent_batches=1)
        calls = [asyncio.create_task(batcher.submit(i)) for i in range(10)]
        await asyncio.sleep(0.01)
        assert handler.batches == [[0]]  # the first call started at once, alone
        handler.release.set()
        results = await asyncio.gather(*calls)
        return handler.batches, results

    batches, results = asyncio.run(main())
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert results == [i * 10 for i in range(10)]


def test_no_more_batches_run_at_once_than_allowed():
    async def main():
        running = peak = 0
        sizes = []

        async def handler(items):
            nonlocal running, peak
            sizes.append(len(items))
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.005)
            running -= 1
            return items

        batcher = LoadBatcher(handler, max_batch_size=3, max_concurrent_batches=2)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(40)))
        return peak, results, sizes

    peak, results, sizes = asyncio.run(main())
    assert peak == 2
    assert results == list(range(40))
    assert sum(sizes) == 40 and max(sizes) == 3


def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_still_runs():
    async def main():
        calls = 0

        async def handler(items):
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)
            if calls == 1:
                raise ValueError("scoring failed")
            return items

        batcher = LoadBatcher(handler, max_batch_size=2, max_concurrent_batches=1)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        second = await batcher.submit(7)
        return first, second

    first, second = asyncio.run(main())
    assert isinstance(first[0], ValueError) and str(first[0]) == "scoring failed"
    assert first[1:] == [1, 2]  # the calls of the next batch were not affected
    assert second == 7


def test_a_handler_returning_the_wrong_number_of_results_is_an_error():
    async def main():
        async def handler(items):
            return items[:-1]

        batcher = LoadBatcher(handler, max_batch_size=4, max_concurrent_batches=1)
        return await asyncio.gather(batcher.submit(1), return_exceptions=True)

    (error,) = asyncio.run(main())
    assert isinstance(error, RuntimeError) and "0 results for 1 items" in str(error)


def test_a_caller_that_goes_away_does_not_break_the_batch():
    async def main():
        handler = Recorder()
        batcher = LoadBatcher(handler, max_batch_size=4, max_concurrent_batches=1)
        first = asyncio.create_task(batcher.submit(1))
        gone = asyncio.create_task(batcher.submit(2))
        stays = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        handler.release.set()
        return await first, await stays, handler.batches

    assert asyncio.run(main()) == (10, 30, [[1], [2, 3]])


@pytest.mark.parametrize("size, concurrent", [(0, 1), (1, 0)])
def test_limits_below_one_are_refused(size, concurrent):
    with pytest.raises(ValueError, match="at least 1"):
        LoadBatcher(lambda items: items, max_batch_size=size, max_concurrent_batches=concurrent)
