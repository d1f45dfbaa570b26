"""Issue 19's union goals on DEV queries: what the training side predicts for the test figures.

    .venv/bin/python benchmarks/dev_goals.py --set experts.dir=.routerserve/both --set ...   # the README's F3

Each domain's dev queries — held out of training (the experts' and the multi-task adapter's steps
were chosen on them) — searched in the union index of every domain, every expert present: base and
each expert forced (benchmarks/confidence_floor.py's cached tables), the multi-task adapter (encoded
here), the served policy routed through pilots and floors built WITHOUT the dev queries (the
config's ``own:pilot_margin/pilot_min_queries`` rule, as confidence_floor.py's selected row: out of
sample; the base guards as served, which were judged on these dev queries) and DatasetOracle (per
domain, the column with the best dev mean). The goals are computed as benchmarks/beir_goals.py
computes them on test (its ``union_goals``), each with its paired 95 % interval, beside the test
figures of benchmarks/results/<--test>.json. Dev sets are small (npl 10, cranfield 11 queries). No
test query is read. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from beir_goals import union_goals  # noqa: E402
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402
from confidence_floor import load_tables, policy_of, regrouped, routed_scores, with_floors  # noqa: E402

app = typer.Typer(add_completion=False)


FALLBACK = "multitask_fallback"


def dev_results(data: dict, routed: dict[str, np.ndarray], multitask: dict[str, np.ndarray], policy: str,
                to_base: dict[str, np.ndarray] | None = None) -> dict:
    """A union result in beir_eval.py's shape over each domain's dev queries: base, the policy
    (``routed``: its per-query scores on the dev rows), dataset_oracle (the base-or-expert column
    with the best dev mean; ties to base) and multitask, for ``union_goals``. With ``to_base`` (the
    dev queries the policy sent to base), also ``multitask_fallback``: the policy with those
    queries answered by the multi-task adapter instead — a what-if, served nowhere."""
    doms = list(data)
    per_query: dict[str, dict[str, list[float]]] = {"base": {}, policy: {}, "dataset_oracle": {}, "multitask": {}}
    if to_base is not None:
        per_query[FALLBACK] = {}
    oracle_of = {}
    for d in doms:
        table = data[d]["table"][data[d]["dev"]]
        if len(routed[d]) != len(table) or len(multitask[d]) != len(table):
            raise ValueError(f"{d}: {len(table)} dev queries, {len(routed[d])} routed and {len(multitask[d])} multi-task scores")
        names = ["base", *data[d]["experts"]]
        best = max(range(len(names)), key=lambda j: (table[:, j].mean(), j == 0))
        oracle_of[d] = names[best]
        columns = {"base": table[:, 0], policy: routed[d], "dataset_oracle": table[:, best], "multitask": multitask[d]}
        if to_base is not None:
            columns[FALLBACK] = np.where(to_base[d], multitask[d], routed[d])
        for p, x in columns.items():
            per_query[p][d] = [float(v) for v in x]
    policies = {p: {**{d: float(np.mean(v)) for d, v in by_d.items()}, "avg": float(np.mean([np.mean(v) for v in by_d.values()]))}
                for p, by_d in per_query.items()}
    qids = {d: [q for q, dev in zip(data[d]["qids"], data[d]["dev"]) if dev] for d in doms}
    return {"setting": "union", "split": "dev", "domains": doms, "query_ids": qids, "policies": policies,
            "per_query_ndcg@10": per_query, "dataset_oracle_expert": oracle_of,
            "to_base": None if to_base is None else {d: float(np.mean(to_base[d])) for d in doms}}


def multitask_scores(cfg, doms: list[str], data: dict, console) -> dict[str, np.ndarray]:
    """Each domain's dev queries encoded by the multi-task adapter and searched in the union:
    nDCG@10 per query. Every training query is encoded and searched, as the tables' columns were
    (a batch of other texts moves an embedding by ~1e-7 and a smaller search batch takes another
    BLAS path: either can reorder a tie at rank 10), and the tables' base embeddings searched the same
    way must score exactly as the tables do: the rows, qrels and union are the tables' own."""
    from ir_measures import nDCG

    from actors.encoder import BASE, EncoderEngine
    from serve.artifacts.experts import MULTITASK, multitask_dir
    from serve.artifacts.models import encoder_settings, resolve_model
    from serve.offline.indexing import load_corpus_vectors
    from serve.offline.ir import (SELF_RETRIEVAL_DOMAINS, domain_examples, examples_qrels, per_query, search_run, shift_rows,
                                  union_offset)

    mt = multitask_dir(cfg)
    if mt is None or not (mt / "adapter_config.json").is_file():
        raise SystemExit(f"{cfg.experts.dir}: no multi-task adapter ('routerserve experts train-multitask')")
    engine = EncoderEngine(resolve_model(cfg.model.ref), {MULTITASK: mt}, encoder_settings(cfg))
    data_dir = cfg.resolve_data_dir()
    union = load_corpus_vectors(cfg, data_dir, doms, False)
    out = {}
    for d in doms:
        own = load_corpus_vectors(cfg, data_dir, [d], False)
        examples = domain_examples(cfg, data_dir, d, own)
        if [q for q, _, _, _ in examples] != data[d]["qids"]:
            raise SystemExit(f"{d}: the cached table holds another training sample than this config's")
        examples = shift_rows(examples, union_offset(union, d, own))
        qids, qrels = data[d]["qids"], examples_qrels(d, examples, union)
        dev = data[d]["dev"]
        scores = {}
        for name, vectors in ((BASE, data[d]["base"]), (MULTITASK, engine.encode([t for _, t, _, _ in examples], MULTITASK))):
            run = search_run(vectors, qids, union, 10, d in SELF_RETRIEVAL_DOMAINS, d)
            s = per_query(qrels, run, nDCG @ 10)
            scores[name] = np.array([s[q] for q in qids])
        if not np.allclose(scores[BASE], data[d]["table"][:, 0], atol=1e-9):
            raise SystemExit(f"{d}: the base model's scores differ from the cached table's: remove the cache")
        scores = {name: x[dev] for name, x in scores.items()}
        console.print(f"{d}: {int(dev.sum())} dev queries, multi-task {100 * scores[MULTITASK].mean():.2f}, "
                      f"base {100 * scores[BASE].mean():.2f}")
        out[d] = scores[MULTITASK]
    return out


