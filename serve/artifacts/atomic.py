"""Writing an artifact folder so that a crash at any point leaves the old one or the new one.

``staged_dir(dest)`` yields a fresh staging folder beside ``dest`` (``.<name>.staging-<pid>``);
when the block succeeds every file is fsynced and the folder swapped in: ``dest`` is renamed to
``.<name>.old-<pid>``, the staging folder to ``dest``, and the old one deleted. When the block
fails the staging folder is deleted and ``dest`` is untouched. Readers never see a dot-folder
(``actors.encoder.adapter_dirs`` skips them). A crash between the two renames leaves ``dest``
missing and its ``.old`` copy beside it: ``recover(root)`` (run before every listing of the
expert store and before every write) renames it back; leftovers of dead writers (staging
folders, half-deleted ``.removing`` folders) are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old|removing)-(?P<pid>\d+)$")


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the folders themselves to disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; when the block succeeds it is fsynced and renamed
    over ``path`` (whole or not at all), when it fails it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> Path:
    """``text`` as ``path``, whole or not at all (``replacing``)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def recover(root: Path) -> None:
    """Undo what a crashed writer left under ``root``: an ``.old`` copy whose artifact is missing
    goes back in place; other leftovers of processes that are gone are deleted."""
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        m = _LEFTOVER.match(child.name)
        if m is None or _alive(int(m["pid"])):
            continue
        dest = root / m["name"]
        if m["kind"] == "old" and not dest.exists():
            os.rename(child, dest)
            fsync_dir(root)
        else:
            shutil.rmtree(child, ignore_errors=True)


def swap_in(staging: Path, dest: Path) -> None:
    fsync_tree(staging)
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except BaseException:
        if old.exists() and not dest.exists():
            os.rename(old, dest)  # the old artifact back in place
        raise
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest.parent)
    staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, dest)
