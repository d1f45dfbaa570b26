import asyncio

import pytest

from serve.app.batching import GreedyBatcher, ServeBatcher

BATCHERS = pytest.mark.parametrize("Batcher", [GreedyBatcher, ServeBatcher])


@pytest.fixture(autouse=True)
def _replica_context(monkeypatch):
    """Serve's batch queue reads its replica's max_ongoing_requests (only to log a warning); these
    tests run the real queue outside a replica, so that one lookup answers from here."""
    from types import SimpleNamespace

    import ray.serve.batching

    ctx = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=1000))
    monkeypatch.setattr(ray.serve.batching.serve, "get_replica_context", lambda: ctx)


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


@BATCHERS
def test_max_batch_size_with_a_size_function(Batcher):
    seen = []

    async def fn(items):
        seen.append([len(x) for x in items])
        await asyncio.sleep(0.01)
        return [len(x) for x in items]

    async def main():
        b = Batcher(fn, max_batch_size=5, size_fn=len)
        return await asyncio.gather(*(b("ab") for _ in range(6)))

    assert asyncio.run(main()) == [2] * 6
    assert all(sum(batch) <= 5 for batch in seen) and sum(map(len, seen)) == 6


@BATCHERS
def test_a_poison_item_fails_alone_and_the_batcher_survives(Batcher):
    calls = []

    async def fn(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("boom")
        return [i.upper() for i in items]

    async def main():
        b = Batcher(fn, max_batch_size=8, batch_wait_timeout_s=0.01)
        results = await asyncio.gather(b("x"), b("bad"), b("y"), return_exceptions=True)
        after = await b("ok")
        return results, after

    results, after = asyncio.run(main())
    assert results[0] == "X" and isinstance(results[1], ValueError) and results[2] == "Y" and after == "OK"
    assert calls[0] == ["x", "bad", "y"] and calls[1:4] == [["x"], ["bad"], ["y"]]  # the batch, then one by one


@BATCHERS
def test_wrong_result_count_is_an_error_not_a_hang(Batcher):
    async def fn(items):
        return items[:-1]

    async def main():
        b = Batcher(fn, batch_wait_timeout_s=0.01)
        return await asyncio.wait_for(asyncio.gather(b(1), b(2), return_exceptions=True), 2)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


@BATCHERS
def test_concurrent_slots_pipeline_batches(Batcher):
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
        b = Batcher(fn, max_batch_size=1, max_concurrent_batches=3)
        return await asyncio.gather(*(b(i) for i in range(9)))

    assert asyncio.run(main()) == list(range(9)) and peak == 3


@BATCHERS
def test_invalid_settings(Batcher):
    with pytest.raises(ValueError):
        Batcher(lambda x: x, max_batch_size=0)


def test_newcomers_are_refused_while_the_oldest_waiting_caller_has_waited_too_long():
    """Latency-aware admission: a caller is admitted while the head of the queue is younger than
    max_queue_wait_s, refused (QueueFull) once it is older, and admitted again once the head has
    been taken into a batch."""
    from serve.app.batching import QueueFull

    release = None

    async def fn(items):
        if items == [0]:
            await release.wait()  # the only slot is held: everyone else waits
        return items

    async def main():
        nonlocal release
        release = asyncio.Event()
        b = GreedyBatcher(fn, max_batch_size=32, max_concurrent_batches=1, max_queue_wait_s=0.2)
        held = asyncio.ensure_future(b(0))
        await asyncio.sleep(0.01)
        young = asyncio.ensure_future(b(1))  # waits; nothing had waited before it
        await asyncio.sleep(0.05)
        still_young = asyncio.ensure_future(b(2))  # the head has waited 0.05 s < 0.2 s: admitted
        await asyncio.sleep(0.25)  # the head has now waited 0.3 s
        with pytest.raises(QueueFull, match=r"oldest waiting request has waited 0\.\d+ s .*over 0\.2 s"):
            await b(3)
        release.set()
        done = await asyncio.gather(held, young, still_young)
        return done, await b(4)  # the queue drained: admitted again

    done, after = asyncio.run(main())
    assert done == [0, 1, 2] and after == 4


def test_a_burst_on_an_idle_batcher_is_taken_whole_and_callers_that_gave_up_do_not_count():
    from serve.app.batching import QueueFull

    async def fn(items):
        await asyncio.sleep(0.05)
        return items

    async def main():
        b = GreedyBatcher(fn, max_batch_size=4, max_concurrent_batches=1, max_queue_wait_s=0.01, max_waiting=30)
        burst = await asyncio.gather(*(b(i) for i in range(24)))  # six batches, one after another
        # a caller that gave up at the head of the queue is not "the oldest waiting"
        release = asyncio.Event()

        async def slow(items):
            await release.wait()
            return items

        b2 = GreedyBatcher(slow, max_batch_size=1, max_concurrent_batches=1, max_queue_wait_s=0.05)
        held = asyncio.ensure_future(b2("held"))
        await asyncio.sleep(0.01)
        gave_up = asyncio.ensure_future(b2("gave up"))
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull):
            await b2("refused")
        gave_up.cancel()
        await asyncio.sleep(0)
        late = asyncio.ensure_future(b2("late"))  # the cancelled head is dropped: admitted
        await asyncio.sleep(0.01)
        release.set()
        return burst, await held, await late

    burst, held, late = asyncio.run(main())
    assert burst == list(range(24)) and held == "held" and late == "late"


