"""The metrics catalog and what each recording helper records (a recording sink in place of Ray's
metrics; the real export is checked by the contract tests in the e2e modules)."""

import asyncio
import re

import httpx

from actors.llm_engines import ScriptedEngine
from serve.app.chat.protocol import ChatCompletionRequest
from serve.app.chat.service import ChatService, LocalChatClient
from serve.config import LLMConfig
from serve.app.ingress import create_app
from serve.app.metrics import CATALOG, VLLM_SERIES, dashboard_panels, parse_scrape, record_routing, series_name


class Sink:
    def __init__(self):
        self.calls = []

    def inc(self, name, value=1.0, **tags):
        if value:
            self.calls.append(("inc", name, value, tags))

    def observe(self, name, value, **tags):
        self.calls.append(("observe", name, value, tags))

    def of(self, name):
        return [(v, t) for _, n, v, t in self.calls if n == name]


def test_catalog_names_and_series():
    assert all(name.startswith("routerserve_") for name in CATALOG)
    assert series_name(CATALOG["routerserve_llm_cost"]) == "ray_routerserve_llm_cost_total"
    assert series_name(CATALOG["routerserve_shard_search_latency_ms"]) == "ray_routerserve_shard_search_latency_ms_bucket"
    assert CATALOG["routerserve_llm_cost"].tag_keys == ("model", "currency")
    for spec in CATALOG.values():
        assert spec.kind != "histogram" or list(spec.boundaries) == sorted(spec.boundaries)


RAY_NODE_GPU = {"ray_node_gpus_utilization", "ray_node_gram_used"}  # Ray's node metrics (GPU hosts only)


