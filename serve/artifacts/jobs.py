"""Admin jobs on disk: long expert changes (register an adapter, train a domain) that the admin API
starts and any ingress replica can report.

    <experts.dir>/jobs/<id>/job.json     the record (written whole: serve.artifacts.generations.write_json_atomic)
    <experts.dir>/jobs/<id>/config.json  the service's config, which the job's command reads
    <experts.dir>/jobs/<id>/log.txt      the job's output

The admin API creates the record (``queued``) and starts the job's command (`routerserve experts
add|train … --job <id>`); the command reports through ``JobStore.reporter``: ``running`` with its
pid and host, its stage and step counts as it goes, a heartbeat every ``HEARTBEAT_S``, then
``succeeded`` with its result or ``failed`` with the error. A record still ``running`` whose
heartbeat stopped (the process or its node died) reads as ``lost``. One job runs at a time per
expert store (``JobStore.claim``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field

from .generations import write_json_atomic

logger = logging.getLogger(__name__)

JOB_ID_PATTERN = r"^j\d{8}T\d{9}-[0-9a-f]{6}$"  # UTC time to the millisecond, then random: they become paths
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # a running job silent this long is lost
QUEUED_STALE_S = 180.0  # a job not started this long after it was queued (its command starts in seconds) is lost
JobStatus = Literal["queued", "running", "succeeded", "failed", "lost"]
ACTIVE = ("queued", "running")


class JobError(ValueError):
    """No such job, an invalid id, or another job is running."""


class JobRecord(BaseModel):
    id: str
    kind: Literal["register", "train"]
    params: dict[str, Any] = Field(..., description="what was asked (name, adapter, domain, steps …)")
    status: JobStatus
    created_at: str
    updated_at: float = Field(..., description="unix time of the last write (the heartbeat while it runs)")
    started_at: str | None = None
    finished_at: str | None = None
    pid: int | None = None
    host: str | None = None
    stage: str = Field("", description="what it is doing now")
    done: int | None = Field(None, description="steps of this stage done (with total)")
    total: int | None = None
    stages: list[dict[str, Any]] = Field([], description="every stage so far: {stage, started_at, done, total}")
    result: dict[str, Any] | None = Field(None, description="on success: the generation made current, and more")
    error: str | None = None
    exit_code: int | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not re.fullmatch(JOB_ID_PATTERN, job_id) or job_id.endswith("\n"):
        raise JobError(f"invalid job id {job_id!r}: 'j', a UTC timestamp and six hex digits (e.g. j20261201T143000123-1a2b3c)")
    return job_id


class JobStore:
    def __init__(self, experts_dir: str | os.PathLike):
        self.root = Path(experts_dir) / "jobs"

    def dir(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    def record_path(self, job_id: str) -> Path:
        return self.dir(job_id) / "job.json"

    def log_path(self, job_id: str) -> Path:
        return self.dir(job_id) / "log.txt"

    def config_path(self, job_id: str) -> Path:
        return self.dir(job_id) / "config.json"

    # -- reading ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        path = self.record_path(job_id)
        if not path.is_file():
            raise JobError(f"no job {job_id}")
        try:
            rec = JobRecord.model_validate_json(path.read_text())
        except ValueError as exc:  # pydantic's ValidationError included
            raise JobError(f"job {job_id}: its record {path} is damaged ({type(exc).__name__})") from None
        silent = time.time() - rec.updated_at
        if rec.status == "running" and silent > STALE_AFTER_S:
            rec.status, rec.error = "lost", (f"no heartbeat for {silent:.0f} s (pid {rec.pid} on {rec.host}): the job's "
                                             "process or its node went away")
        elif rec.status == "queued" and silent > QUEUED_STALE_S:
            rec.status, rec.error = "lost", f"queued {silent:.0f} s ago and never started"
        return rec

    def list(self, limit: int = 50) -> list[JobRecord]:
        """The newest ``limit`` jobs, newest first."""
        if not self.root.is_dir():
            return []
        ids = sorted((p.name for p in self.root.iterdir() if re.fullmatch(JOB_ID_PATTERN, p.name)), reverse=True)
        out = []
        for job_id in ids[:limit]:
            with contextlib.suppress(JobError, ValueError):  # a folder whose record is not written yet
                out.append(self.get(job_id))
        return out

    def log_tail(self, job_id: str, lines: int = 20) -> list[str]:
        path = self.log_path(job_id)
        if not path.is_file():
            return []
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 16384))
            text = fh.read().decode("utf-8", "replace")
        # progress bars rewrite one line with \r: keep what the terminal would show last
        shown = (ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in text.split("\n"))
        return [ln for ln in shown if ln.strip()][-lines:]

    # -- writing ---------------------------------------------------------------------------------

    def _write(self, rec: JobRecord) -> JobRecord:
        rec.updated_at = time.time()
        write_json_atomic(self.record_path(rec.id), rec.model_dump(mode="json"))
        return rec

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        rec = JobRecord.model_validate_json(self.record_path(job_id).read_text())
        return self._write(rec.model_copy(update=fields))

    def claim(self, kind: str, params: dict[str, Any]) -> JobRecord:
        """A new ``queued`` job, unless one is queued or running (JobError naming it). The check
        and the creation run under ``jobs/.lock`` (a blocking ``flock``: call it off the event
        loop), so two replicas never start two jobs; nothing else happens under it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                busy = [r for r in self.list(limit=20) if r.status in ACTIVE]
                if busy:
                    raise JobError(f"job {busy[0].id} ({busy[0].kind} {busy[0].params}) is {busy[0].status}: one job "
                                   "at a time per expert store")
                now = datetime.now(timezone.utc)
                job_id = f"j{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"
                self.dir(job_id).mkdir()
                return self._write(JobRecord(id=job_id, kind=kind, params=params, status="queued",  # type: ignore[arg-type]
                                             created_at=_now(), updated_at=0.0))
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def finish_abnormally(self, job_id: str, exit_code: int | None, why: str) -> JobRecord | None:
        """The job's process ended without recording an outcome (killed, crashed, timed out):
        mark it failed with the end of its log; a recorded outcome is left alone."""
        rec = JobRecord.model_validate_json(self.record_path(job_id).read_text())
        if rec.status not in ACTIVE:
            return None
        tail = " | ".join(self.log_tail(job_id, 5))
        return self._write(rec.model_copy(update=dict(status="failed", finished_at=_now(), exit_code=exit_code,
                                                      error=f"{why}{': ' + tail if tail else ''}")))

    @contextlib.contextmanager
    def reporter(self, job_id: str, timeout_s: float | None = None) -> Iterator["JobReporter"]:
        """What a job's command runs inside: ``running`` (pid, host) with a heartbeat, then
        ``succeeded`` (``JobReporter.result``) or ``failed`` (the exception's message; re-raised).
        Past ``timeout_s`` the heartbeat records ``failed`` and ends the process itself (exit
        124), also when the replica that started it is gone."""
        rep = JobReporter(self, job_id, timeout_s)
        rep.start()
        try:
            yield rep
        except BaseException as exc:
            # typer.Exit / click's Exit carry exit_code (not SystemExit); SystemExit.code may be a string
            code = exc.code if isinstance(exc, SystemExit) else getattr(exc, "exit_code", 1)
            code = code if isinstance(code, int) else 1
            if code == 0:
                rep.stop("succeeded", result=rep.result_fields, exit_code=0)
                raise
            message = str(exc)
            if not message or hasattr(exc, "exit_code") or isinstance(exc, SystemExit):  # printed to the log already
                message = f"exited with {code}: " + " | ".join(self.log_tail(job_id, 3))
            rep.stop("failed", error=message, exit_code=code)
            raise
        rep.stop("succeeded", result=rep.result_fields, exit_code=0)


