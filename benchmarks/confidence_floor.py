"""The routing policy (experts.policy) and its confidence floor (experts.confidence_quantile,
experts.confidence_floor), chosen on TRAINING and DEV queries only.

    .venv/bin/python benchmarks/confidence_floor.py --experts-dir .routerserve/preserve/final \
        --cache .routerserve/confidence-floor --set 'corpus.datasets=[scifact,nfcorpus,arguana,cranfield,npl]'

A query below every pilot's confidence floor goes to the base model: that protects queries of a
domain no expert knows. Each domain's floor is the cosine its training queries reach, at quantile
q, to their nearest other training query of the domain (``--floors member``: a query reaches it
through any member of the domain's pilots) or to their nearest own-domain pilot (``pilot``) — so q
is about the share of a known domain's queries the floor also sends to base. q is chosen by
leave-one-domain-out over the training queries: for each domain d, its expert and every pilot
built from its queries are dropped, the other domains' floors are set at q, and d's training queries are routed (by the policy, in the union index of every domain);
their nDCG@10 is read from a per-query table of base and every expert. Selected: the smallest q
on the grid at which every held-out domain stays within ``--tolerance`` of base across its 95 %
interval (``--select interval``: the low end, so the training sample's noise is margin; ``point``:
the point figure, the rule before the intervals) (else the q with
the best worst-case). The cost on known domains is reported beside it: their DEV queries (held out
from training) routed with every expert present (for ``pilot_knn``, the dev queries' own member
rows dropped: no query finds itself). The grid runs for each routing policy of ``--policies``
(``pilot_knn:K`` sets the policy's K) and each pilot rule of ``--rules``: ``served`` (the pilots
on disk) or ``[own:]M/N``, pilots regrouped from the tables — each training query joins the group
of the expert that beats its own by more than M nDCG@10 in the union index (``own:``: in the
domain's own corpus, the rule of ``pilots build``), groups under N queries fold into the own group
(``1/1``: one pilot per domain) — with the known domains' pilots and floors built without their dev
queries, so those route out of sample (``served`` pilots hold the dev queries: in sample), and
each floor kind of ``--floors``. The policy (and rule and floor) with the best known-dev gain at
its selected quantile is the one to serve (experts.policy; only out-of-sample rows compete when
the grid has any). The report also shows
what each expert does to each domain's training queries when forced (``expert_on_domain``): the cost the floor guards against,
and what ``experts.training.preserve_weight`` lowers. No test query is read. Writes
benchmarks/results/<name>.{json,md}; per-query tables are cached under --cache.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False)
QUANTILES = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]


def _table(cfg, data_dir: Path, domain: str, domains: list[str], engine, cache: Path, key: str) -> dict:
    """Base embeddings, dev mask and per-query nDCG@10 (columns: base, then engine.experts) of the
    domain's training queries searched in the union of ``domains``, and ``own_table``: the experts'
    nDCG@10 on them in the domain's own corpus (what ``pilots build`` groups by) (cached)."""
    part = _union_table(cfg, data_dir, domain, domains, engine, cache, key)
    if "own_table" not in part:  # a table cached before own_table was kept
        from serve.offline.indexing import load_corpus_vectors
        from serve.offline.ir import domain_examples, examples_qrels
        from serve.offline.pilots import expert_table

        own = load_corpus_vectors(cfg, data_dir, [domain], False)
        examples = domain_examples(cfg, data_dir, domain, own)
        if [q for q, _, _, _ in examples] != part["qids"]:
            raise SystemExit(f"{domain}: the cached table holds another training sample: remove {cache}")
        part["own_table"] = expert_table(engine, domain, part["qids"], [t for _, t, _, _ in examples],
                                         examples_qrels(domain, examples, own), own)
        (cache / f"{domain}-{key}.pkl").write_bytes(pickle.dumps(part))
    return part


