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
    with store.claim("register", {"name": "x"}) as rec:
        assert rec.status == "queued" and (tmp_path / "jobs" / rec.id / "job.json").is_file()
    with store.reporter(rec.id) as rep:
        got = store.get(rec.id)
        assert got.status == "running" and got.pid and got.started_at
        rep.progress("training", 3, 10)
        assert (store.get(rec.id).stage, store.get(rec.id).done, store.get(rec.id).total) == ("training", 3, 10)
        rep.progress("training", 4, 10)  # within a second of the last write: skipped
        rep.progress("training", 10, 10)  # the last step is always written
        rep.progress("publishing")
        assert [(s["stage"], s["done"], s["total"]) for s in store.get(rec.id).stages] == [
            ("training", 10, 10), ("publishing", None, None)]
        rep.result(generation="g000002")
    done = store.get(rec.id)
    assert done.status == "succeeded" and done.result == {"generation": "g000002"} and done.exit_code == 0
    with pytest.raises(ValueError, match="bad adapter"):
        with store.claim("register", {"name": "y"}) as rec2:
            pass
        with store.reporter(rec2.id):
            raise ValueError("bad adapter")
    failed = store.get(rec2.id)
    assert failed.status == "failed" and failed.error == "bad adapter" and failed.finished_at
    assert store.finish_abnormally(rec2.id, 1, "late") is None  # a recorded outcome stays
    assert [j.id for j in store.list()] == [rec2.id, rec.id]  # newest first


def test_one_slot_per_store_and_a_silent_job_is_lost(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    with store.claim("train", {"domain": "a"}) as first:
        pass
    with pytest.raises(JobError, match=f"job {first.id}"):
        with store.claim("train", {"domain": "b"}):
            pass
    store.update(first.id, status="running")
    monkeypatch.setattr(jobs_mod, "STALE_AFTER_S", 0.0)
    time.sleep(0.01)
    lost = store.get(first.id)
    assert lost.status == "lost" and "no heartbeat" in lost.error
    with store.claim("train", {"domain": "b"}) as second:  # a lost job frees the slot
        assert second.id != first.id


@pytest.mark.parametrize("bad", ["../x", "j1", "/etc/passwd", "j20261201T000000000-abcdeg", "j20261201T000000000-abcdef\n"])
def test_job_ids_are_checked_before_they_become_paths(tmp_path, bad):
    with pytest.raises(JobError, match="invalid job id"):
        JobStore(tmp_path).get(bad)


def test_the_log_tail_shows_what_a_terminal_would(tmp_path):
    store = JobStore(tmp_path)
    with store.claim("train", {}) as rec:
        store.log_path(rec.id).write_text("start\ntrain 1/10\rtrain 5/10\rtrain 10/10\n\ndone\n")
    assert store.log_tail(rec.id) == ["start", "train 10/10", "done"]
    assert json.loads(store.record_path(rec.id).read_text())["kind"] == "train"
