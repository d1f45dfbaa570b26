"""End to end: expert generations switched live on a real Serve app with two encoder replicas,
over real HTTP, while a closed-loop client keeps sending /v1/retrieve (issue 16)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from serve.cli.common import wait_healthy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live_service(tmp_path_factory, data_dir, ray_session, http_port, small_served_config, start_served):
    from ray import serve

    from serve.app.settings import ENCODER
    from serve.artifacts.experts import generation_store
    from serve.offline.indexing import build_index
    from serve.offline.training import train_domain_expert

    cfg = small_served_config(
        tmp_path_factory.mktemp("live"), http_port, 2, ["scifact"],
        experts={"watch_interval_s": 0.5},
        deployments={"encoder": {"num_replicas": 2, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}}},
        http={"port": http_port, "admin_open": True},  # loopback host: the admin API without keys
    )
    build_index(cfg, data_dir, progress=False)
    train_domain_expert(cfg, data_dir, "scifact", progress=False)  # publishes g000001: scifact
    url = start_served(cfg, data_dir)
    encoder = serve.get_deployment_handle(ENCODER, cfg.app_name)
    yield {"url": url, "cfg": cfg, "data_dir": data_dir, "store": generation_store(cfg), "encoder": encoder}
    serve.shutdown()


class ClosedLoop:
    """``concurrency`` clients sending /v1/retrieve until stopped; every answer is recorded."""

    def __init__(self, url: str, queries: list[str], concurrency: int = 3):
        self.url, self.queries, self.concurrency = url, queries, concurrency
        self.records: list[tuple[int, str | None, str]] = []  # (status, experts_generation, body head)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(concurrency)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                q = self.queries[i % len(self.queries)]
                i += self.concurrency
                try:
                    r = client.post(f"{self.url}/v1/retrieve", json={"query": q, "top_k": 5})
                    gen = r.json().get("experts_generation") if r.status_code == 200 else None
                    self.records.append((r.status_code, gen, r.text[:200]))
                except httpx.HTTPError as exc:
                    self.records.append((0, None, repr(exc)))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


def _replica_generations(encoder, want_replicas: int = 2, timeout_s: float = 60) -> dict[str, str]:
    """{replica id: generation} of every encoder replica (asked through the handle until each
    replica has answered)."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = encoder.info.remote().result(timeout_s=30)
        except Exception:  # noqa: BLE001 - a replica being replaced: ask again
            time.sleep(0.5)
            continue
        seen[info["replica"]] = info["generation"]
        if len(seen) >= want_replicas and len({*seen.values()}) == 1:
            return seen
        time.sleep(0.05)
    return seen


def _wait_every_replica_on(encoder, generation: str, timeout_s: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        seen = _replica_generations(encoder, timeout_s=10)
        if len(seen) >= 2 and set(seen.values()) == {generation}:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"replicas {seen} did not all switch to {generation} within {timeout_s} s")


def _routed(url: str, queries: list[str]) -> list[tuple[str, str]]:
    out = []
    for q in queries:
        body = httpx.post(f"{url}/v1/retrieve", json={"query": q, "top_k": 3}, timeout=60).json()
        out.append((body["expert"], body["experts_generation"]))
    return out


