"""benchmarks/confidence_floor.py's arithmetic: floors set per domain at the quantile, queries
routed through the serving rule and scored from the per-query table, the report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _data():
    """Two domains along the x and y axes; the table's columns: base, then experts a and b."""
    rng = np.random.default_rng(0)
    a = _unit(np.array([1.0, 0, 0]) + 0.15 * rng.standard_normal((50, 3)))
    b = _unit(np.array([0, 1.0, 0]) + 0.15 * rng.standard_normal((50, 3)))
    table = np.tile([0.5, 0.8, 0.1], (50, 1))  # expert a helps, b hurts, whichever domain asks
    return {d: {"base": e, "table": table, "experts": ["a", "b"], "qids": [str(i) for i in range(50)],
                "dev": np.arange(50) < 10} for d, e in (("a", a), ("b", b))}


def test_floors_are_set_per_domain_and_gate_the_route():
    from confidence_floor import policy_of, routed, with_floors

    from actors.routing import PilotSet, domain_floor

    mean = policy_of("pilot_mean")
    data = _data()
    pilots = PilotSet(_unit([[1, 0, 0], [0, 1, 0]]), ["a", "b"], ["a", "b"], "m", "r")
    floored = with_floors(pilots, data, 0.3)
    assert floored.floors.tolist() == pytest.approx([domain_floor(data["a"]["base"], pilots.embeddings[:1], 0.3),
                                                     domain_floor(data["b"]["base"], pilots.embeddings[1:], 0.3)])
    assert np.isnan(with_floors(pilots, data, None).floors).all()
    rows = np.arange(50)
    score, base, to_base, _ = routed(with_floors(pilots, data, None), data["a"], rows, mean)
    assert (score, base, to_base) == pytest.approx((0.8, 0.5, 0.0))  # every query of a to expert a
    score, base, to_base, _ = routed(floored, data["a"], rows, mean)
    assert to_base == pytest.approx(0.3, abs=0.04)  # ~30 % below a's own floor (none reach b's)
    assert score == pytest.approx(0.8 * (1 - to_base) + 0.5 * to_base)
    # b held out: only a's pilot is left, and its floor keeps most of b's queries at base
    score, _, to_base, _ = routed(with_floors(pilots.without_domains(["b"]).restrict(["a"]), data, 0.3), data["b"], rows, mean)
    assert to_base > 0.9 and score == pytest.approx(0.8 * (1 - to_base) + 0.5 * to_base)


def test_known_check_drops_the_dev_queries_own_members():
    """pilot_knn on a dev query that is also a member would find itself (cosine 1): its row goes."""
    from confidence_floor import policy_of, routed, with_floors, without_dev_members

    from actors.routing import PilotSet

    data = _data()
    members = np.concatenate([data["a"]["base"], data["b"]["base"]])
    pilots = PilotSet(_unit([[1, 0, 0], [0, 1, 0]]), ["a", "b"], ["a", "b"], "m", "r", members=members,
                      member_pilot=[0] * 50 + [1] * 50)
    knn = policy_of("pilot_knn:1")
    assert knn.K == 1 and policy_of("pilot_knn:3").K == 3
    kept = without_dev_members(with_floors(pilots, data, 0.3), data)
    assert kept.members.shape[0] == 80 and kept.member_pilot.tolist() == [0] * 40 + [1] * 40
    np.testing.assert_array_equal(kept.members[:40], data["a"]["base"][10:])
    rows = np.flatnonzero(data["a"]["dev"])
    score, base, _, _ = routed(kept, data["a"], rows, knn)
    assert base == pytest.approx(0.5) and 0.5 <= score <= 0.8
    # members that are not the domain's training queries in order: refused, not silently misaligned
    shuffled = PilotSet(pilots.embeddings, pilots.experts, pilots.domains, members=members[::-1], member_pilot=[0] * 50 + [1] * 50)
    with pytest.raises(SystemExit, match="members of a are not its training queries"):
        without_dev_members(shuffled, data)