@app.command()
def main(
    domains: str = typer.Option("scifact,nfcorpus,arguana,cranfield,npl"),
    experts_dir: Path = typer.Option(Path(".routerserve/both")),
    max_queries: int = typer.Option(2000, help="as in beir_eval.py: the same training sample"),
    cache: Path = typer.Option(Path(".routerserve/confidence-floor-both"), help="confidence_floor.py's table cache"),
    test: str = typer.Option("beir_goals", help="benchmarks/results/<test>.json: the same goals on test (beir_goals.py)"),
    name: str = typer.Option("beir_goals_dev"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
):
    from rich.console import Console

    from actors.encoder import BASE

    console = Console()
    t0 = time.perf_counter()
    test_path = RESULTS / f"{test}.json"
    if not test_path.is_file():  # before minutes of tables
        raise typer.BadParameter(f"{test_path} does not exist (benchmarks/beir_goals.py writes it)", param_hint="--test")
    doms = domains.split(",")
    cfg, gen, pilots, data = load_tables(doms, experts_dir, max_queries, cache, set_, console)
    e = cfg.experts
    known = with_floors(regrouped(pilots, data, "own", e.pilot_margin, e.pilot_min_queries, train_only=True), data,
                        e.confidence_quantile, train_only=True, kind=e.confidence_floor)
    policy = policy_of(e.policy)
    routed, to_base = {}, {}
    for d in doms:
        routed[d], chosen = routed_scores(known, data[d], np.flatnonzero(data[d]["dev"]), policy)
        to_base[d] = np.array([c == BASE for c in chosen])
    union = dev_results(data, routed, multitask_scores(cfg, doms, data, console), e.policy, to_base)
    goals = union_goals(union, union, e.policy, setting="union, dev")
    what_if = [g for g in union_goals(union, union, FALLBACK, setting="union, dev")
               if g["goal"] == f"{FALLBACK} ≥ multi-task + 1.5"]
    test_goals = {g["goal"]: g for g in json.loads(test_path.read_text())["goals"] if g["setting"] == "union"}
    doc = {"command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "experts_generation": gen.id if gen else None,
           "policy": e.policy, "pilot_rule": f"own:{e.pilot_margin:g}/{e.pilot_min_queries}",
           "confidence_quantile": e.confidence_quantile, "confidence_floor": e.confidence_floor,
           "goals": goals, "test": {"source": f"{test}.json", "goals": [test_goals.get(g["goal"]) for g in goals]},
           "what_if": what_if, "dev": union, "test_queries_read": 0, "seconds": time.perf_counter() - t0}
    for g, t in zip(goals, doc["test"]["goals"]):
        on_test = "–" if t is None else f"{_fig(t)} ({t['verdict']})"
        console.print(f"{g['goal']}: dev {_fig(g)} ({g['verdict']}), test {on_test}")
    console.print(write_json(name, doc, RESULTS))
    write_markdown(name, render(doc), RESULTS)


def _fig(row: dict | None, key: str = "figure") -> str:
    if row is None:
        return "–"
    scale = {"share": "{:.0f} %", "delta": "{:+.2f}"}[row["unit"]]
    if key == "interval":
        iv = row["interval"]
        return f"[{scale.format(100 * iv['low'])}, {scale.format(100 * iv['high'])}]"
    return scale.format(100 * row[key])


def render(doc: dict) -> str:
    dev = doc["dev"]
    doms = dev["domains"]
    lines = ["# Issue 19's union goals on DEV queries, beside test", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['machine'].get('cpu', '?')} · policy "
             f"{doc['policy']} (pilots {doc['pilot_rule']} and {doc['confidence_floor']} floors at {doc['confidence_quantile']}, "
             "built without the dev queries) · test figures from " f"`{doc['test']['source']}` · test queries read: 0", "",
             "Each domain's dev queries (" + ", ".join(f"{d} {len(dev['query_ids'][d])}" for d in doms) + ") searched in the "
             "union of every domain's corpus. Paired 95 % intervals over those queries (serve/offline/significance.py).", "",
             "| goal | dev | dev 95 % interval | dev verdict | test | test 95 % interval | test verdict |",
             "|---|---|---|---|---|---|---|"]
    for g, t in zip(doc["goals"], doc["test"]["goals"]):
        lines.append(f"| {g['goal']} | {_fig(g)} | {_fig(g, 'interval')} | {g['verdict']} | {_fig(t)} | "
                     f"{_fig(t, 'interval') if t and t['interval'] else '–'} | {t['verdict'] if t else '–'} |")
    pols = ["base", doc["policy"], "multitask", "dataset_oracle", *([FALLBACK] if FALLBACK in dev["policies"] else [])]
    lines += ["", "nDCG@10 on the dev queries in the union (DatasetOracle's column per domain: "
              + ", ".join(f"{d} → {dev['dataset_oracle_expert'][d]}" for d in doms) + "):", "",
              "| policy | " + " | ".join(doms) + " | avg |", "|---|" + "---|" * (len(doms) + 1)]
    for p in pols:
        row = dev["policies"][p]
        lines.append(f"| {p} | " + " | ".join(f"{100 * row[d]:.1f}" for d in doms) + f" | {100 * row['avg']:.2f} |")
    if dev.get("to_base"):
        lines.append(f"| share of {doc['policy']}'s dev queries sent to base (floor, base guard) | "
                     + " | ".join(f"{100 * dev['to_base'][d]:.0f} %" for d in doms) + " | |")
    for g in doc.get("what_if", []):
        lines += ["", f"What-if, served nowhere and not run on test: `{FALLBACK}` — {doc['policy']} with the queries it sends "
                  f"to base answered by the multi-task adapter instead — is {_fig(g)} {_fig(g, 'interval')} over the "
                  "multi-task adapter on dev (goal +1.50). Its leave-one-domain-out check would need a multi-task adapter "
                  "trained without each held-out domain."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
