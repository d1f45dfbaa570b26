"""Issue 19's goals, checked from committed evaluation results — each with its 95 % interval.

    .venv/bin/python benchmarks/beir_goals.py --result beir --multitask beir_both_multitask

Reads benchmarks/results/<result>.json (benchmarks/beir_eval.py: the per-domain setting at the
top, ``union`` and ``lodo`` inside) and <multitask>.json (a run with the ``multitask`` policy and
the served policy in the union setting); reads no test query itself and chooses nothing. Every
goal is a per-query score on the same test queries — the served policy minus base, minus the
multi-task adapter, minus 0.2·base + 0.8·DatasetOracle (≥ 0 ⇔ ≥ 80 % of the gap closed) — so its
interval is paired (serve/offline/significance.py). The per-domain goal compares with issue 17's
committed figure, whose per-query scores were not kept: no paired interval, the point decides.
Verdicts: met · met within noise · missed within noise · missed. Writes benchmarks/results/<name>.{json,md,png}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line, git_commit, machine, write_json, write_markdown  # noqa: E402

app = typer.Typer(add_completion=False)


def _setting(doc: dict, setting: str, source: str) -> dict:
    """One setting's result out of a beir_eval.py file (per_domain at the top, the others nested)."""
    part = doc if doc.get("setting") == setting else doc.get(setting)
    if not part:
        raise SystemExit(f"{source}: no {setting!r} setting (run benchmarks/beir_eval.py with --settings ...,{setting})")
    if "per_query_ndcg@10" not in part:
        raise SystemExit(f"{source}: the {setting} results carry no per-query scores (written before them): re-run "
                         f"its command: {doc.get('command', 'benchmarks/beir_eval.py')}")
    return part


def _check_paired(a: dict, b: dict, what: str) -> None:
    """Two results are paired only on the same queries of the same domains."""
    if a["domains"] != b["domains"] or a["query_ids"] != b["query_ids"]:
        raise SystemExit(f"{what}: the two results were scored on different domains or test queries: not paired")


def goals(result: dict, multitask: dict, policy: str, per_domain_reference: float) -> list[dict]:
    """Every goal of issue 19 as a row: name, setting, figure, target, interval, verdict."""
    from serve.offline.significance import domain_interval, macro_interval, paired

    per_domain, union, lodo = (_setting(result, s, "--result") for s in ("per_domain", "union", "lodo"))
    mt_union = _setting(multitask, "union", "--multitask")
    _check_paired(union, mt_union, "--result union vs --multitask union")
    for part, where in ((per_domain, "per_domain"), (union, "union"), (lodo, "lodo"), (mt_union, "--multitask union")):
        missing = [p for p in (policy, "base") if p not in part["per_query_ndcg@10"]]
        if missing:
            raise SystemExit(f"{where}: policies {missing} were not evaluated")
    for p in ("multitask", policy):
        if p not in mt_union["per_query_ndcg@10"]:
            raise SystemExit(f"--multitask union: policy {p!r} was not evaluated")
    if "dataset_oracle" not in union["per_query_ndcg@10"]:
        raise SystemExit("--result union: policy 'dataset_oracle' was not evaluated")

    rows = union_goals(union, mt_union, policy)
    lq = lodo["per_query_ndcg@10"]
    for d in lodo["domains"]:
        rows.append(_row(f"{d} held out: {policy} ≥ base − 0.5", "lodo",
                         lodo["policies"][policy][d] - lodo["policies"]["base"][d], -0.005,
                         domain_interval(paired(policy, "base", lq, [d])[d])))
    level = macro_interval({d: per_domain["per_query_ndcg@10"][policy][d] for d in per_domain["domains"]})
    rows.append(_row(f"{policy} per-domain average ≥ issue 17's {100 * per_domain_reference:.2f}", "per_domain",
                     per_domain["policies"][policy]["avg"], per_domain_reference, None,
                     "not paired: issue 17's run scored the same test queries but its per-query scores were not kept; "
                     f"the average's own interval, [{100 * level.low:.2f}, {100 * level.high:.2f}], is far wider than a "
                     "paired one would be and says nothing about the difference", unit="level"))
    return rows


