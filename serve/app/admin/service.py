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

from pathlib import Path

from actors.beir import DatasetError, dataset_dir

from serve.artifacts.experts import adapter_under_root, check_adapter_folder, remove_from_service
from serve.artifacts.generations import GenerationError, GenerationStore, check_expert_name

from ..errors import RequestError
from .jobs import AdminJobs
from .protocol import ActivateResponse, GenerationsResponse, GenerationSummary, JobResponse, JobsResponse

SAMPLES = 8  # encoder info calls per look at the replicas (Serve spreads them over the replicas)
INFO_TIMEOUT_S = 2.0  # per info call: a wedged replica does not hold an admin answer


class AdminService:
    def __init__(self, store: GenerationStore, pin: str, encoder_info: Callable[[], Awaitable[dict]],
                 jobs: AdminJobs | None = None):
        self.store, self.pin, self.encoder_info, self.jobs = store, pin, encoder_info, jobs
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

    # -- jobs: register an adapter folder, train a domain ------------------------------------------

    def _jobs(self) -> AdminJobs:
        self._check_not_pinned()
        if self.jobs is None:
            raise RequestError("this service runs no admin jobs (no expert store)", None, 409)
        return self.jobs

    def _check_domain(self, domain: str, field: str) -> None:
        try:
            dataset_dir(self._jobs().settings.data_dir, domain)
        except DatasetError as exc:
            raise RequestError(str(exc), field, 422) from None

    def _adapter_under_root(self, adapter: str) -> Path:
        try:
            return adapter_under_root(self._jobs().settings.register_root, adapter)
        except ValueError as exc:
            raise RequestError(str(exc), "adapter", 422) from None

    async def register(self, name: str, adapter: str, domain: str | None, replace: bool) -> JobResponse:
        """Checks what it can at once (name, path under the root, files, shapes against the base
        model, domain, an existing expert), then starts `experts add` as a job (202)."""
        jobs = self._jobs()
        try:
            check_expert_name(name)
        except ValueError as exc:
            raise RequestError(str(exc), "name", 422) from None
        path = self._adapter_under_root(adapter)
        problems = await asyncio.to_thread(check_adapter_folder, path, jobs.settings.model_path)
        if problems:
            raise RequestError("; ".join(problems), "adapter", 422)
        self._check_domain(domain or name, "domain" if domain else "name")
        current = self.store.current()
        if not replace and current is not None and name in current.experts:
            raise RequestError(f"expert {name!r} is in the current generation {current.id}: pass \"replace\": true "
                               "to replace it", "name", 409)
        params = {"name": name, "adapter": str(path), "domain": domain or name, "replace": replace}
        args = ["experts", "add", name, "--adapter", str(path), "--domain", domain or name, *(["--replace"] if replace else [])]
        return JobResponse(job=await jobs.start("register", params, args))

    async def train(self, domain: str, steps: int | None) -> JobResponse:
        jobs = self._jobs()
        try:
            check_expert_name(domain)
        except ValueError as exc:
            raise RequestError(str(exc), "domain", 422) from None
        self._check_domain(domain, "domain")
        args = ["experts", "train", "--domain", domain, *(["--steps", str(steps)] if steps else [])]
        return JobResponse(job=await jobs.start("train", {"domain": domain, "steps": steps}, args))

    async def job(self, job_id: str) -> JobResponse:
        if self.jobs is None:
            raise RequestError(f"no job {job_id}", "job_id", 404)
        rec, tail = await asyncio.to_thread(self.jobs.get, job_id)
        return JobResponse(job=rec, log_tail=tail)

    async def list_jobs(self, limit: int) -> JobsResponse:
        return JobsResponse(jobs=await asyncio.to_thread(self.jobs.list, limit) if self.jobs is not None else [])

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