class JobReporter:
    def __init__(self, store: JobStore, job_id: str, timeout_s: float | None = None):
        self.store, self.job_id, self.timeout_s = store, job_id, timeout_s
        self.result_fields: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"job-{job_id}-heartbeat", daemon=True)
        self._last = 0.0
        self._t0 = time.monotonic()

    def start(self) -> None:
        self.store.update(self.job_id, status="running", started_at=_now(), pid=os.getpid(), host=socket.gethostname())
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    if self.timeout_s is not None and time.monotonic() - self._t0 > self.timeout_s:
                        self.store.update(self.job_id, status="failed", finished_at=_now(), exit_code=124,
                                          error=f"past experts.job_timeout_s = {self.timeout_s:g} s: ended")
                        os._exit(124)  # the job's own deadline: no replica may be left to kill it
                    self.store.update(self.job_id)
            except Exception:  # noqa: BLE001 - a failed write (full disk, a network volume's hiccup): beat again
                logger.exception("job %s: heartbeat not written", self.job_id)

    def progress(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        """The stage and its step counts; written at most once a second within one stage (the
        last step always). A failed write is logged, never fails the job."""
        now = time.monotonic()
        with self._lock:
            try:
                rec = self.store.get(self.job_id)
                if rec.stage == stage and now - self._last < 1.0 and done != total:
                    return
                self._last = now
                stages = list(rec.stages)
                if not stages or stages[-1]["stage"] != stage:
                    stages.append({"stage": stage, "started_at": _now()})
                stages[-1] = {**stages[-1], "done": done, "total": total}
                self.store.update(self.job_id, stage=stage, done=done, total=total, stages=stages)
            except Exception:  # noqa: BLE001 - progress is informative: the work goes on
                logger.exception("job %s: progress not written", self.job_id)

    def result(self, **fields: Any) -> None:
        self.result_fields.update(fields)

    def stop(self, status: JobStatus, **fields: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S + 1)
        with self._lock:
            self.store.update(self.job_id, status=status, finished_at=_now(), **fields)
