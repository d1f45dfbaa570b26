"""AdminService: list, activate and roll back expert generations of a running service.

Activation writes CURRENT.json (serve.artifacts.generations); every encoder replica follows it
(serve.app.live_experts), so the answer can wait until the replicas it samples serve the new
generation. A service whose config pins a generation (experts.generation) refuses: the pin is
changed in the config (an in-place Serve update), not here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from serve.artifacts.experts import remove_from_service
from serve.artifacts.generations import GenerationError, GenerationStore, check_expert_name

from ..errors import RequestError
from .protocol import ActivateResponse, GenerationsResponse, GenerationSummary

SAMPLES = 8  # encoder info calls per look at the replicas (Serve spreads them over the replicas)
INFO_TIMEOUT_S = 2.0  # per info call: a wedged replica does not hold an admin answer


class AdminService:
    def __init__(self, store: GenerationStore, pin: str, encoder_info: Callable[[], Awaitable[dict]]):
        self.store, self.pin, self.encoder_info = store, pin, encoder_info
        self._changing = asyncio.Lock()  # one change at a time (read current → publish → activate)

    async def replicas(self) -> dict[str, str | None]:
        """The encoder replicas that answered ``SAMPLES`` info calls, and the generation each serves."""
        seen: dict[str, str | None] = {}
        for _ in range(SAMPLES):
            try:
                async with asyncio.timeout(INFO_TIMEOUT_S):
                    info = await self.encoder_info()
            except (TimeoutError, RequestError):  # a replica stuck or being replaced: the next sample
                continue
            seen[info.get("replica", "?")] = info.get("generation")
        return seen

    async def generations(self) -> GenerationsResponse:
        gens = await asyncio.to_thread(self.store.list)
        return GenerationsResponse(current=self.store.current_id(), pin=self.pin,
                                   generations=[GenerationSummary(**g.summary()) for g in gens],
                                   replicas=await self.replicas())

    def _check_not_pinned(self) -> None:
        if self.pin != "current":
            raise RequestError(f"this service pins generation {self.pin} (experts.generation): change the pin in the "
                               "config and update the deployment instead", None, 409)

    async def activate(self, generation: str, wait_s: float) -> ActivateResponse:
        self._check_not_pinned()
        previous = self.store.current_id()
        try:
            async with self._changing:
                gen = await asyncio.to_thread(self.store.activate, generation, reason="activated through the admin API")
        except GenerationError as exc:
            raise RequestError(str(exc), "generation", 404 if "no generation" in str(exc) else 409) from None
        except OSError as exc:
            raise self._read_only(exc) from None
        return await self._settle(gen.id, gen.experts, previous, wait_s)

    async def remove(self, name: str, wait_s: float) -> ActivateResponse:
        """A new current generation without expert ``name`` (and the draft without it); the old
        generation keeps its files, so replicas still serving it are unaffected until they switch."""
        self._check_not_pinned()
        try:
            check_expert_name(name)
        except ValueError as exc:
            raise RequestError(str(exc), "name", 422) from None
        previous = self.store.current_id()
        try:
            async with self._changing:
                gen = await asyncio.to_thread(remove_from_service, self.store, name, f"removed expert {name} through the admin API")
        except GenerationError as exc:
            raise RequestError(str(exc), "name", 404 if "no expert" in str(exc) else 409) from None
        except OSError as exc:
            raise self._read_only(exc) from None
        return await self._settle(gen.id, gen.experts, previous, wait_s)

    async def rollback(self, wait_s: float) -> ActivateResponse:
        self._check_not_pinned()
        previous = self.store.current_id()
        try:
            async with self._changing:
                gen = await asyncio.to_thread(self.store.rollback)
        except GenerationError as exc:
            raise RequestError(str(exc), None, 409) from None
        except OSError as exc:
            raise self._read_only(exc) from None
        return await self._settle(gen.id, gen.experts, previous, wait_s)

    def _read_only(self, exc: OSError) -> RequestError:
        return RequestError(f"cannot write {self.store.pointer_path} ({exc.strerror or type(exc).__name__}): on a "
                            "read-only artifacts volume pin experts.generation in the config instead", None, 409)

    async def _settle(self, generation: str, experts: list[str], previous: str | None, wait_s: float) -> ActivateResponse:
        t0 = time.monotonic()
        replicas = await self.replicas()
        while set(replicas.values()) != {generation} and time.monotonic() - t0 < wait_s:
            await asyncio.sleep(0.25)
            replicas = await self.replicas()
        return ActivateResponse(generation=generation, previous=previous, experts=experts,
                                switched=set(replicas.values()) == {generation}, replicas=replicas,
                                waited_s=round(time.monotonic() - t0, 3))
