"""Issue 19, step 1: does an expert trained against the union (experts.training.negatives: union)
keep other domains' documents out of its top 10 where it is served — one index over every corpus?

    .venv/bin/python benchmarks/union_negatives.py [--domains nfcorpus,scifact,cranfield,npl]
        [--union scifact,nfcorpus,cranfield,arguana,npl] [--steps 600 --patience 300 --max-queries 2000] [--reuse]

For each domain, two experts are trained with the same settings into separate expert folders under
--workdir: negatives "domain" (the softmax and the dev selection over the domain's own documents,
as the committed BEIR experts were) and "union" (over the union of --union). Then the domain's
TEST queries (read once, here) are encoded by the base model and by each expert — forced, no
routing — and searched in the union index: nDCG@10 (ir-measures) per encoder. Dev selection uses
training-side queries only, and so does the choice between the two: the domain's DEV queries
(held out from training by ``split_dev``) searched in the union are scored the same way, beside
the test figures. ``--reuse``: an expert whose adapter exists is not trained again (its report is
read). Writes <out>/union_negatives.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, fmt, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(
    domains: str = typer.Option("nfcorpus,scifact,cranfield,npl"),
    union: str = typer.Option("scifact,nfcorpus,cranfield,arguana,npl"),
    steps: int = typer.Option(600),
    patience: int = typer.Option(300),
    max_queries: int = typer.Option(2000),
    threads: int = typer.Option(2, help="torch threads (model.num_threads)"),
    workdir: Path = typer.Option(Path(".routerserve/union-negatives")),
    out: Path = typer.Option(RESULTS),
    reuse: bool = typer.Option(False, help="keep an expert whose adapter exists (read its train_report.json)"),
):
    from actors.encoder import BASE, EncoderEngine
    from serve.artifacts.experts import adapters_root
    from serve.artifacts.models import encoder_settings, resolve_model
    from serve.config import load_config
    from serve.offline.beir_eval import SELF_RETRIEVAL_DOMAINS
    from serve.offline.indexing import load_corpus_vectors
    from serve.offline.ir import (dev_scorer, domain_examples, eval_queries, measures, per_query, qualify, search_run,
                                  shift_rows, split_dev, union_offset)
    from serve.offline.training import train_domain_expert

    union_names = union.split(",")
    sets = ["llm.enabled=false", f"corpus.datasets=[{','.join(union_names)}]", "experts.training.default_domains=[]",
            f"experts.training.steps={steps}", f"experts.training.patience={patience}",
            f"experts.training.max_queries={max_queries}", f"model.num_threads={threads}"]
    configs = {neg: load_config(None, [*sets, f"experts.dir={workdir / neg}", f"experts.training.negatives={neg}",
                                       "experts.training.preserve_weight=0"]).absolutized()  # negatives alone (step 1)
               for neg in ("domain", "union")}
    base_cfg = configs["domain"]
    data_dir = base_cfg.resolve_data_dir(None)
    corpus = load_corpus_vectors(base_cfg, data_dir, union_names, progress=False)
    ndcg_m, _ = measures()
    rows = []
    for domain in domains.split(","):
        trained = {}
        for neg, cfg in configs.items():
            t0 = time.perf_counter()
            saved = adapters_root(cfg) / domain / "train_report.json"
            reused = reuse and saved.is_file() and (saved.parent / "adapter_config.json").is_file()
            report = json.loads(saved.read_text()) if reused else train_domain_expert(cfg, data_dir, domain, progress=False, pilots=False)
            trained[neg] = {"best_step": report.get("best_step"), "steps_run": len(report.get("losses", [])),
                            "corpus_size": report.get("corpus_size"), "reused": reused,
                            "seconds": None if reused else time.perf_counter() - t0,
                            "dev_best": max((v for _, v in report.get("dev_curve", [])), default=None)}
            print(f"[{domain}] {neg}: best step {trained[neg]['best_step']} of {trained[neg]['steps_run']}, dev "
                  f"{trained[neg]['dev_best']}" + ("" if reused else f", {trained[neg]['seconds']:.0f} s"), flush=True)
        engine = EncoderEngine(resolve_model(base_cfg.model.ref),
                               {neg: adapters_root(cfg) / domain for neg, cfg in configs.items()},
                               encoder_settings(base_cfg))
        own = load_corpus_vectors(base_cfg, data_dir, [domain], progress=False)
        _, dev = split_dev(domain_examples(base_cfg, data_dir, domain, own), base_cfg.experts.training.dev_fraction)
        dev_texts, dev_score = dev_scorer(domain, shift_rows(dev, union_offset(corpus, domain, own)), corpus)
        queries, qrels = eval_queries(data_dir, domain)  # the test queries
        qids = sorted(qrels)
        qrels = {q: {qualify(domain, d): v for d, v in qrels[q].items()} for q in qids}
        texts = [queries[q] for q in qids]
        row = {"domain": domain, "queries": len(qids), "dev_queries": len(dev_texts), "training": trained, "dev": {}}
        for key, name in (("base", BASE), ("negatives_domain", "domain"), ("negatives_union", "union")):
            run = search_run(engine.encode(texts, name), qids, corpus, 10, domain in SELF_RETRIEVAL_DOMAINS, domain)
            row[key] = 100 * float(np.mean(list(per_query(qrels, run, ndcg_m).values())))
            row["dev"][key] = 100 * dev_score(engine.encode(dev_texts, name)) if dev_texts else None
        rows.append(row)
        print(f"[{domain}] union nDCG@10: base {row['base']:.2f}, domain-negatives {row['negatives_domain']:.2f}, "
              f"union-negatives {row['negatives_union']:.2f}; dev {row['dev']}", flush=True)
    doc = {"command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "union": union_names, "steps": steps,
           "patience": patience, "max_queries": max_queries, "rows": rows}
    print(write_json("union_negatives", doc, out))
    write_markdown("union_negatives", render(doc), out)


def render(doc: dict) -> str:
    lines = ["# Experts trained against the union (issue 19, step 1)", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['machine'].get('cpu', '?')}", "",
             f"nDCG@10 of each domain's test queries searched in ONE index over {', '.join(doc['union'])} (the served "
             f"setting), encoded by the base model or by the domain's expert, forced (no routing). Both experts: "
             f"{doc['steps']} steps at most, patience {doc['patience']}, ≤ {doc['max_queries']} training queries, the step kept by dev "
             "nDCG@10 on held-out training queries — scored over the domain's own documents (negatives: domain) or "
             "over the union (negatives: union), whose softmax also spans the union. The choice between them rests on "
             "the DEV columns (training queries held out from training, searched in the union), not on the test columns.", "",
             "| domain | test queries | base | expert, negatives: domain | expert, negatives: union | best step (domain / union) "
             "| dev queries | dev: base / domain / union |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        t = r["training"]
        d, u = r["negatives_domain"], r["negatives_union"]
        dev = r.get("dev") or {}
        devs = " / ".join(fmt(dev.get(k), ".2f") for k in ("base", "negatives_domain", "negatives_union"))
        lines.append(f"| {r['domain']} | {r['queries']} | {r['base']:.2f} | {d:.2f} ({d - r['base']:+.2f}) | "
                     f"{u:.2f} ({u - r['base']:+.2f}) | {t['domain']['best_step']} / {t['union']['best_step']} | "
                     f"{r.get('dev_queries', '–')} | {devs} |")
    avg = {k: float(np.mean([r[k] for r in doc["rows"]])) for k in ("base", "negatives_domain", "negatives_union")}
    d, u = avg["negatives_domain"], avg["negatives_union"]
    dev_avg = [np.mean([r["dev"][k] for r in doc["rows"]]) if all((r.get("dev") or {}).get(k) is not None for r in doc["rows"])
               else None for k in ("base", "negatives_domain", "negatives_union")]
    lines.append(f"| **mean** | | {avg['base']:.2f} | {d:.2f} ({d - avg['base']:+.2f}) | {u:.2f} ({u - avg['base']:+.2f}) | | | "
                 + " / ".join(fmt(v, ".2f") for v in dev_avg) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app()
