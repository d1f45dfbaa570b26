"""benchmarks/beir_goals.py: issue 19's goals checked from result files, each with its paired interval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

DOMAINS = ["a", "b"]


def _setting(setting: str, per_query: dict[str, dict[str, np.ndarray]]) -> dict:
    """A beir_eval.py result of one setting built from per-query scores (figures = their means)."""
    policies = {p: {**{d: float(np.mean(v[d])) for d in DOMAINS}} for p, v in per_query.items()}
    for per in policies.values():
        per["avg"] = float(np.mean([per[d] for d in DOMAINS]))
    n = {d: len(next(iter(per_query.values()))[d]) for d in DOMAINS}
    return {"setting": setting, "domains": DOMAINS, "policies": policies,
            "query_ids": {d: [f"{d}{i}" for i in range(n[d])] for d in DOMAINS},
            "per_query_ndcg@10": {p: {d: list(map(float, v[d])) for d in DOMAINS} for p, v in per_query.items()}}


def _docs(rng):
    base = {d: rng.uniform(0.2, 0.6, 400) for d in DOMAINS}
    pilot = {d: base[d] + 0.05 + rng.normal(0, 0.01, 400) for d in DOMAINS}  # +5 points, steady
    per_domain = _setting("per_domain", {"base": base, "pilot_knn": pilot})
    union = _setting("union", {"base": base, "pilot_knn": pilot, "dataset_oracle": {d: base[d] + 0.055 for d in DOMAINS}})
    lodo = _setting("lodo", {"base": base, "pilot_knn": {"a": base["a"] - 0.02 + rng.normal(0, 0.01, 400),  # clearly worse
                                                         "b": base["b"] - 0.004 + rng.normal(0, 0.2, 400)}})  # noisy
    result = {**per_domain, "union": union, "lodo": lodo, "command": "beir_eval.py --name r", "commit": "c1"}
    multitask = {**_setting("per_domain", {"base": base, "pilot_knn": pilot}), "commit": "c2",
                 "union": _setting("union", {"base": base, "pilot_knn": pilot,
                                             "multitask": {d: pilot[d] - 0.016 + rng.normal(0, 0.001, 400) for d in DOMAINS}})}
    return result, multitask


def test_each_goal_gets_its_figure_interval_and_verdict():
    from beir_goals import goals

    result, multitask = _docs(np.random.default_rng(0))
    rows = {r["goal"]: r for r in goals(result, multitask, "pilot_knn", 0.40)}
    base_gain = rows["pilot_knn ≥ base + 3.0"]
    assert base_gain["figure"] == pytest.approx(0.05, abs=0.002) and base_gain["verdict"] == "met"
    assert rows["pilot_knn ≥ multi-task + 1.5"]["verdict"] == "met"  # +1.6, steady per query
    share = rows["pilot_knn closes ≥ 80 % of the base → DatasetOracle gap"]
    assert share["figure"] == pytest.approx(0.05 / 0.055, abs=0.05) and share["interval"]["low"] <= share["figure"]
    assert rows["a held out: pilot_knn ≥ base − 0.5"]["verdict"] == "missed"
    assert rows["b held out: pilot_knn ≥ base − 0.5"]["verdict"].endswith("within noise")
    assert {r["setting"] for r in rows.values()} == {"union", "lodo", "per_domain"}
    reference = rows["pilot_knn per-domain average ≥ issue 17's 40.00"]
    assert reference["unit"] == "level" and reference["interval"] is None  # not paired: the point decides
    assert reference["verdict"] == "met" and "not paired" in reference["note"]


def test_results_without_per_query_scores_or_on_other_queries_are_refused():
    from beir_goals import goals

    result, multitask = _docs(np.random.default_rng(1))
    old = json.loads(json.dumps(result))
    del old["lodo"]["per_query_ndcg@10"]
    with pytest.raises(SystemExit, match="lodo results carry no per-query scores.*re-run its command: beir_eval.py --name r"):
        goals(old, multitask, "pilot_knn", 0.4)
    other = json.loads(json.dumps(multitask))
    other["union"]["query_ids"]["a"][0] = "elsewhere"
    with pytest.raises(SystemExit, match="different domains or test queries"):
        goals(result, other, "pilot_knn", 0.4)
    with pytest.raises(SystemExit, match="policies \\['pilot_mean'\\] were not evaluated"):
        goals(result, multitask, "pilot_mean", 0.4)


def test_the_command_writes_json_markdown_and_png(tmp_path):
    from typer.testing import CliRunner

    from beir_goals import app

    result, multitask = _docs(np.random.default_rng(2))
    (tmp_path / "r.json").write_text(json.dumps(result))
    (tmp_path / "m.json").write_text(json.dumps(multitask))
    out = CliRunner().invoke(app, ["--result", "r", "--multitask", "m", "--name", "g", "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["test_queries_read"] == 0 and doc["sources"] == {"r.json": "c1", "m.json": "c2"}
    md = (tmp_path / "g.md").read_text()
    assert "| a held out: pilot_knn ≥ base − 0.5 | lodo |" in md and "**missed** |" in md
    assert "| 48.08 | – (not paired) | **missed** |" in md  # the default reference: issue 17's figure
    assert (tmp_path / "g.png").stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))
    missing = CliRunner().invoke(app, ["--result", "nope", "--results-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.replace("│", " ").split())  # usage error
