from dataclasses import replace

import numpy as np
import pytest

from actors.routing import PilotSet, choose, get_policy, register_policy, registered_policies, RoutingPolicy


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_pilot_mean_and_nearest_disagree_when_they_should():
    # expert A: one pilot exactly on the query, one opposite → mean 0, nearest 1.
    # expert B: two pilots at 60 degrees → mean 0.5, nearest 0.5.
    q = _unit([[1.0, 0.0]])
    pilots = PilotSet(
        _unit([[1, 0], [-1, 0], [0.5, np.sqrt(3) / 2], [0.5, -np.sqrt(3) / 2]]),
        ["A", "A", "B", "B"],
    )
    mean = get_policy("pilot_mean").score(q, pilots)
    near = get_policy("pilot_nearest").score(q, pilots)
    np.testing.assert_allclose(mean, [[0.0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(near, [[1.0, 0.5]], atol=1e-6)
    assert choose(mean, pilots.expert_names) == ["B"]
    assert choose(near, pilots.expert_names) == ["A"]


def test_scores_are_cosine_whatever_the_norms(rng):
    q = rng.normal(size=(5, 8)).astype(np.float32)
    p = rng.normal(size=(3, 8)).astype(np.float32)
    pilots = PilotSet(p * 7.0, ["x", "y", "z"])
    got = get_policy("pilot_nearest").score(q * 3.0, pilots)
    want = _unit(q) @ _unit(p).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_experts_routes_to_base():
    assert choose(np.zeros((3, 0)), []) == ["base", "base", "base"]


def test_save_load_and_restrict(tmp_path, rng):
    pilots = PilotSet(rng.normal(size=(3, 4)), ["b", "a", "b"], ["d3", "d9", "d4"], "m", "rule-1")
    path = pilots.save(tmp_path)
    loaded = PilotSet.load(path)
    assert loaded.experts == ["b", "a", "b"] and loaded.domains == ["d3", "d9", "d4"] and loaded.base_model == "m"
    assert loaded.rule == "rule-1" and loaded.restrict(["a"]).rule == "rule-1"
    np.testing.assert_array_equal(loaded.embeddings, pilots.embeddings)
    assert loaded.expert_names == ["b", "a"]
    only_b = loaded.restrict(["b"])
    assert only_b.experts == ["b", "b"] and only_b.domains == ["d3", "d4"]
    np.testing.assert_array_equal(only_b.embeddings, pilots.embeddings[[0, 2]])


def test_registry_is_by_name_and_rejects_duplicates():
    assert {"pilot_mean", "pilot_nearest"} <= set(registered_policies())
    with pytest.raises(KeyError, match="unknown routing policy"):
        get_policy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("pilot_mean")(type("Dup", (RoutingPolicy,), {}))


def test_pilotset_validates_shapes():
    with pytest.raises(ValueError, match="one expert name per pilot"):
        PilotSet(np.zeros((2, 3)), ["a"])
    with pytest.raises(ValueError, match="2-D"):
        PilotSet(np.zeros(3), [])


def test_replace_domains_keeps_other_domains(rng):
    from actors.routing import replace_domains

    cur = PilotSet(rng.normal(size=(3, 4)), ["a", "b", "a"], ["d1", "d1", "d2"], "m")
    new = PilotSet(np.ones((1, 4)), ["b"], ["d1"], "m")
    out = replace_domains(cur, new)
    assert out.domains == ["d2", "d1"] and out.experts == ["a", "b"]
    np.testing.assert_array_equal(out.embeddings[0], cur.embeddings[2])
    assert replace_domains(None, new) is new
    # one file, one grouping rule: pilots kept from another rule are refused, replacing them all is fine
    other = PilotSet(np.ones((1, 4)), ["b"], ["d1"], "m", "margin=0.5")
    with pytest.raises(ValueError, match=r"\['d2'\] were grouped by 'an unrecorded rule'"):
        replace_domains(cur, other)
    everything = PilotSet(np.ones((2, 4)), ["b", "a"], ["d1", "d2"], "m", "margin=0.5")
    assert replace_domains(cur, everything).rule == "margin=0.5"



def _two_domains():
    """Experts A and B with one pilot each on the x / y axes, each with a floor of cos 0.8."""
    return PilotSet(_unit([[1, 0, 0], [0, 1, 0]]), ["A", "B"], ["da", "db"], "m", "r", np.array([0.8, 0.8]))


def test_the_confidence_floor_sends_queries_of_no_known_domain_to_base():
    from actors.routing import route

    pilots = _two_domains()
    near_a, near_b, far = [1, 0.1, 0], [0.1, 1, 0.2], [0.3, 0.3, 1]  # far: cos ≈ 0.28 to both pilots
    chosen, scores, how = route(_unit([near_a, near_b, far]), pilots, get_policy("pilot_mean"))
    assert chosen == ["A", "B", "base"] and scores.shape == (3, 2) and how == ["routed", "routed", "floor"]
    assert route(_unit([far]), pilots, get_policy("pilot_mean"), gate=False)[0] == ["A"]  # the bare rule picks one
    unfloored = PilotSet(pilots.embeddings, pilots.experts, pilots.domains)  # a file from before the floor
    assert route(_unit([far]), unfloored, get_policy("pilot_mean"))[0] == ["A"]
    half = PilotSet(pilots.embeddings, pilots.experts, pilots.domains, floors=np.array([np.nan, 0.8]))
    assert route(_unit([near_a, near_b, far]), half, get_policy("pilot_mean")).how == ["floor", "routed", "floor"]
    assert route(_unit([far]), PilotSet.empty(3), get_policy("pilot_mean"))[0] == ["base"]


def test_the_base_guard_holds_an_expert_back_and_only_that_one():
    from actors.routing import route

    pilots = _two_domains()
    pilots.guards = {"A": {"routed": False, "base_ndcg10": 0.5, "expert_ndcg10": 0.4}, "B": {"routed": True}}
    assert pilots.unrouted == {"A"}
    chosen, _, how = route(_unit([[1, 0.1, 0], [0.1, 1, 0], [0.3, 0.3, 1]]), pilots, get_policy("pilot_mean"))
    assert chosen == ["base", "B", "base"] and how == ["guard", "routed", "floor"]
    assert route(_unit([[1, 0.1, 0]]), pilots, get_policy("pilot_mean"), gate=False)[0] == ["A"]


def test_domain_floor_is_the_quantile_of_the_nearest_own_pilot(rng):
    from actors.routing import domain_floor

    queries = _unit(rng.normal(size=(200, 6)))
    own = _unit(rng.normal(size=(2, 6)))
    nearest = (queries @ own.T).max(axis=1)
    floor = domain_floor(queries * 5.0, own, 0.1)  # cosine: the norms do not matter
    assert np.mean(nearest >= floor) == pytest.approx(0.9, abs=0.01)
    assert domain_floor(queries, own, 0.0) == pytest.approx(nearest.min(), abs=1e-6)


def test_floors_and_guards_survive_save_load_restrict_and_replace(tmp_path):
    from actors.routing import replace_domains

    pilots = _two_domains()
    pilots.guards = {"A": {"routed": False}}
    back = PilotSet.load(pilots.save(tmp_path))
    np.testing.assert_allclose(back.floors, [0.8, 0.8])
    assert back.guards == {"A": {"routed": False}} and back.unrouted == {"A"}
    only_b = back.restrict(["B"])
    assert only_b.experts == ["B"] and only_b.floors.tolist() == pytest.approx([0.8]) and only_b.guards == {}
    no_da = back.without_domains(["da"])
    assert no_da.domains == ["db"] and no_da.guards == {"A": {"routed": False}}
    new = PilotSet(_unit([[0, 0, 1]]), ["A"], ["da"], "m", "r", np.array([0.5]), {"A": {"routed": True}})
    merged = replace_domains(back, new)  # da's pilots rebuilt: its expert's guard is the new one
    assert merged.domains == ["db", "da"] and merged.floors.tolist() == pytest.approx([0.8, 0.5])
    assert merged.unrouted == set()
    legacy = tmp_path / "legacy.npz"  # a pilot file written before floors and guards
    np.savez(legacy, embeddings=pilots.embeddings, experts=np.array(pilots.experts), domains=np.array(pilots.domains))
    old = PilotSet.load(legacy)
    assert np.isnan(old.floors).all() and old.guards == {} and old.unrouted == set()
    with pytest.raises(ValueError, match="floors"):
        PilotSet(np.ones((2, 3)), ["a", "b"], floors=np.ones(3))


def _with_members():
    # expert A's pilot is the mean of two far-apart queries; B's of two queries near each other.
    a1, a2 = _unit([1.0, 0.0, 0.0]), _unit([0.0, 1.0, 0.0])
    b1, b2 = _unit([0.9, 0.3, 0.3]), _unit([0.9, 0.3, -0.3])
    members = np.stack([a1, a2, b1, b2])
    return PilotSet(np.stack([(a1 + a2) / 2, (b1 + b2) / 2]), ["A", "B"], ["dA", "dB"], "m",
                    members=members, member_pilot=[0, 0, 1, 1])


def test_pilot_knn_votes_by_training_queries_not_by_their_mean():
    pilots = _with_members()
    q = _unit([[1.0, 0.05, 0.0]])  # one of A's training queries, far from A's averaged pilot
    assert choose(get_policy("pilot_mean").score(q, pilots), pilots.expert_names) == ["B"]
    knn = get_policy("pilot_knn")
    knn.K = 1
    got = knn.score(q, pilots)
    np.testing.assert_allclose(got[0, 0], float(q[0] @ pilots.members[0]), rtol=1e-5)
    assert choose(got, pilots.expert_names) == ["A"]
    knn.K = 5  # more than an expert has: the mean over all of its members
    np.testing.assert_allclose(knn.score(q, pilots)[0], [(q @ pilots.members[:2].T).mean(), (q @ pilots.members[2:].T).mean()],
                               rtol=1e-5)


def test_members_follow_their_pilots_through_restrict_save_and_replace(tmp_path):
    from actors.routing import replace_domains

    pilots = _with_members()
    only_b = pilots.restrict(["B"])
    np.testing.assert_array_equal(only_b.members, pilots.members[2:])
    assert only_b.member_pilot.tolist() == [0, 0]
    assert pilots.without_domains(["dB"]).member_pilot.tolist() == [0, 0]
    loaded = PilotSet.load(pilots.save(tmp_path))
    np.testing.assert_array_equal(loaded.members, pilots.members)
    assert loaded.member_pilot.tolist() == [0, 0, 1, 1]
    # dA rebuilt with one pilot and one member: B's members keep pointing at B's pilot
    new = PilotSet(_unit([[0.0, 0.0, 1.0]]), ["A"], ["dA"], "m", members=_unit([[0.0, 0.0, 1.0]]), member_pilot=[0])
    out = replace_domains(pilots, new)
    assert out.experts == ["B", "A"] and out.member_pilot.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(out.members[2], new.members[0])
    assert pilots.without_members([0, 2]).member_pilot.tolist() == [0, 1]
    with pytest.raises(ValueError, match="names a pilot that does not exist"):
        PilotSet(np.zeros((1, 3)), ["A"], members=np.zeros((1, 3)), member_pilot=[1])


def test_pilot_knn_without_members_scores_by_the_pilots(tmp_path):
    # a file from before members: np.savez without the keys → the nearest pilot
    pilots = _with_members()
    old = PilotSet(pilots.embeddings, pilots.experts, pilots.domains)
    q = _unit([[0.2, 0.9, 0.1]])
    np.testing.assert_allclose(get_policy("pilot_knn").score(q, old), get_policy("pilot_nearest").score(q, old))


def test_member_floor_is_the_quantile_of_the_nearest_other_training_query(rng):
    from actors.routing import member_floor

    queries = _unit(rng.normal(size=(300, 6)))
    sims = queries @ queries.T
    np.fill_diagonal(sims, -np.inf)  # a query is not its own neighbour
    nearest = sims.max(axis=1)
    floor = member_floor(queries * 3.0, 0.1, block=64)  # blocks and norms do not change it
    assert floor == pytest.approx(np.quantile(nearest, 0.1), abs=1e-6)
    assert np.mean(nearest >= floor) == pytest.approx(0.9, abs=0.01)
    assert member_floor(queries, 0.0) == pytest.approx(nearest.min(), abs=1e-6)
    assert member_floor(queries, 0.5) < 0.999  # not the self-match (1.0)
    assert np.isnan(member_floor(queries[:1], 0.1))  # one query has no neighbour: no floor


def test_the_member_floor_is_reached_through_any_member_not_the_pilot_mean():
    from actors.routing import confident, route

    pilots = _with_members()  # A's pilot is the mean of two far-apart queries (cos 0.71 to each)
    pilots.floors = np.array([0.95, 0.999], np.float32)
    near_a1 = _unit([[1.0, 0.05, 0.0]])  # cos 0.999 to A's first member, 0.74 to A's pilot
    between = _unit([[0.0, 0.0, 1.0]])  # far from every member and pilot
    assert confident(near_a1, pilots).tolist() == [False]  # pilot floor: A's mean is too far
    member = replace(pilots, floor_kind="member")
    assert confident(np.vstack([near_a1, between]), member).tolist() == [True, False]
    assert route(near_a1, member, get_policy("pilot_knn")).how == ["routed"]
    member.floors = np.array([np.nan, 0.95], np.float32)  # A's pilot without a floor: its members never reach it
    assert confident(near_a1, member).tolist() == [False]
    bare = PilotSet(pilots.embeddings, pilots.experts, pilots.domains, floors=[0.7, 0.7], floor_kind="member")
    assert confident(near_a1, bare).tolist() == [True]  # no members (an old file): through the pilots


def test_the_floor_kind_survives_save_restrict_and_replace_and_is_never_mixed(tmp_path):
    from actors.routing import replace_domains

    member = replace(_with_members(), floors=np.array([0.9, 0.9], np.float32), floor_kind="member")
    back = PilotSet.load(member.save(tmp_path))
    assert back.floor_kind == "member" and back.restrict(["B"]).floor_kind == "member"
    assert back.without_members([0]).floor_kind == back.without_domains(["dA"]).floor_kind == "member"
    assert PilotSet.load(_with_members().save(tmp_path / "p")).floor_kind == "pilot"
    legacy = tmp_path / "legacy.npz"  # a file from before the kind: its floors were measured to pilots
    np.savez(legacy, embeddings=member.embeddings, experts=np.array(member.experts), floors=member.floors)
    assert PilotSet.load(legacy).floor_kind == "pilot"
    new = PilotSet(_unit([[0.0, 0.0, 1.0]]), ["A"], ["dA"], "m", floors=[0.5])  # a pilot floor, same rule ""
    with pytest.raises(ValueError, match="rebuild every domain"):
        replace_domains(back, new)
    assert replace_domains(back, replace(new, floor_kind="member")).floor_kind == "member"
    with pytest.raises(ValueError, match="floor_kind"):
        PilotSet(np.ones((1, 3)), ["a"], floor_kind="nearest")


def test_unknown_corpora_are_the_index_corpora_no_expert_is_named_after():
    from actors.routing import unknown_corpora

    assert unknown_corpora(["scifact", "nfcorpus", "npl"], ["scifact"]) == ["nfcorpus", "npl"]
    assert unknown_corpora(["scifact", "nfcorpus"], ["scifact", "nfcorpus", "extra"]) == []
    # no expert named after any corpus: names that do not map say nothing, the guard stays off
    assert unknown_corpora(["scifact", "nfcorpus"], ["alpha", "beta"]) == []
    assert unknown_corpora(["scifact"], []) == []


def test_the_corpus_guard_counts_the_top_hits_against_the_share():
    from actors.routing import CORPUS_VOTE_K, unknown_corpus_guard

    u = ["news"]
    hits = [["news"] * 8 + ["sci"] * 2,  # 0.8
            ["news"] * 7 + ["sci"] * 3,  # 0.7
            ["sci"] * 10,
            [],  # no hits: nothing to say
            ["news", "sci"],  # fewer than K: the share of what there is (0.5)
            ["sci"] * CORPUS_VOTE_K + ["news"] * 30]  # only the first K vote
    assert unknown_corpus_guard(hits, u, 0.8) == [True, False, False, False, False, False]
    assert unknown_corpus_guard(hits, u, 0.5) == [True, True, False, False, True, False]
    assert unknown_corpus_guard(hits, u, 1.0) == [False] * 6
    assert unknown_corpus_guard([["news"] * 10], [], 0.1) == [False]  # no unknown corpus
