"""`eval qa` logic over the real HTTP layer (in-process ASGI) with scripted engines: metrics,
policies, the JSON shape the issue asks for, and the report files."""

import asyncio
import json

import httpx
import pytest

from actors.llm_engines import ScriptedEngine
from serve.app.chat.service import ChatService, LocalChatClient
from serve.config import LLMConfig
from serve.app.ingress import create_app
from serve.offline.qa_eval import evaluate_qa, exact_match, load_qa, normalize_answer, token_f1, write_qa_report


def llm_config():
    return LLMConfig.model_validate(
        {
            "enabled": True,
            "engines": {"small": {"kind": "vllm", "model": "package:none"}, "big": {"kind": "vllm", "model": "package:none"}},
            "router": {"engine": "small"},
            "candidates": [
                {"name": "Alpha", "description": "knows capitals", "engine": "big",
                 "price": {"prompt_per_1m": 1, "completion_per_1m": 2, "currency": "EUR"}},
                {"name": "Beta", "description": "free", "engine": "small", "price": {"prompt_per_1m": 0, "completion_per_1m": 0}},
            ],
        }
    )


class ConstrainedScript(ScriptedEngine):
    """Like a router under structured outputs: when the regex forbids searching, it answers."""

    async def complete(self, prompt, *, max_tokens, temperature=0.0, stop=(), regex=None, seed=None):
        if regex is not None and "<search>" not in regex:
            return await ScriptedEngine(["<answer>Paris</answer>"]).complete(prompt, max_tokens=max_tokens, stop=stop)
        return await super().complete(prompt, max_tokens=max_tokens, temperature=temperature, stop=stop)


