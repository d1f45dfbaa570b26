"""End to end: a real local Ray cluster, the Ray Data index job, trained experts, the real Serve
app, driven over real HTTP. Started once per module (≈1–2 min on 2 cores).

The index is an IVF index (trained as a Ray task, 3 shards filled from one template, memory-mapped
by the shard replicas) searched with nprobe = its 8 lists by default: exhaustive, so answers equal
exact search, while a request's own nprobe makes it approximate."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from actors.encoder import EncoderEngine
from actors.routed_encoder import RoutedEncoder
from actors.routing import PilotSet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir, ray_session, http_port, small_served_config, start_served):
    from ray import serve

    from serve.artifacts.experts import enabled_experts, pilots_path
    from serve.offline.training import train_domain_expert
    from serve.offline.indexing import build_index

    cfg = small_served_config(tmp_path_factory.mktemp("served"), http_port, 3, ["scifact", "nfcorpus"],
                              index={"factory": "IVF8,Flat", "train_size": 200}, search={"nprobe": 8, "mmap": True})
    folder = build_index(cfg, data_dir, progress=False)
    for domain in ("scifact", "nfcorpus"):
        train_domain_expert(cfg, data_dir, domain, progress=False)
    url = start_served(cfg, data_dir)
    # An in-process reference: the same adapters, pilots and vectors, no Serve, no shards.
    from serve.artifacts.models import encoder_settings
    from serve.artifacts.models import resolve_model

    engine = EncoderEngine(resolve_model(cfg.model.ref), enabled_experts(cfg), encoder_settings(cfg))
    reference = RoutedEncoder(engine, PilotSet.load(pilots_path(cfg)), cfg.experts.policy)
    from serve.offline.indexing import load_corpus_vectors

    corpus = load_corpus_vectors(cfg, data_dir, cfg.corpus.datasets, progress=False)
    vectors, doc_ids = corpus.vectors, corpus.doc_ids
    yield {"url": url, "cfg": cfg, "folder": folder, "reference": reference, "vectors": vectors, "doc_ids": doc_ids, "data_dir": data_dir}
    serve.shutdown()


def _expected_ids(served, query: str, expert: str | None, k: int) -> tuple[str, list[str]]:
    batch = served["reference"].route_and_encode([query], [expert])
    q = batch.queries[0]
    order = np.argsort(-(served["vectors"] @ q.embedding), kind="stable")[:k]
    return q.expert, [served["doc_ids"][i] for i in order]


def test_health_and_experts(served):
    h = httpx.get(f"{served['url']}/healthz").json()
    assert h["status"] == "ok" and h["num_docs"] == 240 and len(h["shards"]) == 3
    assert sum(s["ntotal"] for s in h["shards"]) == 240
    assert all(s["index"] == "IVF8,Flat" and s["knobs"] == {"nprobe": 8} and s["mmap"] for s in h["shards"])
    ex = httpx.get(f"{served['url']}/v1/experts").json()
    assert sorted(e["name"] for e in ex["experts"]) == ["nfcorpus", "scifact"]
    assert all(e["num_pilots"] >= 1 for e in ex["experts"])
    assert ex["pilot_rule"] == "best_expert margin=0 min_queries=1"  # the test config keeps the paper's rule
    assert ex["confidence_floor"] is False and ex["confidence_floor_kind"] is None  # ... and no floor


@pytest.mark.parametrize(
    "query",
    ["Vitamin D supplementation reduces the risk of respiratory infection.", "Is red meat bad for your heart?"],
)
def test_routed_retrieval_through_shards_equals_single_index(served, query):
    r = httpx.post(f"{served['url']}/v1/retrieve", json={"query": query, "top_k": 10}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    expert, ids = _expected_ids(served, query, None, 10)
    assert body["expert"] == expert and body["expert"] in ("scifact", "nfcorpus") and body["selected_by"] == "routed"
    assert [h["doc_id"] for h in body["hits"]] == ids
    assert body["hits"] == sorted(body["hits"], key=lambda h: -h["score"])
    assert body["index"] == "IVF8,Flat" and body["search_params"] == {"nprobe": 8}


def test_a_request_sets_the_search_knob_within_bounds(served):
    url, q = served["url"], {"query": "Is red meat bad for your heart?", "top_k": 10, "expert": "base"}
    exact = httpx.post(f"{url}/v1/retrieve", json=q, timeout=60).json()
    one = httpx.post(f"{url}/v1/retrieve", json={**q, "nprobe": 1}, timeout=60).json()
    assert one["search_params"] == {"nprobe": 1} and len(one["hits"]) == 10
    assert [h["doc_id"] for h in one["hits"]] != [h["doc_id"] for h in exact["hits"]]  # one list of eight
    for body, field in [({**q, "nprobe": 0}, "nprobe"), ({**q, "nprobe": 5000}, "nprobe"), ({**q, "ef_search": 8}, "ef_search")]:
        r = httpx.post(f"{url}/v1/retrieve", json=body, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


def test_concurrent_requests_batch_and_mix_experts(served):
    queries = [f"dietary factors and disease risk, variant {i}" for i in range(24)]
    experts = ["scifact", "nfcorpus", "base"] * 8

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{served['url']}/v1/retrieve", json={"query": q, "top_k": 5, "expert": e})
                    for q, e in zip(queries, experts)
                )
            )

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    for q, e, body in zip(queries, experts, bodies):
        assert body["expert"] == e and body["forced"] and body["selected_by"] == "forced"
        assert [h["doc_id"] for h in body["hits"]] == _expected_ids(served, q, e, 5)[1]
    # Concurrent requests were served in shared batches (one encoder call for several queries).
    assert max(b["timings_ms"]["encoder_batch_queries"] for b in bodies) > 1
    assert max(b["timings_ms"]["batch_size"] for b in bodies) > 1


@pytest.mark.parametrize(
    "kwargs, status",
    [
        ({"json": {"query": "", "top_k": 3}}, 422),
        ({"json": {"query": "x", "top_k": 0}}, 422),
        ({"json": {"query": "x", "top_k": 10_000}}, 422),
        ({"json": {"query": "x" * 5000}}, 422),  # over limits.max_query_chars: declared in the spec
        ({"json": {"query": "x" * 2_000_000}}, 413),  # over limits.max_body_bytes
        ({"json": {"query": "x", "expert": "physics"}}, 404),
        ({"json": {"query": ["not", "a", "string"]}}, 422),
        ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 422),
    ],
)
def test_bad_input_is_a_4xx_json_error_and_the_service_survives(served, kwargs, status):
    r = httpx.post(f"{served['url']}/v1/retrieve", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    ok = httpx.post(f"{served['url']}/v1/retrieve", json={"query": "insulin", "top_k": 1}, timeout=30)
    assert ok.status_code == 200


def test_embeddings_endpoint_matches_the_expert_encoder(served):
    r = httpx.post(
        f"{served['url']}/v1/embeddings",
        json={"model": "all-MiniLM-L6-v2:scifact", "input": ["cell biology", "diet"]},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want = served["reference"].engine.encode(["cell biology", "diet"], "scifact")
    np.testing.assert_allclose(got, want, atol=1e-5)
    bad = httpx.post(f"{served['url']}/v1/embeddings", json={"model": "gpt-4", "input": "x"})
    assert bad.status_code == 404


def test_openapi_is_served(served):
    spec = httpx.get(f"{served['url']}/openapi.json").json()
    assert "/v1/retrieve" in spec["paths"] and "/v1/embeddings" in spec["paths"]


def test_index_build_is_cached_and_resumes_after_losing_a_chunk(served):
    from actors.index_store import IndexManifest

    from serve.offline.indexing import build_index

    cfg, folder = served["cfg"], served["folder"]
    manifest = folder / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert build_index(cfg, served["data_dir"], progress=False) == folder
    assert manifest.stat().st_mtime_ns == stamp  # cached: nothing rebuilt
    # the union's vectors are the two datasets' own caches (what expert training encoded): 2 x 2 chunks
    chunks = sorted(Path(cfg.index.dir).glob("*/chunks/chunk_*.npy"))
    assert len(chunks) == 4 and not (folder.parent / "chunks").exists()
    kept = {p: p.stat().st_mtime_ns for p in chunks}
    trained = folder.parent / IndexManifest.load(folder).trained_file
    trained_stamp = trained.stat().st_mtime_ns
    lost = chunks[1]
    before = np.load(lost)
    lost.unlink()
    shutil.rmtree(folder)
    build_index(cfg, served["data_dir"], progress=False)
    np.testing.assert_allclose(np.load(lost), before, atol=1e-5)
    for p in chunks:
        if p != lost:
            assert p.stat().st_mtime_ns == kept[p]  # only the missing chunk was re-encoded
    assert manifest.is_file()
    rebuilt = IndexManifest.load(folder)
    assert trained.stat().st_mtime_ns == trained_stamp and rebuilt.train_seconds == 0.0  # the template was reused


def test_shards_of_one_trained_template_merge_to_the_same_answer_at_any_count(served):
    """All shards share the trained quantizer: 2 shards and 3 shards give the same ids for the same
    nprobe, also when it is approximate (nprobe 2 of 8 lists)."""
    from actors.index_store import IndexManifest
    from actors.search import ShardSearcher, merge_topk

    from serve.offline.indexing import build_index

    cfg = served["cfg"].model_copy(deep=True)
    cfg.index.num_shards = 2
    answers = []
    queries = served["reference"].engine.encode(["salt intake", "vitamin D", "protein folding", "heart disease"])
    for folder in (served["folder"], build_index(cfg, served["data_dir"], progress=False)):
        m = IndexManifest.load(folder)
        assert m.factory == "IVF8,Flat" and m.knobs == ["nprobe"]
        shards = [ShardSearcher(folder / e.file, e.offset, factory=m.factory, defaults={"nprobe": 2}, mmap=True)
                  for e in m.shards]
        answers.append(merge_topk([s.search(queries, 10) for s in shards], 10)[1])
    assert len(IndexManifest.load(folder).shards) == 2
    np.testing.assert_array_equal(answers[0], answers[1])


def test_cli_query_pretty_prints_a_served_answer(served):
    from typer.testing import CliRunner

    from serve.cli import app

    r = CliRunner().invoke(app, ["query", "salt intake and blood pressure", "--url", served["url"], "-k", "3"])
    assert r.exit_code == 0, r.output
    assert "expert:" in r.output and "policy: pilot_knn" in r.output
    r = CliRunner().invoke(app, ["query", "x", "--url", served["url"], "--expert", "nope"])
    assert r.exit_code == 1 and "404" in r.output


def test_metrics_contract_from_a_real_scrape(served):
    """The project's retrieval metrics, with their labels, in a real scrape of the Ray metrics
    endpoint after real traffic (Ray exports on an interval: poll up to a minute)."""
    from serve.app.metrics import wait_for_series

    url = served["url"]
    assert httpx.post(f"{url}/v1/retrieve", json={"query": "vitamin D and infections", "top_k": 3}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/retrieve", json={"query": "salt", "top_k": 3, "expert": "base"}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/embeddings", json={"model": "base", "input": ["a", "b", "c"]}, timeout=60).status_code == 200
    assert httpx.post(f"{url}/v1/retrieve", json={"query": 3}, timeout=60).status_code == 422

    wanted = [
        ("ray_routerserve_expert_selected_total", {"how": "routed", "deployment": "ExpertEncoder"}),
        ("ray_routerserve_expert_selected_total", {"expert": "base", "how": "forced"}),
        ("ray_routerserve_routing_confidence_bucket", {"deployment": "ExpertEncoder"}),
        ("ray_routerserve_encoder_batch_size_bucket", {"stage": "route"}),
        ("ray_routerserve_encoder_batch_size_bucket", {"stage": "embed"}),
        ("ray_routerserve_shard_search_latency_ms_bucket", {"deployment": "SearchShard0", "shard": "shard_000",
                                                            "index": "IVF8,Flat", "knob": "nprobe=8"}),
        ("ray_routerserve_errors_total", {"endpoint": "/v1/retrieve", "reason": "422:validation",
                                          "deployment": "RetrievalIngress"}),
        ("ray_serve_num_http_requests_total", {"route": "/v1/retrieve"}),
    ]
    missing, series = wait_for_series(wanted, timeout_s=60)
    assert missing == []
    routed = [s for s in series["ray_routerserve_expert_selected_total"] if s.get("how") == "routed"]
    assert {s["expert"] for s in routed} <= {"scifact", "nfcorpus", "base"}
    assert all({"application", "replica"} <= set(s) for s in routed)


def test_schemathesis_all_checks_pass_on_the_retrieval_endpoints_through_serve(served, schemathesis_cli, tmp_path):
    """The OpenAPI contract through the real Serve proxy and ingress (schemathesis --checks all)."""
    done = schemathesis_cli(served["url"], tmp_path, "--max-examples", "25",
                            "--include-path-regex", "^/v1/(retrieve|embeddings|experts)$")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    generated = int(next(line.split()[0] for line in done.stdout.splitlines() if " generated, " in line))
    assert generated >= 100, done.stdout[-2000:]


def test_overload_is_refused_at_once_with_503_and_retry_after(served):
    """600 requests at once against the default admission (proxy: 64 queued for the ingress; the
    ingress: 512 ongoing, limits.max_waiting and limits.max_queue_wait_s): the excess is refused
    with 503 + Retry-After instead of queueing — by Serve's proxy past its queue, by the ingress
    (JSON) past its waiting room; every request gets an answer (no 500, no 408 from the proxy's
    backstop, no client timeout) and the service stays healthy. Before: no max_queued_requests,
    every request queued until its client gave up; then, with 64 ingress slots, requests waited
    in the proxy's queue, outside every deadline of ours, and some got the proxy's plain-text 408."""
    url = served["url"]

    async def flood():
        limits = httpx.Limits(max_connections=700, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(
                client.post(f"{url}/v1/retrieve", json={"query": f"overload probe {i}", "top_k": 3})
                for i in range(600)
            ))

    responses = asyncio.run(flood())
    by_status = {}
    for r in responses:
        by_status.setdefault(r.status_code, []).append(r)
    assert set(by_status) <= {200, 503}, {s: rs[0].text[:200] for s, rs in by_status.items()}
    # at least one batch's worth answered (how many the admission lets through depends on the
    # host's speed), and the flood refused (>= 50: a busy host sends the 600 slowly enough that
    # fewer pile up)
    assert len(by_status.get(503, [])) >= 50 and len(by_status.get(200, [])) >= 32
    assert all(int(r.headers["retry-after"]) >= 1 for r in by_status[503])
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert httpx.post(f"{url}/v1/retrieve", json={"query": "insulin", "top_k": 1}, timeout=60).status_code == 200


def test_a_killed_shard_replica_is_a_503_naming_it_then_recovers(served):
    """ray.kill on SearchShard1's replica: while Serve replaces it, requests answer 200 or 503 +
    Retry-After (never a 500 or a partial result); then the service is whole again.
    Before: a request holding the dead replica got 500 "internal error (ActorDiedError)"."""
    import ray

    url = served["url"]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "#SearchShard1#" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    statuses, refusals = [], []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/v1/retrieve", json={"query": "blood pressure", "top_k": 5}, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 503:
            refusals.append(r)
        if r.status_code == 200 and len(statuses) > 3:
            body = r.json()
            if len(body["hits"]) == 5:
                break
        time.sleep(0.2)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[-1] == 200
    for r in refusals:
        assert "retry-after" in r.headers and r.json()["error"]["code"] == 503
    assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
