"""benchmarks/ann.py on small data: recall arithmetic, every index type through the serving
search code with its knob, the synthetic set's shape and resemblance, the report. Nothing about
speed is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def _unit(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_counts_the_exact_top_k_found():
    from ann import recall_at_k

    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at_k(found, exact, k=4) == pytest.approx((2 / 4 + 1) / 2)


def test_flat_recall_is_one_and_ivf_recall_grows_with_nprobe():
    from ann import measure_set

    docs, queries = _unit(2000), _unit(50, seed=1)
    rows = measure_set("t", docs, queries, ["IVF32,Flat", "HNSW8"], {"nprobe": [1, 4, 32], "ef_search": [8, 64]}, 1000,
                       min_s=0.05)
    flat = [r for r in rows if r["index"] == "Flat"]
    ivf = [r for r in rows if r["index"] == "IVF32,Flat"]
    assert len(flat) == 1 and flat[0]["recall_at_10"] == 1.0 and flat[0]["speedup_vs_flat"] == 1.0
    assert [r["knob"] for r in ivf] == ["nprobe=1", "nprobe=4", "nprobe=32"]
    recalls = [r["recall_at_10"] for r in ivf]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0 and recalls[0] < 1.0  # nprobe 32 = every list: exact
    assert all(r["train_s"] > 0 and r["memory_mib"] > 0 for r in ivf)
    hnsw = [r for r in rows if r["index"] == "HNSW8"]
    assert [r["knob"] for r in hnsw] == ["ef_search=8", "ef_search=64"] and hnsw[0]["recall_at_10"] <= hnsw[1]["recall_at_10"]


def test_synthetic_vectors_are_unit_length_and_resemble_the_real_clusters():
    from ann import recall_at_k, synthetic

    rng = np.random.default_rng(0)
    centers = _unit(8, 16, seed=3)
    real = centers[rng.integers(0, 8, 3000)] + 0.15 * rng.standard_normal((3000, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    syn = synthetic(real, 5000, components=8)
    assert syn.shape == (5000, 16) and syn.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(syn, axis=1), 1.0, atol=1e-5)
    # each synthetic vector lies near one of the real clusters, and they are used as often
    near = np.argmax(syn @ centers.T, axis=1)
    real_near = np.argmax(real @ centers.T, axis=1)
    np.testing.assert_allclose(np.bincount(near, minlength=8) / 5000, np.bincount(real_near, minlength=8) / 3000, atol=0.03)
    assert recall_at_k(np.argsort(-(syn @ centers.T), axis=1)[:, :1], near[:, None], k=1) == 1.0
    assert np.mean(np.max(syn @ centers.T, axis=1)) == pytest.approx(np.mean(np.max(real @ centers.T, axis=1)), abs=0.03)


def test_the_report_names_the_goal_and_every_section(tmp_path):
    from ann import render

    row = {"vectors": "synthetic-100", "n": 100, "index": "IVF8,SQ8", "knob": "nprobe=4", "recall_at_10": 0.96,
           "qps_batch1": 500.0, "qps_batch64": 900.0, "speedup_vs_flat": 12.0, "memory_mib": 1.0, "build_s": 0.5,
           "start": {"read": {"load_s": 0.2, "rss_anon_mib": 50, "rss_file_mib": 0, "first_search_ms": 1},
                     "mmap": {"load_s": 0.001, "rss_anon_mib": 2, "rss_file_mib": 40, "first_search_ms": 3}}}
    flat = {**row, "index": "Flat", "knob": None, "recall_at_10": 1.0, "speedup_vs_flat": 1.0, "start": None}
    doc = {"command": "ann.py measure", "commit": "abc", "date": "today", "machine": {"cpu": "x", "logical_cpus": 2},
           "datasets": ["scifact"], "queries": 10, "train_size": 100, "rows": [flat, row],
           "ndcg": [{"index": "Flat", "knob": None, "ndcg_at_10": {"scifact": 60.0}, "avg": 60.0, "vs_flat": 0.0}],
           "calibration": [{"vectors": "real", "n": 100, "top1_similarity": 0.6}]}
    render(doc, tmp_path)
    md = (tmp_path / "ann.md").read_text()
    assert "`IVF8,SQ8` nprobe=4: recall 0.960 at 12.0×" in md and "A replica's start" in md and "nDCG@10" in md
    assert (tmp_path / "ann.png").stat().st_size > 0 and (tmp_path / "ann.json").exists() is False