def test_a_caller_that_gave_up_takes_no_room_in_a_batch():
    seen, release = [], None

    async def fn(items):
        seen.append(list(items))
        if items == ["held"]:
            await release.wait()
        return items

    async def main():
        nonlocal release
        release = asyncio.Event()
        b = GreedyBatcher(fn, max_batch_size=2, max_concurrent_batches=1)
        held = asyncio.ensure_future(b("held"))
        await asyncio.sleep(0.01)
        first = asyncio.ensure_future(b("a"))
        gone = asyncio.ensure_future(b("gone"))
        last = asyncio.ensure_future(b("b"))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        return await asyncio.gather(held, first, last)

    assert asyncio.run(main()) == ["held", "a", "b"]
    assert seen == [["held"], ["a", "b"]]  # the cancelled caller did not take the second seat


def test_serve_batch_forms_batches_early_where_the_greedy_batcher_waits_for_a_slot():
    """The deviation the switch exists to re-measure: with one slot busy, Serve's @serve.batch
    forms the next batch when its wait timeout expires (then waits for the slot), so callers
    arriving later go into a third batch; the greedy batcher takes all of them when the slot frees."""
    def run(Batcher):
        seen: list[list[int]] = []

        async def fn(items):
            seen.append(list(items))
            await asyncio.sleep(0.4)
            return items

        async def main():
            b = Batcher(fn, max_batch_size=32, max_concurrent_batches=1, batch_wait_timeout_s=0.005)
            first = asyncio.ensure_future(b(0))
            await asyncio.sleep(0.05)
            early = asyncio.ensure_future(b(1))
            await asyncio.sleep(0.15)  # past the wait timeout, the slot still busy
            late = [asyncio.ensure_future(b(i)) for i in range(2, 6)]
            return await asyncio.gather(first, early, *late)

        assert asyncio.run(main()) == list(range(6))
        return seen

    assert run(GreedyBatcher) == [[0], [1, 2, 3, 4, 5]]
    assert run(ServeBatcher) == [[0], [1], [2, 3, 4, 5]]


def test_serve_batcher_admission_counts_callers_not_yet_in_a_batch():
    from serve.app.batching import QueueFull

    release = None

    async def fn(items):
        await release.wait()
        return items

    async def main():
        nonlocal release
        release = asyncio.Event()
        b = ServeBatcher(fn, max_batch_size=1, max_waiting=2)
        running = asyncio.ensure_future(b(0))
        await asyncio.sleep(0.05)  # taken into the only batch slot
        queued = [asyncio.ensure_future(b(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        waiting = b.waiting
        with pytest.raises(QueueFull):
            await b(3)
        release.set()
        return waiting, await asyncio.gather(running, *queued), b.waiting

    waiting, results, after = asyncio.run(main())
    assert waiting == 2 and results == [0, 1, 2] and after == 0


@BATCHERS
def test_an_item_larger_than_a_batch_runs_alone(Batcher):
    async def fn(items):
        return [len(x) for x in items]

    async def main():
        b = Batcher(fn, max_batch_size=4, size_fn=len)
        return await asyncio.gather(b("abcdefgh"), b("ab"), b("a"))

    assert asyncio.run(main()) == [8, 2, 1]


def test_after_a_poison_batch_each_caller_is_answered_when_its_own_retry_ends():
    done: list[str] = []  # items whose forward finished
    seen_when_answered: dict[str, list[str]] = {}

    async def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        await asyncio.sleep(0.02)
        done.extend(items)
        return items

    async def main():
        b = GreedyBatcher(fn, max_batch_size=8, batch_wait_timeout_s=0.01)

        async def call(x):
            try:
                await b(x)
            except ValueError:
                pass
            seen_when_answered[x] = list(done)

        await asyncio.gather(*(call(x) for x in ("a", "bad", "c", "d")))

    asyncio.run(main())
    # "a" is answered while "c" and "d" are still being retried, not after all of them
    assert seen_when_answered["a"] == ["a"] and seen_when_answered["d"] == ["a", "c", "d"]