def _row(goal: str, setting: str, figure: float, target: float, interval, note: str = "", unit: str = "delta") -> dict:
    """One goal; ``interval`` None: no paired interval exists — the verdict is the point figure's alone."""
    verdict = interval.verdict(target) if interval is not None else "met" if figure >= target else "missed"
    return {"goal": goal, "setting": setting, "figure": figure, "target": target, "unit": unit,
            "interval": interval.as_dict() if interval is not None else None, "verdict": verdict, "note": note}


def union_goals(union: dict, mt_union: dict, policy: str, setting: str = "union") -> list[dict]:
    """The goals in the union: ≥ base + 3.0, ≥ multi-task + 1.5, ≥ 80 % of the base → DatasetOracle
    gap, no domain below base − 0.3 — from two results in beir_eval.py's shape (``policies`` and
    ``per_query_ndcg@10``; ``mt_union`` scores ``multitask`` and ``policy`` on the same queries)."""
    from serve.offline.significance import combine, domain_interval, macro_interval, paired

    doms = union["domains"]
    pq, avg = union["per_query_ndcg@10"], union["policies"]
    rows = [_row(f"{policy} ≥ base + 3.0", setting, avg[policy]["avg"] - avg["base"]["avg"], 0.03,
                 macro_interval(paired(policy, "base", pq, doms)))]
    mq = mt_union["per_query_ndcg@10"]
    same = all(np.allclose(mq[policy][d], pq[policy][d]) for d in doms)
    rows.append(_row(f"{policy} ≥ multi-task + 1.5", setting,
                     mt_union["policies"][policy]["avg"] - mt_union["policies"]["multitask"]["avg"], 0.015,
                     macro_interval(paired(policy, "multitask", mq, doms)),
                     "" if same else f"the --multitask run's {policy} differs from --result's (other experts?): paired "
                     "within that run"))
    gap = avg["dataset_oracle"]["avg"] - avg["base"]["avg"]
    closed = (avg[policy]["avg"] - avg["base"]["avg"]) / gap if gap else float("nan")
    rows.append(_row(f"{policy} closes ≥ 80 % of the base → DatasetOracle gap", setting, closed, 0.8,
                     _shifted(macro_interval(combine({policy: 1, "base": -0.2, "dataset_oracle": -0.8}, pq, doms)), gap, 0.8),
                     "interval of pilot − 0.2·base − 0.8·oracle, shown as the share of the gap closed", unit="share"))
    for d in doms:
        rows.append(_row(f"{d}: {policy} ≥ base − 0.3", setting, avg[policy][d] - avg["base"][d], -0.003,
                         domain_interval(paired(policy, "base", pq, [d])[d])))
    return rows


def _shifted(interval, gap: float, share: float):
    """The interval of ``pilot − (1−s)·base − s·oracle`` (in nDCG) re-expressed as the share of the
    base → oracle gap the pilot closes: value / gap + s (gap fixed at its point estimate)."""
    from serve.offline.significance import Interval

    if not gap:
        return Interval(float("nan"), float("nan"), float("nan"), interval.level)
    lo, hi = sorted((interval.low / gap + share, interval.high / gap + share))
    return Interval(interval.mean / gap + share, lo, hi, interval.level)


def _cell(row: dict, x: float) -> str:
    """A figure as the table shows it: a share of the gap in %, a difference or a level in nDCG@10 points."""
    return {"share": f"{100 * x:.0f} %", "delta": f"{100 * x:+.2f}", "level": f"{100 * x:.2f}"}[row["unit"]]


