"""benchmarks/corpus_guard.py: the corpus guard applied in the leave-one-domain-out grid as the
service applies it, the cost on known domains, the share selected, the report."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from actors.routing import l2_normalize as _unit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _data():
    """Domains a and b, close enough that the policy sends every query to the other's expert when
    its own is gone. Table columns: base, expert a, expert b — each expert helps its own domain
    and hurts the other. Half of each domain's queries have base hits all in their own corpus, half
    mostly in the other's."""
    rng = np.random.default_rng(0)
    data = {}
    for d, other, centre, table in (("a", "b", [1.0, 0.2, 0], [0.5, 0.8, 0.3]), ("b", "a", [0.2, 1.0, 0], [0.5, 0.3, 0.8])):
        n = 40
        corpora = [[d] * 10 if i % 2 == 0 else [other] * 7 + [d] * 3 for i in range(n)]
        data[d] = {"base": _unit(np.array(centre) + 0.05 * rng.standard_normal((n, 3))), "table": np.tile(table, (n, 1)),
                   "experts": ["a", "b"], "qids": [str(i) for i in range(n)], "dev": np.arange(n) < 10, "corpora": corpora}
    return data


def test_the_grid_guards_held_out_queries_and_counts_the_cost_to_known_ones():
    from confidence_floor import policy_of
    from corpus_guard import grid_row

    from actors.routing import PilotSet

    data = _data()
    pilots = PilotSet(_unit([[1, 0.2, 0], [0.2, 1, 0]]), ["a", "b"], ["a", "b"], "m", "r")
    mean = policy_of("pilot_mean")
    off = grid_row(pilots, pilots, data, ["a", "b"], mean, None, "member", None)
    # no guard: a held out goes to b's expert (0.3 vs base 0.5); known b's dev queries gain 0.3
    assert off["held_out"]["a"]["routed"] - off["held_out"]["a"]["base"] == pytest.approx(-0.2)
    assert off["known_in_fold"]["a"] == pytest.approx(0.3)
    guarded = grid_row(pilots, pilots, data, ["a", "b"], mean, None, "member", 1.0)
    # share 1.0: a's queries whose 10 hits are all in a (its own, unknown corpus) go to base — half of them
    assert guarded["held_out"]["a"]["to_base"] == pytest.approx(0.5)
    assert guarded["held_out"]["a"]["routed"] - guarded["held_out"]["a"]["base"] == pytest.approx(-0.1)
    # b's dev queries (known in the fold where a is held out): half have 7 of 10 hits in a: not at 1.0 ...
    assert guarded["known_in_fold"]["a"] == pytest.approx(0.3)
    # ... but at 0.7 they go to base: the cost
    cost = grid_row(pilots, pilots, data, ["a", "b"], mean, None, "member", 0.7)
    assert cost["known_in_fold"]["a"] == pytest.approx(0.15) and cost["worst_held_out_delta"] == pytest.approx(-0.1)


def test_the_share_is_the_best_held_out_low_end_within_the_cost():
    from corpus_guard import select_share

    def row(share, low, known):
        return {"share": share, "worst_held_out_low": low, "known_in_fold_delta": known}

    grid = [row(None, -0.005, 0.05), row(0.2, 0.0, 0.040), row(0.5, -0.001, 0.0495), row(0.8, -0.001, 0.05),
            row(1.0, -0.004, 0.05)]
    assert select_share(grid, 0.001) == 0.8  # 0.2 costs too much; 0.5 and 0.8 tie: the larger share
    assert select_share(grid, 0.02) == 0.2
    assert select_share([row(None, -0.005, 0.05), row(0.5, 0.0, 0.01)], 0.001) is None


def test_the_report_names_the_selected_share_and_reads_no_test_query(tmp_path):
    from corpus_guard import plot, render

    cell = {"routed": 0.4, "base": 0.5, "to_base": 0.5, "delta_low": -0.2, "delta_high": 0.0}
    grid = [{"share": s, "held_out": {"a": cell}, "known_in_fold": {"a": 0.3}, "worst_held_out_delta": -0.1,
             "worst_held_out_low": -0.2, "known_in_fold_delta": 0.3} for s in (None, 0.5, 1.0)]
    doc = {"command": "cmd", "commit": "abc", "date": "d", "machine": {"cpu": "x"}, "policy": "pilot_knn",
           "confidence_floor": "member", "confidence_quantile": 0.1, "served_share": 0.5, "selected_share": 1.0,
           "max_cost": 0.001, "grid": grid}
    text = render(doc, ["a"])
    assert "selected share: **1**" in text and "served (config): 0.5" in text and "Test queries read: 0" in text
    assert "| off | -10.00 [-20.00, +0.00] (50%) | -10.00 | -20.00 | +30.00 |" in text
    assert plot(doc, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cost_run_refuses_an_unknown_domain_before_loading_anything():
    from corpus_guard import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["cost", "--without", "atlantis", "--set", "corpus.datasets=[scifact,nfcorpus]"])
    assert result.exit_code == 2 and "atlantis" in result.output and "--without" in result.output