def test_dashboard_queries_only_known_series():
    known = {f"ray_{n}" for n in CATALOG}
    for title, expr, _ in dashboard_panels():
        for name in re.findall(r"\b(ray_[a-z_]+)", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in known or name.startswith("ray_serve_") or name in RAY_NODE_GPU or name in VLLM_SERIES, (title, name)
    used = {re.sub(r"_(total|bucket)$", "", n) for _, e, _ in dashboard_panels() for n in re.findall(r"ray_routerserve_[a-z_]+", e)}
    assert used == known  # every metric of ours has a panel


def test_record_routing_counts_experts_and_margins():
    sink = Sink()
    record_routing(sink, {
        "experts": ["scifact", "base", "nfcorpus", "base", "base"],
        "forced": [False, True, False, False, False],
        "how": ["routed", "forced", "routed", "floor", "guard"],
        "routing_scores": [{"scifact": 0.61, "nfcorpus": 0.58}, {"scifact": 0.1, "nfcorpus": 0.2},
                           {"scifact": 0.40, "nfcorpus": 0.40}, {"scifact": 0.2, "nfcorpus": 0.1},
                           {"scifact": 0.9, "nfcorpus": 0.1}],
    })
    assert [t for _, t in sink.of("routerserve_expert_selected")] == [
        {"expert": "scifact", "how": "routed"}, {"expert": "base", "how": "forced"}, {"expert": "nfcorpus", "how": "routed"},
        {"expert": "base", "how": "floor"}, {"expert": "base", "how": "guard"}]  # base by the floor / a guard: said so
    margins = sink.of("routerserve_routing_confidence")
    assert [round(v, 6) for v, _ in margins] == [0.03, 0.0] and margins[0][1] == {"expert": "scifact"}


def _service():
    llm = LLMConfig.model_validate({
        "engines": {"e": {"kind": "vllm", "model": "package:none"}},
        "router": {"engine": "e"},
        "candidates": [{"name": "Alpha", "description": "d", "engine": "e",
                        "price": {"prompt_per_1m": 1.0, "completion_per_1m": 2.0, "currency": "EUR"}}],
    })

    def script(prompt):
        if prompt.rstrip().endswith("</information>"):
            return "<answer>Paris</answer>"
        if "capital" in prompt and "Answer concisely" not in prompt:
            return "<search>Alpha:capital of France?</search>"
        return "Paris"

    engine = ScriptedEngine(script)
    service = ChatService(llm, {"e": engine}, engine.chat_prompt)
    service.metrics = Sink()
    return service


def test_record_chat_for_router_and_direct_calls():
    service = _service()
    routed = asyncio.run(service.chat(ChatCompletionRequest.model_validate(
        {"model": "router-r1", "messages": [{"role": "user", "content": "capital of France"}]})))
    direct = asyncio.run(service.chat(ChatCompletionRequest.model_validate(
        {"model": "Alpha", "messages": [{"role": "user", "content": "hi"}]})))
    sink = service.metrics
    rounds = sink.of("routerserve_controller_rounds")
    assert rounds == [(len(routed.routing.rounds), {"stopped": "answer"})]
    assert [t for _, t in sink.of("routerserve_route_calls")] == [
        {"candidate": "Alpha", "outcome": "ok"}, {"candidate": "Alpha", "outcome": "direct"}]
    costs = sink.of("routerserve_llm_cost")
    assert [t for _, t in costs] == [{"model": "Alpha", "currency": "EUR"}] * 2
    assert sum(v for v, _ in costs) == routed.routing.cost + direct.routing.cost > 0
    tokens = {(t["model"], t["type"]): 0 for _, t in sink.of("routerserve_llm_tokens")}
    for v, t in sink.of("routerserve_llm_tokens"):
        tokens[(t["model"], t["type"])] += v
    assert tokens[("router-r1", "completion")] == routed.routing.router_tokens["completion"] > 0
    assert tokens[("Alpha", "prompt")] == routed.routing.candidate_tokens["prompt"] + direct.usage.prompt_tokens


def test_http_errors_are_counted_by_route_and_reason():
    service = _service()
    sink = Sink()
    app = create_app(None, LocalChatClient(service), sink)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            a = await client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
            b = await client.post("/v1/chat/completions", json={"model": "Alpha"})
            c = await client.get("/no/such/path")
            return a.status_code, b.status_code, c.status_code

    assert asyncio.run(run()) == (404, 422, 404)
    assert [t for _, t in sink.of("routerserve_errors")] == [
        {"endpoint": "/v1/chat/completions", "reason": "404:model"},
        {"endpoint": "/v1/chat/completions", "reason": "422:validation"},
        {"endpoint": "<unmatched>", "reason": "404:http"},
    ]


def test_parse_scrape_reads_prometheus_text():
    text = (
        "# HELP ray_routerserve_errors_total Requests answered with an error\n"
        "# TYPE ray_routerserve_errors_total counter\n"
        'ray_routerserve_errors_total{endpoint="/v1/retrieve",reason="422:validation"} 2.0\n'
    )
    assert parse_scrape(text) == {"ray_routerserve_errors_total": [{"endpoint": "/v1/retrieve", "reason": "422:validation"}]}


def test_dashboard_panels_filter_by_namespace_and_leave_out_probes():
    """Every selector is scoped to the dashboard's $namespace (several RayServices share one
    Prometheus); the HTTP panels leave out the probes' routes, which would swamp them."""
    for title, expr, _ in dashboard_panels():
        selectors = re.findall(r"\b(ray_[a-z_]+)(\{[^}]*\})?", expr)
        assert selectors and all('namespace=~"$namespace"' in sel for _, sel in selectors), (title, expr)
        if "http" in expr:
            assert 'route!="/healthz"' in expr and 'route!~"/-/.*"' in expr, title
    assert {t for t, _, _ in dashboard_panels()} >= {"GPU utilisation % by node and GPU", "GPU memory used by node and GPU"}


def test_the_knob_label_names_the_default_and_buckets_what_requests_set():
    from serve.app.metrics import knob_label

    assert knob_label({}, {}) == ""
    assert knob_label({"nprobe": 16}, {"nprobe": 16}) == "nprobe=16"
    labels = {knob_label({"nprobe": n}, {"nprobe": 16}) for n in range(1, 1025)}
    assert len(labels) <= 12  # a client cannot mint a series per value
    assert knob_label({"nprobe": 100}, {"nprobe": 16}) == "nprobe<=128" and knob_label({"nprobe": 1}, {"nprobe": 16}) == "nprobe<=1"
    assert knob_label({"nprobe": 64}, {"nprobe": 16}) == "nprobe<=64"
