"""Artifact folders are swapped in whole: a crash at any point leaves the old one or the new one."""

import os

import pytest

from actors.encoder import adapter_dirs
from serve.artifacts import atomic
from serve.artifacts.atomic import recover, staged_dir

DEAD_PID = 2**22 + 12345  # above pid_max's default: no such process


def _adapter(path, marker: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_text(marker)


def _marker(path) -> str:
    return (path / "adapter_model.safetensors").read_text()


def test_a_finished_write_replaces_the_old_folder_and_leaves_nothing_beside_it(tmp_path):
    _adapter(tmp_path / "sci", "old")
    with staged_dir(tmp_path / "sci") as staging:
        assert staging.name.startswith(".sci.staging-") and adapter_dirs(tmp_path) == {"sci": tmp_path / "sci"}
        _adapter(staging, "new")
        assert _marker(tmp_path / "sci") == "old"  # readers see the old one until the swap
    assert _marker(tmp_path / "sci") == "new" and os.listdir(tmp_path) == ["sci"]


def test_a_write_that_fails_midway_leaves_the_old_folder(tmp_path):
    _adapter(tmp_path / "sci", "old")
    with pytest.raises(RuntimeError, match="killed"):
        with staged_dir(tmp_path / "sci") as staging:
            (staging / "adapter_model.safetensors").write_text("trunc")
            raise RuntimeError("killed while writing")
    assert _marker(tmp_path / "sci") == "old" and os.listdir(tmp_path) == ["sci"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    _adapter(tmp_path / "sci", "old")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(os.path.basename(src))
        if len(calls) == 2:  # the staging folder → sci
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        with staged_dir(tmp_path / "sci") as staging:
            _adapter(staging, "new")
    monkeypatch.undo()
    assert _marker(tmp_path / "sci") == "old"


def test_recover_undoes_what_a_dead_writer_left(tmp_path):
    """A writer killed between its two renames left no 'sci' and its '.old' copy: the copy goes
    back. Staging and half-deleted folders of dead writers go away; a live writer's are kept."""
    _adapter(tmp_path / f".sci.old-{DEAD_PID}", "old")
    _adapter(tmp_path / f".nf.staging-{DEAD_PID}", "half")
    _adapter(tmp_path / f".gone.removing-{DEAD_PID}", "half")
    _adapter(tmp_path / f".live.staging-{os.getpid()}", "in progress")
    assert adapter_dirs(tmp_path) == {}  # dot-folders are never loaded as experts
    recover(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f".live.staging-{os.getpid()}", "sci"]
    assert _marker(tmp_path / "sci") == "old"


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    from serve.artifacts.atomic import replacing, write_text_atomic

    target = tmp_path / "report.md"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert write_text_atomic(target, "new") == target and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary file left beside it