def test_add_remove_and_rollback_switch_every_replica_live_without_a_failed_request(live_service):
    """Under a closed-loop client: add an expert (train nfcorpus), remove another (scifact), roll
    back. Every answer is a 200 naming the generation that served it; after each activation both
    encoder replicas serve the new generation; the new expert's queries route to it; after the
    rollback a restarted replica starts cleanly on a generation whose expert the draft no longer
    has (its own copy). Before: experts loaded once per replica, `experts remove` deleted files the
    deployment still pointed to, and a restarted replica failed."""
    from actors.beir import load_queries
    from serve.offline.ir import training_queries
    from serve.artifacts.experts import remove_expert
    from serve.offline.training import train_domain_expert

    url, cfg, store, encoder = (live_service[k] for k in ("url", "cfg", "store", "encoder"))
    g1 = store.current_id()
    assert set(_replica_generations(encoder).values()) == {g1}
    nf_queries = [t for _, t, _ in training_queries(live_service["data_dir"], "nfcorpus", 8)]
    sci_queries = list(load_queries(live_service["data_dir"], "scifact").values())[:4]
    assert {e for e, _ in _routed(url, nf_queries)} <= {"scifact", "base"}  # no nfcorpus expert yet
    assert httpx.post(f"{url}/v1/retrieve", json={"query": "x", "expert": "nfcorpus"}, timeout=60).status_code == 404

    with ClosedLoop(url, sci_queries + nf_queries) as load:
        # 1. add: a newly trained expert is published and activated; every replica follows
        train_domain_expert(cfg, live_service["data_dir"], "nfcorpus", progress=False)
        g2 = store.current_id()
        assert g2 != g1 and set(store.get(g2).experts) == {"nfcorpus", "scifact"}
        _wait_every_replica_on(encoder, g2)
        routed = _routed(url, nf_queries)
        assert all(gen == g2 for _, gen in routed)
        assert sum(e == "nfcorpus" for e, _ in routed) >= len(routed) // 2, routed
        forced = httpx.post(f"{url}/v1/retrieve", json={"query": "x", "expert": "nfcorpus"}, timeout=60)
        assert forced.status_code == 200 and forced.json()["expert"] == "nfcorpus"  # the ingress's list refreshed
        # 2. remove: the draft loses scifact; the new generation has nfcorpus only
        remove_expert(cfg, "scifact")
        g3 = store.current_id()
        assert store.get(g3).experts == ["nfcorpus"]
        _wait_every_replica_on(encoder, g3)
        assert httpx.post(f"{url}/v1/retrieve", json={"query": "x", "expert": "scifact"}, timeout=60).status_code == 404
        experts = httpx.get(f"{url}/v1/experts", timeout=30).json()
        assert experts["experts_generation"] == g3 and [e["name"] for e in experts["experts"]] == ["nfcorpus"]
        # the corpus guard: scifact's documents stay in the index without their expert; a query whose base
        # top 10 are at least 80 % scifact answers with those base hits instead of the nfcorpus expert's
        assert experts["corpora_without_expert"] == ["scifact"] and experts["unknown_corpus_share"] == 0.8
        held = 0
        for q in sci_queries:
            base = httpx.post(f"{url}/v1/retrieve", json={"query": q, "top_k": 10, "expert": "base"}, timeout=60).json()
            body = httpx.post(f"{url}/v1/retrieve", json={"query": q, "top_k": 10}, timeout=60).json()
            share = sum(h["dataset"] == "scifact" for h in base["hits"]) / len(base["hits"])
            assert (body["expert"], body["selected_by"]) == (("base", "corpus") if share >= 0.8 else ("nfcorpus", "routed"))
            if body["selected_by"] == "corpus":
                held += 1
                assert [h["doc_id"] for h in body["hits"]] == [h["doc_id"] for h in base["hits"]]
        assert held >= 1  # scifact's own queries: most of their base neighbours are scifact documents
        # 3. roll back to g2 through the admin API (scifact again, from g2's own copy: the draft's
        #    folder is gone); the answer waits until the sampled replicas serve it
        answer = httpx.post(f"{url}/admin/v1/experts/rollback", json={"wait_s": 15}, timeout=60).json()
        assert answer["generation"] == g2 and answer["previous"] == g3 and answer["switched"], answer
        assert store.current_id() == g2
        _wait_every_replica_on(encoder, g2)
        time.sleep(1)
    statuses = [s for s, _, _ in load.records]
    failed = [(s, body) for s, _, body in load.records if s != 200]
    assert len(statuses) > 30 and not failed, failed[:5]
    assert {g for _, g, _ in load.records} <= {g1, g2, g3} and {g2, g3} <= {g for _, g, _ in load.records}

    # 4. a replica restarted now starts on the current generation, scifact included
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "#ExpertEncoder#" in a["name"]]
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        fresh = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_REPLICA::") and "#ExpertEncoder#" in a["name"] and a["name"] not in names]
        if fresh:
            break
        time.sleep(1)
    assert fresh, "Serve did not replace the killed encoder replica"
    wait_healthy(url, 120)
    seen = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (len(seen) == 2 and set(seen.values()) == {g2}):
        seen = _replica_generations(encoder, timeout_s=20)
    assert len(seen) == 2 and set(seen.values()) == {g2}, seen
    forced = httpx.post(f"{url}/v1/retrieve", json={"query": "x", "expert": "scifact"}, timeout=60)
    assert forced.status_code == 200 and forced.json()["experts_generation"] == g2


