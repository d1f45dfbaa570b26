"""benchmarks/union_negatives.py's report: one row per domain, each expert against base, the mean."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_report_puts_each_expert_beside_base():
    from union_negatives import render

    train = {"best_step": 25, "steps_run": 300, "corpus_size": 10, "seconds": 1.0, "dev_best": 0.3}
    rows = [{"domain": "nfcorpus", "queries": 323, "training": {"domain": train, "union": {**train, "best_step": 50}},
             "base": 25.9, "negatives_domain": 24.8, "negatives_union": 26.4, "dev_queries": 200,
             "dev": {"base": 25.0, "negatives_domain": 26.0, "negatives_union": 30.0}},
            {"domain": "npl", "queries": 42, "training": {"domain": train, "union": train},
             "base": 41.0, "negatives_domain": 43.0, "negatives_union": 43.5, "dev_queries": 10,
             "dev": {"base": 40.0, "negatives_domain": 45.0, "negatives_union": 46.0}}]
    doc = {"command": "union_negatives.py", "commit": "abc", "date": "today", "machine": {"cpu": "x"},
           "union": ["nfcorpus", "npl"], "steps": 300, "patience": 100, "max_queries": 50, "rows": rows}
    md = render(doc)
    assert "| nfcorpus | 323 | 25.90 | 24.80 (-1.10) | 26.40 (+0.50) | 25 / 50 | 200 | 25.00 / 26.00 / 30.00 |" in md
    assert "| **mean** | | 33.45 | 33.90 (+0.45) | 34.95 (+1.50) | | | 32.50 / 35.50 / 38.00 |" in md
    rows[1].pop("dev")  # a row without dev figures: dashes, and no mean of them
    md = render(doc)
    assert "| npl | 42 | 41.00 | 43.00 (+2.00) | 43.50 (+2.50) | 25 / 25 | 10 | – / – / – |" in md
    assert md.rstrip().endswith("| | | – / – / – |")
