"""Versioned, immutable expert sets ("generations") and the pointer to the one in service.

    <experts.dir>/generations/g000007/     one generation, written once, never modified:
        manifest.json                      its experts (with each file's sha256), pilot rule, parent,
                                           base model, reason, time
        adapters/<name>/                   a copy of each expert's peft adapter folder
        pilots.npz                         the pilots of exactly these experts
    <experts.dir>/CURRENT.json             {"generation": "g000007", "history": [...], ...}

A generation is staged in a dot-folder beside its final name, fsynced, and renamed into place
(a rename never replaces an existing generation: two publishers get two numbers). The pointer is
written to a temporary file, fsynced, and renamed over the old one. So a reader sees a whole
generation or none, and the pointer names a whole generation or the previous one. Readers that
serve (the encoder replicas, evaluation, `experts list`) read a generation; the offline writers
(training, pilot building, `experts add/remove`) work on the draft (``adapters/``, ``pilots.npz``)
and publish it as a new generation.

Activating appends to the pointer's history; rolling back drops its last entry. Garbage
collection keeps the newest ``keep`` generations and every generation in the pointer's recent
history, and never the current one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from actors.routing import PILOTS_FILE, PilotSet

from serve.config import GENERATION_ID_PATTERN

from .atomic import fsync_dir, fsync_tree, recover, write_text_atomic

GENERATIONS = "generations"
POINTER = "CURRENT.json"
MANIFEST = "manifest.json"
GENERATION_ID = re.compile(GENERATION_ID_PATTERN)
EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HISTORY_LIMIT = 100  # activations remembered in the pointer (rollback depth)


class GenerationError(ValueError):
    """A generation that does not exist, is not whole, or may not be used for what was asked."""


def check_expert_name(name: str) -> str:
    """Expert names become folder names: letters, digits, '.', '_', '-', never 'base'."""
    if not isinstance(name, str) or not EXPERT_NAME.fullmatch(name) or name.lower() == "base":
        raise ValueError(
            f"invalid expert name {name!r}: 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not 'base'"
        )
    return name


def check_generation_id(gen_id: str) -> str:
    """Generation ids become paths: exactly ``g`` + six digits, nothing else."""
    if not isinstance(gen_id, str) or not GENERATION_ID.fullmatch(gen_id):
        raise GenerationError(f"invalid generation id {gen_id!r}: 'g' followed by six digits (e.g. g000003)")
    return gen_id


def _number(gen_id: str) -> int:
    return int(GENERATION_ID.fullmatch(gen_id).group(1))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as ``path``, whole or not at all (a temporary file fsynced, then renamed over it)."""
    write_text_atomic(path, json.dumps(data, indent=2))


@dataclass(frozen=True)
class Generation:
    id: str
    path: Path
    manifest: dict

    @property
    def number(self) -> int:
        return _number(self.id)

    @property
    def experts(self) -> list[str]:
        return list(self.manifest["experts"])

    def adapters(self, enabled: Iterable[str] | None = None) -> dict[str, Path]:
        """Adapter folders of this generation's experts (only ``enabled`` ones when given; an
        enabled name the generation lacks is an error naming both)."""
        names = self.experts
        if enabled is not None:
            missing = [e for e in enabled if e not in names]
            if missing:
                raise GenerationError(f"experts.enabled names {missing}, which generation {self.id} lacks (it has {names})")
            names = [e for e in names if e in set(enabled)]
        return {name: self.path / "adapters" / name for name in names}

    @property
    def pilots_path(self) -> Path | None:
        p = self.path / PILOTS_FILE
        return p if p.is_file() else None

    def load_pilots(self) -> PilotSet | None:
        return PilotSet.load(self.pilots_path) if self.pilots_path else None

    def verify(self) -> None:
        """Every file the manifest lists is there with its recorded sha256 (a damaged volume, or
        a hand edit, is caught before a replica loads it)."""
        for name, entry in self.manifest["experts"].items():
            for rel, digest in entry["files"].items():
                f = self.path / "adapters" / name / rel
                if not f.is_file() or _sha256(f) != digest:
                    raise GenerationError(f"generation {self.id}: {f} is missing or differs from its manifest")
        pilots = self.manifest.get("pilots_sha256")
        if pilots is not None and (self.pilots_path is None or _sha256(self.pilots_path) != pilots):
            raise GenerationError(f"generation {self.id}: {PILOTS_FILE} is missing or differs from its manifest")

    def summary(self) -> dict:
        m = self.manifest
        return {"generation": self.id, "experts": self.experts, "created_at": m.get("created_at"),
                "parent": m.get("parent"), "reason": m.get("reason", ""), "pilot_rule": m.get("pilot_rule", "")}


