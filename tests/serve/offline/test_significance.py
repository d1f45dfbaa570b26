"""serve/offline/significance.py: the intervals behind every "met / missed" of an evaluation."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from serve.offline.significance import Interval, combine, domain_interval, macro_interval, paired


def test_a_domain_interval_is_the_mean_plus_minus_z_standard_errors():
    x = [0.0, 1.0, 0.5, 0.25, 0.75]
    iv = domain_interval(x)
    se = np.std(x, ddof=1) / math.sqrt(len(x))
    z = NormalDist().inv_cdf(0.975)
    assert (iv.mean, iv.low, iv.high) == pytest.approx((0.5, 0.5 - z * se, 0.5 + z * se))
    assert domain_interval(x, level=0.5).half_width < iv.half_width  # a lower level: narrower
    assert math.isinf(domain_interval([0.3]).half_width)  # one query: no spread, no claim
    with pytest.raises(ValueError, match="at least one"):
        domain_interval([])
    with pytest.raises(ValueError, match="level"):
        domain_interval(x, level=1.0)


def test_the_macro_interval_averages_domains_and_adds_their_variances():
    a, b = [0.1, 0.3, 0.2, 0.4], [0.9, 0.7, 0.8, 0.6, 0.5, 0.75]
    iv = macro_interval({"a": a, "b": b})
    se = math.hypot(np.std(a, ddof=1) / 2, np.std(b, ddof=1) / math.sqrt(6)) / 2
    assert iv.mean == pytest.approx((np.mean(a) + np.mean(b)) / 2)  # each domain counts once, not each query
    assert iv.half_width == pytest.approx(NormalDist().inv_cdf(0.975) * se)


def test_paired_differences_cancel_what_both_policies_share():
    rng = np.random.default_rng(0)
    hard = rng.uniform(0, 1, 400)  # per-query difficulty: both policies feel it
    per_query = {"base": {"d": hard}, "expert": {"d": np.clip(hard + 0.02 + rng.normal(0, 0.01, 400), 0, None)}}
    diff = paired("expert", "base", per_query, ["d"])
    assert macro_interval(diff).low > 0  # the paired interval sees the small, steady gain
    unpaired_se = math.hypot(np.std(per_query["base"]["d"], ddof=1), np.std(per_query["expert"]["d"], ddof=1)) / 20
    assert macro_interval(diff).half_width < 0.2 * NormalDist().inv_cdf(0.975) * unpaired_se
    mix = combine({"expert": 1, "base": -0.2, "oracle": -0.8}, {**per_query, "oracle": {"d": hard + 0.01}}, ["d"])
    assert np.allclose(mix["d"], per_query["expert"]["d"] - 0.2 * hard - 0.8 * (hard + 0.01))


def test_unpaired_or_missing_scores_are_refused_by_name():
    per_query = {"a": {"d": [0.1, 0.2]}, "b": {"d": [0.1, 0.2, 0.3]}}
    with pytest.raises(ValueError, match="different queries"):
        paired("a", "b", per_query, ["d"])
    with pytest.raises(KeyError, match="'c'.*'d'"):
        paired("a", "c", per_query, ["d"])
    with pytest.raises(KeyError, match="domain 'e'"):
        paired("a", "b", per_query, ["e"])
    with pytest.raises(ValueError, match="with itself"):
        paired("a", "a", per_query, ["d"])


@pytest.mark.parametrize(("low", "mean", "high", "verdict"), [
    (0.02, 0.03, 0.04, "met"),
    (0.00, 0.02, 0.04, "met within noise"),
    (0.00, 0.01, 0.02, "missed within noise"),
    (-0.02, -0.01, 0.0, "missed"),
])
def test_verdicts_place_the_target_against_the_interval(low, mean, high, verdict):
    assert Interval(mean, low, high).verdict(0.015) == verdict
