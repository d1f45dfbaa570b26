"""ChatService + the HTTP router for /v1/chat/completions and /v1/models, over scripted engines
(the protocol logic; the real-model path is tests/serve/app/test_e2e_chat.py)."""

import json

import pytest
from fastapi.testclient import TestClient

from actors.llm_engines import ScriptedEngine
from serve.app.chat.service import ChatService, LocalChatClient
from serve.config import LLMConfig
from serve.app.ingress import create_app


class RecordingEngine(ScriptedEngine):
    """A scripted engine that also records the structured-output regex it was given."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.regexes = []

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None):
        self.regexes.append(regex)
        return await super().complete(prompt, max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed)


def llm_config(**router):
    return LLMConfig.model_validate(
        {
            "enabled": True,
            "engines": {"small": {"kind": "vllm", "model": "package:none"}, "big": {"kind": "transformers", "model": "package:none"}},
            "router": {"engine": "small", **router},
            "candidates": [
                {"name": "Alpha", "description": "knows capitals", "engine": "big",
                 "price": {"prompt_per_1m": 1_000_000, "completion_per_1m": 2_000_000, "currency": "EUR"}},
                {"name": "Beta", "description": "cheap", "engine": "small",
                 "price": {"prompt_per_1m": 0, "completion_per_1m": 0}},
            ],
        }
    )


def router_script(prompt):
    return "<answer>Paris</answer>" if prompt.rstrip().endswith("</information>") else "<think>ask</think><search>alpha:capital of France?</search>"


@pytest.fixture
def parts():
    router = RecordingEngine(router_script, model_id="small")
    big = ScriptedEngine(lambda q: "Paris is the capital", model_id="big")
    service = ChatService(llm_config(), {"small": router, "big": big}, router.chat_prompt)
    return service, router, big


@pytest.fixture
def client(parts):
    return TestClient(create_app(None, LocalChatClient(parts[0])))


def test_models_lists_router_and_priced_candidates(client):
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["router-r1", "Alpha", "Beta"]
    alpha = body["data"][1]
    assert alpha["kind"] == "candidate" and alpha["price"]["currency"] == "EUR" and alpha["description"] == "knows capitals"


def test_router_request_runs_the_loop_and_reports_routing_and_usage(client, parts):
    _, router, big = parts
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "capital of France"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Paris" and body["choices"][0]["finish_reason"] == "stop"
    routing = body["routing"]
    assert routing["route_calls"] == 1 and routing["calls"] == {"Alpha": 1} and routing["stopped"] == "answer"
    assert [rd["action"] for rd in routing["rounds"]] == ["search", "answer"]
    assert routing["rounds"][0]["candidate"] == "Alpha" and routing["rounds"][0]["sub_query"] == "capital of France?"
    # scripted tokens: the candidate's prompt is the wrapped sub-query, its completion 4 words
    cand_prompt = routing["candidate_tokens"]["prompt"]
    assert routing["candidate_tokens"]["completion"] == 4
    assert routing["cost"] == pytest.approx(cand_prompt * 1 + 4 * 2) and routing["currency"] == "EUR"
    assert routing["upstream_cost"] == pytest.approx(4 * 2_000_000)  # completion × price per 1M, unnormalised
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == routing["router_tokens"]["prompt"] + cand_prompt
    # the router saw ONE user message through its chat template, question normalised, pool rendered
    first_prompt = router.calls[0]
    assert first_prompt.startswith("<|user|>\n") and first_prompt.endswith("<|assistant|>\n")
    assert "Question: capital of France?" in first_prompt and "- Alpha: knows capitals" in first_prompt
    # structured outputs: every generation constrained; the candidate names are in the regex
    assert all(rx and "Alpha" in rx for rx in router.regexes)
    assert "concisely" in big.calls[0] and "capital of France?" in big.calls[0]


def test_structured_output_can_be_switched_off(parts):
    router = RecordingEngine(router_script)
    service = ChatService(llm_config(structured_output=False), {"small": router, "big": parts[2]}, router.chat_prompt)
    TestClient(create_app(None, LocalChatClient(service))).post(
        "/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "q"}]}
    )
    assert router.regexes and all(rx is None for rx in router.regexes)


def test_direct_candidate_call_is_priced(client):
    r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200 and body["model"] == "Alpha"
    assert body["choices"][0]["message"]["content"] == "Paris is the" and body["usage"]["completion_tokens"] == 3
    assert body["routing"]["cost"] == pytest.approx(body["usage"]["prompt_tokens"] * 1 + 3 * 2)


@pytest.mark.parametrize(
    "payload, status, needle",
    [
        ({"model": "gpt-x", "messages": [{"role": "user", "content": "q"}]}, 404, "gpt-x"),
        ({"model": "router-r1", "messages": [{"role": "system", "content": "q"}]}, 422, "user message"),
        ({"model": "router-r1", "messages": []}, 422, "messages"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": 5}]}, 422, "content"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": "q"}], "n": 2}, 422, "n"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": "q"}], "temperature": -1}, 422, "temperature"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": "q"}], "tools": []}, 422, "tools"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": "q"}], "budget": 0}, 422, "budget"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": "q \ud800"}]}, 422, "lone surrogate"),
        ({"model": "router-r1", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, 422, "lone surrogate"),
    ],
)
def test_bad_requests_get_4xx_json_naming_the_problem(client, payload, status, needle):
    r = client.post("/v1/chat/completions", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert client.get("/v1/models").status_code == 200  # still serving


def test_engine_failure_is_503_not_500(parts):
    router = ScriptedEngine(router_script, fail_with=RuntimeError("engine crashed"))
    service = ChatService(llm_config(), {"small": router, "big": parts[2]}, router.chat_prompt)
    client = TestClient(create_app(None, LocalChatClient(service)))
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "q"}]})
    body = r.json()
    assert r.status_code == 503 and body["error"]["message"] == "router engine 'small' failed (RuntimeError)"
    assert body["routing"]["stopped"] == "router_failed" and body["routing"]["cost"] == 0.0
    r = client.post("/v1/chat/completions", json={"model": "Beta", "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    health = client.get("/healthz")
    assert health.status_code == 200  # scripted engines report healthy; failures are per call


def test_budget_per_request_stops_routing(client):
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "q"}], "budget": 1.0})
    routing = r.json()["routing"]
    assert routing["rounds"][0]["status"] == "over_budget" and routing["cost"] == 0.0 and routing["budget_left"] == 1.0
    assert routing["route_calls"] == 0


def test_stream_sends_round_events_then_the_answer(client):
    with client.stream("POST", "/v1/chat/completions", json={"model": "router-r1", "stream": True, "stream_options": {"include_usage": True},
                                                             "messages": [{"role": "user", "content": "capital of France"}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    rounds = [e["routing_event"] for e in events if "routing_event" in e]
    assert [rd["action"] for rd in rounds] == ["search", "answer"]
    answer = next(e for e in events if e["choices"])
    assert answer["choices"][0]["delta"]["content"] == "Paris" and answer["object"] == "chat.completion.chunk"
    assert events[-1]["usage"]["total_tokens"] > 0


def test_stream_to_an_unknown_model_is_a_json_404(client):
    r = client.post("/v1/chat/completions", json={"model": "nope", "stream": True, "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_max_route_calls_zero_makes_the_router_answer_alone(client, parts):
    _, router, big = parts
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "max_route_calls": 0,
                                                  "messages": [{"role": "user", "content": "capital of France"}]})
    routing = r.json()["routing"]
    assert routing["route_calls"] == 0 and big.calls == []
    assert routing["rounds"][0]["status"] == "not_executed"  # its search was not made
    assert router.regexes[0] is not None and "<search>" not in router.regexes[0]  # constrained to an answer


def test_direct_call_over_budget_is_refused_before_calling(client, parts):
    _, _, big = parts
    r = client.post("/v1/chat/completions", json={"model": "Alpha", "budget": 0.5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 422 and "worst-case cost" in r.json()["error"]["message"] and big.calls == []
    r = client.post("/v1/chat/completions", json={"model": "Beta", "budget": 0.5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["routing"]["budget_left"] == 0.5  # a free candidate fits any budget


def test_a_client_that_disconnects_stops_the_paid_calls():
    """Streaming router-r1: once the client goes away (the SSE generator is closed after the first
    round), the loop is cancelled and no candidate is called again."""
    import asyncio

    router = ScriptedEngine(lambda p: "<search>Alpha:again</search>", model_id="small")
    big = ScriptedEngine(lambda q: "more", model_id="big", latency_s=0.05)
    service = ChatService(llm_config(max_turns=8, max_route_calls=8), {"small": router, "big": big}, router.chat_prompt)
    from serve.app.chat.protocol import ChatCompletionRequest

    async def main():
        req = ChatCompletionRequest(model="router-r1", messages=[{"role": "user", "content": "q"}], stream=True)
        events = service.stream(req)
        first = await anext(events)
        await events.aclose()  # the disconnect
        at_close = len(big.calls)
        await asyncio.sleep(0.5)  # ten candidate latencies: a loop still running would have called again
        return first, at_close, len(big.calls)

    first, at_close, later = asyncio.run(main())
    assert "routing_event" in first and at_close == later <= 2


def test_a_direct_call_past_the_candidates_deadline_is_a_504():
    import asyncio

    cfg = llm_config()
    cfg.candidates[0].timeout_s = 0.05
    slow = ScriptedEngine(lambda q: "late", model_id="big", latency_s=5)
    router = ScriptedEngine(router_script, model_id="small")
    client = TestClient(create_app(None, LocalChatClient(ChatService(cfg, {"small": router, "big": slow}, router.chat_prompt))))
    r = client.post("/v1/chat/completions", json={"model": "Alpha", "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 504 and r.json()["error"]["message"] == "candidate 'Alpha' timed out after 0.05 s"
    assert asyncio.iscoroutinefunction(slow.chat)


def test_router_generation_has_a_deadline_and_the_503_carries_the_ledger():
    cfg = llm_config(timeout_s=0.05)
    router = ScriptedEngine(router_script, model_id="small", latency_s=5)
    big = ScriptedEngine(lambda q: "Paris", model_id="big")
    client = TestClient(create_app(None, LocalChatClient(ChatService(cfg, {"small": router, "big": big}, router.chat_prompt))))
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 503 and r.json()["error"]["message"] == "router engine 'small' timed out"
    assert r.json()["routing"]["stopped"] == "router_failed"


def test_the_whole_loop_has_a_deadline_and_the_504_carries_the_ledger():
    """Each generation and call is within its own timeout, but together they pass
    llm.router.request_timeout_s: 504 with what was spent, never an unbounded request."""
    cfg = llm_config(timeout_s=10, request_timeout_s=0.3)
    cfg.candidates[0].timeout_s = 10
    router = ScriptedEngine(lambda p: "<search>Alpha:q</search>", model_id="small")  # routes forever
    big = ScriptedEngine(lambda q: "maybe", model_id="big", latency_s=0.1)
    client = TestClient(create_app(None, LocalChatClient(ChatService(cfg, {"small": router, "big": big}, router.chat_prompt))))
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "q"}]})
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["error"]["message"] == "no answer within 0.3 s (llm.router.request_timeout_s)"
    assert body["routing"]["stopped"] == "deadline" and body["routing"]["calls"].get("Alpha", 0) >= 1
    assert body["routing"]["rounds"][-1]["status"] in ("ok", "cancelled")


def test_a_truncated_answer_is_returned_with_finish_reason_length_and_max_tokens_bounds_the_loop(parts):
    service, _, _ = parts
    router = ScriptedEngine(lambda p: "<answer>Paris is the capital of France and", model_id="small")
    service.engines["small"] = router
    client = TestClient(create_app(None, LocalChatClient(service)))
    r = client.post("/v1/chat/completions", json={"model": "router-r1", "max_tokens": 3,
                                                  "messages": [{"role": "user", "content": "capital of France"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Paris is the"  # 3 scripted tokens: "<answer>Paris is the"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["routing"]["stopped"] == "answer_truncated" and len(body["routing"]["rounds"]) == 1
    assert body["usage"]["completion_tokens"] == 3 and len(router.calls) == 1


def test_finish_reason_is_length_only_when_a_token_cap_cut_the_output(parts):
    service, _, _ = parts
    service.engines["small"] = ScriptedEngine(lambda p: "thinking about it", model_id="small")  # never acts
    client = TestClient(create_app(None, LocalChatClient(service)))
    ask = {"model": "router-r1", "messages": [{"role": "user", "content": "capital of France"}]}
    body = client.post("/v1/chat/completions", json=ask).json()
    assert body["routing"]["stopped"] == "no_answer" and len(body["routing"]["rounds"]) == 5  # 4 turns + the final one
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"] == ""
    body = client.post("/v1/chat/completions", json={**ask, "max_tokens": 4}).json()
    assert body["routing"]["stopped"] == "max_tokens" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


# A template written here with the structure of upstream's prompt_pool (str.format, one
# {question}, lines joined by backslashes, a leading newline, an em dash, "Question: {question}\n"
# and a blank line at the end); the text itself is ours.
CHECKPOINT_STYLE_TEMPLATE = (
    "\nThink inside <think> and </think> before every action. \
To ask a model, write <search> LLM-Name:Your-Query </search> \u2014 its reply comes back inside \
<information> and </information>.\nModels: Alpha (capitals), Beta (cheap).\n\
Answer inside <answer> and </answer>. Question: {question}\n\n"
)


def test_a_checkpoints_str_format_prompt_reaches_the_router_byte_for_byte(tmp_path):
    """prompt_syntax: format renders the file as upstream does (str.format_map with the
    normalised question), through the router's chat template as one user message."""
    path = tmp_path / "checkpoint_prompt.txt"
    path.write_text(CHECKPOINT_STYLE_TEMPLATE, encoding="utf-8")
    router = RecordingEngine(router_script, model_id="small")
    cfg = llm_config(prompt_file=str(path), prompt_syntax="format", structured_output=False)
    service = ChatService(cfg, {"small": router, "big": ScriptedEngine(lambda q: "Paris", model_id="big")}, router.chat_prompt)
    TestClient(create_app(None, LocalChatClient(service))).post(
        "/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "  capital of France "}]})
    expected = router.chat_prompt([{"role": "user", "content": CHECKPOINT_STYLE_TEMPLATE.format_map({"question": "capital of France?"})}])
    assert router.calls[0] == expected
    assert "Question: capital of France?\n\n" in router.calls[0] and "\u2014" in router.calls[0]


def test_prompt_files_that_cannot_render_are_refused_at_config_load_naming_the_key(tmp_path):
    from pydantic import ValidationError

    def refused(text, **router):
        path = tmp_path / "p.txt"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValidationError) as err:
            llm_config(prompt_file=str(path), **router)
        return str(err.value)

    assert "prompt_file" in refused('Question: {question} as JSON {"a": 1}', prompt_syntax="format", structured_output=False)
    assert "{question} (required)" in refused("Question: {query}", prompt_syntax="format", structured_output=False)
    assert "no $question" in refused("Question: {question}")  # a str.format file read as a string.Template
    # structured output that cannot express a prompt asking for <think>: refused, naming the switch
    assert "structured_think" in refused(CHECKPOINT_STYLE_TEMPLATE, prompt_syntax="format")
    assert "prompt_syntax" in str(pytest.raises(ValidationError, llm_config, prompt_syntax="format").value)
    ok = tmp_path / "ok.txt"
    ok.write_text(CHECKPOINT_STYLE_TEMPLATE, encoding="utf-8")
    llm_config(prompt_file=str(ok), prompt_syntax="format", structured_think=True)  # can express it
    llm_config(prompt_file=str(tmp_path / "in-the-image.txt"), prompt_syntax="format")  # checked where served


