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
    from confidence_floor import routed, with_floors

    from actors.routing import PilotSet, domain_floor

    data = _data()
    pilots = PilotSet(_unit([[1, 0, 0], [0, 1, 0]]), ["a", "b"], ["a", "b"], "m", "r")
    floored = with_floors(pilots, data, 0.3)
    assert floored.floors.tolist() == pytest.approx([domain_floor(data["a"]["base"], pilots.embeddings[:1], 0.3),
                                                     domain_floor(data["b"]["base"], pilots.embeddings[1:], 0.3)])
    assert np.isnan(with_floors(pilots, data, None).floors).all()
    rows = np.arange(50)
    score, base, to_base = routed(with_floors(pilots, data, None), data["a"], rows)
    assert (score, base, to_base) == pytest.approx((0.8, 0.5, 0.0))  # every query of a to expert a
    score, base, to_base = routed(floored, data["a"], rows)
    assert to_base == pytest.approx(0.3, abs=0.04)  # ~30 % below a's own floor (none reach b's)
    assert score == pytest.approx(0.8 * (1 - to_base) + 0.5 * to_base)
    # b held out: only a's pilot is left, and its floor keeps most of b's queries at base
    score, _, to_base = routed(with_floors(pilots.without_domains(["b"]).restrict(["a"]), data, 0.3), data["b"], rows)
    assert to_base > 0.9 and score == pytest.approx(0.8 * (1 - to_base) + 0.5 * to_base)


def test_the_report_names_the_selected_quantile_and_reads_no_test_query():
    from confidence_floor import render

    cell = {"routed": 0.49, "base": 0.5, "to_base": 0.9}
    grid = [{"quantile": q, "held_out": {"a": cell}, "known": {"a": cell}, "worst_held_out_delta": -0.01,
             "known_dev_delta": 0.03} for q in (None, 0.3)]
    doc = {"command": "confidence_floor.py", "commit": "abc", "date": "today", "machine": {"cpu": "x"}, "pilot_rule": "r",
           "tolerance": 0.005, "selected_quantile": 0.3, "grid": grid}
    md = render(doc, ["a"])
    assert "→ **0.3**. Test queries read: 0." in md
    assert "| none | -1.00 (90% base) | -1.00 | +3.00 |" in md and "| 0.3 | -1.00 (90% base) | -1.00 | +3.00 |" in md
