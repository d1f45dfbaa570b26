"""GreedyBatcher: batch concurrent calls, forming each batch only when a processing slot is free.

Why not ``@serve.batch``: Ray Serve 2.60 forms a batch as soon as its wait timeout expires and
only then waits for a free slot (``max_concurrent_batches``). Under a closed-loop load the
batches are therefore formed early and stay tiny: measured here with 16 clients, median batch
size 1, 750 ms median queueing, 21.7 q/s. Forming the batch when a slot frees up takes everything
that queued meanwhile, so batches grow to match the downstream speed, and an idle service still
sends a lone request at once (no fixed wait). Works in any asyncio loop (Serve replica or not).

A batch whose function raises is retried item by item, so one poison item (say, a text the
tokenizer rejects) fails only its own caller, not everyone batched with it.

Admission: a caller is refused at once (QueueFull, a 503 + Retry-After upstream) when
``max_waiting`` callers wait already, or when the oldest waiting caller has waited longer than
``max_queue_wait_s`` (its sojourn time, as CoDel measures a queue): past that, a newcomer would
wait at least as long, so under overload the queue stays short and the admitted stay fast,
while a burst on an idle service is taken whole (nothing has waited yet).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The waiting room is full or too slow (max_waiting, max_queue_wait_s): refuse now instead of
    queueing without bound."""


def _admit(waiting: int, oldest_arrival: float | None, max_waiting: int | None, max_queue_wait_s: float | None) -> None:
    """The admission rule both batchers share: raise QueueFull when a newcomer should be refused."""
    if max_waiting is not None and waiting >= max_waiting:
        raise QueueFull(f"{waiting} requests are already waiting for a batch")
    if max_queue_wait_s is not None and oldest_arrival is not None:
        waited = time.monotonic() - oldest_arrival
        if waited > max_queue_wait_s:
            raise QueueFull(f"the oldest waiting request has waited {waited:.2f} s for a batch (over {max_queue_wait_s:g} s)")


class _Failed:
    """One item's exception, carried as its result (a batch answers item by item)."""

    def __init__(self, exc: Exception):
        self.exc = exc


async def _isolated(fn: Callable[[list], Awaitable[Sequence]], items: list,
                    answered: Callable[[int, object], None] = lambda i, res: None,
                    gone: Callable[[int], bool] = lambda i: False) -> list:
    """``fn(items)``, or, when that raises, each item alone: one result or _Failed per item, each
    also given to ``answered(i, result)`` as soon as it is known (retried one by one: each as its
    own retry ends). Items whose caller is ``gone(i)`` are not retried."""
    try:
        out = list(await _call(fn, items))
    except Exception as exc:  # noqa: BLE001 - the batcher lives on
        if len(items) > 1:
            return [await _alone(fn, item, i, answered, gone) for i, item in enumerate(items)]
        out = [_Failed(exc)]
    for i, res in enumerate(out):
        answered(i, res)
    return out


async def _alone(fn, item, i: int, answered: Callable[[int, object], None], gone: Callable[[int], bool]):
    if gone(i):
        return _Failed(asyncio.CancelledError())
    try:
        res = (await _call(fn, [item]))[0]
    except Exception as one:  # noqa: BLE001
        res = _Failed(one)
    answered(i, res)
    return res


async def _call(fn: Callable[[list], Awaitable[Sequence]], items: list) -> Sequence:
    results = await fn(items)
    if len(results) != len(items):
        raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
    return results


class _Batcher(Generic[T, R]):
    """What both batchers share: the batch function, size function, admission limits, the bounded
    record of batch sizes."""

    def __init__(
        self,
        fn: Callable[[list[T]], Awaitable[Sequence[R]]],
        max_batch_size: int = 32,
        max_concurrent_batches: int = 1,
        batch_wait_timeout_s: float = 0.0,
        size_fn: Callable[[T], int] | None = None,
        max_waiting: int | None = None,
        max_queue_wait_s: float | None = None,
    ):
        if max_batch_size < 1 or max_concurrent_batches < 1:
            raise ValueError("max_batch_size and max_concurrent_batches must be >= 1")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.size_fn = size_fn or (lambda _: 1)
        self.max_waiting = max_waiting  # callers queued for a batch slot; None: unbounded
        self.max_queue_wait_s = max_queue_wait_s  # the oldest caller's wait past which newcomers are refused
        self.batch_sizes: list[int] = []  # recent batch sizes (bounded), for metrics and tests

    def _record(self, size: int) -> None:
        self.batch_sizes.append(size)
        del self.batch_sizes[:-1000]


