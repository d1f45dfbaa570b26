"""The project's own metrics: one catalog, used by the deployments, the Grafana dashboard and the
metrics contract test.

Metrics are created with ``ray.serve.metrics`` inside replicas (Serve adds the ``deployment``,
``replica`` and ``application`` labels) and exported by each Ray node's metrics agent in
Prometheus format. Exported names get Ray's ``ray_`` prefix; counters also get ``_total`` and
histograms ``_bucket``/``_sum``/``_count`` (see :func:`series_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CONFIDENCE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
ROUND_BUCKETS = [1, 2, 3, 4, 5, 6, 8]
RELOAD_S_BUCKETS = [0.5, 1, 2, 5, 10, 20, 60, 120]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


CATALOG: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("routerserve_expert_selected", "counter",
                   "Queries per expert (base = no adapter); how = forced by the request, routed by the policy, or "
                   "sent to base by the confidence floor (floor) or an expert's base guard (guard)",
                   ("expert", "how")),
        MetricSpec("routerserve_corpus_guard", "counter",
                   "Queries the policy routed to an expert (tag) that the corpus guard answered with base: their "
                   "base top 10 hits come mostly from corpora no expert is named after", ("expert",)),
        MetricSpec("routerserve_routing_confidence", "histogram",
                   "Margin of the chosen expert's policy score over the runner-up (cosine units; 0 = a tie)",
                   ("expert",), tuple(CONFIDENCE_BUCKETS)),
        MetricSpec("routerserve_shard_search_latency_ms", "histogram",
                   "FAISS search time per shard call, by index type (factory string) and search knobs (e.g. nprobe=16)",
                   ("shard", "index", "knob"), tuple(LATENCY_MS_BUCKETS)),
        MetricSpec("routerserve_encoder_batch_size", "histogram", "Texts per encoder forward pass", ("stage",),
                   tuple(BATCH_BUCKETS)),
        MetricSpec("routerserve_controller_rounds", "histogram", "Router-R1 generations per request", ("stopped",),
                   tuple(ROUND_BUCKETS)),
        MetricSpec("routerserve_route_calls", "counter", "Candidate calls made by the controller", ("candidate", "outcome")),
        MetricSpec("routerserve_llm_tokens", "counter", "Tokens through the router and candidates", ("model", "type")),
        MetricSpec("routerserve_llm_cost", "counter", "Cost of candidate calls", ("model", "currency")),
        MetricSpec("routerserve_errors", "counter", "Requests answered with an error", ("endpoint", "reason")),
        MetricSpec("routerserve_experts_generation", "gauge",
                   "Expert generation an encoder replica serves (the number of gNNNNNN; 0: none)"),
        MetricSpec("routerserve_experts_reloads", "counter",
                   "Expert generation switches attempted by encoder replicas", ("outcome",)),
        MetricSpec("routerserve_experts_reload_seconds", "histogram",
                   "Time to load an expert generation (adapters + pilots) off the request path", (),
                   tuple(RELOAD_S_BUCKETS)),
    )
}


def series_name(spec: MetricSpec) -> str:
    """The Prometheus series name Ray exports for ``spec`` (counters: ``_total``; histograms: the
    ``_bucket`` series)."""
    base = f"ray_{spec.name}"
    return {"counter": base + "_total", "gauge": base, "histogram": base + "_bucket"}[spec.kind]


class Metrics:
    """The catalog's metrics, created on first use (inside a replica or a Ray worker)."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}

    def _get(self, name: str):
        metric = self._made.get(name)
        if metric is None:
            from ray.serve import metrics as serve_metrics

            spec = CATALOG[name]
            if spec.kind == "counter":
                metric = serve_metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "gauge":
                metric = serve_metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
            else:
                metric = serve_metrics.Histogram(spec.name, description=spec.description,
                                                 boundaries=list(spec.boundaries), tag_keys=spec.tag_keys)
            self._made[name] = metric
        return metric

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value:
            self._get(name).inc(value, tags={k: str(v) for k, v in tags.items()})

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._get(name).observe(value, tags={k: str(v) for k, v in tags.items()})

    def set(self, name: str, value: float, **tags: str) -> None:
        self._get(name).set(value, tags={k: str(v) for k, v in tags.items()})


