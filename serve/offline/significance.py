"""How sure a figure of an evaluation is: intervals over the test queries behind it.

An evaluation's figure is a macro average: per domain, the mean of a per-query score (nDCG@10),
then the mean over the domains. Two policies scored on the same queries differ query by query, so
their difference is itself a per-query score (``paired``) — and so is any weighted sum of policies,
e.g. ``pilot − 0.2·base − 0.8·oracle`` (≥ 0 ⇔ the pilot closes ≥ 80 % of the base → oracle gap).
A domain's mean has standard error sd/√n; the macro average's is √(Σ se_d²)/D (the domains'
queries are independent samples). The interval is mean ± z·se, z of the two-sided level (normal
approximation: the domains here have 42 … 688 test queries). It answers "could the goal's side of
the target be sampling noise?", not "is the method better": a goal missed by less than the
half-width is missed within noise, one met by less than it is met within noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided interval at ``level`` (nDCG as 0-1 fractions, like the results)."""

    mean: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def verdict(self, target: float) -> str:
        """Against a goal ``mean ≥ target``: ``met`` (the whole interval clears it), ``met within
        noise`` (the mean does, the interval's low end does not), ``missed within noise``, ``missed``
        (the whole interval is below)."""
        if self.low >= target:
            return "met"
        if self.mean >= target:
            return "met within noise"
        return "missed within noise" if self.high >= target else "missed"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level}


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), not {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no queries: a mean needs at least one")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.inf  # one query: no spread to measure
    return float(x.mean()), se


def domain_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The interval of one domain's mean per-query score."""
    mean, se = _mean_se(values)
    z = _z(level)
    return Interval(mean, mean - z * se, mean + z * se, level)


def macro_interval(per_domain: Mapping[str, Sequence[float]], level: float = LEVEL) -> Interval:
    """The interval of the macro average (mean over domains of each domain's mean)."""
    if not per_domain:
        raise ValueError("no domains: a macro average needs at least one")
    stats = [_mean_se(v) for v in per_domain.values()]
    mean = float(np.mean([m for m, _ in stats]))
    se = math.sqrt(sum(s * s for _, s in stats)) / len(stats)
    z = _z(level)
    return Interval(mean, mean - z * se, mean + z * se, level)


def combine(terms: Mapping[str, float], per_query: Mapping[str, Mapping[str, Sequence[float]]],
            domains: Sequence[str]) -> dict[str, np.ndarray]:
    """Per domain, the per-query weighted sum Σ weight·score of the policies in ``terms``
    ({policy: weight}) — e.g. {"pilot_knn": 1, "base": -1}: the paired difference. Every policy
    must be scored on the same queries of the domain (checked by count)."""
    out: dict[str, np.ndarray] = {}
    for d in domains:
        total = None
        for policy, weight in terms.items():
            if policy not in per_query or d not in per_query[policy]:
                raise KeyError(f"no per-query scores of policy {policy!r} on domain {d!r}")
            x = weight * np.asarray(per_query[policy][d], dtype=np.float64)
            if total is not None and x.shape != total.shape:
                raise ValueError(f"{d}: policies scored on different queries ({x.shape[0]} vs {total.shape[0]}): not paired")
            total = x if total is None else total + x
        out[d] = total
    return out


def paired(a: str, b: str, per_query: Mapping[str, Mapping[str, Sequence[float]]],
           domains: Sequence[str]) -> dict[str, np.ndarray]:
    """Per domain, policy ``a``'s per-query score minus policy ``b``'s on the same queries."""
    if a == b:
        raise ValueError(f"policy {a!r} paired with itself: the difference is zero by construction")
    return combine({a: 1.0, b: -1.0}, per_query, domains)