def test_member_floors_are_set_per_domain_from_its_queries_nearest_other_query():
    from confidence_floor import policy_of, routed, with_floors

    from actors.routing import PilotSet, member_floor

    data = _data()
    members = np.concatenate([data["a"]["base"], data["b"]["base"]])
    pilots = PilotSet(_unit([[1, 0, 0], [0, 1, 0]]), ["a", "b"], ["a", "b"], "m", "r", members=members,
                      member_pilot=[0] * 50 + [1] * 50)
    floored = with_floors(pilots, data, 0.3, kind="member")
    assert floored.floor_kind == "member" and with_floors(pilots, data, 0.3).floor_kind == "pilot"
    assert floored.floors.tolist() == pytest.approx([member_floor(data["a"]["base"], 0.3), member_floor(data["b"]["base"], 0.3)])
    train_only = with_floors(pilots, data, 0.3, train_only=True, kind="member")  # without the 10 dev queries
    assert train_only.floors[0] == pytest.approx(member_floor(data["a"]["base"][10:], 0.3))
    # b held out: a's members are far from b's queries, so nearly all of them stay with base
    knn = policy_of("pilot_knn:1")
    fold = with_floors(pilots.without_domains(["b"]).restrict(["a"]), data, 0.3, kind="member")
    score, _, to_base, delta = routed(fold, data["b"], np.arange(50), knn)
    assert to_base > 0.9 and score == pytest.approx(0.8 * (1 - to_base) + 0.5 * to_base)
    assert delta.mean == pytest.approx(score - 0.5) and delta.low <= delta.mean <= delta.high  # paired: routed − base
    _, _, _, kept = routed(with_floors(pilots, data, None, kind="member"), data["a"], np.arange(50), knn)
    assert kept.mean == pytest.approx(0.3) and kept.half_width == pytest.approx(0)  # +0.3 on every query: no spread


def test_the_report_names_the_selected_quantile_and_reads_no_test_query():
    from confidence_floor import render

    cell = {"routed": 0.49, "base": 0.5, "to_base": 0.9}
    grid = [{"quantile": q, "held_out": {"a": cell}, "known": {"a": cell}, "worst_held_out_delta": -0.01,
             "known_dev_delta": 0.03} for q in (None, 0.3)]
    doc = {"command": "confidence_floor.py", "commit": "abc", "date": "today", "machine": {"cpu": "x"}, "pilot_rule": "r",
           "tolerance": 0.005, "selected_policy": "pilot_knn:1", "selected_quantile": 0.3,
           "policies": {"pilot_knn:1": {"grid": grid, "selected_quantile": 0.3, "worst_held_out_delta": -0.01,
                                        "known_dev_delta": 0.03}}}
    md = render(doc, ["a"])
    assert "→ **pilot_knn:1, quantile 0.3**. Test queries read: 0." in md
    assert "| pilot_knn:1 | 0.3 | -1.00 | – | +3.00 |" in md  # a grid from before the intervals: no low end
    assert "| none | -1.00 (90% base) | -1.00 | +3.00 |" in md and "| 0.3 | -1.00 (90% base) | -1.00 | +3.00 |" in md
    cell.update(delta_low=-0.03, delta_high=0.01)  # a grid with the held-out figures' intervals
    assert "| 0.3 | -1.00 [-3.00, +1.00] (90% base) | -1.00 | +3.00 |" in render(doc, ["a"])


def test_the_cross_table_forces_every_domains_queries_to_each_expert():
    from confidence_floor import expert_on_domain, render

    data = _data()
    data["b"]["table"] = np.tile([0.4, 0.1, 0.9], (50, 1))  # on b's queries expert a hurts, b helps
    cross = expert_on_domain(data)
    assert cross == {"a": pytest.approx({"a": 0.3, "b": -0.4}), "b": pytest.approx({"a": -0.3, "b": 0.5})}
    doc = {"command": "c", "commit": "abc", "date": "today", "machine": {}, "pilot_rule": "r", "tolerance": 0.005,
           "selected_policy": "pilot_mean", "selected_quantile": 0.3, "policies": {}, "expert_on_domain": cross}
    md = render(doc, ["a", "b"])
    assert "| queries of | a expert | b expert |" in md
    assert "| a | +30.00 | -40.00 |" in md and "| b | -30.00 | +50.00 |" in md


