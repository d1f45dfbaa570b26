"""The corpus guard (experts.unknown_corpus_share) on TRAINING and DEV queries only.

    .venv/bin/python benchmarks/corpus_guard.py select --experts-dir .routerserve/both \
        --cache .routerserve/confidence-floor-both --set 'corpus.datasets=[scifact,nfcorpus,arguana,cranfield,npl]'
    .venv/bin/python benchmarks/corpus_guard.py cost --without cranfield --set ...   # its serving cost

When the union index holds a corpus no expert is named after, a routed query whose base top 10
hits come at least a share s from such corpora goes to base (actors.routing.unknown_corpus_guard,
applied by the retrieval service after its search). Leave-one-domain-out over the training
queries, with the served policy and confidence floor (experts.policy, confidence_quantile,
confidence_floor): for each domain d, its expert and its pilots are dropped and its corpus stays
in the index — the corpus no expert knows —, and per s:

* held out: d's training queries, nDCG@10 minus base [95 % interval, paired per query] and the
  share sent to base — what the guard protects;
* known, in the fold: the other domains' DEV queries (their pilots built without them: out of
  sample), routed with the four experts and the same guard — what it costs a known domain whose
  queries' neighbours include documents of d.

Selected (``select_share``): among the shares that cost the known domains at most ``--max-cost``
points of dev nDCG@10 against no guard, the one with the best worst held-out low end (ties: the
larger share, which sends fewer queries to base) — the config's experts.unknown_corpus_share.
The rule and its 0.1 were set before any test figure with the guard was read. With every expert
present no corpus is unknown and the guard does nothing (no row for that: the known-dev figure of
benchmarks/confidence_floor.py stands). Tables are confidence_floor.py's
(same cache); each query's base top 10 in the union is searched here. No test query is read.
Writes benchmarks/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402
from confidence_floor import load_tables, policy_of, routed, with_floors, without_dev_members  # noqa: E402

app = typer.Typer(add_completion=False)
SHARES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def hit_corpora(cfg, data: dict, doms: list[str]) -> None:
    """``data[d]["corpora"]``: each training query's base top-10 hits' corpora in the union of
    ``doms``, best first (the searched rows are the ones the tables scored)."""
    from actors.routing import CORPUS_VOTE_K
    from serve.offline.indexing import load_corpus_vectors
    from serve.offline.ir import SELF_RETRIEVAL_DOMAINS, ranked_corpora, search_run

    union = load_corpus_vectors(cfg, cfg.resolve_data_dir(), doms, False)
    for d, part in data.items():
        run = search_run(part["base"], part["qids"], union, CORPUS_VOTE_K, d in SELF_RETRIEVAL_DOMAINS, d)
        part["corpora"] = ranked_corpora(run, part["qids"])


def select_share(grid: list[dict], max_cost: float) -> float | None:
    """The share to serve: within ``max_cost`` (nDCG@10, 0-1) of no guard's known dev in the fold,
    the best worst held-out low end; ties go to the larger share. None: no share qualifies."""
    off = next(r for r in grid if r["share"] is None)
    ok = [r for r in grid if r["share"] is not None and r["known_in_fold_delta"] >= off["known_in_fold_delta"] - max_cost]
    if not ok:
        return None
    return max(ok, key=lambda r: (round(r["worst_held_out_low"], 6), r["share"]))["share"]


def grid_row(pilots, known_pilots, data: dict, doms: list[str], policy, quantile, kind: str,
             share: float | None) -> dict:
    """One share (None: no guard): held-out and known-in-the-fold figures, every domain held out once."""
    row: dict = {"share": share, "held_out": {}, "known_in_fold": {}}
    for d in doms:
        others = [e for e in doms if e != d]
        fold = with_floors(pilots.without_domains([d]).restrict(others), data, quantile, kind=kind)
        score, base, to_base, delta = routed(fold, data[d], np.arange(len(data[d]["qids"])), policy, [d], share)
        row["held_out"][d] = {"routed": score, "base": base, "to_base": to_base, "delta_low": delta.low,
                              "delta_high": delta.high}
        known = with_floors(known_pilots.without_domains([d]).restrict(others), data, quantile, kind=kind)
        gains = []
        for o in others:
            score, base, to_base, _ = routed(known, data[o], np.flatnonzero(data[o]["dev"]), policy, [d], share)
            gains.append(score - base)
        row["known_in_fold"][d] = float(np.mean(gains))
    row["worst_held_out_delta"] = min(v["routed"] - v["base"] for v in row["held_out"].values())
    row["worst_held_out_low"] = min(v["delta_low"] for v in row["held_out"].values())
    row["known_in_fold_delta"] = float(np.mean(list(row["known_in_fold"].values())))
    return row


@app.command()
def select(
    domains: str = typer.Option("scifact,nfcorpus,arguana,cranfield,npl"),
    experts_dir: Path = typer.Option(Path(".routerserve/both")),
    max_queries: int = typer.Option(2000, help="as in beir_eval.py: the same training sample"),
    cache: Path = typer.Option(Path(".routerserve/confidence-floor-both"), help="confidence_floor.py's table cache"),
    name: str = typer.Option("corpus_guard"),
    max_cost: float = typer.Option(0.001, help="what the guard may cost the known domains' dev queries in the fold "
                                   "(nDCG@10, 0-1; 0.001 = 0.1 points)"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
):
    from rich.console import Console

    console = Console()
    t0 = time.perf_counter()
    doms = domains.split(",")
    cfg, gen, pilots, data = load_tables(doms, experts_dir, max_queries, cache, set_, console)
    hit_corpora(cfg, data, doms)
    e = cfg.experts
    policy = policy_of(e.policy)
    known_pilots = without_dev_members(pilots.restrict(doms), data)
    grid = []
    for share in [None, *SHARES]:
        row = grid_row(pilots, known_pilots, data, doms, policy, e.confidence_quantile, e.confidence_floor, share)
        grid.append(row)
        console.print(f"share {share}: held-out worst {100 * row['worst_held_out_delta']:+.2f} (low "
                      f"{100 * row['worst_held_out_low']:+.2f}), known dev in the fold {100 * row['known_in_fold_delta']:+.2f}")
    doc = {"command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "experts_generation": gen.id if gen else None,
           "policy": e.policy, "confidence_quantile": e.confidence_quantile, "confidence_floor": e.confidence_floor,
           "served_share": e.unknown_corpus_share, "max_cost": max_cost, "selected_share": select_share(grid, max_cost),
           "grid": grid,
           "num_queries": {d: {"training": len(data[d]["qids"]), "dev": int(data[d]["dev"].sum())} for d in doms},
           "test_queries_read": 0, "seconds": time.perf_counter() - t0}
    console.print(f"selected experts.unknown_corpus_share = {_share(doc['selected_share'])} (served: "
                  f"{_share(doc['served_share'])})")
    console.print(write_json(name, doc, RESULTS))
    write_markdown(name, render(doc, doms), RESULTS)
    console.print(plot(doc, RESULTS / f"{name}.png"))


def _share(s) -> str:
    return "off" if s is None else f"{s:g}"


def render(doc: dict, doms: list[str]) -> str:
    lines = ["# The corpus guard on training and dev queries (experts.unknown_corpus_share)", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['machine'].get('cpu', '?')} · "
             f"policy {doc['policy']}, confidence floor {doc['confidence_floor']} at {doc['confidence_quantile']} · "
             f"selected share: **{_share(doc['selected_share'])}** (the best worst held-out low end among shares costing "
             f"known dev at most {100 * doc['max_cost']:.1f} points) · served (config): {_share(doc['served_share'])}", "",
             "Leave one domain out: its expert and pilots dropped, its corpus kept in the union index (a corpus no expert "
             "knows). Held out: its TRAINING queries, nDCG@10 minus base [95 % interval, paired per query] (share sent to "
             "base). Known in the fold: the other four domains' DEV queries (pilots built without them), mean nDCG@10 minus "
             "base, with the same guard — the cost. A routed query goes to base when at least `share` of its base top 10 "
             "hits come from the corpus no expert knows. Test queries read: 0.", "",
             "| share | " + " | ".join(f"held-out {d}" for d in doms) + " | worst held-out | worst low end | known dev in the fold |",
             "|---|" + "---|" * (len(doms) + 3)]
    for row in doc["grid"]:
        cells = [f"{100 * (v['routed'] - v['base']):+.2f} [{100 * v['delta_low']:+.2f}, {100 * v['delta_high']:+.2f}] "
                 f"({100 * v['to_base']:.0f}%)" for v in row["held_out"].values()]
        lines.append(f"| {_share(row['share'])} | " + " | ".join(cells) + f" | {100 * row['worst_held_out_delta']:+.2f} | "
                     f"{100 * row['worst_held_out_low']:+.2f} | {100 * row['known_in_fold_delta']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> Path:
    """Held-out worst (and its low end) and the known-dev cost against the share."""
    from serve.offline.reports import save_figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["grid"] if r["share"] is not None]
    off = next(r for r in doc["grid"] if r["share"] is None)
    x = [r["share"] for r in rows]
    fig, (held, known) = plt.subplots(1, 2, figsize=(10, 4))
    held.plot(x, [100 * r["worst_held_out_delta"] for r in rows], "o-", label="worst held-out domain")
    held.plot(x, [100 * r["worst_held_out_low"] for r in rows], "v--", label="its 95 % interval's low end")
    held.axhline(100 * off["worst_held_out_delta"], color="C0", lw=0.8, ls=":", label="no guard")
    held.axhline(100 * off["worst_held_out_low"], color="C1", lw=0.8, ls=":", label="no guard: low end")
    held.axhline(-0.5, color="grey", lw=0.8, label="goal: within 0.5 of base")
    held.set_title("held out: its training queries (the guard's gain)", fontsize=9)
    known.plot(x, [100 * r["known_in_fold_delta"] for r in rows], "s-", color="C2", label="with the guard")
    known.axhline(100 * off["known_in_fold_delta"], color="C2", lw=0.8, ls=":", label="no guard")
    known.set_title("known domains' dev queries, fold mean (its cost)", fontsize=9)
    for ax in (held, known):
        if doc["served_share"] is not None:
            ax.axvline(doc["served_share"], color="black", lw=0.8, ls="--")
        ax.set_xlabel("unknown_corpus_share (to base at or above)")
        ax.set_ylabel("nDCG@10 minus base (points)")
        ax.legend(fontsize=7)
    fig.suptitle(f"corpus guard, leave one domain out · {doc['commit']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


@app.command()
def cost(
    without: str = typer.Option("cranfield", help="the domain whose expert is disabled (experts.enabled): its corpus stays in "
                                "the index with no expert, so the guard is active"),
    batch: int = typer.Option(16, help="queries per service batch (retrieve_many), as the ingress batches them"),
    per_domain: int = typer.Option(64, help="training queries per domain"),
    repeats: int = typer.Option(5),
    top_k: int = typer.Option(10),
    name: str = typer.Option("corpus_guard_cost"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
):
    """What the guard costs the service while it is active: the config's index and experts with
    ``--without``'s expert disabled, the same training queries through the in-process service
    (retrieval_load.py's ceiling: the ingress's code, no Ray) with the guard at the config's share
    and off, runs interleaved; median queries/s. Writes benchmarks/results/<name>.{json,md}."""
    import asyncio
    import statistics

    from retrieval_load import local_service
    from rich.console import Console

    from serve.app.retrieval.service import RetrieveItem
    from serve.config import load_config
    from serve.offline.ir import training_queries

    console = Console()
    doms = list(load_config(None, set_ or []).corpus.datasets)
    if without not in doms:
        raise typer.BadParameter(f"{without!r} is not one of corpus.datasets {doms}", param_hint="--without")
    cfg = load_config(None, [*(set_ or []), f"experts.enabled=[{','.join(d for d in doms if d != without)}]"]).absolutized()
    data_dir = cfg.resolve_data_dir()
    queries = [t for d in doms for _, t, _ in training_queries(data_dir, d, per_domain)]
    services = {"guard": local_service(cfg, data_dir), "off": local_service(cfg, data_dir, None)}

    async def run(service) -> tuple[float, int, int]:
        t0, held, rows = time.perf_counter(), 0, 0
        for i in range(0, len(queries), batch):
            out = await service.retrieve_many([RetrieveItem(q, top_k, None, False) for q in queries[i : i + batch]])
            held += sum(o["selected_by"] == "corpus" for o in out)
            rows += int(out[0]["timings_ms"]["corpus_guard_rows"])
        return len(queries) / (time.perf_counter() - t0), held, rows

    for service in services.values():
        asyncio.run(run(service))  # warm-up
    runs: dict[str, list] = {k: [] for k in services}
    for r in range(repeats):
        for k, service in services.items():
            runs[k].append(asyncio.run(run(service)))
        console.print(f"run {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1][0]:.1f} q/s" for k, v in runs.items()))
    qps = {k: statistics.median(x[0] for x in v) for k, v in runs.items()}
    ratios = [g[0] / o[0] for g, o in zip(runs["guard"], runs["off"])]  # paired: the two ran back to back
    doc = {"command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "without": without, "corpora": doms,
           "share": cfg.experts.unknown_corpus_share, "batch": batch, "queries": len(queries), "repeats": repeats,
           "qps_runs": {k: [x[0] for x in v] for k, v in runs.items()}, "qps": qps,
           "paired_ratios": ratios, "overhead": 1 - statistics.median(ratios), "guard_rows": runs["guard"][0][2], "sent_to_base": runs["guard"][0][1]}
    lines = ["# What the corpus guard costs the service while it is active", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['machine'].get('cpu', '?')}, "
             f"{doc['machine'].get('logical_cpus', '?')} CPUs", "",
             f"The in-process service (the ingress's code over local encoder and shards, no Ray: retrieval_load.py's ceiling), "
             f"the index of {', '.join(doms)}, every expert but {without}'s (its corpus has none: the guard is active), "
             f"{len(queries)} training queries ({per_domain} per domain) in batches of {batch}, top {top_k}; runs interleaved, "
             f"median of {repeats}.", "",
             "| corpus guard | queries/s (median) | runs |", "|---|---|---|"]
    for k in services:
        label = f"on (share {doc['share']:g})" if k == "guard" else "off"
        lines.append(f"| {label} | {qps[k]:.1f} | " + ", ".join(f"{x:.1f}" for x in doc["qps_runs"][k]) + " |")
    lines += ["", f"Overhead: **{100 * doc['overhead']:+.1f} %** of queries/s (1 − the median of each run pair's ratio; the "
              f"pairs' ratios span {min(ratios):.2f}–{max(ratios):.2f}: a difference inside that is noise). Each routed query searched once more as its base "
              f"embedding: {doc['guard_rows']} extra rows for {len(queries)} queries; {doc['sent_to_base']} answered with base "
              f"hits (`selected_by: corpus`)."]
    console.print(write_json(name, doc, RESULTS))
    console.print(write_markdown(name, "\n".join(lines) + "\n", RESULTS))


if __name__ == "__main__":
    app()
