"""The admin API in-process (the same FastAPI app the ingress serves): its own keys, activation
and rollback of expert generations, bad input refused with the current generation untouched.
The encoder behind it is a real LiveExperts (real engine and adapters) answering info calls."""

import json

import pytest
from fastapi.testclient import TestClient

from serve.app.admin.service import AdminService
from serve.app.ingress import create_app
from serve.app.live_experts import LiveExperts, encoder_builder
from serve.artifacts.generations import GenerationStore
from serve.config import ConfigError, config_from_dict

ADMIN, QUERY = "admin-secret", "query-secret"


@pytest.fixture(scope="module")
def published(tmp_path_factory, engine, random_adapters, mean_pilots):
    store = GenerationStore(tmp_path_factory.mktemp("experts"))
    pilots = mean_pilots(engine, {"alpha": ["cell biology"], "beta": ["public policy"]})
    g1 = store.publish({"alpha": random_adapters["alpha"]}, pilots, reason="alpha").id
    g2 = store.publish(random_adapters, pilots, reason="alpha+beta").id
    return store, g1, g2


@pytest.fixture
def admin_app(published, model_path, encoder_settings):
    store, g1, _ = published
    store.activate(g1)

    live = LiveExperts(store, encoder_builder(model_path, encoder_settings))

    async def info():  # one replica that follows the pointer (as the watch loop does)
        await live.sync()
        return {"replica": "r1", "generation": live.generation}

    def make(pin="current", admin_keys=frozenset({ADMIN}), admin_open=False, api_keys=frozenset({QUERY})):
        app = create_app(None, admin=AdminService(store, pin, info), admin_keys=admin_keys,
                         admin_open=admin_open, api_keys=api_keys)
        return TestClient(app)

    return make, store, live


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_admin_routes_take_only_admin_keys(admin_app):
    make, store, _ = admin_app
    client = make()
    url = "/admin/v1/experts/generations"
    assert client.get(url).status_code == 401
    r = client.get(url, headers=_auth(QUERY))  # a query key is not an admin key
    assert r.status_code == 401 and "admin key" in r.json()["error"]["message"]
    assert client.get("/v1/experts", headers=_auth(ADMIN)).status_code == 401  # nor the other way round
    r = client.get(url, headers=_auth(ADMIN))
    assert r.status_code == 200
    body = r.json()
    assert body["current"] == store.current_id() and body["pin"] == "current"
    assert [g["generation"] for g in body["generations"]] == ["g000001", "g000002"]
    assert body["replicas"] == {"r1": "g000001"}


def test_without_admin_keys_the_admin_api_is_off_unless_opened(admin_app):
    make, store, _ = admin_app
    r = make(admin_keys=None).post("/admin/v1/experts/rollback", json={}, headers=_auth(QUERY))
    assert r.status_code == 403 and "admin_keys_env" in r.json()["error"]["message"]
    assert make(admin_keys=None, admin_open=True).get("/admin/v1/experts/generations").status_code == 200


def test_activate_and_rollback_switch_the_replica_and_say_so(admin_app):
    make, store, live = admin_app
    client = make()
    r = client.post("/admin/v1/experts/activate", json={"generation": "g000002", "wait_s": 5}, headers=_auth(ADMIN))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generation"] == "g000002" and body["previous"] == "g000001" and body["switched"] is True
    assert body["replicas"] == {"r1": "g000002"} and sorted(body["experts"]) == ["alpha", "beta"]
    assert live.generation == "g000002" and store.current_id() == "g000002"
    r = client.post("/admin/v1/experts/rollback", json={}, headers=_auth(ADMIN))
    assert r.status_code == 200 and r.json()["generation"] == "g000001" and live.generation == "g000001"


@pytest.mark.parametrize("body, status, param", [
    ({"generation": "g000099"}, 404, "generation"),        # unknown
    ({"generation": "../g000001"}, 422, "generation"),     # a path
    ({"generation": "/etc/passwd"}, 422, "generation"),
    ({"generation": "g000002", "extra": 1}, 422, "extra"),
    ({}, 422, "generation"),
])
def test_bad_activation_is_a_4xx_naming_the_problem_and_changes_nothing(admin_app, body, status, param):
    make, store, live = admin_app
    r = make().post("/admin/v1/experts/activate", json=body, headers=_auth(ADMIN))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert store.current_id() == "g000001" and live.generation == "g000001"