def test_a_continuation_of_a_cut_generation_is_never_constrained():
    """The router's first generation hits its token cap inside <think>; the next one continues it
    (inside the tag) and must run unconstrained; a generation that starts an action again is
    constrained."""
    # the scripted engine's tokens are words: the first generation is cut after 4 of its 6
    router = RecordingEngine(["<think>the capital of France is Paris", "Paris</think><search>Alpha:capital-of-France?</search>",
                              "<answer>Paris</answer>"], model_id="small")
    cfg = llm_config(structured_think=True, max_new_tokens=4)
    service = ChatService(cfg, {"small": router, "big": ScriptedEngine(lambda q: "Paris", model_id="big")}, router.chat_prompt)
    body = TestClient(create_app(None, LocalChatClient(service))).post(
        "/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "capital of France"}]}).json()
    rounds = body["routing"]["rounds"]
    assert [r["finish_reason"] for r in rounds][:1] == ["length"]
    assert router.regexes[0] is not None and router.regexes[1] is None and router.regexes[2] is not None
    assert body["choices"][0]["message"]["content"] == "Paris"


def test_a_candidate_gets_its_own_instruction_cap_seed_and_temperature(tmp_path):
    """llm.candidates.*: instruction_file (str.format, {query}), max_tokens, seed and temperature
    reach the candidate's engine on every routed call; the budget's worst case counts that text."""
    path = tmp_path / "agent.txt"
    path.write_text("You are a helpful agent; explain briefly.\n\nThe task: {query}\n\n", encoding="utf-8")
    cfg = llm_config()
    alpha = cfg.candidates[0].model_copy(update={"instruction_file": path, "seed": 42, "temperature": 0.2, "max_tokens": 9})
    cfg = cfg.model_copy(update={"candidates": [alpha, cfg.candidates[1]]})
    router = RecordingEngine(router_script, model_id="small")
    big = ScriptedEngine(lambda q: "Paris is the capital of France and a big city", model_id="big")
    service = ChatService(cfg, {"small": router, "big": big}, router.chat_prompt)
    body = TestClient(create_app(None, LocalChatClient(service))).post(
        "/v1/chat/completions", json={"model": "router-r1", "messages": [{"role": "user", "content": "capital of France"}]}).json()
    assert big.calls == ["You are a helpful agent; explain briefly.\n\nThe task: capital of France?\n\n"]
    assert big.seeds == [42] and body["routing"]["rounds"][0]["completion_tokens"] == 9  # capped at its max_tokens
    worst = service.loop.candidates["Alpha"].worst_case("capital of France?")
    assert worst.prompt_tokens >= len(big.calls[0].encode()) and worst.completion_tokens == 9


def test_candidate_instruction_files_are_checked_naming_the_key(tmp_path):
    from pydantic import ValidationError

    bad = tmp_path / "bad.txt"
    bad.write_text("Answer {question}", encoding="utf-8")
    data = llm_config().model_dump()
    data["candidates"][0]["instruction_file"] = str(bad)
    with pytest.raises(ValidationError, match=r"candidates\.0\.instruction_file[\s\S]*only placeholder must be \{query\}"):
        LLMConfig.model_validate(data)
    data["candidates"][0]["instruction_file"] = None
    data["engines"]["big"] = {"kind": "retriever", "model": "auto", "base_url": "http://127.0.0.1:1"}
    data["candidates"][0]["instruction_file"] = str(tmp_path / "any.txt")
    with pytest.raises(ValidationError, match="retriever candidate searches the sub-query itself"):
        LLMConfig.model_validate(data)