def knob_label(knobs: dict[str, int], defaults: dict[str, int]) -> str:
    """The ``knob`` label of a search: ``nprobe=16`` at the configured value; a request's own
    value as its power-of-two bucket (``nprobe<=128``), so clients cannot mint a series per value."""
    parts = []
    for name, value in sorted(knobs.items()):
        if value == defaults.get(name):
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}<={1 << max(0, int(value) - 1).bit_length()}")
    return ",".join(parts)


def record_routing(metrics, result: dict) -> None:
    """One encoder batch result (``route_and_encode_requests`` item): experts chosen, margins."""
    for expert, how, scores in zip(result["experts"], result["how"], result["routing_scores"]):
        metrics.inc("routerserve_expert_selected", expert=expert, how=how)
        if how == "routed" and len(scores) >= 2:  # the margin of the policy's own pick
            top, second = sorted(scores.values(), reverse=True)[:2]
            metrics.observe("routerserve_routing_confidence", top - second, expert=expert)


def record_chat(metrics, model: str, routing: dict, router_engine_model: str | None = None) -> None:
    """One answered chat request (router or direct): rounds, route calls, tokens, cost."""
    currency = routing.get("currency", "USD")
    if routing.get("router") is not None:
        metrics.observe("routerserve_controller_rounds", len(routing["rounds"]), stopped=routing["stopped"])
        for kind in ("prompt", "completion"):
            metrics.inc("routerserve_llm_tokens", routing["router_tokens"].get(kind, 0), model=routing["router"], type=kind)
        for r in routing["rounds"]:
            if r.get("action") != "search" or not r.get("candidate"):
                continue
            metrics.inc("routerserve_route_calls", candidate=r["candidate"], outcome=r.get("status") or "unknown")
            for kind in ("prompt", "completion"):
                metrics.inc("routerserve_llm_tokens", r.get(f"{kind}_tokens", 0), model=r["candidate"], type=kind)
            metrics.inc("routerserve_llm_cost", r.get("cost", 0.0), model=r["candidate"], currency=currency)
    else:
        metrics.inc("routerserve_route_calls", candidate=model, outcome="direct")
        for kind in ("prompt", "completion"):
            metrics.inc("routerserve_llm_tokens", routing["candidate_tokens"].get(kind, 0), model=model, type=kind)
        metrics.inc("routerserve_llm_cost", routing.get("cost", 0.0), model=model, currency=currency)