def test_the_switches_are_in_the_metrics(live_service):
    """Each encoder replica exports the generation it serves and its reloads (a real scrape of the
    Ray nodes' metrics endpoints, as Prometheus would)."""
    from serve.app.metrics import wait_for_series

    missing, _ = wait_for_series([
        ("ray_routerserve_experts_generation", {"deployment": "ExpertEncoder"}),
        ("ray_routerserve_experts_reloads_total", {"deployment": "ExpertEncoder", "outcome": "ok"}),
        ("ray_routerserve_experts_reload_seconds_bucket", {"deployment": "ExpertEncoder"}),
    ], timeout_s=60)
    assert not missing, missing


def test_the_cli_drives_the_admin_api_of_a_running_service(live_service):
    """`routerserve experts remove|rollback|generations --url`: the same operations through the
    running service's admin API (this fixture opens it on its loopback host)."""
    from typer.testing import CliRunner

    from serve.cli import app

    url, store, encoder = live_service["url"], live_service["store"], live_service["encoder"]
    runner = CliRunner()
    before = store.current_id()
    assert "scifact" in store.get(before).experts
    r = runner.invoke(app, ["experts", "remove", "scifact", "--url", url])
    assert r.exit_code == 0 and "every sampled replica serves it" in " ".join(r.output.split()), r.output
    after = store.current_id()
    assert after != before and "scifact" not in store.get(after).experts
    assert set(_replica_generations(encoder).values()) == {after}
    r = runner.invoke(app, ["experts", "rollback", "--url", url])
    assert r.exit_code == 0 and before in r.output and store.current_id() == before, r.output
    r = runner.invoke(app, ["experts", "generations", "--url", url])
    assert r.exit_code == 0 and after in r.output and "encoder replicas sampled" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["experts", "remove", "no-such", "--url", url])
    assert r.exit_code == 1 and "404" in r.output and store.current_id() == before


def test_a_pinned_generation_must_exist_before_the_app_builds(live_service):
    """experts.generation pins one (the cluster's way): building the app — what `k8s validate
    --artifacts-dir` does with the cluster's config — names a pin that is not published, and a
    pin of a published one goes to every encoder replica as Serve's user_config."""
    from serve.app.builders import build_app
    from serve.app.settings import ENCODER, deployment_options
    from serve.artifacts.generations import GenerationError

    cfg = live_service["cfg"].model_copy(deep=True)
    cfg.experts.generation = "g000099"
    with pytest.raises(GenerationError, match="no generation g000099"):
        build_app({"config": cfg, "data_dir": str(live_service["data_dir"])})
    store = live_service["store"]
    cfg.experts.generation = store.list()[0].id
    build_app({"config": cfg, "data_dir": str(live_service["data_dir"])})
    assert deployment_options(cfg)[ENCODER]["user_config"] == {"generation": cfg.experts.generation}
    # a pinned service needs no CURRENT.json (a volume filled by copying generations only)
    aside = store.pointer_path.with_name("CURRENT.aside")
    store.pointer_path.rename(aside)
    try:
        build_app({"config": cfg, "data_dir": str(live_service["data_dir"])})
    finally:
        aside.rename(store.pointer_path)