@pytest.fixture
def qa_dir(tmp_path):
    (tmp_path / "qa").mkdir()
    rows = [
        {"id": "t.0", "question": "capital of France", "golden_answers": ["Paris"]},
        {"id": "t.1", "question": "capital of Italy", "golden_answers": ["Rome", "Roma"]},
        {"id": "t.2", "question": "capital of Spain", "golden_answers": ["Madrid"]},
    ]
    (tmp_path / "qa" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _service():
    def router(prompt):  # routes once to Alpha, then answers what Alpha said (first word)
        if prompt.rstrip().endswith("</information>"):
            reply = prompt.rstrip()[: -len("</information>")].rsplit("<information>", 1)[1]
            return f"<answer>{reply.split()[0]}</answer>"
        if "capital of France" not in prompt:
            return "<answer>Paris</answer>"  # not France: answers alone, wrongly
        return "<search>Alpha:which capital?</search>"

    def alpha(q):  # knows France and Italy
        return "Paris." if "France" in q or "which capital" in q else ("Rome" if "Italy" in q else "no idea")

    engines = {"small": ConstrainedScript(router), "big": ScriptedEngine(alpha)}
    return ChatService(llm_config(), engines, engines["small"].chat_prompt)


def test_qa_eval_scores_every_policy_and_writes_the_issue_shape(qa_dir, tmp_path):
    app = create_app(None, LocalChatClient(_service()))
    result = asyncio.run(evaluate_qa("http://test", qa_dir, ["toy"], None, None, concurrency=2, progress=False,
                                     transport=httpx.ASGITransport(app=app)))
    per = result["datasets"]["toy"]
    assert set(per) == {"router", "router_alone", "random", "Alpha", "Beta"}
    assert per["Alpha"]["em"] == pytest.approx(2 / 3) and per["Alpha"]["calls_per_question"] == 1.0
    assert per["router_alone"]["calls_per_question"] == 0.0 and per["router_alone"]["em"] == pytest.approx(1 / 3)
    assert per["router"]["em"] == pytest.approx(1 / 3)  # France via Alpha; the others answered alone, wrongly
    assert per["router"]["calls_per_question"] == pytest.approx(1 / 3)
    assert per["Alpha"]["cost_per_question"] > 0 and per["Beta"]["cost_per_question"] == 0.0
    for r in per.values():
        assert {"em", "f1", "calls_per_question", "cost_per_question", "n"} <= set(r) and r["n"] == 3
    assert result["pool"]["Alpha"]["price"]["currency"] == "EUR"
    result["command"] = "routerserve eval qa --datasets toy"
    paths = write_qa_report(result, tmp_path / "out" / "qa")
    data = json.loads(paths[0].read_text())
    assert data["datasets"]["toy"]["Alpha"]["n"] == 3 and data["command"].startswith("routerserve eval qa")
    assert "| toy | Alpha | 66.7 |" in paths[1].read_text() and paths[2].stat().st_size > 0


def test_qa_inputs_are_checked(qa_dir):
    assert len(load_qa(qa_dir, "toy", 2)) == 2
    with pytest.raises(ValueError, match="not found"):
        load_qa(qa_dir, "nope", None)
    (qa_dir / "qa" / "bad.jsonl").write_text('{"question": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_qa(qa_dir, "bad", None)
    app = create_app(None, LocalChatClient(_service()))
    with pytest.raises(ValueError, match="unknown policies"):
        asyncio.run(evaluate_qa("http://test", qa_dir, ["toy"], None, ["oracle"], progress=False,
                                transport=httpx.ASGITransport(app=app)))


class CountingTransport(httpx.ASGITransport):
    def __init__(self, app):
        super().__init__(app=app)
        self.chat_posts = 0

    async def handle_async_request(self, request):
        if request.url.path == "/v1/chat/completions":
            self.chat_posts += 1
        return await super().handle_async_request(request)


def test_an_interrupted_qa_eval_resumes_from_its_checkpoint(qa_dir, tmp_path):
    app = create_app(None, LocalChatClient(_service()))
    ckpt = tmp_path / "qa.partial.jsonl"
    first = CountingTransport(app)
    full = asyncio.run(evaluate_qa("http://test", qa_dir, ["toy"], None, ["Alpha", "router"], progress=False,
                                   transport=first, checkpoint=ckpt))
    assert first.chat_posts == 6 and len(ckpt.read_text().splitlines()) == 2
    # the run was cut while writing its second entry: only the first survives intact
    lines = ckpt.read_text().splitlines()
    ckpt.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    again = CountingTransport(app)
    resumed = asyncio.run(evaluate_qa("http://test", qa_dir, ["toy"], None, ["Alpha", "router"], progress=False,
                                      transport=again, checkpoint=ckpt))
    assert again.chat_posts == 3  # only the router policy is asked again
    assert resumed["resumed"] == ["toy/Alpha"]
    assert resumed["datasets"]["toy"]["Alpha"] == full["datasets"]["toy"]["Alpha"]  # reused as recorded
    for key in ("em", "f1", "calls_per_question", "cost_per_question", "n"):
        assert resumed["datasets"]["toy"]["router"][key] == full["datasets"]["toy"]["router"][key]
    assert resumed["overall"]["Alpha"]["n"] == 3
    # a different question set (limit 2) does not reuse runs made for other ids
    fresh = CountingTransport(app)
    limited = asyncio.run(evaluate_qa("http://test", qa_dir, ["toy"], 2, ["Alpha"], progress=False,
                                      transport=fresh, checkpoint=ckpt))
    assert fresh.chat_posts == 2 and limited["resumed"] == []



def test_reporting_drops_only_the_reported_datasets_from_the_checkpoint(tmp_path):
    from serve.offline.qa_eval import drop_from_checkpoint

    ckpt = tmp_path / "qa.partial.jsonl"
    rows = [{"dataset": "nq", "policy": "router"}, {"dataset": "hotpotqa", "policy": "router"}, {"dataset": "nq", "policy": "random"}]
    ckpt.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    drop_from_checkpoint(ckpt, ["nq"])
    assert [json.loads(x) for x in ckpt.read_text().splitlines()] == [{"dataset": "hotpotqa", "policy": "router"}]
    drop_from_checkpoint(ckpt, ["hotpotqa"])
    assert not ckpt.exists()
    drop_from_checkpoint(ckpt, ["nq"])  # nothing there: no error


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Beatles", ["Beatles", "x"]) == 1.0 and exact_match(None, ["a"]) == 0.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert token_f1("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    assert token_f1("x", ["y"]) == 0.0 and token_f1(None, ["y"]) == 0.0