def _union_table(cfg, data_dir: Path, domain: str, domains: list[str], engine, cache: Path, key: str) -> dict:
    from ir_measures import nDCG

    from actors.encoder import BASE
    from serve.offline.indexing import load_corpus_vectors
    from serve.offline.pilots import expert_table
    from serve.offline.ir import (SELF_RETRIEVAL_DOMAINS, domain_examples, examples_qrels, per_query, search_run,
                                  shift_rows, split_dev, union_offset)

    path = cache / f"{domain}-{key}.pkl"  # another expert set, sample or union: other tables
    if path.is_file():
        return pickle.loads(path.read_bytes())
    own = load_corpus_vectors(cfg, data_dir, [domain], False)
    union = load_corpus_vectors(cfg, data_dir, domains, False)
    examples = domain_examples(cfg, data_dir, domain, own)
    dev = {q for q, _, _, _ in split_dev(examples, cfg.experts.training.dev_fraction)[1]}
    examples = shift_rows(examples, union_offset(union, domain, own))
    qids, texts = [q for q, _, _, _ in examples], [t for _, t, _, _ in examples]
    qrels = examples_qrels(domain, examples, union)
    base = engine.encode(texts, BASE)
    scores = per_query(qrels, search_run(base, qids, union, 10, domain in SELF_RETRIEVAL_DOMAINS, domain), nDCG @ 10)
    table = np.column_stack([[scores[q] for q in qids], expert_table(engine, domain, qids, texts, qrels, union)])
    out = {"qids": qids, "base": base, "dev": np.array([q in dev for q in qids]), "table": table,
           "experts": list(engine.experts)}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out))
    return out


def with_floors(pilots, data: dict, quantile: float | None, train_only: bool = False, kind: str = "pilot"):
    """``pilots`` with every domain's floor of ``kind`` (actors.routing.FLOOR_KINDS) set at ``quantile``
    of its training queries (None: no floor); ``train_only``: of those that are not dev queries (the
    pilots were built without them)."""
    from dataclasses import replace

    from actors.routing import floor_of

    floors = np.full(len(pilots.experts), np.nan, np.float32)
    if quantile is not None:
        for d in set(pilots.domains):
            rows = [i for i, x in enumerate(pilots.domains) if x == d]
            queries = data[d]["base"][~data[d]["dev"]] if train_only else data[d]["base"]
            floors[rows] = floor_of(kind, queries, pilots.embeddings[rows], quantile)
    return replace(pilots, floors=floors, floor_kind=kind)


def parse_rule(spec: str) -> tuple[str, float, int] | None:
    """``served`` (the pilots on disk: None), ``MARGIN/MIN_QUERIES`` (pilots regrouped by nDCG@10 in
    the union index) or ``own:MARGIN/MIN_QUERIES`` (in each domain's own corpus, as ``pilots build``)."""
    if spec == "served":
        return None
    where, _, rule = spec.rpartition(":")
    margin, _, min_q = rule.partition("/")
    try:
        if where not in ("", "own"):
            raise ValueError
        return where or "union", float(margin), int(min_q or 1)
    except ValueError:
        raise typer.BadParameter(f"--rules: {spec!r} is neither 'served' nor [own:]MARGIN/MIN_QUERIES (e.g. 0.3/10)") from None


def regrouped(served, data: dict, where: str, margin: float, min_q: int, train_only: bool):
    """Pilots of every domain in ``data`` grouped by ``margin`` / ``min_q`` from its training queries'
    nDCG@10 in the union index (``where`` = "union": the served index) or in the domain's own corpus
    ("own": the rule of ``pilots build``), the served pilots' base guards kept. ``train_only``:
    without the dev queries, which then route out of sample."""
    from actors.routing import replace_domains
    from serve.offline.pilots import best_experts, pilots_from_groups

    out = None
    for d, part in data.items():
        rows = ~part["dev"] if train_only else np.ones(len(part["qids"]), bool)
        experts = part["experts"]
        table = part["table"][:, 1:] if where == "union" else part["own_table"]
        best = best_experts(table[rows], experts.index(d), margin, min_q, names=experts)
        new, _ = pilots_from_groups(part["base"][rows], best, experts, d, served.base_model, f"{where} {margin:g}/{min_q}")
        out = replace_domains(out, new)
    out.guards = dict(served.guards)
    return out


