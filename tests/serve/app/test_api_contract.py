"""The published OpenAPI spec is the contract: it declares what the service accepts (lengths,
ranges, item counts, the blank-text rule) and every status it answers, and schemathesis' own
checks (``--checks all``) pass against the real HTTP app — retrieval over the real encoder and
FAISS shards, chat over scripted engines, API keys on. (Through Ray Serve: test_e2e_http.py.)"""

import json
import socket
import threading
import time

import httpx
import pytest

from actors.llm_engines import ScriptedEngine
from serve.app.chat.service import ChatService, LocalChatClient
from serve.app.ingress import create_app
from serve.config import LLMConfig

JSON = {"content-type": "application/json"}


def _spec(stack) -> dict:
    return stack["client"].get("/openapi.json").json()


def test_the_spec_declares_the_request_limits(stack):
    schemas = _spec(stack)["components"]["schemas"]
    query = schemas["RetrieveRequest"]["properties"]["query"]
    assert (query["minLength"], query["maxLength"], query["pattern"]) == (1, 200, r"[^ \t\r\n]")
    top_k = schemas["RetrieveRequest"]["properties"]["top_k"]
    assert (top_k["minimum"], top_k["maximum"]) == (1, 20)
    one, many = schemas["EmbeddingRequest"]["properties"]["input"]["oneOf"]
    assert one["maxLength"] == 200 and (many["minItems"], many["maxItems"]) == (1, 4)
    assert many["items"]["maxLength"] == 200
    size = schemas["EmbeddingRequest"]["properties"]["dimensions"]["anyOf"][0]
    assert size["minimum"] == size["maximum"] == 384
    assert schemas["EmbeddingRequest"]["properties"]["model"]["examples"] == ["mini"]


@pytest.mark.parametrize("path", ["/v1/retrieve", "/v1/embeddings"])
def test_the_spec_lists_every_status_and_the_retry_after_of_a_503(stack, path):
    responses = _spec(stack)["paths"][path]["post"]["responses"]
    assert sorted(responses) == ["200", "401", "404", "413", "422", "503", "504"]
    assert "Retry-After" in responses["503"]["headers"]
    for status in ("404", "413", "422", "503", "504"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.mark.parametrize(
    "body, status",
    [
        ({"query": "protein", "top_k": 3.0}, 200),  # JSON Schema's integer: 3.0 is 3
        ({"query": "protein", "top_k": "3"}, 422),  # a string is not an integer
        ({"query": "protein", "top_k": True}, 422),  # nor is a boolean
        ({"query": "protein", "top_k": 3.5}, 422),
        ({"query": "\x1f protein"}, 200),  # not blank under the declared pattern, so accepted
        ({"query": "\u3000"}, 200),  # (the pattern names exactly which characters are blank)
        ({"query": " \r\n\t"}, 422),
    ],
)
def test_what_the_spec_admits_is_exactly_what_is_accepted(stack, body, status):
    r = stack["client"].post("/v1/retrieve", content=json.dumps(body), headers=JSON)
    assert r.status_code == status, r.text


@pytest.mark.parametrize("body", [b"%\xff\xfe\xfd", b'{"query": "\xc3\x28"}', b"\xff"])
def test_a_body_that_is_not_utf8_json_is_a_422(stack, body):
    """Before: FastAPI's undocumented 400 "There was an error parsing the body" for some bytes."""
    r = stack["client"].post("/v1/retrieve", content=body, headers=JSON)
    assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text


def test_a_wrong_method_is_a_405_with_allow(stack):
    r = stack["client"].delete("/v1/retrieve")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == 405


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat_client() -> LocalChatClient:
    cfg = LLMConfig.model_validate({
        "enabled": True,
        "engines": {"small": {"kind": "vllm", "model": "package:none"}, "big": {"kind": "transformers", "model": "package:none"}},
        "router": {"engine": "small"},
        "candidates": [
            {"name": "Alpha", "description": "knows capitals", "engine": "big", "price": {"prompt_per_1m": 1, "completion_per_1m": 2}},
            {"name": "Beta", "description": "cheap", "engine": "small", "price": {"prompt_per_1m": 0, "completion_per_1m": 0}},
        ],
    })
    router = ScriptedEngine(lambda p: "<answer>Paris</answer>" if p.rstrip().endswith("</information>")
                            else "<search>Alpha:capital of France?</search>", model_id="small")
    big = ScriptedEngine(lambda q: "Paris is the capital", model_id="big")
    return LocalChatClient(ChatService(cfg, {"small": router, "big": big}, router.chat_prompt))


@pytest.fixture(scope="module")
def served_in_process(stack):
    """The app over real HTTP (uvicorn in a thread): retrieval + chat + API keys."""
    import uvicorn

    app = create_app(stack["service"], _chat_client(), api_keys=frozenset({"test-key"}))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)


def test_schemathesis_all_checks_pass_over_every_endpoint(served_in_process, schemathesis_cli, tmp_path):
    done = schemathesis_cli(served_in_process, tmp_path, "--max-examples", "40",
                            "-H", "Authorization: Bearer test-key")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "6 selected / 6 total" in done.stdout  # every operation, chat included