def test_a_damaged_generation_is_refused_and_the_current_one_stays(admin_app, tmp_path):
    make, store, live = admin_app
    gen = store.get("g000002")
    weights = next(p for p in gen.adapters()["beta"].iterdir() if p.suffix == ".safetensors")
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-8] + b"\0" * 8)
        r = make().post("/admin/v1/experts/activate", json={"generation": "g000002"}, headers=_auth(ADMIN))
        assert r.status_code == 409 and "differs from its manifest" in r.json()["error"]["message"]
        assert store.current_id() == "g000001"
    finally:
        weights.write_bytes(original)


def test_a_pinned_service_refuses_admin_activation(admin_app):
    make, store, _ = admin_app
    r = make(pin="g000001").post("/admin/v1/experts/activate", json={"generation": "g000002"}, headers=_auth(ADMIN))
    assert r.status_code == 409 and "experts.generation" in r.json()["error"]["message"]
    assert store.current_id() == "g000001"


def test_the_spec_declares_the_admin_scheme_and_statuses(admin_app):
    make, *_ = admin_app
    spec = make().get("/openapi.json", headers=_auth(QUERY)).json()
    op = spec["paths"]["/admin/v1/experts/activate"]["post"]
    assert op["security"] == [{"adminKey": []}] and {"401", "403", "404", "409", "422"} <= set(op["responses"])
    assert spec["paths"]["/healthz"]["get"].get("security") is None
    json.dumps(spec)


def test_admin_open_only_on_a_loopback_host():
    with pytest.raises(ConfigError, match="http.admin_open"):
        config_from_dict({"http": {"host": "0.0.0.0", "admin_open": True}})
    assert config_from_dict({"http": {"admin_open": True}}).http.admin_open


def test_remove_publishes_the_current_generation_without_the_expert(admin_app):
    """DELETE /admin/v1/experts/{name}: a new current generation without it, the replica switched;
    the generation before keeps its files (replicas still on it are unaffected). Runs last: it
    publishes into the module's store."""
    make, store, live = admin_app
    client = make()
    assert client.post("/admin/v1/experts/activate", json={"generation": "g000002"}, headers=_auth(ADMIN)).status_code == 200
    for name, status in (("gamma", 404), ("-bad", 422), ("base", 422)):
        r = client.delete(f"/admin/v1/experts/{name}", headers=_auth(ADMIN))
        assert r.status_code == status and r.json()["error"]["param"] == "name", (name, r.text)
    assert store.current_id() == "g000002" and len(store.list()) == 2  # nothing published
    assert client.delete("/admin/v1/experts/beta", headers=_auth(QUERY)).status_code == 401
    r = client.delete("/admin/v1/experts/beta", params={"wait_s": 5}, headers=_auth(ADMIN))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["previous"] == "g000002" and body["experts"] == ["alpha"] and body["switched"]
    assert live.generation == body["generation"] == store.current_id() and live.encoder.experts == ["alpha"]
    store.get("g000002").verify()  # the old generation is whole


def test_a_stuck_encoder_replica_does_not_hold_an_admin_answer(published, monkeypatch):
    """Each sampled info call has its own deadline: a wedged replica is left out of the replica
    view instead of holding the admin answer. Before: no deadline, the answer waited forever."""
    import asyncio

    from serve.app.admin import service as admin_service

    store, g1, _ = published
    store.activate(g1)
    monkeypatch.setattr(admin_service, "INFO_TIMEOUT_S", 0.05)
    calls = []

    async def info():
        calls.append(1)
        if len(calls) % 2:
            await asyncio.sleep(3600)  # the wedged replica
        return {"replica": "ok", "generation": store.current_id()}

    client = TestClient(create_app(None, admin=AdminService(store, "current", info), admin_open=True))
    r = client.get("/admin/v1/experts/generations")
    assert r.status_code == 200 and r.json()["replicas"] == {"ok": store.current_id()}


def test_a_route_prefix_does_not_hide_the_admin_routes_from_their_keys(published):
    """Serve's proxy keeps the route prefix in the path and sets root_path: the key checks match
    the path the routes see. Before: `/rs/admin/…` passed the query-key branch (a query key, or no
    key at all, reached the admin API)."""
    store, _, _ = published

    async def info():
        return {"replica": "r1", "generation": store.current_id()}

    app = create_app(None, admin=AdminService(store, "current", info), admin_keys=frozenset({ADMIN}),
                     api_keys=frozenset({QUERY}))
    client = TestClient(app, root_path="/rs")
    assert client.get("/rs/admin/v1/experts/generations", headers=_auth(QUERY)).status_code == 401
    assert client.get("/rs/admin/v1/experts/generations", headers=_auth(ADMIN)).status_code == 200
    off = TestClient(create_app(None, admin=AdminService(store, "current", info)), root_path="/rs")
    assert off.get("/rs/admin/v1/experts/generations").status_code == 403
    assert client.get("/rs/healthz").status_code == 200  # the probes' route stays open


