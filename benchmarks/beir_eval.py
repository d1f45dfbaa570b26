"""The RouterRetriever quality benchmark: train what is missing, then evaluate every policy.

    .venv/bin/python benchmarks/beir_eval.py --domains scifact,nfcorpus,arguana,cranfield,npl \
        --experts-dir .routerserve/preserve/final --steps 600 --set experts.training.patience=300 --name beir

1. one expert per domain, trained as the config trains them (configs/local.yaml: the full-corpus
   softmax over the union of the domains — ``corpus.datasets`` is set to ``--domains`` — and the
   other domains' passages preserved), skipped when its adapter exists; 2. pilots of every domain
   by the best-expert rule with the config's margin (configs/local.yaml: 0.3 / 10, chosen by
   benchmarks/pilot_margin.py; ``--set experts.pilot_margin=0 --set experts.pilot_min_queries=1``
   for the paper's), rebuilt when the pilots on disk follow another rule;
3. the multi-task adapter (all domains' training data); 4. `eval beir` in the per-domain and the
union setting, and leave-one-domain-out in the union (``lodo``: each domain routed without its
expert and its pilots; the classifier and the multi-task adapter, trained on every domain, sit
that one out). Writes benchmarks/results/<name>.{json,md,png}, <name>_union.* and <name>_lodo.*;
the JSON holds every setting, the command, versions and the machine. Test queries are never used for
training or pilots (see serve/evaluation.py). Encoding and training dominate the run time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(
    domains: str = typer.Option("scifact,nfcorpus,arguana,cranfield,npl"),
    experts_dir: Path = typer.Option(Path(".routerserve/preserve/final")),
    steps: int = typer.Option(600, help="training steps per expert (multi-task: steps × #domains)"),
    max_queries: int = typer.Option(2000, help="training queries per domain"),
    policies: str = typer.Option("base,multitask,pilot_mean,pilot_mean_ungated,pilot_nearest,dataset_router,classifier,"
                                 "dataset_oracle,instance_oracle"),
    settings: str = typer.Option("per_domain,union,lodo"),
    name: str = typer.Option("beir"),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: Optional[list[str]] = typer.Option(None, "--set"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
):
    from rich.console import Console

    from serve.deploy.cluster import ensure_ray
    from serve.config import load_config
    from serve.offline.beir_eval import evaluate, rule_summary, write_report
    from serve.artifacts.experts import multitask_dir
    from serve.offline.training import train_default_experts, train_multitask_expert

    console = Console()
    overrides = [
        f"corpus.datasets=[{domains}]",  # the served index of the union setting: what the experts train against
        f"experts.dir={experts_dir}",
        f"experts.training.steps={steps}",
        f"experts.training.max_queries={max_queries}",
        f"experts.training.default_domains=[{domains}]",
        *(set_ or []),
    ]
    cfg = load_config(config, overrides).absolutized()
    ddir = cfg.resolve_data_dir(data_dir)
    doms = domains.split(",")
    ensure_ray(cfg.ray)
    t0 = time.perf_counter()
    console.rule("experts")
    trained = train_default_experts(cfg, ddir)
    console.print(f"trained now: {trained}")
    # pilots: rebuilt there when a domain was trained now or the file's grouping rule is not the config's
    pols = policies.split(",")
    if "multitask" in pols and not (multitask_dir(cfg) / "adapter_config.json").is_file():
        console.rule("multi-task adapter")
        train_multitask_expert(cfg, ddir, doms)
    train_seconds = time.perf_counter() - t0
    combined = {
        "benchmark": name,
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        "training": cfg.experts.training.model_dump(),
        "pilot_rule": rule_summary(cfg),
        "train_seconds": train_seconds,
    }
    query_embeddings: dict = {}  # the same experts in both settings: encode each test query once
    for i, setting in enumerate(settings.split(",")):
        console.rule(f"eval {setting}")
        trained_on_all = ("classifier", "multitask") if setting == "lodo" else ()
        result = evaluate(cfg, ddir, doms, [p for p in pols if p not in trained_on_all], setting,
                          embedding_cache=query_embeddings)
        result["command"] = combined["command"]
        stem = RESULTS / (name if i == 0 else f"{name}_{setting}")
        write_report(result, stem)
        if i == 0:
            combined.update({k: v for k, v in result.items() if k != "command"})
        else:
            combined[setting] = result
        for policy, per in result["policies"].items():
            console.print(f"{setting:10s} {policy:16s} " + "  ".join(f"{d}={100 * per[d]:.1f}" for d in [*doms, "avg"]))
    write_json(name, combined, RESULTS)  # every setting in one file, replacing the first setting's report JSON
    console.print(f"wrote {RESULTS / name}.* in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    app()
