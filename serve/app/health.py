"""Replica health beyond "the process is alive": a replica whose work has stopped moving.

Serve calls a deployment's ``check_health`` every ``health_check_period_s``; raising (or not
answering within ``health_check_timeout_s``) marks the replica unhealthy and Serve replaces it.
A replica can be alive and still wedged: a torch or FAISS call that never returns holds the only
batch slot, and every later request waits behind it. ``InFlight`` records when each piece of
blocking work started, and ``check`` fails the health check once the oldest has run longer than
``limits.stuck_after_s`` — a busy replica finishes its batches well within that, a wedged one never.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from typing import Iterator


class Wedged(RuntimeError):
    """The replica's oldest in-flight work is older than the stuck threshold."""


class InFlight:
    """Start times of the work a replica is running now (batches, searches, embedding calls)."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._ids = itertools.count()
        self._started: dict[int, float] = {}

    @contextmanager
    def track(self) -> Iterator[None]:
        key = next(self._ids)
        self._started[key] = self._clock()
        try:
            yield
        finally:
            del self._started[key]

    def __len__(self) -> int:
        return len(self._started)

    def oldest_age_s(self) -> float:
        """Seconds the oldest running piece of work has run; 0 when idle."""
        return self._clock() - min(self._started.values()) if self._started else 0.0

    def check(self, what: str, stuck_after_s: float) -> None:
        age = self.oldest_age_s()
        if age > stuck_after_s:
            raise Wedged(f"{what}: the oldest of {len(self)} in-flight calls has run {age:.0f} s "
                         f"(limits.stuck_after_s = {stuck_after_s:g}); the replica is wedged")