def test_a_regrouped_rule_builds_pilots_from_the_union_table_and_keeps_dev_queries_out():
    """``M/N``: a training query joins another expert's pilot only when that expert beats its own
    by more than M in the union table; with train_only the dev queries are neither pilots' members
    nor in the floors, so the known check routes them out of sample."""
    import typer
    from confidence_floor import parse_rule, regrouped, with_floors

    from actors.routing import PilotSet, domain_floor

    data = _data()
    data["a"]["table"] = np.tile([0.5, 0.4, 0.1], (50, 1))
    data["a"]["table"][:20, 2] = 0.9  # expert b beats a's own by 0.5 on 20 of a's queries
    data["b"]["table"] = np.tile([0.5, 0.1, 0.8], (50, 1))  # on b's queries b's own wins
    served = PilotSet(_unit([[1, 0, 0], [0, 1, 0]]), ["a", "b"], ["a", "b"], "m", "r",
                      guards={"b": {"routed": False}})
    assert parse_rule("served") is None and parse_rule("0.3/10") == ("union", 0.3, 10)
    assert parse_rule("1") == ("union", 1.0, 1) and parse_rule("own:0.5/3") == ("own", 0.5, 3)
    for bad in ("x/y", "mine:0.3/10"):
        with pytest.raises(typer.BadParameter, match=f"{bad!r} is neither"):
            parse_rule(bad)
    every = regrouped(served, data, "union", 0.3, 10, train_only=False)
    assert list(zip(every.domains, every.experts)) == [("a", "a"), ("a", "b"), ("b", "b")]
    np.testing.assert_allclose(every.embeddings[1], data["a"]["base"][:20].mean(axis=0), rtol=1e-5)
    assert every.guards == served.guards and every.members.shape[0] == 100 and every.rule == "union 0.3/10"
    # own:  grouped by the experts' nDCG@10 in the domain's own corpus (experts only, no base column)
    data["a"]["own_table"] = np.tile([0.4, 0.1], (50, 1))
    data["b"]["own_table"] = np.tile([0.1, 0.8], (50, 1))
    assert regrouped(served, data, "own", 0.3, 10, train_only=False).experts == ["a", "b"]  # b's win is union-only
    assert [e for e in regrouped(served, data, "union", 0.5, 10, train_only=False).experts] == ["a", "b"]  # not by MORE than 0.5
    assert regrouped(served, data, "union", 0.3, 25, train_only=False).experts == ["a", "b"]  # a group of 20 < 25 folds in
    known = regrouped(served, data, "union", 0.3, 10, train_only=True)
    assert known.members.shape[0] == 80  # dev rows (the first 10 of each domain) are not members
    np.testing.assert_allclose(known.embeddings[1], data["a"]["base"][10:20].mean(axis=0), rtol=1e-5)
    floored = with_floors(known, data, 0.3, train_only=True)
    assert floored.floors[2] == pytest.approx(domain_floor(data["b"]["base"][10:], known.embeddings[2:], 0.3))
    data["b"]["base"][0] = _unit([[0.2, 0.3, 1.0]])[0]  # a dev query far from b's pilot sets the all-rows minimum
    assert with_floors(known, data, 0.0, train_only=True).floors[2] > with_floors(known, data, 0.0).floors[2] + 0.2


def test_selection_lets_only_out_of_sample_rows_compete_when_there_are_any():
    from confidence_floor import select

    results = {"pilot_mean": {"rule": "served", "known_dev_delta": 0.036},  # in sample: dev queries are members
               "pilot_mean @ own:0.3/10": {"rule": "own:0.3/10", "known_dev_delta": 0.035},
               "pilot_knn:1 @ 1/1": {"rule": "1/1", "known_dev_delta": 0.033}}
    assert select(results) == "pilot_mean @ own:0.3/10"
    assert select({k: results[k] for k in ("pilot_mean",)}) == "pilot_mean"
    assert select({"pilot_knn:1": {"known_dev_delta": 0.02}, "pilot_mean": {"known_dev_delta": 0.03}}) == "pilot_mean"


def test_an_unknown_floor_kind_is_refused_before_any_table_is_built(tmp_path):
    from typer.testing import CliRunner

    from confidence_floor import app

    out = CliRunner().invoke(app, ["--floors", "member,nearest", "--experts-dir", str(tmp_path / "none"),
                                   "--cache", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "--floors" in out.output and "nearest" in out.output
    assert not (tmp_path / "cache").exists()


def test_the_quantile_is_chosen_with_the_held_out_intervals_as_margin():
    """``point`` takes the smallest quantile whose worst held-out figure meets the tolerance — at the
    goal's edge; ``interval`` asks it of the interval's low end, so a noisier grid point waits."""
    from confidence_floor import render, select_quantile

    def row(q, point, low, known=0.05):
        return {"quantile": q, "worst_held_out_delta": point, "worst_held_out_low": low, "known_dev_delta": known,
                "held_out": {}, "known": {}}

    grid = [row(None, -0.009, -0.012), row(0.01, -0.004, -0.007), row(0.1, -0.003, -0.0045), row(0.3, -0.001, -0.002)]
    assert select_quantile(grid, 0.005, "point")["quantile"] == 0.01
    assert select_quantile(grid, 0.005, "interval")["quantile"] == 0.1
    assert select_quantile(grid, 0.001, "interval")["quantile"] == 0.3  # none qualifies: the best worst case
    best = select_quantile(grid, 0.005)
    doc = {"command": "c", "commit": "abc", "date": "today", "machine": {}, "pilot_rule": "r", "tolerance": 0.005,
           "select": "interval", "selected_policy": "pilot_knn:1", "selected_quantile": 0.1,
           "policies": {"pilot_knn:1": {"grid": [], "selected_quantile": 0.1, "worst_held_out_delta": best["worst_held_out_delta"],
                                        "worst_held_out_low": best["worst_held_out_low"], "known_dev_delta": 0.05}}}
    md = render(doc, ["a"])
    assert "within 0.5 of base across its 95 % interval (its low end)" in md and "| pilot_knn:1 | 0.1 | -0.30 | -0.45 | +5.00 |" in md
