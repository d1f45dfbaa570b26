"""serve.offline.pilots without a model: pilots and their floors from grouped training queries."""

import numpy as np
import pytest

from actors.routing import PilotSet, domain_floor, member_floor, replace_domains
from serve.offline.pilots import pilots_from_groups


def _queries(seed: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype(np.float32)


def test_each_domain_gets_the_floor_of_the_kind_asked_for():
    base, best = _queries(0), np.array([0] * 30 + [1] * 10)
    member, wins = pilots_from_groups(base, best, ["a", "b"], "da", "m", "r", 0.1, "member")
    assert wins == {"a": 30, "b": 10} and member.floor_kind == "member"
    assert member.floors.tolist() == pytest.approx([member_floor(base, 0.1)] * 2)  # every training query of the domain
    pilot, _ = pilots_from_groups(base, best, ["a", "b"], "da", "m", "r", 0.1, "pilot")
    assert pilot.floor_kind == "pilot" and pilot.floors.tolist() == pytest.approx([domain_floor(base, pilot.embeddings, 0.1)] * 2)
    assert member.floors[0] != pytest.approx(pilot.floors[0])


def test_without_a_floor_the_kind_is_the_one_older_files_hold():
    """experts.confidence_quantile null: no floor, whatever experts.confidence_floor says — so a pilot
    file from before the kind (no floor, loaded as 'pilot') still takes a rebuilt domain."""
    old = PilotSet(_queries(1, 2), ["a", "b"], ["da", "db"], "m", "r")
    new, _ = pilots_from_groups(_queries(2), np.zeros(40, int), ["a"], "da", "m", "r", None, "member")
    assert np.isnan(new.floors).all() and new.floor_kind == "pilot"
    assert replace_domains(old, new).domains == ["db", "da"]