SELECT_BY = {"interval": "worst_held_out_low", "point": "worst_held_out_delta"}


def select_quantile(grid: list[dict], tolerance: float, by: str = "interval") -> dict:
    """The grid row (a quantile; ``None``, no floor, never) to serve: the smallest quantile at which
    every held-out domain stays within ``tolerance`` of base — ``by`` "interval": across its 95 %
    interval (the low end: the training queries' own sampling noise is margin, so a test sample is
    less likely to land past the goal), "point": by its point figure (at the goal's edge by
    construction). None qualifies: the quantile with the best worst case."""
    key = SELECT_BY[by]
    rows = [r for r in grid if r["quantile"] is not None]
    ok = [r for r in rows if r[key] >= -tolerance]
    return ok[0] if ok else max(rows, key=lambda r: r[key])


def select(results: dict) -> str:
    """The grid row (policy [@ rule]) with the best known-dev gain at its selected quantile. The
    served pilots hold the dev queries (in sample): with regrouped rules on the grid, only those compete."""
    fair = [k for k, r in results.items() if r.get("rule", "served") != "served"] or list(results)
    return max(fair, key=lambda k: results[k]["known_dev_delta"])


def policy_of(spec: str):
    """A routing policy by name; ``pilot_knn:K`` with its K set."""
    from actors.routing import get_policy

    name, _, k = spec.partition(":")
    policy = get_policy(name)
    if k:
        policy.K = int(k)
    return policy


def without_dev_members(pilots, data: dict):
    """``pilots`` without the members that are dev queries. A domain's members are its training
    queries in ``data``'s row order (the same sample); checked, not assumed."""
    domain_of = np.array(pilots.domains)[pilots.member_pilot] if pilots.members.shape[0] else np.array([])
    drop = []
    for d, part in data.items():
        rows = np.flatnonzero(domain_of == d)
        if len(rows) != len(part["qids"]) or not np.allclose(pilots.members[rows], part["base"], atol=1e-4):
            raise SystemExit(f"the pilots' members of {d} are not its training queries: rebuild the pilots with this "
                             "config (`routerserve pilots build`)")
        drop += list(rows[part["dev"]])
    return pilots.without_members(np.array(drop, np.int64))


def routed_scores(pilots, part: dict, rows: np.ndarray, policy, unknown: list[str] = (), share: float | None = None,
                  ) -> tuple[np.ndarray, list[str]]:
    """(each query's nDCG@10 as routed, the expert each was routed to) for ``part``'s queries at
    ``rows``; with ``unknown`` corpora and a ``share``, the corpus guard as served (``part["corpora"]``:
    each query's base top hits' corpora, benchmarks/corpus_guard.py)."""
    from actors.encoder import BASE
    from actors.routing import route, unknown_corpus_guard

    cols = [BASE, *part["experts"]]
    chosen = route(part["base"][rows], pilots, policy).chosen
    if unknown and share is not None:
        held = unknown_corpus_guard([part["corpora"][i] for i in rows], unknown, share)
        chosen = [BASE if h else c for c, h in zip(chosen, held)]
    table = part["table"][rows]
    return np.array([table[i, cols.index(c)] for i, c in enumerate(chosen)]), chosen


def routed(pilots, part: dict, rows: np.ndarray, policy, unknown: list[str] = (), share: float | None = None,
           ) -> tuple[float, float, float, object]:
    """(routed nDCG@10, base nDCG@10, share sent to base, the 95 % interval of routed minus base
    — paired per query, serve/offline/significance.py) of ``part``'s queries at ``rows``, routed as
    ``routed_scores`` routes them."""
    from actors.encoder import BASE
    from serve.offline.significance import domain_interval

    scores, chosen = routed_scores(pilots, part, rows, policy, unknown, share)
    base = part["table"][rows, 0]
    return (float(scores.mean()), float(base.mean()), float(np.mean([c == BASE for c in chosen])),
            domain_interval(scores - base))


