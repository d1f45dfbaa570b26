"""The admin jobs' records on disk (serve.artifacts.jobs): one slot per store, the reporter's
outcome and progress, a silent job read as lost, ids checked before they become paths."""

from __future__ import annotations

import json
import time

import pytest

from serve.artifacts import jobs as jobs_mod
from serve.artifacts.jobs import JobError, JobStore


def test_a_job_records_progress_and_its_outcome(tmp_path):
    store = JobStore(tmp_path)
    rec = store.claim("register", {"name": "x"})
    assert rec.status == "queued" and (tmp_path / "jobs" / rec.id / "job.json").is_file()
    with store.reporter(rec.id) as rep:
        got = store.get(rec.id)
        assert got.status == "running" and got.pid and got.started_at
        rep.progress("training", 3, 10)
        assert (store.get(rec.id).stage, store.get(rec.id).done, store.get(rec.id).total) == ("training", 3, 10)
        rep.progress("training", 4, 10)  # within a second of the last write: skipped
        assert store.get(rec.id).done == 3
        rep.progress("training", 10, 10)  # the last step is always written
        rep.progress("publishing")
        assert [(s["stage"], s["done"], s["total"]) for s in store.get(rec.id).stages] == [
            ("training", 10, 10), ("publishing", None, None)]
        rep.result(generation="g000002")
    done = store.get(rec.id)
    assert done.status == "succeeded" and done.result == {"generation": "g000002"} and done.exit_code == 0
    rec2 = store.claim("register", {"name": "y"})
    with pytest.raises(ValueError, match="bad adapter"):
        with store.reporter(rec2.id):
            raise ValueError("bad adapter")
    failed = store.get(rec2.id)
    assert failed.status == "failed" and failed.error == "bad adapter" and failed.finished_at
    assert store.finish_abnormally(rec2.id, 1, "late") is None  # a recorded outcome stays
    assert [j.id for j in store.list()] == [rec2.id, rec.id]  # newest first


def test_one_slot_per_store_and_a_silent_job_is_lost(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    first = store.claim("train", {"domain": "a"})
    with pytest.raises(JobError, match=f"job {first.id}"):
        store.claim("train", {"domain": "b"})
    monkeypatch.setattr(jobs_mod, "QUEUED_STALE_S", 0.0)  # queued and never started (its replica died)
    time.sleep(0.01)
    assert store.get(first.id).status == "lost" and "never started" in store.get(first.id).error
    monkeypatch.setattr(jobs_mod, "QUEUED_STALE_S", 180.0)
    store.update(first.id, status="running")
    monkeypatch.setattr(jobs_mod, "STALE_AFTER_S", 0.0)
    time.sleep(0.01)
    lost = store.get(first.id)
    assert lost.status == "lost" and "no heartbeat" in lost.error
    second = store.claim("train", {"domain": "b"})  # a lost job frees the slot
    assert second.id != first.id


def test_claims_from_many_threads_start_one_job(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = JobStore(tmp_path)

    def claim(i):
        try:
            return store.claim("train", {"i": i}).id
        except JobError:
            return None

    with ThreadPoolExecutor(8) as pool:
        got = [j for j in pool.map(claim, range(16)) if j]
    assert len(got) == 1 and [j.id for j in store.list()] == got


def test_the_outcome_of_a_command_that_exits(tmp_path):
    """typer.Exit is click's Exit (a RuntimeError with exit_code), not SystemExit: recorded with its
    code and the end of the log; an exit 0 is a success; a damaged record is a JobError."""
    import typer

    store = JobStore(tmp_path)
    rec = store.claim("train", {})
    store.log_path(rec.id).write_text("config error: experts.dir is null\n")
    with pytest.raises(typer.Exit):
        with store.reporter(rec.id):
            raise typer.Exit(2)
    got = store.get(rec.id)
    assert got.status == "failed" and got.exit_code == 2 and "experts.dir is null" in got.error
    rec = store.claim("train", {})
    with pytest.raises(SystemExit):
        with store.reporter(rec.id):
            raise SystemExit(0)
    assert store.get(rec.id).status == "succeeded"
    store.record_path(rec.id).write_text("{not json")
    with pytest.raises(JobError, match="damaged"):
        store.get(rec.id)


@pytest.mark.parametrize("bad", ["../x", "j1", "/etc/passwd", "j20261201T000000000-abcdeg", "j20261201T000000000-abcdef\n"])
def test_job_ids_are_checked_before_they_become_paths(tmp_path, bad):
    with pytest.raises(JobError, match="invalid job id"):
        JobStore(tmp_path).get(bad)


def test_the_log_tail_shows_what_a_terminal_would(tmp_path):
    store = JobStore(tmp_path)
    rec = store.claim("train", {})
    store.log_path(rec.id).write_text("start\ntrain 1/10\rtrain 5/10\rtrain 10/10\n\ndone\n")
    assert store.log_tail(rec.id) == ["start", "train 10/10", "done"]
    assert json.loads(store.record_path(rec.id).read_text())["kind"] == "train"