def dashboard_panels() -> list[tuple[str, str, str]]:
    """(title, PromQL, unit) per Grafana panel: Serve's own metrics first, then ours, then vLLM's
    engines', then the GPUs.
    Every selector is filtered by the dashboard's ``$namespace`` variable (the PodMonitor's scrape
    adds the namespace label), and the HTTP panels leave out the probes' routes."""
    rate = "[$__rate_interval]"
    ns = 'namespace=~"$namespace"'
    http = f'{{{ns}, route!="/healthz", route!~"/-/.*"}}'  # Serve's own /-/healthz, /-/routes too

    def q(metric: str) -> str:
        return f"{metric}{{{ns}}}"

    def per_s(by: str, counter: str) -> str:  # a counter's rate, summed by labels
        return f"sum by ({by}) (rate({q(counter)}{rate}))"

    def quantile(p: float, by: str, bucket: str) -> str:  # a histogram's quantile by labels
        return f"histogram_quantile({p}, sum by ({by + ', ' if by else ''}le) (rate({q(bucket)}{rate})))"

    return [
        ("HTTP requests/s by route and code",
         f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{http}{rate}))", "reqps"),
        ("HTTP p95 latency by route",
         f"histogram_quantile(0.95, sum by (route, le) (rate(ray_serve_http_request_latency_ms_bucket{http}{rate})))", "ms"),
        ("Replicas per deployment (healthy)", f"sum by (deployment) ({q('ray_serve_deployment_replica_healthy')})", "none"),
        ("Autoscaling target replicas", f"max by (deployment) ({q('ray_serve_autoscaling_target_replicas')})", "none"),
        ("Ongoing requests at replicas", f"sum by (deployment) ({q('ray_serve_num_ongoing_requests_at_replicas')})", "none"),
        ("Deployment p95 processing latency",
         quantile(0.95, "deployment", "ray_serve_deployment_processing_latency_ms_bucket"),
         "ms"),
        ("Expert selected /s", per_s("expert", "ray_routerserve_expert_selected_total"), "reqps"),
        ("Corpus guard: routed queries sent to base /s", per_s("expert", "ray_routerserve_corpus_guard_total"), "reqps"),
        ("Routing confidence p50",
         quantile(0.5, "expert", "ray_routerserve_routing_confidence_bucket"), "none"),
        ("Shard search p95",
         quantile(0.95, "shard", "ray_routerserve_shard_search_latency_ms_bucket"), "ms"),
        ("Encoder batch size p50",
         quantile(0.5, "stage", "ray_routerserve_encoder_batch_size_bucket"), "none"),
        ("Router-R1 rounds per request p50",
         quantile(0.5, "", "ray_routerserve_controller_rounds_bucket"), "none"),
        ("Route calls/s by candidate and outcome",
         per_s("candidate, outcome", "ray_routerserve_route_calls_total"), "reqps"),
        ("Tokens/s by model", per_s("model, type", "ray_routerserve_llm_tokens_total"), "none"),
        ("Cost per hour by model", per_s("model, currency", "ray_routerserve_llm_cost_total") + " * 3600", "none"),
        ("Errors/s by reason", per_s("endpoint, reason", "ray_routerserve_errors_total"), "reqps"),
        ("Expert generation per encoder replica", f"max by (replica) ({q('ray_routerserve_experts_generation')})", "none"),
        ("Expert reloads/min by outcome",
         per_s("outcome", "ray_routerserve_experts_reloads_total") + " * 60", "none"),
        ("Expert reload p95 seconds",
         quantile(0.95, "", "ray_routerserve_experts_reload_seconds_bucket"), "s"),
        # vLLM's own engine metrics (llm.engines.<name>.engine_metrics: vLLM's Ray stat logger)
        ("vLLM requests running / waiting by model",
         f"sum by (model_name) ({q('ray_vllm_num_requests_running')}) or sum by (model_name) "
         f"({q('ray_vllm_num_requests_waiting')})", "none"),
        ("vLLM KV cache use by model", f"max by (model_name) ({q('ray_vllm_kv_cache_usage_perc')})", "percentunit"),
        ("vLLM time to first token p95 by model",
         quantile(0.95, "model_name", "ray_vllm_time_to_first_token_seconds_bucket"), "s"),
        ("vLLM generated tokens/s by model",
         per_s("model_name", "ray_vllm_generation_tokens_total"), "none"),
        # Ray's own node metrics (every Ray node exports them): the GPU pods' load and memory
        ("GPU utilisation % by node and GPU", f"avg by (ip, GpuIndex) ({q('ray_node_gpus_utilization')})", "percent"),
        ("GPU memory used by node and GPU", f"sum by (ip, GpuIndex) ({q('ray_node_gram_used')})", "decmbytes"),
    ]


# vLLM's engine series the dashboard reads (llm.engines.<name>.engine_metrics)
VLLM_SERIES = {n for _, expr, _ in dashboard_panels() for n in re.findall(r"ray_vllm_[a-z_]+", expr)}


def parse_scrape(text: str) -> dict[str, list[dict[str, str]]]:
    """Prometheus text → series name → the label sets it was exported with."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


def node_metrics_urls() -> list[str]:
    """The metrics endpoint of every alive node of the connected Ray cluster."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


def scrape_cluster(timeout_s: float = 10.0) -> dict[str, list[dict[str, str]]]:
    """Every node's metrics endpoint of the connected Ray cluster, parsed and merged."""
    import httpx

    merged: dict[str, list[dict[str, str]]] = {}
    for url in node_metrics_urls():
        for name, labels in parse_scrape(httpx.get(url, timeout=timeout_s).text).items():
            merged.setdefault(name, []).extend(labels)
    return merged


def wait_for_series(wanted: list[tuple[str, dict[str, str]]], timeout_s: float = 60.0, every_s: float = 2.0):
    """Scrape until every (series name, labels) in ``wanted`` has a sample carrying those labels
    (Ray exports on an interval); returns (what is still missing, the last scrape)."""
    import time

    def has(series, name, labels):
        return any(all(s.get(k) == v for k, v in labels.items()) for s in series.get(name, []))

    deadline = time.monotonic() + timeout_s
    while True:
        series = scrape_cluster()
        missing = [(n, lab) for n, lab in wanted if not has(series, n, lab)]
        if not missing or time.monotonic() > deadline:
            return missing, series
        time.sleep(every_s)
