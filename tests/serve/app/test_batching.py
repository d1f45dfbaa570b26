import asyncio

import pytest

from serve.app.batching import GreedyBatcher


def test_batches_form_when_a_slot_frees_and_take_everything_queued():
    seen: list[list[int]] = []
    release = None

    async def fn(items):
        seen.append(list(items))
        if len(seen) == 1:
            await release.wait()  # hold the only slot while the others queue
        return [i * 10 for i in items]

    async def main():
        nonlocal release
        release = asyncio.Event()
        b = GreedyBatcher(fn, max_batch_size=32, max_concurrent_batches=1)
        first = asyncio.ensure_future(b(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b(i)) for i in range(1, 10)]
        await asyncio.sleep(0.01)
        release.set()
        return await first, await asyncio.gather(*rest)

    a, rest = asyncio.run(main())
    assert a == 0 and rest == [i * 10 for i in range(1, 10)]
    assert seen == [[0], list(range(1, 10))]


def test_max_batch_size_with_a_size_function():
    seen = []

    async def fn(items):
        seen.append([len(x) for x in items])
        await asyncio.sleep(0.01)
        return [len(x) for x in items]

    async def main():
        b = GreedyBatcher(fn, max_batch_size=5, size_fn=len)
        return await asyncio.gather(*(b("ab") for _ in range(6)))

    assert asyncio.run(main()) == [2] * 6
    assert all(sum(batch) <= 5 for batch in seen) and sum(map(len, seen)) == 6


def test_a_poison_item_fails_alone_and_the_batcher_survives():
    calls = []

    async def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("boom")
        return [i.upper() for i in items]

    async def main():
        b = GreedyBatcher(fn, max_batch_size=8, batch_wait_timeout_s=0.01)
        results = await asyncio.gather(b("x"), b("bad"), b("y"), return_exceptions=True)
        after = await b("ok")
        return results, after

    results, after = asyncio.run(main())
    assert results[0] == "X" and isinstance(results[1], ValueError) and results[2] == "Y" and after == "OK"
    assert calls[0] == ["x", "bad", "y"] and calls[1:4] == [["x"], ["bad"], ["y"]]  # the batch, then one by one


def test_wrong_result_count_is_an_error_not_a_hang():
    async def fn(items):
        return items[:-1]

    async def main():
        b = GreedyBatcher(fn, batch_wait_timeout_s=0.01)
        return await asyncio.wait_for(asyncio.gather(b(1), b(2), return_exceptions=True), 2)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_concurrent_slots_pipeline_batches():
    active = 0
    peak = 0

    async def fn(items):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return items

    async def main():
        b = GreedyBatcher(fn, max_batch_size=1, max_concurrent_batches=3)
        return await asyncio.gather(*(b(i) for i in range(9)))

    assert asyncio.run(main()) == list(range(9)) and peak == 3


def test_invalid_settings():
    with pytest.raises(ValueError):
        GreedyBatcher(lambda x: x, max_batch_size=0)