def _job_until_done(url: str, job_id: str, timeout_s: float = 300) -> tuple[dict, list[dict]]:
    """Poll GET /admin/v1/jobs/{id} until the job ends: (last answer, every distinct state seen)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/admin/v1/jobs/{job_id}", timeout=30).json()
        j = body["job"]
        state = {k: j[k] for k in ("status", "stage", "done", "total")}
        if not seen or seen[-1] != state:
            seen.append(state)
        if j["status"] not in ("queued", "running"):
            return body, seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {seen[-1]} after {timeout_s} s")


def test_admin_jobs_register_an_adapter_folder_and_train_a_domain(live_service):
    """POST /admin/v1/experts (an adapter folder under experts.register_root) and POST
    /admin/v1/experts/train run as jobs of the running service (202 + a job id); the job's
    progress is readable while it runs; on success its generation is current and every replica
    serves it; the CLI's `experts add --url` follows a job to its end. Before: neither route
    existed (register and train were offline commands only)."""
    import shutil

    from typer.testing import CliRunner

    from serve.cli import app

    url, cfg, store, encoder = (live_service[k] for k in ("url", "cfg", "store", "encoder"))
    current = store.current()
    assert "scifact" in current.experts
    root = cfg.experts.register_root_path()
    shutil.copytree(current.adapters()["scifact"], root / "uploaded")  # an adapter "trained elsewhere"
    register = {"name": "scifact", "adapter": "uploaded", "domain": "scifact"}

    # register through the API: an existing name needs "replace"; then 202, Location, the job to its end
    r = httpx.post(f"{url}/admin/v1/experts", json=register, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["param"] == "name", r.text
    r = httpx.post(f"{url}/admin/v1/experts", json={**register, "replace": True}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert r.headers["location"] == f"/admin/v1/jobs/{job['id']}" and job["status"] == "queued"
    body, seen = _job_until_done(url, job["id"])
    assert body["job"]["status"] == "succeeded", (body["job"], body["log_tail"])
    gen = body["job"]["result"]["generation"]
    assert gen == store.current_id() != current.id and set(store.get(gen).experts) == set(current.experts)
    assert [s["stage"] for s in body["job"]["stages"]] == ["loading the adapter onto the base model", "pilots of scifact",
                                                           "publishing"], body["job"]["stages"]
    assert seen[0]["status"] == "queued" and seen[-1]["status"] == "succeeded"
    _wait_every_replica_on(encoder, gen)
    forced = httpx.post(f"{url}/v1/retrieve", json={"query": "cell biology", "expert": "scifact"}, timeout=60)
    assert forced.status_code == 200 and forced.json()["experts_generation"] == gen

    # train through the API: the training stage reports its steps
    r = httpx.post(f"{url}/admin/v1/experts/train", json={"domain": "scifact", "steps": 4}, timeout=60)
    assert r.status_code == 202, r.text
    body, seen = _job_until_done(url, r.json()["job"]["id"])
    assert body["job"]["status"] == "succeeded", (body["job"], body["log_tail"])
    assert body["job"]["result"]["steps"] == 4 and body["job"]["result"]["generation"] == store.current_id()
    training = [s for s in body["job"]["stages"] if s["stage"] == "training"]
    assert len(training) == 1 and training[0]["done"] == training[0]["total"] == 4, body["job"]["stages"]
    _wait_every_replica_on(encoder, store.current_id())

    # the CLI: refused at once without --replace; with it, followed to the end
    runner = CliRunner()
    cli = ["experts", "add", "scifact", "--adapter", "uploaded", "--domain", "scifact", "--url", url]
    res = runner.invoke(app, cli)
    assert res.exit_code == 1 and "409" in res.output, res.output
    res = runner.invoke(app, [*cli, "--replace"])
    assert res.exit_code == 0 and "succeeded" in res.output and store.current_id() in res.output, res.output
    listed = httpx.get(f"{url}/admin/v1/jobs", timeout=30).json()["jobs"]
    assert [j["status"] for j in listed[:3]] == ["succeeded"] * 3 and listed[2]["id"] == job["id"]
    res = runner.invoke(app, ["experts", "jobs", job["id"], "--url", url])
    assert res.exit_code == 0 and f"job {job['id']} (register): succeeded" in res.output, res.output
    res = runner.invoke(app, ["experts", "jobs", "--url", url])
    assert res.exit_code == 0 and "succeeded" in res.output and "train" in res.output, res.output
