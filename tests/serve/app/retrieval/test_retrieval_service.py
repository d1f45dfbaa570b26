"""RetrievalService + HTTP router in-process (no Ray): the same code the Serve ingress runs."""

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from actors.index_store import DocStore
from actors.routed_encoder import RoutedEncoder
from actors.search import ShardSearcher, build_flat_index
from serve.config import LimitsConfig
from serve.app.ingress import create_app
from serve.app.retrieval.protocol import RetrieveRequest
from serve.app.retrieval.service import LocalEncoderClient, LocalShardClient, RetrievalService

JSON = {"content-type": "application/json"}  # bodies sent as json.dumps writes them (escaped surrogates too)


def test_retrieve_routes_and_hits_match_a_brute_force_search(stack):
    q = "protein expression in cancer cells"
    r = stack["client"].post("/v1/retrieve", json={"query": q, "top_k": 5, "include_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expert"] in ("alpha", "beta") and not body["forced"]
    assert set(body["routing_scores"]) == {"alpha", "beta"}
    assert body["expert"] == max(body["routing_scores"], key=body["routing_scores"].get)
    qv = stack["engine"].encode([q], body["expert"])[0]
    want = np.argsort(-(stack["vectors"] @ qv), kind="stable")[:5]
    assert [h["doc_id"] for h in body["hits"]] == [stack["docs"][i].doc_id for i in want]
    assert body["hits"][0]["text"] == stack["docs"][want[0]].text
    assert {"total_ms", "encode_ms", "search_ms"} <= set(body["timings_ms"])


def test_forced_base_and_expert(stack):
    c = stack["client"]
    base = c.post("/v1/retrieve", json={"query": "insulin", "top_k": 3, "expert": "base"}).json()
    beta = c.post("/v1/retrieve", json={"query": "insulin", "top_k": 3, "expert": "beta"}).json()
    assert base["expert"] == "base" and base["forced"] and beta["expert"] == "beta"
    assert "text" not in base["hits"][0] or base["hits"][0]["text"] is None


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"query": "", "top_k": 3}, 422, "query"),
        ({"query": " \t\n ", "top_k": 3}, 422, "query: must not be blank"),
        ({"query": "x" * 201}, 422, "query: String should have at most 200 characters"),
        ({"query": "ok", "top_k": 0}, 422, "top_k"),
        ({"query": "ok", "top_k": 21}, 422, "top_k"),
        ({"query": "ok", "top_k": "5"}, 422, "top_k"),
        ({"query": 5}, 422, "query"),
        ({"top_k": 3}, 422, "query"),
        ({"query": "ok", "expert": "gamma"}, 404, "unknown expert 'gamma'"),
        ({"query": "ok", "colour": "red"}, 422, "unknown field"),
        ({"query": "ok \ud800 then"}, 422, "query: not valid Unicode text (a lone surrogate at character 3)"),
        ({"query": "ok", "expert": "\udfff"}, 422, "expert"),
        ({"query": "ok", "nprobe": 4}, 422, "nprobe: the index is 'Flat', which has no nprobe"),
        ({"query": "ok", "ef_search": 4}, 422, "ef_search: the index is 'Flat', which has no ef_search"),
    ],
)
def test_bad_retrieve_requests_are_4xx_json(stack, body, status, needle):
    r = stack["client"].post("/v1/retrieve", content=json.dumps(body), headers=JSON)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status


