"""LiveExperts: the expert generation one encoder replica serves, switched live.

Which generation a replica serves: the one pinned by its Serve ``user_config``
(``{"generation": "g000007"}``, set from experts.generation; Serve calls ``reconfigure`` on every
replica when it changes and gives it to every replica that starts later), or with
``"current"`` the one CURRENT.json names, checked every experts.watch_interval_s.

A switch loads the new generation's adapters and pilots into a new RoutedEncoder in a worker
thread, off the request path, while the old one keeps serving; then one assignment swaps them.
A batch takes ``(generation, encoder)`` once at its start, so it finishes on the generation it
started with. A generation that fails to load leaves the old one serving (counted, logged, and
named in the replica's info). At the replica's start (``start``) the pinned generation is loaded
directly (it failing fails the start); following CURRENT.json, an unloadable current generation
falls back to the ones activated before it.

A plain class (no Serve): the encoder deployment wraps it, the tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from actors.encoder import EncoderEngine, EncoderSettings
from actors.routed_encoder import RoutedEncoder
from actors.routing import DEFAULT_POLICY

from serve.artifacts.generations import Generation, GenerationError, GenerationStore, check_generation_id

logger = logging.getLogger(__name__)

CURRENT = "current"


def encoder_builder(model_path: str, settings: EncoderSettings, policy: str = DEFAULT_POLICY,
                    enabled: list[str] | None = None) -> Callable[[Generation | None], RoutedEncoder]:
    """``build(generation)`` for LiveExperts: the base model with the generation's (enabled)
    adapters and its pilots; None: the base model alone."""

    def build(gen: Generation | None) -> RoutedEncoder:
        adapters = gen.adapters(enabled) if gen is not None else {}
        return RoutedEncoder(EncoderEngine(model_path, adapters, settings), gen.load_pilots() if adapters else None, policy)

    return build


class LiveExperts:
    def __init__(self, store: GenerationStore | None, build: Callable[[Generation | None], RoutedEncoder],
                 pin: str = CURRENT, on_reload: Callable[[str, float, bool], None] | None = None):
        """``build(generation)`` makes the RoutedEncoder of a generation (None: no experts, the
        base model only); ``on_reload(generation, seconds, ok)`` records each switch attempt."""
        self.store, self.build, self.on_reload = store, build, on_reload or (lambda *a: None)
        self.pin = self._check_pin(pin)
        self._lock = asyncio.Lock()  # one load at a time
        self.failed: dict[str, str] = {}  # generation -> why it last did not load
        self._skip: str | None = None  # the target that just failed to load
        self._active: tuple[str | None, RoutedEncoder] | None = None  # loaded by start()

    @staticmethod
    def _check_pin(pin: str) -> str:
        return pin if pin == CURRENT else check_generation_id(pin)

    @property
    def active(self) -> tuple[str | None, RoutedEncoder]:
        if self._active is None:
            self.start()
        return self._active

    @property
    def generation(self) -> str | None:
        return self.active[0]

    @property
    def encoder(self) -> RoutedEncoder:
        return self.active[1]

    def start(self) -> None:
        """Load the target generation (the replica's start). Following CURRENT.json, when the
        current generation does not load the ones activated before it are tried, newest first:
        the replica serves one and reports the failure (``failed``, the reload metric) instead of
        failing its start again and again. A pinned generation that does not load fails the start."""
        target = self._target_id()
        candidates = [target]
        if self.pin == CURRENT and self.store is not None:
            history = (self.store.pointer() or {}).get("history", [])
            candidates += [g for g in reversed(history) if g not in candidates]
        for gen_id in candidates:
            try:
                encoder, seconds = self._load(gen_id)
            except Exception:  # noqa: BLE001 - recorded by _load; try the one before
                continue
            self._active = (gen_id, encoder)
            self.on_reload(str(gen_id), seconds, True)
            if gen_id != target:
                self._skip = target
            return
        raise GenerationError(f"no expert generation loads (tried {candidates}): {self.failed}")

    def _load(self, gen_id: str | None) -> tuple[RoutedEncoder, float]:
        """The RoutedEncoder of ``gen_id`` (checksums verified first) and the seconds it took; a
        failure is recorded (``failed``, ``on_reload``) and raised."""
        t0 = time.perf_counter()
        try:
            gen = self.store.get(gen_id) if gen_id is not None else None
            if gen is not None:
                gen.verify()
            return self.build(gen), time.perf_counter() - t0
        except Exception as exc:
            self.failed[str(gen_id)] = f"{type(exc).__name__}: {exc}"[:300]
            self.on_reload(str(gen_id), time.perf_counter() - t0, False)
            logger.error("expert generation %s did not load; serving %s: %s", gen_id,
                         self._active[0] if self._active else "nothing yet", exc)
            raise

    def _target_id(self) -> str | None:
        if self.store is None:
            return None
        return self.store.current_id() if self.pin == CURRENT else self.pin

    async def sync(self) -> bool:
        """Serve the target generation if it is not served yet. True when a switch happened."""
        if self._active is None:
            await asyncio.to_thread(self.start)
            return True
        async with self._lock:
            target = self._target_id()
            if target != self._skip:
                self._skip = None
            if target == self.generation or target == self._skip:
                return False
            if target is None:  # the pointer vanished: keep the experts served, never drop to base silently
                return False
            try:
                encoder, seconds = await asyncio.to_thread(self._load, target)
            except Exception:  # noqa: BLE001 - recorded by _load; the old generation keeps serving
                self._skip = target  # not retried every interval; again once the target moved away and back
                return False
            old = self.generation
            self._skip = None
            self._active = (target, encoder)  # one assignment: a batch sees the old pair or the new one
            self.failed.pop(target, None)
            self.on_reload(str(target), seconds, True)
            logger.info("expert generation %s -> %s in %.1f s", old, target, seconds)
            return True

    async def reconfigure(self, user_config: dict | None) -> None:
        """Serve's user_config: ``{"generation": "current" | "gNNNNNN"}``, given right after the
        constructor (the replica's first load: ``start``) and on every in-place update. On an
        update a generation that does not load is recorded and the old one keeps serving (raising
        here would make Serve stop the replica)."""
        self.pin = self._check_pin(str((user_config or {}).get("generation", CURRENT)))
        if self._active is None:
            await asyncio.to_thread(self.start)
        else:
            await self.sync()

    async def watch(self, interval_s: float) -> None:
        """Follow CURRENT.json (while not pinned) until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if self.pin == CURRENT and self._active is not None:
                try:
                    await self.sync()
                except Exception:  # noqa: BLE001 - an unreadable pointer: keep serving, look again
                    logger.exception("checking the expert generation failed")