_THREAD_LOCKS: dict[str, threading.RLock] = {}
_HELD = threading.local()  # stores this thread holds the file lock of (re-entry does not re-lock)


class GenerationStore:
    """The generations under one experts folder and its pointer."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dir = self.root / GENERATIONS
        self.pointer_path = self.root / POINTER

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time across threads and processes (an ``fcntl`` lock on
        ``<root>/.store.lock``; pods that share the volume share it where the filesystem honours
        it): the read-modify-write steps (publish's numbering, the pointer's history, "the current
        generation without X") never interleave. Re-entrant within a thread."""
        key = str(self.root.resolve())
        held = getattr(_HELD, "stores", None)
        if held is None:
            held = _HELD.stores = set()
        if key in held:
            yield
            return
        with _THREAD_LOCKS.setdefault(key, threading.RLock()):
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / ".store.lock", "a+") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                held.add(key)
                try:
                    yield
                finally:
                    held.discard(key)
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- reading ---------------------------------------------------------------------------------

    def list(self) -> list[Generation]:
        """Whole generations, oldest first (staging dot-folders are not generations)."""
        if not self.dir.is_dir():
            return []
        out = []
        for child in self.dir.iterdir():
            if GENERATION_ID.fullmatch(child.name) and (child / MANIFEST).is_file():
                out.append(self._load(child))
        return sorted(out, key=lambda g: g.number)

    def get(self, gen_id: str) -> Generation:
        path = self.dir / check_generation_id(gen_id)
        if not (path / MANIFEST).is_file():
            known = [g.id for g in self.list()]
            raise GenerationError(f"no generation {gen_id} under {self.dir} (have {known or 'none'})")
        return self._load(path)

    @staticmethod
    def _load(path: Path) -> Generation:
        return Generation(path.name, path, json.loads((path / MANIFEST).read_text()))

    def pointer(self) -> dict | None:
        if not self.pointer_path.is_file():
            return None
        return json.loads(self.pointer_path.read_text())

    def current_id(self) -> str | None:
        p = self.pointer()
        return None if p is None else check_generation_id(p["generation"])

    def current(self) -> Generation | None:
        gen_id = self.current_id()
        return None if gen_id is None else self.get(gen_id)

    # -- writing ---------------------------------------------------------------------------------

    def publish(self, adapters: Mapping[str, str | os.PathLike], pilots: PilotSet | None, *, reason: str,
                base_model: str = "") -> Generation:
        with self.lock():
            return self._publish(adapters, pilots, reason=reason, base_model=base_model)

    def _publish(self, adapters: Mapping[str, str | os.PathLike], pilots: PilotSet | None, *, reason: str,
                 base_model: str = "") -> Generation:
        """Write a new generation holding copies of ``adapters`` and the pilots of exactly those
        experts. Nothing is activated. Every expert needs pilots; every adapter needs its
        adapter_config.json; a generation with the same content as the newest is still a new
        generation (publishing is explicit)."""
        for name, src in adapters.items():
            check_expert_name(name)
            if not (Path(src) / "adapter_config.json").is_file():
                raise GenerationError(f"{src} is not a peft adapter folder (no adapter_config.json)")
        names = list(adapters)
        if names:
            have = set(pilots.expert_names) if pilots is not None else set()
            missing = [e for e in names if e not in have]
            if missing:
                raise GenerationError(f"experts without pilot embeddings: {missing} (build them: routerserve pilots build)")
        self.dir.mkdir(parents=True, exist_ok=True)
        recover(self.dir)  # staging folders of publishers that died
        parent = self.current_id()
        staging = self.dir / f".publish-{uuid.uuid4().hex[:12]}.staging-{os.getpid()}"  # one per publish
        try:
            (staging / "adapters").mkdir(parents=True)
            experts = {}
            for name, src in adapters.items():
                dest = staging / "adapters" / name
                shutil.copytree(src, dest, symlinks=False)
                files = sorted(p for p in dest.rglob("*") if p.is_file())
                experts[name] = {"files": {str(p.relative_to(dest)): _sha256(p) for p in files}, "source": str(src)}
            manifest = {"parent": parent, "created_at": _now(), "reason": reason, "base_model": base_model,
                        "experts": experts, "pilot_rule": "", "pilots_sha256": None}
            if names:
                kept = pilots.restrict(names)
                kept.save(staging / PILOTS_FILE)
                manifest["pilot_rule"] = kept.rule
                manifest["pilots_sha256"] = _sha256(staging / PILOTS_FILE)
            for _ in range(100):  # claim the next number; a rename never replaces an existing folder
                gen_id = f"g{self._next_number():06d}"
                (staging / MANIFEST).write_text(json.dumps({"generation": gen_id, **manifest}, indent=2))
                fsync_tree(staging)
                try:
                    os.rename(staging, self.dir / gen_id)
                    break
                except OSError:
                    if not (self.dir / gen_id).exists():
                        raise
            else:
                raise GenerationError(f"could not claim a generation number under {self.dir}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.dir)
        return self.get(gen_id)

    def _next_number(self) -> int:
        """One past every gNNNNNN folder, whole or not (a half-copied one is never reused)."""
        taken = [int(m.group(1)) for c in self.dir.iterdir() if (m := GENERATION_ID.fullmatch(c.name))]
        return max(taken, default=0) + 1

    def activate(self, gen_id: str, *, reason: str = "activate") -> Generation:
        with self.lock():
            return self._activate(gen_id, reason=reason)

    def _activate(self, gen_id: str, *, reason: str) -> Generation:
        """Make ``gen_id`` the current generation (it must exist and be whole)."""
        gen = self.get(gen_id)
        gen.verify()
        old = self.pointer() or {}
        history = old.get("history", [])
        if not history or history[-1] != gen.id:  # re-activating the current one is not a new step
            history = [*history, gen.id][-HISTORY_LIMIT:]
        write_json_atomic(self.pointer_path, {"generation": gen.id, "activated_at": _now(), "reason": reason,
                                               "history": history})
        return gen

    def rollback(self) -> Generation:
        with self.lock():
            return self._rollback()

    def _rollback(self) -> Generation:
        """Back to the generation that was current before the current one."""
        p = self.pointer()
        history = (p or {}).get("history", [])
        if len(history) < 2:
            raise GenerationError("nothing to roll back to: no earlier activation is recorded")
        target = self.get(history[-2])
        target.verify()
        write_json_atomic(self.pointer_path, {"generation": target.id, "activated_at": _now(),
                                               "reason": f"rollback from {history[-1]}", "history": history[:-1]})
        return target

    def gc(self, keep: int, protect: Iterable[str] = ()) -> list[str]:
        with self.lock():
            return self._gc(keep, protect)

    def _gc(self, keep: int, protect: Iterable[str] = ()) -> list[str]:
        """Delete generations beyond the newest ``keep``, except the current one, those in the
        last ``keep`` entries of the activation history (rollback targets) and ``protect``
        (e.g. a generation pinned by the running service). Returns the ids deleted."""
        if keep < 1:
            raise GenerationError("keep must be at least 1")
        gens = self.list()
        p = self.pointer() or {}
        safe = {g.id for g in gens[-keep:]} | set(p.get("history", [])[-keep:]) | set(protect)
        if p.get("generation"):
            safe.add(p["generation"])
        deleted = []
        for g in gens:
            if g.id in safe:
                continue
            doomed = self.dir / f".{g.id}.removing-{os.getpid()}"
            os.rename(g.path, doomed)  # out of sight first: a crash mid-delete leaves no half generation
            shutil.rmtree(doomed)
            deleted.append(g.id)
        if deleted:
            fsync_dir(self.dir)
        return deleted