def test_malformed_json_is_422(stack):
    r = stack["client"].post("/v1/retrieve", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_embeddings_openai_shape_and_expert_selection(stack):
    c, engine = stack["client"], stack["engine"]
    r = c.post("/v1/embeddings", json={"model": "mini", "input": ["a b", "c"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    np.testing.assert_allclose(body["data"][0]["embedding"], engine.encode(["a b"])[0], atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(engine.count_tokens(["a b", "c"]))
    ex = c.post("/v1/embeddings", json={"model": "mini:alpha", "input": "a b", "encoding_format": "base64"}).json()
    import base64

    vec = np.frombuffer(base64.b64decode(ex["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(vec, engine.encode(["a b"], "alpha")[0], atol=1e-5)
    assert c.post("/v1/embeddings", json={"model": "base", "input": "x"}).status_code == 200


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "other", "input": "x"}, 404, "unknown model"),
        ({"model": "mini:gamma", "input": "x"}, 404, "unknown model"),
        ({"model": "mini", "input": []}, 422, "List should have at least 1 item"),
        ({"model": "mini", "input": ["a"] * 5}, 422, "List should have at most 4 items"),
        ({"model": "mini", "input": ["a", ""]}, 422, "input.texts[1]: String should have at least 1 character"),
        ({"model": "mini", "input": ["a", "b\udc00"]}, 422, "lone surrogate"),
        ({"model": "mini", "input": "x", "dimensions": 7}, 422, "dimensions"),
        ({"model": "mini", "input": [1, 2]}, 422, "input"),
    ],
)
def test_bad_embedding_requests(stack, body, status, needle):
    r = stack["client"].post("/v1/embeddings", content=json.dumps(body), headers=JSON)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_experts_health_and_openapi(stack):
    c = stack["client"]
    ex = c.get("/v1/experts").json()
    assert [e["name"] for e in ex["experts"]] == ["alpha", "beta"] and ex["policy"] == "pilot_knn"
    h = c.get("/healthz")
    assert h.status_code == 200 and h.json()["num_docs"] == 60
    spec = c.get("/openapi.json").json()
    assert {"/v1/retrieve", "/v1/embeddings", "/v1/experts", "/healthz"} <= set(spec["paths"])


def test_health_is_503_when_shards_do_not_cover_the_docs(stack, engine, tmp_path, mean_pilots):
    DocStore.write(tmp_path / "d.parquet", stack["docs"])  # 60 docs, but the shard holds 10 vectors
    pilots = mean_pilots(engine, {"alpha": ["x"], "beta": ["y"]})
    service = RetrievalService(
        LocalEncoderClient(RoutedEncoder(engine, pilots), "m"),
        [LocalShardClient(ShardSearcher(index=build_flat_index(stack["vectors"][:10])))],
        DocStore(tmp_path / "d.parquet"),
        LimitsConfig(),
        "mini",
    )
    r = TestClient(create_app(service)).get("/healthz")
    assert r.status_code == 503 and "10 vectors for 60 documents" in r.json()["error"]


def test_routed_encoder_requires_pilots_for_every_expert(engine):
    with pytest.raises(ValueError, match="experts without pilot embeddings"):
        RoutedEncoder(engine, None)


def test_zero_experts_serves_the_base_model(stack, engine, model_path, encoder_settings, tmp_path):
    from actors.encoder import EncoderEngine

    plain = EncoderEngine(model_path, None, encoder_settings)
    DocStore.write(tmp_path / "d.parquet", stack["docs"])
    service = RetrievalService(
        LocalEncoderClient(RoutedEncoder(plain, None), "m"),
        [LocalShardClient(ShardSearcher(index=build_flat_index(stack["vectors"])))],
        DocStore(tmp_path / "d.parquet"),
        LimitsConfig(),
        "mini",
    )
    c = TestClient(create_app(service))
    body = c.post("/v1/retrieve", json={"query": "insulin resistance", "top_k": 3}).json()
    assert body["expert"] == "base" and body["routing_scores"] == {} and len(body["hits"]) == 3
    assert c.get("/v1/experts").json()["experts"] == []
    assert c.post("/v1/retrieve", json={"query": "x", "expert": "alpha"}).status_code == 404
    assert c.post("/v1/embeddings", json={"model": "mini:alpha", "input": "x"}).status_code == 404


def test_retrieval_is_a_router_r1_candidate(stack):
    """Routed RAG and routed LLMs in one graph: the retrieval service registered as the candidate
    'Retriever' (RetrieverEngine over this app's own HTTP API, in-process), called by the router
    loop and directly; its reply is the same top passages /v1/retrieve returns, and it is priced."""
    import asyncio

    import httpx

    from actors.llm_engines import RetrieverEngine, ScriptedEngine
    from serve.app.chat.service import ChatService, LocalChatClient
    from serve.config import LLMConfig

    llm = LLMConfig.model_validate({
        "engines": {"router": {"kind": "vllm", "model": "package:none"},
                    "search": {"kind": "retriever", "model": "auto", "base_url": "http://app",
                               "engine_kwargs": {"top_k": 2, "max_chars_per_passage": 80}}},
        "router": {"engine": "router"},
        "candidates": [{"name": "Retriever", "description": "scientific abstracts", "engine": "search",
                        "price": {"prompt_per_1m": 0.0, "completion_per_1m": 0.01}, "max_tokens": 300}],
    })

    def router(prompt):  # retrieve once, then answer with the first passage's title
        if prompt.rstrip().endswith("</information>"):
            first = prompt.rstrip()[: -len("</information>")].rsplit("<information>", 1)[1]
            return f"<answer>{first.split(': ', 1)[0]}</answer>"
        return "<search>Retriever:protein expression in cancer cells</search>"

    holder = {}
    transport = httpx.ASGITransport(app=_LazyApp(holder))
    search = RetrieverEngine("http://app", "auto", top_k=2, max_chars_per_passage=80, model_id="search", transport=transport)
    scripted = ScriptedEngine(router)
    service = ChatService(llm, {"router": scripted, "search": search}, scripted.chat_prompt)
    # the app under test serves both halves: retrieval (the stack's service) and chat
    holder["app"] = create_app(stack["service"], LocalChatClient(service))

    async def run():
        async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as client:
            hits = (await client.post("/v1/retrieve", json={"query": "protein expression in cancer cells", "top_k": 2})).json()["hits"]
            routed = await client.post("/v1/chat/completions", json={"model": "router-r1", "messages": [
                {"role": "user", "content": "Which abstract is about protein expression in cancer?"}]})
            direct = await client.post("/v1/chat/completions", json={"model": "Retriever", "messages": [
                {"role": "user", "content": "protein expression in cancer cells"}]})
            return hits, routed, direct

    hits, routed, direct = asyncio.run(run())
    assert routed.status_code == 200 and direct.status_code == 200, (routed.text, direct.text)
    call = next(r for r in routed.json()["routing"]["rounds"] if r["action"] == "search")
    assert call["candidate"] == "Retriever" and call["status"] == "ok"
    assert call["reply"].startswith(f"[1] {hits[0]['title']}") and f"[2] {hits[1]['title']}" in call["reply"]
    assert routed.json()["choices"][0]["message"]["content"] == f"[1] {hits[0]['title']}"
    assert call["completion_tokens"] > 0 and call["cost"] > 0
    assert direct.json()["choices"][0]["message"]["content"].startswith(f"[1] {hits[0]['title']}")
    with pytest.raises(NotImplementedError):
        asyncio.run(search.complete("x", max_tokens=4))
    asyncio.run(search.check_health())  # the retrieval side answers; no recursion through /healthz
    healthy, detail = asyncio.run(service.health())
    assert healthy and detail["llm_engines"]["search"] == "ok"
    from actors.router_r1 import CANDIDATE_INSTRUCTION

    wrapped = [{"role": "user", "content": CANDIDATE_INSTRUCTION.format(query="protein expression in cancer cells")}]
    assert search.query_of(wrapped) == "protein expression in cancer cells"  # the LLM instruction is not searched
    short = asyncio.run(search.chat(wrapped, max_tokens=10))
    assert short.finish_reason == "length" and len(short.text) == 30 and short.text == call["reply"][:30]


class _LazyApp:
    """An ASGI app resolved at call time (the engine needs the transport before the app exists)."""

    def __init__(self, holder):
        self.holder = holder

    async def __call__(self, scope, receive, send):
        await self.holder["app"](scope, receive, send)


def test_api_keys_guard_every_endpoint_but_healthz(stack, monkeypatch):
    from serve.app.ingress import api_keys_from_env

    monkeypatch.setenv("RS_KEYS", "key-one, key-two")
    keys = api_keys_from_env("RS_KEYS")
    assert keys == {"key-one", "key-two"} and api_keys_from_env(None) is None
    client = TestClient(create_app(stack["service"], None, None, keys))
    body = {"query": "protein", "top_k": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"},
                    {"Authorization": "Bearer clé-☃".encode()}, {"Authorization": b"Bearer \xff\xfe"}):  # not ASCII: 401, not 500
        r = client.post("/v1/retrieve", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/retrieve", json=body, headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert client.get("/v1/experts").status_code == 401
    assert client.get("/healthz").status_code == 200  # probes need no key
    monkeypatch.delenv("RS_KEYS")
    with pytest.raises(RuntimeError, match="http.api_keys_env: environment variable RS_KEYS"):
        api_keys_from_env("RS_KEYS")


def test_a_poison_request_fails_alone_in_a_batch(stack):
    """One request whose encoding raises (as a tokenizer does on bad text) fails on its own; the
    requests batched with it are answered (the batch is retried item by item)."""
    from serve.app.batching import GreedyBatcher

    base, calls = stack["service"], []

    class PoisonedEncoder(LocalEncoderClient):
        async def route_and_encode(self, request):
            calls.append(len(request["queries"]))
            if any("POISON" in q for q in request["queries"]):
                raise UnicodeEncodeError("utf-8", "POISON", 0, 1, "surrogates not allowed")
            return await super().route_and_encode(request)

    service = RetrievalService(PoisonedEncoder(base.encoder.encoder, "m"), base.shards, base.docs, base.limits, "mini")
    service.enable_batching(lambda fn: GreedyBatcher(fn, 16, 1, 0.05))

    async def main():
        reqs = [RetrieveRequest(query=q, top_k=2) for q in ("protein", "POISON here", "insulin", "debate")]
        return await asyncio.gather(*(service.retrieve(r) for r in reqs), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], UnicodeEncodeError)
    assert [len(r.hits) for i, r in enumerate(results) if i != 1] == [2, 2, 2]
    assert calls[0] == 4 and sorted(calls[1:]) == [1, 1, 1, 1]  # one batch of 4, then each alone


class _StuckShard(LocalShardClient):
    async def search(self, queries, k, knobs=None):
        await asyncio.Event().wait()  # never answers


class _BrokenShard(LocalShardClient):
    async def search(self, queries, k, knobs=None):
        raise ConnectionError("replica died")


def _service_with(stack, shard_cls, **limits):
    base = stack["service"]
    shards = list(base.shards)
    shards[1] = shard_cls(shards[1].shard)
    lim = LimitsConfig(**{**base.limits.model_dump(), **limits})
    return RetrievalService(base.encoder, shards, base.docs, lim, "mini")


def test_a_stuck_shard_answers_503_naming_it_within_the_deadline(stack):
    """A shard that never answers: a 503 + Retry-After naming it before the request's deadline
    (before: a 504 for the request that did not say which part was stuck)."""
    import time

    client = TestClient(create_app(_service_with(stack, _StuckShard, request_timeout_s=0.5)))
    t0 = time.perf_counter()
    r = client.post("/v1/retrieve", json={"query": "protein", "top_k": 2})
    assert time.perf_counter() - t0 < 0.5
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"].startswith("search shard(s) [1] failed (TimeoutError: no answer within 0.")


def test_a_request_that_runs_out_of_time_elsewhere_is_a_504(stack):
    """The encoder never answers: the request's own deadline answers 504."""
    from serve.app.retrieval.service import LocalEncoderClient

    class StuckEncoder(LocalEncoderClient):
        async def route_and_encode(self, request):
            await asyncio.Event().wait()

    base = stack["service"]
    service = _service_with(stack, LocalShardClient, request_timeout_s=0.2)
    service.encoder = StuckEncoder(base.encoder.encoder, "test-model")
    service._info = asyncio.run(base.encoder_info())
    r = TestClient(create_app(service)).post("/v1/retrieve", json={"query": "protein", "top_k": 2})
    assert r.status_code == 504 and r.json()["error"]["message"] == "no answer within 0.2 s (limits.request_timeout_s)"


def test_a_failed_shard_is_a_503_naming_it_never_a_partial_result(stack):
    client = TestClient(create_app(_service_with(stack, _BrokenShard)))
    r = client.post("/v1/retrieve", json={"query": "protein", "top_k": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"].startswith("search shard(s) [1] failed (ConnectionError)")


def test_requests_beyond_the_waiting_room_are_refused_at_once(stack):
    """One request holds the only batch slot, one waits (max_waiting=1); the third is refused
    with 503 + Retry-After instead of queueing."""
    from serve.app.batching import GreedyBatcher
    from serve.app.errors import RequestError

    service = _service_with(stack, _StuckShard, request_timeout_s=30, retry_after_s=2)
    batchers = []
    service.enable_batching(lambda fn: batchers.append(GreedyBatcher(fn, 1, 1, 0.0, max_waiting=1)) or batchers[0])

    async def main():
        held = [asyncio.ensure_future(service.retrieve(RetrieveRequest(query="a")))]
        while not batchers[0].batch_sizes:  # "a" holds the only slot (its shard never answers)
            await asyncio.sleep(0.01)
        held.append(asyncio.ensure_future(service.retrieve(RetrieveRequest(query="b"))))
        while batchers[0].waiting < 1:  # "b" waits
            await asyncio.sleep(0.01)
        try:
            await service.retrieve(RetrieveRequest(query="c"))
        except RequestError as exc:
            return exc
        finally:
            for t in held:
                t.cancel()

    refused = asyncio.run(main())
    assert refused.status == 503 and refused.headers == {"Retry-After": "2"} and "at capacity" in refused.message


def test_bodies_over_the_limit_are_413_before_or_while_they_are_read(stack):
    client = TestClient(create_app(stack["service"], max_body_bytes=2048))
    big = json.dumps({"query": "x" * 4000})
    r = client.post("/v1/retrieve", content=big, headers=JSON)
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it streams
        for i in range(0, len(big), 500):
            yield big[i:i + 500].encode()

    r = client.post("/v1/retrieve", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert client.post("/v1/retrieve", json={"query": "protein", "top_k": 1}).status_code == 200


def test_a_batch_past_the_deadline_frees_its_slot_for_the_next_request(stack):
    """The first batch's encoder call never returns. The batch itself is cancelled at the
    deadline, so the next request gets the (only) batch slot and its answer. Before: the slot
    stayed held and every later request waited behind it until its own deadline."""
    from serve.app.batching import GreedyBatcher
    from serve.app.errors import RequestError
    from serve.app.retrieval.service import LocalEncoderClient

    class StuckOnce(LocalEncoderClient):
        calls = 0

        async def route_and_encode(self, request):
            StuckOnce.calls += 1
            if StuckOnce.calls == 1:
                await asyncio.Event().wait()
            return await super().route_and_encode(request)

    base = stack["service"]
    service = _service_with(stack, LocalShardClient, request_timeout_s=0.5)
    service.encoder = StuckOnce(base.encoder.encoder, "test-model")
    service._info = asyncio.run(base.encoder_info())
    service.enable_batching(lambda fn: GreedyBatcher(fn, 1, 1, 0.0))

    async def main():
        first = asyncio.ensure_future(service.retrieve(RetrieveRequest(query="protein", top_k=2)))
        await asyncio.sleep(0.1)  # "protein" holds the only slot
        second = await service.retrieve(RetrieveRequest(query="cell biology", top_k=2))
        with pytest.raises(RequestError) as info:
            await first
        return info.value, second

    timed_out, answered = asyncio.run(main())
    assert timed_out.status == 504 and len(answered.hits) == 2


def test_an_expert_removed_live_is_a_404_and_the_expert_list_is_refreshed(stack):
    """The ingress checked a forced expert against its cached list, then the replica answering
    had switched to a generation without it: a 404 naming the generation, and the next check
    uses the new list. Before: the encoder's UnknownExpertError reached the client as a 500."""
    service = stack["service"]
    real = service.encoder

    class SwitchedReplica:  # the real encoder's answers, as a replica on a generation without "beta"
        async def info(self):
            info = await real.info()
            return {**info, "generation": "g000002", "experts": [e for e in info["experts"] if e["name"] != "beta"]}

        async def embed(self, texts, expert):
            if expert == "beta":
                return {"error": "unknown expert 'beta'; available: ['base', 'alpha']", "generation": "g000002"}
            return {**await real.embed(texts, expert), "generation": "g000002"}

        async def embed_many(self, requests):
            return [await self.embed(r["texts"], r["expert"]) for r in requests]

        async def route_and_encode(self, request):
            return await real.route_and_encode(request)

    service._info = {**asyncio.run(real.info()), "generation": "g000001"}  # cached before the switch
    service.encoder = SwitchedReplica()
    try:
        client = TestClient(create_app(service))
        r = client.post("/v1/embeddings", json={"model": "mini:beta", "input": "x"})
        assert r.status_code == 404 and "g000002" in r.json()["error"]["message"], r.text
        assert service._info is None  # dropped: the next request checks against the new list
        r = client.post("/v1/embeddings", json={"model": "mini:beta", "input": "x"})
        assert r.status_code == 404 and "available" in r.json()["error"]["message"]
        ok = client.post("/v1/embeddings", json={"model": "mini:alpha", "input": "x"})
        assert ok.status_code == 200 and ok.json()["experts_generation"] == "g000002"
    finally:
        service.encoder, service._info = real, None


def test_concurrent_embedding_requests_share_one_encoder_call(stack):
    """With the ingress's batching on, concurrent /v1/embeddings requests (different experts) go to
    the encoder as one embed_many call and each gets exactly its own vectors; an encoder outage
    is one error per request, not a retry of each request alone. Before: one encoder call per
    request (the endpoint bypassed the batchers)."""
    from serve.app.batching import GreedyBatcher
    from serve.app.errors import RequestError, overloaded
    from serve.app.retrieval.protocol import EmbeddingRequest
    from serve.app.retrieval.service import LocalEncoderClient

    base, calls = stack["service"], []

    class Counting(LocalEncoderClient):
        down = False

        async def embed_many(self, requests):
            calls.append([r["expert"] for r in requests])
            if Counting.down:
                raise overloaded("an ExpertEncoder replica was lost during the call; retry", 1)
            return await super().embed_many(requests)

    service = RetrievalService(Counting(base.encoder.encoder, "m"), base.shards, base.docs, base.limits, "mini")
    batchers = []
    service.enable_batching(lambda fn: GreedyBatcher(fn, 16, 1, 0.05),
                            lambda fn: batchers.append(GreedyBatcher(fn, 16, 1, 0.05, size_fn=lambda r: len(r["texts"])))
                            or batchers[-1])
    reqs = [EmbeddingRequest(model="mini", input="protein folding"), EmbeddingRequest(model="mini:alpha", input=["cells", "tissue"]),
            EmbeddingRequest(model="mini:beta", input="public policy")]

    async def main():  # one event loop, as the ingress replica has
        return await asyncio.gather(*(service.embeddings(r) for r in reqs), return_exceptions=True)

    answers = asyncio.run(main())
    assert not [a for a in answers if isinstance(a, BaseException)], answers
    assert len(calls) == 1 and sorted(calls[0], key=str) == sorted([None, "alpha", "beta"], key=str), calls
    assert batchers[0].batch_sizes == [4]  # sized by texts: 1 + 2 + 1
    for req, answer in zip(reqs, answers):
        texts = [req.input] if isinstance(req.input, str) else req.input
        alone = stack["engine"].encode(texts, req.model.partition(":")[2] or "base")
        got = np.array([d.embedding for d in answer.data], dtype=np.float32)
        np.testing.assert_allclose(got, alone, atol=1e-5)
    calls.clear()
    Counting.down = True
    answers = asyncio.run(main())
    assert all(isinstance(a, RequestError) and a.status == 503 for a in answers) and len(calls) == 1, (calls, answers)
    assert answers[0].headers == {"Retry-After": "1"}


# -- approximate indexes: the index type and its knob in every answer, per-request knobs ------------


@pytest.fixture(scope="module")
def ivf_service(stack, engine, mean_pilots, tmp_path_factory):
    """The stack's 60 docs in 3 IVF shards filled from one trained template (nprobe 1 by default)."""
    from actors.search import fill_shard, split_ranges, train_index

    vectors = stack["vectors"]
    template = train_index("IVF4,Flat", vectors)
    shards = [ShardSearcher(index=fill_shard(template, vectors[a:b]), offset=a, factory="IVF4,Flat", defaults={"nprobe": 1})
              for a, b in split_ranges(len(vectors), 3)]
    path = tmp_path_factory.mktemp("ivf") / "d.parquet"
    DocStore.write(path, stack["docs"])
    pilots = mean_pilots(engine, {"alpha": ["cell biology", "protein"], "beta": ["debate", "policy"]})
    return RetrievalService(LocalEncoderClient(RoutedEncoder(engine, pilots), "m"), [LocalShardClient(s) for s in shards],
                            DocStore(path), LimitsConfig(max_nprobe=8), "mini", vectors.shape[1], "IVF4,Flat", {"nprobe": 1})


def test_answers_name_the_index_and_the_knob_they_ran_with(ivf_service, stack):
    c = TestClient(create_app(ivf_service))
    q = {"query": "protein expression in cancer cells", "top_k": 10, "expert": "base"}
    default = c.post("/v1/retrieve", json=q).json()
    assert default["index"] == "IVF4,Flat" and default["search_params"] == {"nprobe": 1}
    every_list = c.post("/v1/retrieve", json={**q, "nprobe": 4}).json()
    assert every_list["search_params"] == {"nprobe": 4}
    qv = stack["engine"].encode([q["query"]])[0]
    exact = [stack["docs"][i].doc_id for i in np.argsort(-(stack["vectors"] @ qv), kind="stable")[:10]]
    assert [h["doc_id"] for h in every_list["hits"]] == exact  # all 4 lists probed: exact
    assert [h["doc_id"] for h in default["hits"]] != exact  # one list of four: approximate
    plain = c.post("/v1/retrieve", json={"query": "x"}).json()
    assert plain["index"] == "IVF4,Flat" and plain["search_params"] == {"nprobe": 1}
    for body, needle in [({**q, "nprobe": 9}, "nprobe: Input should be less than or equal to 8"),
                         ({**q, "nprobe": 0}, "nprobe: Input should be greater than or equal to 1"),
                         ({**q, "ef_search": 16}, "the index is 'IVF4,Flat', which has no ef_search")]:
        r = c.post("/v1/retrieve", json=body)
        assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text
    spec = c.get("/openapi.json").json()["components"]["schemas"]["RetrieveRequest"]["properties"]
    assert "maximum" in json.dumps(spec["nprobe"]) and "has no ef_search" in spec["ef_search"]["description"]


def test_a_batch_mixing_knobs_searches_each_group_with_its_own(ivf_service, stack):
    """One batch, three nprobe values: one search call per shard per value, and every item's hits
    are the exact merge of the shards searched at ITS nprobe (not its neighbours')."""
    from actors.search import merge_topk
    from serve.app.retrieval.service import RetrieveItem

    queries = ["insulin resistance", "protein folding", "vitamin D", "gene expression", "cancer cells"]
    knobs = [(("nprobe", 1),), (("nprobe", 4),), (("nprobe", 2),), (("nprobe", 4),), (("nprobe", 1),)]
    calls = []
    for client in ivf_service.shards:
        search = client.search

        async def counted(q, k, kn=None, search=search):
            calls.append(dict(kn or {}))
            return await search(q, k, kn)

        client.search = counted
    try:
        answers = asyncio.run(ivf_service.retrieve_many([RetrieveItem(q, 5, "base", False, k) for q, k in zip(queries, knobs)]))
    finally:
        for client in ivf_service.shards:
            del client.search
    assert sorted(c["nprobe"] for c in calls) == [1, 1, 1, 2, 2, 2, 4, 4, 4]  # 3 shards x 3 distinct values
    vectors = stack["engine"].encode(queries)
    shards = [c.shard for c in ivf_service.shards]
    differ = 0
    for i, (a, k) in enumerate(zip(answers, knobs)):
        _, want = merge_topk([s.search(vectors[i : i + 1], 5, dict(k)) for s in shards], 5)
        assert [h.doc_id for h in a["hits"]] == [stack["docs"][j].doc_id for j in want[0]] and a["search_params"] == dict(k)
        _, other = merge_topk([s.search(vectors[i : i + 1], 5, {"nprobe": 4 if k[0][1] == 1 else 1}) for s in shards], 5)
        differ += list(other[0]) != list(want[0])
    assert differ >= 1  # the knob changes answers here: a mixed-up group would show


# -- the corpus guard: a routed query that reads like a corpus no expert knows goes to base ----------


@pytest.fixture(scope="module")
def corpus_guard(stack, model_path, random_adapters, encoder_settings, mean_pilots, tmp_path_factory):
    """The stack's 60 docs, the 10 nearest (by the base model) to ``query`` relabelled as corpus
    'news', which no expert is named after; one expert, 'scifact' (every query routes to it).
    ``service(share)``: a service over them with the corpus guard at ``share``."""
    from dataclasses import replace

    from actors.encoder import BASE, EncoderEngine

    engine = EncoderEngine(model_path, {"scifact": random_adapters["alpha"]}, encoder_settings)
    query = "protein expression in cancer cells"
    vectors = stack["vectors"]
    news = set(np.argsort(-(vectors @ engine.encode([query], BASE)[0]), kind="stable")[:10].tolist())
    docs = [replace(d, dataset="news" if i in news else "scifact") for i, d in enumerate(stack["docs"])]
    path = tmp_path_factory.mktemp("corpus-guard") / "docs.parquet"
    DocStore.write(path, docs)
    routed = RoutedEncoder(engine, mean_pilots(engine, {"scifact": ["cell biology"]}))
    shards = [LocalShardClient(ShardSearcher(index=build_flat_index(vectors[a:b]), offset=a)) for a, b in ((0, 25), (25, 60))]

    def service(share):
        return RetrievalService(LocalEncoderClient(routed, "m"), shards, DocStore(path), LimitsConfig(), "mini",
                                vectors.shape[1], unknown_corpus_share=share)

    return {"service": service, "engine": engine, "query": query, "docs": docs, "vectors": vectors}


def _top(vectors, v, k):
    return np.argsort(-(vectors @ v), kind="stable")[:k].tolist()


def test_the_corpus_guard_answers_a_query_that_reads_like_an_unknown_corpus_with_base(corpus_guard):
    from actors.encoder import BASE
    from serve.app.metrics import CATALOG

    g = corpus_guard
    sink = _Sink()
    c = TestClient(create_app(g["service"](0.8), metrics=sink))
    body = c.post("/v1/retrieve", json={"query": g["query"], "top_k": 5}).json()
    assert body["expert"] == "base" and body["selected_by"] == "corpus" and not body["forced"]
    want = _top(g["vectors"], g["engine"].encode([g["query"]], BASE)[0], 5)  # the base model's own hits
    assert [h["doc_id"] for h in body["hits"]] == [g["docs"][i].doc_id for i in want]
    assert {h["dataset"] for h in body["hits"]} == {"news"}
    assert body["timings_ms"]["corpus_guard_rows"] == 1.0
    assert sink.calls == [("routerserve_corpus_guard", {"expert": "scifact"})] and "routerserve_corpus_guard" in CATALOG
    experts = c.get("/v1/experts").json()
    assert experts["corpora_without_expert"] == ["news"] and experts["unknown_corpus_share"] == 0.8
    # forcing the expert is the caller's choice: never guarded
    forced = c.post("/v1/retrieve", json={"query": g["query"], "top_k": 5, "expert": "scifact"}).json()
    assert forced["expert"] == "scifact" and forced["selected_by"] == "forced"


def test_the_corpus_guard_keeps_the_expert_below_the_share_and_when_off(corpus_guard):
    from actors.encoder import BASE

    g = corpus_guard
    news = {i for i, d in enumerate(g["docs"]) if d.dataset == "news"}
    queries = ["tax law and policy", "a debate on schools", "cell membranes", g["query"]]
    shares = [len(news & set(_top(g["vectors"], v, 10))) / 10 for v in g["engine"].encode(queries, BASE)]
    assert min(shares) < 0.8 <= max(shares)  # both sides of the line
    c = TestClient(create_app(g["service"](0.8)))
    for q, share in zip(queries, shares):
        body = c.post("/v1/retrieve", json={"query": q, "top_k": 3}).json()
        want = ("base", "corpus") if share >= 0.8 else ("scifact", "routed")
        assert (body["expert"], body["selected_by"]) == want, (q, share)
        if share < 0.8:  # the expert's hits, as without the guard
            v = g["engine"].encode([q], "scifact")[0]
            assert [h["doc_id"] for h in body["hits"]] == [g["docs"][i].doc_id for i in _top(g["vectors"], v, 3)]
    off = TestClient(create_app(g["service"](None)))
    body = off.post("/v1/retrieve", json={"query": g["query"], "top_k": 3}).json()
    assert (body["expert"], body["selected_by"]) == ("scifact", "routed") and body["timings_ms"]["corpus_guard_rows"] == 0
    assert off.get("/v1/experts").json()["corpora_without_expert"] == []


def test_the_corpus_guard_has_nothing_to_do_when_no_expert_is_named_after_a_corpus(stack):
    """The stack's experts (alpha, beta) are named after no corpus (scifact): the guard stays off
    instead of sending every query to base, and searches no extra row."""
    base = stack["service"]
    service = RetrievalService(base.encoder, base.shards, base.docs, base.limits, "mini", unknown_corpus_share=0.8)
    c = TestClient(create_app(service))
    body = c.post("/v1/retrieve", json={"query": "protein expression in cancer cells", "top_k": 3}).json()
    assert body["selected_by"] == "routed" and body["timings_ms"]["corpus_guard_rows"] == 0
    assert c.get("/v1/experts").json()["corpora_without_expert"] == []


class _Sink:
    def __init__(self):
        self.calls = []

    def inc(self, name, value=1.0, **tags):
        self.calls.append((name, tags))

    def observe(self, name, value, **tags):
        pass
