"""The generation store: immutable published expert sets, the pointer, rollback, GC, crashes."""

import json
import os
import shutil

import numpy as np
import pytest

from actors.routing import PilotSet
from serve.artifacts.generations import GenerationError, GenerationStore, check_generation_id


def _adapter(root, name, payload=b"weights"):
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


def _pilots(*experts, dim=4):
    return PilotSet(np.eye(len(experts), dim, dtype=np.float32), list(experts), list(experts), "m", "rule-1")


@pytest.fixture
def draft(tmp_path):
    src = tmp_path / "draft"
    return {"a": _adapter(src, "a", b"A1"), "b": _adapter(src, "b", b"B1")}


def test_publish_copies_the_draft_and_later_draft_changes_leave_it_alone(tmp_path, draft):
    store = GenerationStore(tmp_path / "experts")
    g1 = store.publish(draft, _pilots("a", "b", "c"), reason="first", base_model="m")
    assert g1.id == "g000001" and g1.experts == ["a", "b"] and store.current_id() is None  # not activated
    assert g1.load_pilots().expert_names == ["a", "b"]  # exactly its experts' pilots
    assert g1.manifest["pilot_rule"] == "rule-1" and g1.manifest["parent"] is None
    # the draft changes (retrained, removed): the published copy does not
    (draft["a"] / "adapter_model.safetensors").write_bytes(b"A2")
    shutil.rmtree(draft["b"])
    assert (g1.adapters()["a"] / "adapter_model.safetensors").read_bytes() == b"A1"
    assert (g1.adapters()["b"] / "adapter_config.json").is_file()
    g1.verify()
    store.activate(g1.id)
    g2 = store.publish({"a": draft["a"]}, _pilots("a"), reason="second")
    assert g2.id == "g000002" and g2.manifest["parent"] == "g000001"
    assert [g.id for g in store.list()] == ["g000001", "g000002"]


def test_publish_refuses_experts_without_pilots_or_adapter_files(tmp_path, draft):
    store = GenerationStore(tmp_path / "experts")
    with pytest.raises(GenerationError, match=r"without pilot embeddings: \['b'\]"):
        store.publish(draft, _pilots("a"), reason="x")
    with pytest.raises(GenerationError, match="not a peft adapter folder"):
        store.publish({"a": tmp_path}, _pilots("a"), reason="x")
    with pytest.raises(ValueError, match="invalid expert name"):
        store.publish({"../evil": draft["a"]}, _pilots("../evil"), reason="x")
    assert store.list() == [] and not [p for p in (store.dir.iterdir() if store.dir.exists() else [])]


def test_a_generation_with_no_experts_serves_the_base_model(tmp_path):
    store = GenerationStore(tmp_path)
    g = store.publish({}, None, reason="empty")
    assert g.experts == [] and g.adapters() == {} and g.load_pilots() is None
    g.verify()


def test_activate_rollback_and_the_pointer_history(tmp_path, draft):
    store = GenerationStore(tmp_path)
    with pytest.raises(GenerationError, match="nothing to roll back"):
        store.rollback()
    ids = [store.publish(draft, _pilots("a", "b"), reason=str(i)).id for i in range(3)]
    for gid in ids:
        store.activate(gid)
    assert store.current_id() == "g000003"
    assert store.rollback().id == "g000002" and store.current_id() == "g000002"
    assert store.rollback().id == "g000001"
    with pytest.raises(GenerationError, match="nothing to roll back"):
        store.rollback()
    with pytest.raises(GenerationError, match="no generation g000009"):
        store.activate("g000009")
    assert store.current_id() == "g000001"  # a failed activation changes nothing


@pytest.mark.parametrize("bad", ["../g000001", "/etc", "g1", "g0000001", "G000001", "g000001/..", "", "current", "g000001\n"])
def test_generation_ids_that_become_paths_are_checked(tmp_path, bad):
    with pytest.raises(GenerationError, match="invalid generation id"):
        check_generation_id(bad)
    with pytest.raises(GenerationError):
        GenerationStore(tmp_path).activate(bad)