def expert_on_domain(data: dict) -> dict:
    """{domain: {expert: mean nDCG@10 - base}} over the domain's training queries searched in the union,
    every query forced to that expert: what an expert does to queries it was not trained for (the
    held-out loss comes from there when the floor lets such a query through)."""
    return {d: {e: float((part["table"][:, 1 + i] - part["table"][:, 0]).mean()) for i, e in enumerate(part["experts"])}
            for d, part in data.items()}


def load_tables(doms: list[str], experts_dir: Path, max_queries: int, cache: Path, set_: list[str] | None, console):
    """(config, expert generation, the served pilots, {domain: its training queries' table}) —
    the tables cached under ``cache``, keyed by the domains, the adapters and the sample."""
    from actors.encoder import EncoderEngine
    from serve.artifacts.experts import served_experts
    from serve.artifacts.models import encoder_settings, resolve_model
    from serve.config import load_config

    cfg = load_config(None, [f"experts.dir={experts_dir}", f"experts.training.max_queries={max_queries}",
                             *(set_ or [])]).absolutized()
    data_dir = cfg.resolve_data_dir()
    gen, adapters, pilots = served_experts(cfg)
    if pilots is None or not set(doms) <= set(pilots.domains):
        raise SystemExit(f"{experts_dir}: build the pilots of {doms} first (`routerserve pilots build`)")
    engine = EncoderEngine(resolve_model(cfg.model.ref), {d: adapters[d] for d in doms}, encoder_settings(cfg))
    key = hashlib.sha256(json.dumps([doms, {d: str(adapters[d]) for d in doms}, max_queries,
                                     cfg.corpus.max_docs_per_dataset]).encode()).hexdigest()[:12]
    data = {}
    for d in doms:
        console.print(f"table of {d}'s training queries …")
        data[d] = _table(cfg, data_dir, d, doms, engine, cache, key)
    return cfg, gen, pilots, data