class GreedyBatcher(_Batcher[T, R]):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting: deque[tuple[float, T, asyncio.Future]] = deque()  # (arrival, item, caller's future)
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Callers waiting for a batch slot (those that gave up are dropped as they reach the head)."""
        return len(self._waiting)

    async def __call__(self, item: T) -> R:
        self._ensure_started()
        self.admit()
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((time.monotonic(), item, fut))
        self._arrived.set()
        return await fut

    def admit(self) -> None:
        """Raise QueueFull when a newcomer should be refused now."""
        while self._waiting and self._waiting[0][2].done():  # callers that gave up wait for nothing
            self._waiting.popleft()
        _admit(len(self._waiting), self._waiting[0][0] if self._waiting else None, self.max_waiting, self.max_queue_wait_s)

    def _ensure_started(self) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._slots = asyncio.Semaphore(self.max_concurrent_batches)
            self._worker = asyncio.get_running_loop().create_task(self._form_batches())

    async def _next(self) -> tuple[T, asyncio.Future]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        _, item, fut = self._waiting.popleft()
        return item, fut

    async def _form_batches(self) -> None:
        assert self._arrived is not None and self._slots is not None
        while True:
            await self._slots.acquire()
            first = await self._next()
            batch, size = [first], self.size_fn(first[0])
            if self.batch_wait_timeout_s > 0 and not self._waiting:
                await asyncio.sleep(self.batch_wait_timeout_s)
            while self._waiting:  # the head that does not fit waits for the next batch, still first
                if self._waiting[0][2].done():  # a caller that gave up takes no room
                    self._waiting.popleft()
                    continue
                n = self.size_fn(self._waiting[0][1])
                if size + n > self.max_batch_size:
                    break
                _, item, fut = self._waiting.popleft()
                batch.append((item, fut))
                size += n
            asyncio.get_running_loop().create_task(self._run(batch, size))
    async def _run(self, batch: list, size: int) -> None:
        try:
            self._record(size)
            live = [(item, fut) for item, fut in batch if not fut.done()]  # skip cancelled callers
            if not live:
                return

            def answer(i: int, res) -> None:
                self._settle(live[i][1], exc=res.exc) if isinstance(res, _Failed) else self._settle(live[i][1], res)

            await _isolated(self.fn, [item for item, _ in live], answer, lambda i: live[i][1].done())
        finally:
            self._slots.release()

    @staticmethod
    def _settle(fut: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
        if not fut.done():  # a caller that gave up (cancelled) is skipped
            fut.set_exception(exc) if exc is not None else fut.set_result(result)


class ServeBatcher(_Batcher[T, R]):
    """Ray Serve's own ``@serve.batch`` behind GreedyBatcher's interface
    (``deployments.*_batching.batcher: serve_batch``): the same batch function, size function,
    poison isolation and admission; only the batch formation is Serve's. Kept so the deviation
    above is re-measured on every Ray upgrade (benchmarks/compare.py, system serve-batch).

    Admission counts callers whose batch has not started (queued, or in a batch Serve formed that
    waits for a slot; Serve's queue is not inspectable). Serve also counts callers that gave up
    while it forms a batch (GreedyBatcher skips them)."""

    def __init__(self, *args, **kwargs):
        from ray import serve

        super().__init__(*args, **kwargs)
        self._pending: dict[int, float] = {}  # ticket -> arrival of callers whose batch has not started, oldest first
        self._tickets = itertools.count()
        # an item larger than a whole batch: Serve fails it; here it runs as a batch of its own
        # (as in GreedyBatcher), so its size counts as at most max_batch_size
        self._batched = serve.batch(max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s,
                                    max_concurrent_batches=self.max_concurrent_batches,
                                    batch_size_fn=lambda batch: sum(min(self.size_fn(item), self.max_batch_size)
                                                                    for _, item in batch))(self._run)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def admit(self) -> None:
        _admit(len(self._pending), next(iter(self._pending.values()), None), self.max_waiting, self.max_queue_wait_s)

    async def __call__(self, item: T) -> R:
        self.admit()
        ticket = next(self._tickets)
        self._pending[ticket] = time.monotonic()
        try:
            result = await self._batched((ticket, item))
        finally:
            self._pending.pop(ticket, None)
        if isinstance(result, _Failed):
            raise result.exc
        return result

    async def _run(self, batch: list[tuple[int, T]]) -> list:
        for ticket, _ in batch:
            self._pending.pop(ticket, None)
        items = [item for _, item in batch]
        self._record(sum(map(self.size_fn, items)))
        return await _isolated(self.fn, items)
