"""actors.routed_encoder's batch entry points: several callers' requests served by one pass."""

import numpy as np

from actors.encoder import BASE
from actors.routed_encoder import RoutedEncoder, embed_requests


def test_embed_requests_share_one_mixed_adapter_pass_and_fail_alone(engine, mean_pilots):
    """Three /v1/embeddings callers (base, alpha, beta) and one naming an unknown expert, in one
    batch: each gets exactly what a pass of its own would give, in its order, with its token
    counts; the bad one gets its error; the engine ran one forward for the batch."""
    routed = RoutedEncoder(engine, mean_pilots(engine, {"alpha": ["cell biology"], "beta": ["public policy"]}))
    requests = [{"texts": ["a protein folds", "tax law"], "expert": None},
                {"texts": ["cells divide"], "expert": "alpha"},
                {"texts": ["nope"], "expert": "gamma"},
                {"texts": ["votes and budgets", "a longer sentence about parliaments and their rules"], "expert": "beta"}]
    calls = []
    real = engine.encode

    def counting(texts, adapters=None, batch_size=None):
        calls.append(list(adapters) if isinstance(adapters, list) else adapters)
        return real(texts, adapters, batch_size)

    engine.encode = counting
    try:
        out = embed_requests(routed, requests)
    finally:
        engine.encode = real
    assert calls == [[BASE, BASE, "alpha", "beta", "beta"]]  # one call, every row with its caller's expert
    assert "gamma" in out[2]["error"] and "embeddings" not in out[2]
    for req, got in zip([requests[i] for i in (0, 1, 3)], [out[i] for i in (0, 1, 3)]):
        alone = engine.encode(req["texts"], req["expert"] or BASE)
        np.testing.assert_allclose(got["embeddings"], alone, atol=1e-5)
        assert got["tokens"] == engine.count_tokens(req["texts"])
    assert not np.allclose(out[1]["embeddings"], engine.encode(["cells divide"], BASE), atol=1e-3)  # alpha applied


def test_a_guarded_expert_is_not_routed_to_but_can_be_forced_and_says_why(engine, mean_pilots):
    """The base guard in the serving path: queries nearest alpha's pilot go to base (their
    first-pass embedding), forcing alpha still encodes with alpha, and /v1/experts' info says alpha
    is held back and why."""
    from actors.routed_encoder import encoder_info, route_and_encode_requests

    pilots = mean_pilots(engine, {"alpha": ["cell biology", "proteins fold"], "beta": ["public policy", "tax law"]})
    open_batch = RoutedEncoder(engine, pilots).route_and_encode(["cell biology", "tax law"])
    assert [q.expert for q in open_batch.queries] == ["alpha", "beta"]
    evidence = {"domain": "alpha", "queries": "dev", "num_queries": 10, "index": ["alpha"], "base_ndcg10": 0.5,
                "expert_ndcg10": 0.45, "routed": False}
    pilots.guards = {"alpha": evidence}
    guarded = RoutedEncoder(engine, pilots)
    out = route_and_encode_requests(guarded, [{"queries": ["cell biology", "tax law"]},
                                              {"queries": ["cell biology"], "forced": ["alpha"]}])
    assert out[0]["experts"] == ["base", "beta"] and out[1]["experts"] == ["alpha"]
    assert out[0]["how"] == ["guard", "routed"] and out[1]["how"] == ["forced"]  # why each went where it went
    np.testing.assert_allclose(out[0]["embeddings"][0], engine.encode(["cell biology"], BASE)[0], atol=1e-5)
    np.testing.assert_allclose(out[1]["embeddings"][0], engine.encode(["cell biology"], "alpha")[0], atol=1e-5)
    info = {e["name"]: e for e in encoder_info(guarded, "m")["experts"]}
    assert info["alpha"]["routed"] is False and info["alpha"]["guard"] == evidence
    assert info["beta"]["routed"] is True and info["beta"]["guard"] is None
    assert encoder_info(guarded, "m")["confidence_floor"] is False and encoder_info(guarded, "m")["confidence_floor_kind"] is None
    from dataclasses import replace

    floored = RoutedEncoder(engine, replace(pilots, floors=np.full(len(pilots.experts), 0.5, np.float32), floor_kind="member"))
    assert encoder_info(floored, "m")["confidence_floor"] is True and encoder_info(floored, "m")["confidence_floor_kind"] == "member"


def test_the_base_pass_travels_back_only_while_the_requests_corpora_include_one_no_expert_knows(engine, mean_pilots):
    """The corpus guard's inputs: with the index's corpora in the request, the encoder names those
    its experts leave unknown and returns the base pass's embeddings for the service to search;
    with every corpus known, no corpora sent, or none named after an expert, neither comes back
    (nothing extra on the encoder → ingress hop while the guard has nothing to do)."""
    from actors.routed_encoder import route_and_encode_requests

    routed = RoutedEncoder(engine, mean_pilots(engine, {"alpha": ["cell biology"], "beta": ["public policy"]}))
    queries = ["cell biology", "tax law"]
    out = route_and_encode_requests(routed, [{"queries": queries, "corpora": ["alpha", "beta", "gamma"]},
                                             {"queries": queries, "corpora": ["alpha", "beta"]},
                                             {"queries": queries},
                                             {"queries": queries, "corpora": ["x", "y"]}])
    assert out[0]["unknown_corpora"] == ["gamma"]
    np.testing.assert_allclose(out[0]["base_embeddings"], engine.encode(queries, BASE), atol=1e-5)
    for result in out[1:]:
        assert "unknown_corpora" not in result and "base_embeddings" not in result
        np.testing.assert_allclose(result["embeddings"], out[0]["embeddings"], atol=1e-6)