def test_a_damaged_generation_is_not_activated(tmp_path, draft):
    store = GenerationStore(tmp_path)
    g = store.publish(draft, _pilots("a", "b"), reason="x")
    (g.adapters()["a"] / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(GenerationError, match="differs from its manifest"):
        store.activate(g.id)
    assert store.current_id() is None


def test_a_publisher_that_died_mid_write_leaves_no_generation(tmp_path, draft, monkeypatch):
    """A crash while copying: the staging folder is invisible to readers and swept by the next
    publish; the numbering is not disturbed."""
    store = GenerationStore(tmp_path)
    real = shutil.copytree
    calls = []

    def crash_on_second(src, dst, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(src, dst, **kw)

    monkeypatch.setattr(shutil, "copytree", crash_on_second)
    with pytest.raises(OSError, match="disk gone"):
        store.publish(draft, _pilots("a", "b"), reason="x")
    monkeypatch.setattr(shutil, "copytree", real)
    assert store.list() == [] and list(store.dir.iterdir()) == []
    # a leftover of a process that is gone (killed, not an exception) is swept too
    dead = store.dir / ".publish.staging-999999"
    (dead / "adapters").mkdir(parents=True)
    assert store.list() == []
    g = store.publish(draft, _pilots("a", "b"), reason="x")
    assert g.id == "g000001" and not dead.exists()


def test_the_pointer_is_replaced_whole(tmp_path, draft, monkeypatch):
    store = GenerationStore(tmp_path)
    g1 = store.publish(draft, _pilots("a", "b"), reason="1")
    g2 = store.publish(draft, _pilots("a", "b"), reason="2")
    store.activate(g1.id)

    def crash(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.activate(g2.id)
    monkeypatch.undo()
    assert store.current_id() == g1.id  # the old pointer, whole


def test_gc_keeps_the_newest_the_current_the_rollback_targets_and_the_pinned(tmp_path, draft):
    store = GenerationStore(tmp_path)
    ids = [store.publish(draft, _pilots("a", "b"), reason=str(i)).id for i in range(7)]
    store.activate(ids[1])
    store.activate(ids[0])  # current: the oldest; rollback target: g000002
    gone = store.gc(keep=2, protect=[ids[3]])
    assert gone == [ids[2], ids[4]]
    assert [g.id for g in store.list()] == [ids[0], ids[1], ids[3], ids[5], ids[6]]
    assert store.rollback().id == ids[1]
    with pytest.raises(GenerationError):
        store.gc(keep=0)


def test_removing_from_the_service_removes_from_the_draft_too(tmp_path):
    """remove_from_service: the current generation without the expert, and the draft without it,
    so the next publish of the draft does not bring it back."""
    from serve.artifacts.experts import remove_from_service

    root = tmp_path / "experts"
    draft = {"a": _adapter(root / "adapters", "a"), "b": _adapter(root / "adapters", "b")}
    _pilots("a", "b").save(root / "pilots.npz")
    store = GenerationStore(root)
    store.activate(store.publish(draft, _pilots("a", "b"), reason="x").id)
    with pytest.raises(GenerationError, match="no expert 'c'"):
        remove_from_service(store, "c", "x")
    with pytest.raises(ValueError, match="invalid expert name"):
        remove_from_service(store, "../a", "x")
    gen = remove_from_service(store, "b", "removed b")
    assert store.current_id() == gen.id == "g000002" and gen.experts == ["a"]
    assert sorted(p.name for p in (root / "adapters").iterdir()) == ["a"]
    assert PilotSet.load(root / "pilots.npz").expert_names == ["a"]
    store.get("g000001").verify()


def test_a_half_copied_generation_folder_is_never_reused_nor_listed(tmp_path, draft):
    """A gNNNNNN folder without its manifest (an interrupted copy onto the volume) is not a
    generation, and publishing numbers past it. Before: publish retried that number forever."""
    store = GenerationStore(tmp_path)
    (store.dir / "g000001" / "adapters").mkdir(parents=True)
    assert store.list() == []
    g = store.publish(draft, _pilots("a", "b"), reason="x")
    assert g.id == "g000002" and [x.id for x in store.list()] == ["g000002"]


def test_reactivating_the_current_generation_is_not_a_rollback_step(tmp_path, draft):
    store = GenerationStore(tmp_path)
    g1, g2 = (store.publish(draft, _pilots("a", "b"), reason=str(i)).id for i in range(2))
    store.activate(g1)
    store.activate(g2)
    store.activate(g2)
    assert store.pointer()["history"] == [g1, g2]
    assert store.rollback().id == g1


def test_expert_names_with_a_trailing_newline_are_refused():
    from serve.artifacts.generations import check_expert_name

    with pytest.raises(ValueError, match="invalid expert name"):
        check_expert_name("alpha\n")


def test_writers_take_turns_across_threads_and_processes(tmp_path, draft):
    """The store's lock: concurrent publishes get distinct numbers and lose nothing; a writer in
    another process (another ingress replica on the same volume) holds activations back until it
    is done."""
    import subprocess
    import sys
    import threading
    import time

    store = GenerationStore(tmp_path)
    ids, errors = [], []

    def publish():
        try:
            ids.append(store.publish(draft, _pilots("a", "b"), reason="race").id)
        except Exception as exc:  # noqa: BLE001 - collected and asserted empty
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(ids) == [f"g{i:06d}" for i in range(1, 7)]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from serve.artifacts.generations import GenerationStore\n"
         f"with GenerationStore({str(tmp_path)!r}).lock():\n    print('held', flush=True); time.sleep(1.5)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    store.activate("g000001")
    waited = time.monotonic() - t0
    holder.wait(10)
    assert waited > 0.5 and store.current_id() == "g000001", waited


def test_after_a_rollback_an_offline_change_starts_from_the_served_generation(tmp_path):
    """publish → publish (adds c) → rollback: the draft still holds c. Before, the next offline
    change (here removing a) published the draft's set — c came back behind the operator's back.
    Now the draft follows the current generation first (draft_follows_current): the new
    generation is the served one without a."""
    from serve.artifacts.experts import draft_follows_current, publish_draft, remove_expert
    from serve.config import config_from_dict

    root = tmp_path / "experts"
    cfg = config_from_dict({"experts": {"dir": str(root)}}).absolutized()
    _adapter(root / "adapters", "a", b"A1")
    _adapter(root / "adapters", "b", b"B1")
    _pilots("a", "b").save(root / "pilots.npz")
    g1 = publish_draft(cfg, "a+b")
    assert draft_follows_current(cfg) is None  # the draft is what is served
    _adapter(root / "adapters", "c", b"C1")
    _pilots("a", "b", "c").save(root / "pilots.npz")
    g2 = publish_draft(cfg, "a+b+c")
    store = GenerationStore(root)
    assert store.rollback().id == g1.id
    remove_expert(cfg, "a")
    served = store.current()
    assert served.id not in (g1.id, g2.id) and served.experts == ["b"], served.experts
    assert sorted(p.name for p in (root / "adapters").iterdir() if not p.name.startswith(".")) == ["b"]
    assert PilotSet.load(root / "pilots.npz").expert_names == ["b"]
    assert (served.adapters()["b"] / "adapter_model.safetensors").read_bytes() == b"B1"
    store.get(g2.id).verify()  # c is still in its generation: nothing lost
    # an activate is a switch too; a store without the marker (from before it) is left alone
    store.activate(g2.id)
    assert draft_follows_current(cfg) == g2.id and (root / "adapters" / "c").is_dir()
    (root / "DRAFT.json").unlink()
    store.activate(g1.id)
    assert draft_follows_current(cfg) is None and (root / "adapters" / "c").is_dir()


def test_following_the_served_generation_keeps_adapters_never_published(tmp_path):
    """experts.enabled leaves some draft adapters out of every generation: following the current
    generation removes only what a generation published, never those (their only copy)."""
    from serve.artifacts.experts import draft_follows_current, publish_draft
    from serve.config import config_from_dict

    root = tmp_path / "experts"
    cfg = config_from_dict({"experts": {"dir": str(root), "enabled": ["a"]}}).absolutized()
    _adapter(root / "adapters", "a", b"A1")
    _adapter(root / "adapters", "wip", b"W1")  # not enabled: never published
    _pilots("a").save(root / "pilots.npz")
    g1 = publish_draft(cfg, "a")
    cfg.experts.enabled = ["a", "wip"]
    _pilots("a", "wip").save(root / "pilots.npz")
    g2 = publish_draft(cfg, "a+wip")
    _adapter(root / "adapters", "later", b"L1")  # trained with publish=False
    store = GenerationStore(root)
    store.rollback()
    assert draft_follows_current(cfg) == g1.id
    names = sorted(p.name for p in (root / "adapters").iterdir() if not p.name.startswith("."))
    assert names == ["a", "later"], names  # wip: published in g2, not served; later: its only copy stays
    store.get(g2.id).verify()


def test_a_publish_after_the_served_generation_moved_mid_change_is_refused(tmp_path):
    """An activate or rollback while a change (a training run) was being made is not undone by
    its publish: refused, nothing published; `experts publish` (by hand) forces it."""
    from serve.artifacts.experts import draft_follows_current, publish_draft
    from serve.config import config_from_dict

    root = tmp_path / "experts"
    cfg = config_from_dict({"experts": {"dir": str(root)}}).absolutized()
    _adapter(root / "adapters", "a", b"A1")
    _pilots("a").save(root / "pilots.npz")
    g1 = publish_draft(cfg, "a")
    _adapter(root / "adapters", "b", b"B1")
    _pilots("a", "b").save(root / "pilots.npz")
    g2 = publish_draft(cfg, "a+b")
    assert draft_follows_current(cfg) is None  # the change starts here ...
    _adapter(root / "adapters", "c", b"C1")
    _pilots("a", "b", "c").save(root / "pilots.npz")
    store = GenerationStore(root)
    store.rollback()  # ... someone rolls back while it runs ...
    with pytest.raises(GenerationError, match=f"generation {g1.id} was made current while this change"):
        publish_draft(cfg, "a+b+c")  # ... and its publish would have undone that
    assert store.current_id() == g1.id and len(store.list()) == 2
    forced = publish_draft(cfg, "by hand", force=True)
    assert store.current_id() == forced.id and forced.experts == ["a", "b", "c"] and g2.id != forced.id