def render(doc: dict) -> str:
    lines = ["# Issue 19's goals with their 95 % intervals", "",
             f"`{doc['command']}` · commit {doc['commit']} · {doc['date']} · {doc['machine'].get('cpu', '?')}", "",
             f"Sources: {', '.join(f'`{k}` ({v})' for k, v in doc['sources'].items())}. Policy: `{doc['policy']}`. "
             "Each figure is a difference on the same test queries (paired); the interval is the "
             f"{doc['level']:.0%} normal interval of its macro average (serve/offline/significance.py). "
             "Test queries read by this script: 0 (it reads result files).", "",
             "| goal | setting | figure | target | 95 % interval | verdict |", "|---|---|---|---|---|---|"]
    for r in doc["goals"]:
        iv = r["interval"]
        span = f"[{_cell(r, iv['low'])}, {_cell(r, iv['high'])}]" if iv else "– (not paired)"
        lines.append(f"| {r['goal']} | {r['setting']} | {_cell(r, r['figure'])} | {_cell(r, r['target'])} | {span} | "
                     f"**{r['verdict']}** |")
    notes = [r for r in doc["goals"] if r["note"]]
    if notes:
        lines += [""] + [f"- {r['goal']}: {r['note']}" for r in notes]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """Each goal's figure minus its target with the interval; right of zero is the goal met."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from serve.offline.reports import save_figure

    rows = doc["goals"]
    colours = {"met": "tab:green", "met within noise": "yellowgreen", "missed within noise": "orange", "missed": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        scale = 100 * (abs(doc["gaps"]["union"]) if r["unit"] == "share" else 1)  # a share of the gap: in nDCG points
        iv = r["interval"] or {"low": r["figure"], "high": r["figure"]}  # not paired: the point alone
        x, lo, hi = (scale * (v - r["target"]) for v in (r["figure"], iv["low"], iv["high"]))
        ax.errorbar(x, i, xerr=[[x - lo], [hi - x]], fmt="o", color=colours[r["verdict"]], capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=c, label=v) for v, c in colours.items()], fontsize=7,
              loc="lower right")
    ax.set_yticks(range(len(rows)), [f"{r['goal']} ({r['setting']})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("figure − target (nDCG@10 points; 95 % interval)")
    ax.set_title(f"issue 19 goals: {doc['policy']}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@app.command()
def main(
    result: str = typer.Option("beir", help="benchmarks/results/<result>.json: per_domain, union and lodo"),
    multitask: str = typer.Option("beir_both_multitask", help="benchmarks/results/<multitask>.json: a union run with "
                                  "the multitask policy and the served policy"),
    policy: str = typer.Option("pilot_knn", help="the served routing policy (experts.policy)"),
    per_domain_reference: float = typer.Option(0.4808, help="issue 17's per-domain average (nDCG@10, 0-1)"),
    name: str = typer.Option("beir_goals"),
    results_dir: Path = typer.Option(RESULTS, help="where the result files are read and this report written"),
):
    from rich.console import Console

    from serve.offline.significance import LEVEL

    docs = {}
    for label, stem in (("--result", result), ("--multitask", multitask)):
        path = results_dir / f"{stem}.json"
        if not path.is_file():
            raise typer.BadParameter(f"{path} does not exist", param_hint=label)
        docs[label] = json.loads(path.read_text())
    union = _setting(docs["--result"], "union", "--result")
    doc = {"command": command_line(), "commit": git_commit(), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "policy": policy, "level": LEVEL,
           "sources": {f"{result}.json": docs["--result"].get("commit", "?"),
                       f"{multitask}.json": docs["--multitask"].get("commit", "?")},
           "gaps": {"union": union["policies"]["dataset_oracle"]["avg"] - union["policies"]["base"]["avg"]
                    if "dataset_oracle" in union["policies"] else 0.0},
           "goals": goals(docs["--result"], docs["--multitask"], policy, per_domain_reference),
           "test_queries_read": 0}
    console = Console()
    for r in doc["goals"]:
        console.print(f"{r['verdict']:20s} {r['goal']} ({r['setting']}): {_cell(r, r['figure'])} vs {_cell(r, r['target'])}")
    write_json(name, doc, results_dir)
    write_markdown(name, render(doc), results_dir)
    plot(doc, results_dir / f"{name}.png")
    console.print(f"wrote {results_dir / name}.{{json,md,png}}")


if __name__ == "__main__":
    app()