# -- jobs: register an adapter folder, train a domain -----------------------------------------------


@pytest.fixture
def jobs_app(published, model_path, tmp_path):
    """An admin app whose jobs run under tmp_path: a register root holding a real adapter, a data
    dir with one dataset (``alpha``)."""
    import shutil

    from serve.app.admin.jobs import AdminJobs
    from serve.app.settings import AdminJobSettings
    from serve.artifacts.jobs import JobStore

    store, g1, g2 = published
    store.activate(g2)
    root, data = tmp_path / "incoming", tmp_path / "data"
    shutil.copytree(store.get(g2).adapters()["beta"], root / "gamma")
    (data / "alpha").mkdir(parents=True)
    (data / "alpha" / "corpus.jsonl").write_text('{"_id": "d1", "text": "cells"}\n')
    jobs = AdminJobs(JobStore(tmp_path / "store"), AdminJobSettings(
        config={}, data_dir=str(data), register_root=str(root), model_path=str(model_path)))

    async def info():
        return {"replica": "r1", "generation": store.current_id()}

    def make(pin="current"):
        return TestClient(create_app(None, admin=AdminService(store, pin, info, jobs), admin_keys=frozenset({ADMIN}),
                                     api_keys=frozenset({QUERY})))

    return make, store, jobs, root