@app.command()
def main(
    domains: str = typer.Option("scifact,nfcorpus,arguana,cranfield,npl"),
    experts_dir: Path = typer.Option(Path(".routerserve/preserve/final")),
    max_queries: int = typer.Option(2000, help="as in beir_eval.py: the same training sample"),
    tolerance: float = typer.Option(0.005, help="a held-out domain may fall this far below base (nDCG@10, 0-1)"),
    select_by: str = typer.Option("interval", "--select", help="'interval': the smallest quantile at which every held-out domain stays "
                               "within --tolerance across its 95 % interval (its low end); 'point': by its point figure "
                               "(the rule before the intervals)"),
    cache: Path = typer.Option(Path(".routerserve/confidence-floor")),
    name: str = typer.Option("confidence_floor"),
    policies: str = typer.Option("pilot_mean,pilot_knn:1,pilot_knn:3,pilot_knn:5"),
    floors: str = typer.Option("member,pilot", help="confidence floor kinds to grid (experts.confidence_floor): 'member' "
                               "(cosine to the nearest other training query of the domain), 'pilot' (to the nearest own pilot)"),
    rules: str = typer.Option("served", help="pilot rules to grid: 'served' (the pilots on disk) and [own:]MARGIN/MIN_QUERIES "
                              "(regrouped by nDCG@10 in the union / the domain's own corpus; known domains' dev queries "
                              "then route out of sample)"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
):
    from rich.console import Console

    from actors.routing import FLOOR_KINDS

    if select_by not in SELECT_BY:  # before minutes of tables
        raise typer.BadParameter(f"{select_by!r} is not one of {list(SELECT_BY)}", param_hint="--select")
    kinds = floors.split(",")
    if not set(kinds) <= set(FLOOR_KINDS):  # before minutes of tables
        raise typer.BadParameter(f"{sorted(set(kinds) - set(FLOOR_KINDS))} not among {list(FLOOR_KINDS)}", param_hint="--floors")
    console = Console()
    t0 = time.perf_counter()
    doms = domains.split(",")
    cfg, gen, pilots, data = load_tables(doms, experts_dir, max_queries, cache, set_, console)
    results = {}
    built = {}  # rule -> (pilots for the held-out check, pilots for the known check): once, for every policy
    for rule in rules.split(","):
        grouping = parse_rule(rule)
        if grouping is None:  # the pilots on disk: built from every training query, dev queries included
            built[rule] = pilots, without_dev_members(pilots.restrict(doms), data)
        else:
            built[rule] = (regrouped(pilots, data, *grouping, train_only=False),
                           regrouped(pilots, data, *grouping, train_only=True))
    for rule, spec, kind in [(r, p, k) for r in built for p in policies.split(",") for k in kinds]:
        every, known_pilots = built[rule]
        policy = policy_of(spec)
        grid = []
        for q in [None, *QUANTILES]:
            row = {"quantile": q, "held_out": {}, "known": {}}
            for d in doms:  # d has no expert and no pilots: its training queries are a domain nobody knows
                others = [e for e in doms if e != d]
                fold = with_floors(every.without_domains([d]).restrict(others), data, q, kind=kind)
                score, base, to_base, delta = routed(fold, data[d], np.arange(len(data[d]["qids"])), policy)
                row["held_out"][d] = {"routed": score, "base": base, "to_base": to_base, "delta_low": delta.low,
                                      "delta_high": delta.high}
            full = with_floors(known_pilots, data, q, train_only=rule != "served", kind=kind)
            for d in doms:  # every expert present: what the floor costs a known domain (its dev queries)
                score, base, to_base, _ = routed(full, data[d], np.flatnonzero(data[d]["dev"]), policy)
                row["known"][d] = {"routed": score, "base": base, "to_base": to_base}
            row["worst_held_out_delta"] = min(v["routed"] - v["base"] for v in row["held_out"].values())
            row["worst_held_out_low"] = min(v["delta_low"] for v in row["held_out"].values())
            row["known_dev_delta"] = float(np.mean([v["routed"] - v["base"] for v in row["known"].values() if v["base"] == v["base"]]))
            grid.append(row)
            console.print(f"{spec} @ {rule} {kind} floor q={q}: held-out worst {100 * row['worst_held_out_delta']:+.2f}, known dev "
                          f"{100 * row['known_dev_delta']:+.2f} " + " ".join(
                              f"{d}:{100 * (v['routed'] - v['base']):+.2f}/{100 * v['to_base']:.0f}%" for d, v in row["held_out"].items()))
        best = select_quantile(grid, tolerance, select_by)
        key = (spec if rule == "served" else f"{spec} @ {rule}") + f" · {kind} floor"
        results[key] = {"rule": rule, "floor": kind, "num_pilots": len(every.experts), "grid": grid, "selected_quantile": best["quantile"],
                        "known_dev_delta": best["known_dev_delta"], "worst_held_out_delta": best["worst_held_out_delta"],
                        "worst_held_out_low": best["worst_held_out_low"]}
    chosen = select(results)
    doc = {"command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "experts_generation": gen.id if gen else None,
           "pilot_rule": pilots.rule, "tolerance": tolerance, "select": select_by, "selected_policy": chosen,
           "selected_rule": results[chosen]["rule"], "selected_floor": results[chosen]["floor"],
           "selected_quantile": results[chosen]["selected_quantile"], "policies": results,
           "num_queries": {d: {"training": len(data[d]["qids"]), "dev": int(data[d]["dev"].sum())} for d in doms},
           "expert_on_domain": expert_on_domain(data),
           "test_queries_read": 0, "seconds": time.perf_counter() - t0}
    console.print(f"selected experts.policy = {chosen}, experts.confidence_quantile = {doc['selected_quantile']}, "
                  f"experts.confidence_floor = {doc['selected_floor']}")
    console.print(write_json(name, doc, RESULTS))
    write_markdown(name, render(doc, doms), RESULTS)


def _interval(cell: dict) -> str:
    """`` [low, high]``: a held-out figure's 95 % interval (grids from before it: nothing)."""
    return f" [{100 * cell['delta_low']:+.2f}, {100 * cell['delta_high']:+.2f}]" if "delta_low" in cell else ""


def render(doc: dict, doms: list[str]) -> str:
    lines = ["# The routing policy and its confidence floor, chosen on training and dev queries (issue 19)", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['machine'].get('cpu', '?')} · pilots: "
             f"{doc['pilot_rule']}", "",
             "Held out: each domain's TRAINING queries routed without its expert and its pilots (the union index of every "
             "domain), nDCG@10 minus base [its 95 % interval, paired per query: the sampling noise of these training "
             "queries alone — a test sample of the domain adds its own], and the share sent to base. Known: every domain's DEV queries with every expert "
             "present (pilot_knn: their own member rows dropped; a regrouped rule `M/N`: its pilots and floors built without the "
             "dev queries, grouped by each training query's best expert in the union at margin M, groups under N folded "
             "into the domain's own — the pilots on disk (`served`) include the dev queries, which favours them). Per "
             "policy, rule and floor kind (`member`: a domain's floor is the cosine its training queries reach to their "
             "nearest other training query of the domain, reached through any member; `pilot`: to their nearest own pilot), "
             "the selected quantile is the smallest keeping "
             f"every held-out domain within {100 * doc['tolerance']:.1f} of base"
             + (" across its 95 % interval (its low end)" if doc.get("select") == "interval" else "")
             + "; the policy with the best known-dev gain there "
             "(out of sample: among the regrouped rules when the grid has any; `own:M/N` is the config's "
             "experts.pilot_margin / pilot_min_queries) "
             f"is selected → **{doc['selected_policy']}, quantile {doc['selected_quantile']}**. Test queries read: 0.", "",
             "| policy | selected quantile | worst held-out | worst low end | known dev (mean Δ) |", "|---|---|---|---|---|"]
    for spec, r in doc["policies"].items():
        label = spec + (f" ({r['num_pilots']} pilots)" if "num_pilots" in r else "")
        low = f"{100 * r['worst_held_out_low']:+.2f}" if "worst_held_out_low" in r else "–"  # grids from before the intervals
        lines.append(f"| {label} | {r['selected_quantile']} | {100 * r['worst_held_out_delta']:+.2f} | {low} | "
                     f"{100 * r['known_dev_delta']:+.2f} |")
    cross = doc.get("expert_on_domain") or {}
    if cross:
        experts = list(next(iter(cross.values())))
        lines += ["", "Every training query of a domain forced to one expert (union index): nDCG@10 minus base. Off the "
                  "diagonal is what the floor has to keep away from an expert; the diagonal is an expert on the "
                  "queries it was trained on (optimistic).", "",
                  "| queries of | " + " | ".join(f"{e} expert" for e in experts) + " |", "|---|" + "---|" * len(experts)]
        for d, row in cross.items():
            lines.append(f"| {d} | " + " | ".join(f"{100 * row[e]:+.2f}" for e in experts) + " |")
    for spec, r in doc["policies"].items():
        lines += ["", f"## {spec}", "",
                  "| quantile | " + " | ".join(f"held-out {d}" for d in doms) + " | worst held-out | known dev (mean Δ) |",
                  "|---|" + "---|" * (len(doms) + 2)]
        for row in r["grid"]:
            q = "none" if row["quantile"] is None else f"{row['quantile']:g}"
            cells = [f"{100 * (v['routed'] - v['base']):+.2f}{_interval(v)} ({100 * v['to_base']:.0f}% base)"
                     for v in row["held_out"].values()]
            lines.append(f"| {q} | " + " | ".join(cells) + f" | {100 * row['worst_held_out_delta']:+.2f} | "
                         f"{100 * row['known_dev_delta']:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
