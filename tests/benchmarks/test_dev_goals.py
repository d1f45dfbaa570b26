"""benchmarks/dev_goals.py: issue 19's union goals on dev queries, in beir_eval.py's result shape."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _data(rng) -> dict:
    """Two domains' tables (columns: base, expert a, expert b) with a dev mask; a's own expert helps
    its dev queries, b's expert is worse than base on b (its DatasetOracle column is then base's)."""
    data = {}
    for d, n, own_gain in (("a", 40, 0.2), ("b", 30, -0.1)):
        base = rng.uniform(0.2, 0.5, n)
        other = base - 0.05
        own = base + own_gain
        table = np.column_stack([base, own, other] if d == "a" else [base, other, own])
        dev = np.zeros(n, bool)
        dev[::4] = True
        data[d] = {"qids": [f"{d}{i}" for i in range(n)], "dev": dev, "table": table, "experts": ["a", "b"]}
    return data


def test_dev_results_take_the_dev_rows_pick_each_domains_best_column_and_feed_the_union_goals():
    from beir_goals import union_goals
    from dev_goals import dev_results

    rng = np.random.default_rng(0)
    data = _data(rng)
    routed = {d: data[d]["table"][data[d]["dev"], 1 if d == "a" else 0] for d in data}  # a → its expert, b → base
    multitask = {d: data[d]["table"][data[d]["dev"], 0] + 0.03 for d in data}
    to_base = {"a": np.zeros(10, bool), "b": np.ones(8, bool)}
    union = dev_results(data, routed, multitask, "pilot_knn", to_base)

    assert union["query_ids"] == {"a": [f"a{i}" for i in range(0, 40, 4)], "b": [f"b{i}" for i in range(0, 30, 4)]}
    assert union["dataset_oracle_expert"] == {"a": "a", "b": "base"}
    np.testing.assert_allclose(union["per_query_ndcg@10"]["dataset_oracle"]["a"], data["a"]["table"][data["a"]["dev"], 1])
    np.testing.assert_allclose(union["per_query_ndcg@10"]["base"]["b"], data["b"]["table"][data["b"]["dev"], 0])
    pol = union["policies"]
    assert pol["pilot_knn"]["avg"] == pytest.approx((pol["pilot_knn"]["a"] + pol["pilot_knn"]["b"]) / 2)
    assert pol["pilot_knn"]["a"] - pol["base"]["a"] == pytest.approx(0.2)

    assert union["to_base"] == {"a": 0.0, "b": 1.0}
    # the what-if: b's queries went to base, so the multi-task adapter answers them; a's stay routed
    np.testing.assert_allclose(union["per_query_ndcg@10"]["multitask_fallback"]["b"], multitask["b"])
    np.testing.assert_allclose(union["per_query_ndcg@10"]["multitask_fallback"]["a"], routed["a"])

    rows = {r["goal"]: r for r in union_goals(union, union, "pilot_knn", setting="union, dev")}
    assert rows["pilot_knn ≥ base + 3.0"]["figure"] == pytest.approx(0.1)  # (0.2 + 0) / 2
    assert rows["pilot_knn ≥ base + 3.0"]["verdict"] == "met"
    assert rows["pilot_knn ≥ multi-task + 1.5"]["figure"] == pytest.approx(0.1 - 0.03)
    assert rows["pilot_knn closes ≥ 80 % of the base → DatasetOracle gap"]["figure"] == pytest.approx(1.0)
    assert {r["setting"] for r in rows.values()} == {"union, dev"}
    what_if = {r["goal"]: r for r in union_goals(union, union, "multitask_fallback")}
    assert what_if["multitask_fallback ≥ multi-task + 1.5"]["figure"] == pytest.approx((0.2 - 0.03 + 0) / 2)


def test_dev_results_refuse_scores_of_other_queries():
    from dev_goals import dev_results

    data = _data(np.random.default_rng(1))
    routed = {d: data[d]["table"][data[d]["dev"], 0] for d in data}
    multitask = {**routed, "b": routed["b"][:-1]}
    with pytest.raises(ValueError, match="b: 8 dev queries, 8 routed and 7 multi-task scores"):
        dev_results(data, routed, multitask, "pilot_knn")


def test_render_puts_dev_and_test_side_by_side():
    from beir_goals import union_goals
    from dev_goals import dev_results, render

    data = _data(np.random.default_rng(2))
    routed = {d: data[d]["table"][data[d]["dev"], 0] + 0.01 for d in data}
    union = dev_results(data, routed, {d: data[d]["table"][data[d]["dev"], 0] for d in data}, "pilot_knn")
    goals = union_goals(union, union, "pilot_knn", setting="union, dev")
    test = [{**goals[0], "figure": 0.0382, "verdict": "met within noise"}, None, *goals[2:]]
    doc = {"command": "dev_goals.py", "commit": "c", "date": "d", "machine": {"cpu": "x"}, "policy": "pilot_knn",
           "pilot_rule": "own:0.3/10", "confidence_floor": "member", "confidence_quantile": 0.1, "goals": goals,
           "test": {"source": "beir_goals.json", "goals": test}, "dev": union}
    text = render(doc)
    line = next(x for x in text.splitlines() if x.startswith("| pilot_knn ≥ base + 3.0"))
    assert "| +1.00 |" in line and "| +3.82 |" in line and "met within noise" in line
    mt_line = next(x for x in text.splitlines() if x.startswith("| pilot_knn ≥ multi-task"))
    assert mt_line.endswith("| – | – | – |")  # no test figure for it: dashes, not an error
    assert "a → a, b → base" in text
    assert "multitask_fallback" not in text  # no to_base given: no what-if row or line