def _wrong_shapes(folder):
    """A LoRA adapter folder for a 768-wide base model (MiniLM is 384 wide)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["query"]}))
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_{}.weight"
    save_file({key.format("A"): np.zeros((8, 768), np.float32), key.format("B"): np.zeros((768, 8), np.float32)},
              str(folder / "adapter_model.safetensors"))


def test_bad_register_and_train_input_is_a_4xx_and_starts_nothing(jobs_app, tmp_path):
    """Every bad input the issue lists, refused before a job starts, the current generation
    untouched: path outside the root (.., absolute, a symlink out), missing files, an adapter of
    another base model (wrong shapes), unknown domain, bad names, an existing expert, no key or a
    query key."""
    make, store, jobs, root = jobs_app
    client = make()
    before = store.current_id()
    outside = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(root / "gamma", outside)
    (root / "link-out").symlink_to(outside)
    (root / "empty").mkdir()
    _wrong_shapes(root / "wide")
    shutil.copytree(root / "gamma", root / "smuggler")
    (root / "smuggler" / "notes").symlink_to(tmp_path / "elsewhere" / "adapter_config.json")  # a file outside
    (root / "loop").symlink_to(root / "loop")
    cases = [
        ({"name": "x", "adapter": "../elsewhere", "domain": "alpha"}, 422, "adapter", "outside experts.register_root"),
        ({"name": "x", "adapter": str(outside), "domain": "alpha"}, 422, "adapter", "outside experts.register_root"),
        ({"name": "x", "adapter": "link-out", "domain": "alpha"}, 422, "adapter", "outside experts.register_root"),
        ({"name": "x", "adapter": "nope", "domain": "alpha"}, 422, "adapter", "does not exist"),
        ({"name": "x", "adapter": "empty", "domain": "alpha"}, 422, "adapter", "adapter_config.json and adapter_model.safetensors missing"),
        ({"name": "x", "adapter": "wide", "domain": "alpha"}, 422, "adapter", "another base model"),
        ({"name": "x", "adapter": "smuggler", "domain": "alpha"}, 422, "adapter", "symbolic links (notes)"),
        ({"name": "x", "adapter": "loop", "domain": "alpha"}, 422, "adapter", "loop"),
        ({"name": "x", "adapter": "a" * 5000, "domain": "alpha"}, 422, "adapter", ""),
        ({"name": "x", "adapter": "gamma", "domain": "nowhere"}, 422, "domain", "not found"),
        ({"name": "x", "adapter": "gamma", "domain": "../alpha"}, 422, "domain", "invalid dataset name"),
        ({"name": "../x", "adapter": "gamma", "domain": "alpha"}, 422, "name", "invalid expert name"),
        ({"name": "beta", "adapter": "gamma", "domain": "alpha"}, 409, "name", "replace"),
        ({"name": "x", "adapter": "gamma", "domain": "alpha", "extra": 1}, 422, "extra", ""),
    ]
    for body, status, param, words in cases:
        r = client.post("/admin/v1/experts", json=body, headers=_auth(ADMIN))
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (body, err)
    for body, param in (({"domain": "nowhere"}, "domain"), ({"domain": "alpha", "steps": 0}, "steps")):
        r = client.post("/admin/v1/experts/train", json=body, headers=_auth(ADMIN))
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    good = {"name": "x", "adapter": "gamma", "domain": "alpha"}
    assert client.post("/admin/v1/experts", json=good).status_code == 401
    assert client.post("/admin/v1/experts", json=good, headers=_auth(QUERY)).status_code == 401
    assert client.post("/admin/v1/experts/train", json={"domain": "alpha"}, headers=_auth(QUERY)).status_code == 401
    r = make(pin=before).post("/admin/v1/experts", json=good, headers=_auth(ADMIN))
    assert r.status_code == 409 and "experts.generation" in r.json()["error"]["message"]
    assert store.current_id() == before and jobs.list(10) == []
    for bad, status in (("j1", 422), ("j20261201T000000000-abcdef", 404)):
        r = client.get(f"/admin/v1/jobs/{bad}", headers=_auth(ADMIN))
        assert r.status_code == status and r.json()["error"]["param"] == "job_id", r.text


def test_one_job_at_a_time_per_store(jobs_app):
    """A queued or running job holds the store's one slot: a second register/train is a 409 naming
    it; once it ended, the slot is free."""
    make, store, jobs, _ = jobs_app
    held = jobs.store.claim("train", {"domain": "alpha"})
    jobs.store.update(held.id, status="running")
    client = make()
    r = client.post("/admin/v1/experts/train", json={"domain": "alpha"}, headers=_auth(ADMIN))
    assert r.status_code == 409 and held.id in r.json()["error"]["message"], r.text
    r = client.get("/admin/v1/jobs", headers=_auth(ADMIN))
    assert [j["id"] for j in r.json()["jobs"]] == [held.id]
    r = client.get(f"/admin/v1/jobs/{held.id}", headers=_auth(ADMIN))
    assert r.status_code == 200 and r.json()["job"]["status"] == "running"
    jobs.store.update(held.id, status="failed")
    assert jobs.store.list(5)[0].status == "failed"


def test_the_runner_kills_a_job_past_its_deadline_and_records_why(published, model_path, tmp_path):
    """The watcher side with a real child process: one that outlives experts.job_timeout_s is killed
    (its whole session) and marked failed with the reason and the end of its log; one that exits
    without recording an outcome is marked failed with its exit code."""
    import asyncio
    import sys

    from serve.app.admin.jobs import AdminJobs
    from serve.app.errors import RequestError
    from serve.app.settings import AdminJobSettings
    from serve.artifacts.jobs import JobStore

    class Scripted(AdminJobs):
        script = ""

        def command(self, job_id, args):
            return [sys.executable, "-c", self.script]

    jobs = Scripted(JobStore(tmp_path), AdminJobSettings(config={}, data_dir=str(tmp_path), register_root=str(tmp_path),
                                                         model_path=str(model_path), timeout_s=1.5))

    async def run(script):
        jobs.script = script
        rec = await jobs.start("train", {"domain": "alpha"}, [])
        assert rec.status == "queued"
        await asyncio.gather(*jobs._watchers)
        return jobs.get(rec.id)

    rec, tail = asyncio.run(run("import time; print('working', flush=True); time.sleep(60)"))
    assert rec.status == "failed" and "job_timeout_s" in rec.error and "working" in rec.error and tail == ["working"]
    rec, _ = asyncio.run(run("import sys; print('boom'); sys.exit(3)"))
    assert rec.status == "failed" and rec.exit_code == 3 and "without recording an outcome" in rec.error

    class Unstartable(Scripted):
        def command(self, job_id, args):
            return [str(tmp_path / "no-such-program")]

    jobs = Unstartable(jobs.store, jobs.settings)
    with pytest.raises(RequestError) as err:
        asyncio.run(jobs.start("train", {"domain": "alpha"}, []))
    assert err.value.status == 409
    failed = jobs.store.list(1)[0]
    assert failed.status == "failed" and "did not start" in failed.error  # the slot is free again
    assert jobs.store.claim("train", {}).status == "queued"
