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
