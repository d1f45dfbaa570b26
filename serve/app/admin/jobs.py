"""AdminJobs: the admin API's long expert changes, run as `routerserve experts add|train … --job <id>`
in a child process of the ingress replica that took the request.

The online app never imports the offline pipelines (pilot building, training): it starts the same
command a user would run, with the service's own config (written into the job's folder) and data
dir, and Ray's address when it runs in a Ray cluster (a missing base index is then a Ray Data job
on that cluster, not a second local one). The command records its progress and outcome
(serve.artifacts.jobs); this side only watches the process: a job past ``experts.job_timeout_s``
is killed, and one that ends without an outcome (killed, crashed) is marked failed with the end of
its log. Any ingress replica reads the records, so `GET /admin/v1/jobs/{id}` works wherever it lands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from serve.artifacts.jobs import JobError, JobRecord, JobStore

from ..errors import RequestError
from ..settings import AdminJobSettings

logger = logging.getLogger(__name__)


def _ray_address() -> str | None:
    """The GCS address of the Ray cluster this process runs in (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - no Ray here: the job's command runs without a cluster
        return None


class AdminJobs:
    def __init__(self, store: JobStore, settings: AdminJobSettings):
        self.store, self.settings = store, settings
        self._watchers: set[asyncio.Task] = set()

    def command(self, job_id: str, args: list[str]) -> list[str]:
        """The job's command line: `routerserve <args> --config <job>/config.json --data-dir … --job <id>`."""
        cmd = [sys.executable, "-m", "serve.cli", *args, "--config", str(self.store.config_path(job_id)),
               "--data-dir", self.settings.data_dir, "--job", job_id]
        address = self.settings.ray_address or _ray_address()
        if address:
            cmd += ["--set", f"ray.address={address}"]
        return cmd

    async def start(self, kind: str, params: dict[str, Any], args: list[str]) -> JobRecord:
        """Claim the store's one job slot (409 when a job is queued or running; the claim's file
        lock is taken off the event loop), write the config, start the command; the record as it
        is now (``queued``). A command that cannot be started marks its job failed."""
        try:
            rec = await asyncio.to_thread(self.store.claim, kind, params)
        except JobError as exc:
            raise RequestError(str(exc), None, 409) from None
        except OSError as exc:
            raise self._cannot_write(exc) from None
        try:
            config = {**self.settings.config, "ray": {**self.settings.config.get("ray", {}), "address": "local"}}
            self.store.config_path(rec.id).write_text(json.dumps(config, indent=2))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb",
                   **{v: str(self.settings.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
            with open(self.store.log_path(rec.id), "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    *self.command(rec.id, args), stdin=asyncio.subprocess.DEVNULL, stdout=log,
                    stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as exc:
            await asyncio.to_thread(self.store.finish_abnormally, rec.id, None, f"the job's command did not start ({exc})")
            raise self._cannot_write(exc) from None
        task = asyncio.create_task(self._watch(rec.id, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        logger.info("admin job %s started: pid %s, %s %s", rec.id, proc.pid, kind, params)
        return rec

    def _cannot_write(self, exc: OSError) -> RequestError:
        return RequestError(f"cannot start a job under {self.store.root} ({exc.strerror or type(exc).__name__}): on a "
                            "read-only artifacts volume change experts offline and pin experts.generation", None, 409)

    async def _watch(self, job_id: str, proc: asyncio.subprocess.Process) -> None:
        why = None
        try:
            code = await asyncio.wait_for(proc.wait(), self.settings.timeout_s)
        except asyncio.TimeoutError:
            why = f"killed after experts.job_timeout_s = {self.settings.timeout_s:g} s"
            self._kill(proc)
            code = await proc.wait()
        except asyncio.CancelledError:  # the replica is shutting down: the job goes with it
            self._kill(proc)
            code = await proc.wait()
            why = "the ingress replica that ran it shut down"
        try:
            await asyncio.to_thread(self.store.finish_abnormally, job_id, code,
                                    why or f"the job's process ended ({code}) without recording an outcome")
        except (OSError, ValueError):
            logger.exception("admin job %s: its record could not be written", job_id)

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the command and anything it started
        except ProcessLookupError:
            pass

    def get(self, job_id: str) -> tuple[JobRecord, list[str]]:
        try:
            return self.store.get(job_id), self.store.log_tail(job_id)
        except JobError as exc:
            status = 422 if "invalid job id" in str(exc) else 409 if "damaged" in str(exc) else 404
            raise RequestError(str(exc), "job_id", status) from None

    def list(self, limit: int) -> list[JobRecord]:
        return self.store.list(limit)
