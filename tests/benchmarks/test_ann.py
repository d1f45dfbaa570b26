"""benchmarks/ann.py on small data: recall arithmetic, index types from factory strings with their
search knobs, and the synthetic set's shape. Nothing about speed is asserted."""

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
    from ann import measure

    docs, queries = _unit(2000), _unit(50, seed=1)
    rows = measure("t", docs, queries, ["Flat", "IVF32,Flat"])
    flat = [r for r in rows if r["index"] == "Flat"]
    ivf = [r for r in rows if r["index"] == "IVF32,Flat"]
    assert len(flat) == 1 and flat[0]["recall_at_10"] == 1.0 and flat[0]["speedup_vs_flat"] > 0
    assert [r["knob"] for r in ivf] == ["nprobe=1", "nprobe=4", "nprobe=16", "nprobe=64"]
    recalls = [r["recall_at_10"] for r in ivf]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0 and recalls[0] < 1.0  # nprobe 64 >= 32 lists: exact


def test_synthetic_vectors_are_unit_length_and_follow_the_real_clusters():
    from ann import synthetic

    real = _unit(3000)
    syn = synthetic(real, 5000, clusters=8)
    assert syn.shape == (5000, 16) and syn.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(syn, axis=1), 1.0, atol=1e-5)
