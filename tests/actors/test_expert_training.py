import numpy as np
import pytest

from actors.encoder import EncoderEngine
from actors.expert_training import AdapterTrainSettings, train_query_adapter
from actors.routed_encoder import RoutedEncoder, route_and_encode_requests

QUERIES = [f"question number {i} about topic {t}" for i, t in enumerate("abcdefgh")]


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_training_moves_queries_towards_their_documents(tmp_path, model_path, encoder_settings):
    base = EncoderEngine(model_path, None, encoder_settings)
    queries = QUERIES
    targets = _unit_rows(8, base.dim, 0)
    report = train_query_adapter(
        model_path, encoder_settings, queries, targets, tmp_path / "toy",
        AdapterTrainSettings(steps=25, batch_size=8, lr=2e-3), progress=False,
    )
    assert (tmp_path / "toy" / "adapter_config.json").is_file()
    assert np.mean(report["losses"][-5:]) < report["losses"][0]
    trained = EncoderEngine(model_path, {"toy": tmp_path / "toy"}, encoder_settings)
    before = np.sum(base.encode(queries) * targets, axis=1).mean()
    after = np.sum(trained.encode(queries, "toy") * targets, axis=1).mean()
    assert after > before + 0.05


def test_routed_encoder_routes_to_the_pilot_domain(engine, mean_pilots):
    sci = ["protein folding in cells", "gene expression in tumors", "insulin resistance mechanisms"]
    law = ["should voting be mandatory", "ban on school uniforms debate", "freedom of speech limits"]
    pilots = mean_pilots(engine, {"alpha": sci, "beta": law})
    routed = RoutedEncoder(engine, pilots, "pilot_mean")
    batch = routed.route_and_encode(["DNA methylation in cancer cells", "is censorship ever justified"])
    assert [q.expert for q in batch.queries] == ["alpha", "beta"]
    for q, name in zip(batch.queries, ["alpha", "beta"]):
        assert set(q.routing_scores) == {"alpha", "beta"}
        assert max(q.routing_scores, key=q.routing_scores.get) == name
    # second pass used the chosen adapter
    np.testing.assert_allclose(batch.queries[1].embedding, engine.encode(["is censorship ever justified"], "beta")[0], atol=1e-5)


def test_request_batch_mixes_experts_and_isolates_a_bad_request(engine, mean_pilots):
    pilots = mean_pilots(engine, {"alpha": ["cells"], "beta": ["debate"]})
    routed = RoutedEncoder(engine, pilots)
    out = route_and_encode_requests(
        routed,
        [
            {"queries": ["a", "b"], "forced": ["alpha", "base"]},
            {"queries": ["c"], "forced": ["nope"]},
            {"queries": ["d"], "forced": ["beta"]},
        ],
    )
    assert out[0]["experts"] == ["alpha", "base"] and out[0]["forced"] == [True, True]
    assert "unknown expert 'nope'" in out[1]["error"]
    assert out[2]["experts"] == ["beta"]
    np.testing.assert_allclose(out[2]["embeddings"][0], engine.encode(["d"], "beta")[0], atol=1e-5)
    np.testing.assert_allclose(out[0]["embeddings"][1], engine.encode(["b"])[0], atol=1e-5)


def test_hard_negatives_are_top_ranked_non_relevant_rows():
    from actors.expert_training import mine_hard_negatives

    corpus = np.eye(6, dtype=np.float32)
    q = np.array([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)
    assert mine_hard_negatives(q, corpus, [{0}], 2).tolist() == [[1, 2]]
    assert mine_hard_negatives(q, corpus, [{0, 1}], 2, skip_top=1).tolist() == [[3, 4]]


def test_hard_negatives_enter_the_loss(tmp_path, model_path, encoder_settings):
    """Same data and seed: adding hard negatives must change the loss (they are real columns)."""
    queries = ["alpha query", "beta query", "gamma query", "delta query"]
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(4, 384)).astype(np.float32)
    hard = rng.normal(size=(4, 2, 384)).astype(np.float32)
    s = AdapterTrainSettings(steps=1, batch_size=4)
    plain = train_query_adapter(model_path, encoder_settings, queries, pos, tmp_path / "a", s, progress=False)
    mined = train_query_adapter(model_path, encoder_settings, queries, pos, tmp_path / "b", s, progress=False, hard_negatives=hard)
    assert mined["hard_negatives_per_query"] == 2 and plain["hard_negatives_per_query"] == 0
    assert mined["losses"][0] > plain["losses"][0]  # more negative columns, same positives → higher CE


def test_full_corpus_objective_ranks_targets_higher(tmp_path, model_path, encoder_settings):
    """Softmax over the whole (frozen) corpus: targets must climb in the full ranking."""
    base = EncoderEngine(model_path, None, encoder_settings)
    queries = QUERIES
    corpus = _unit_rows(60, base.dim, 0)
    targets = list(range(8))
    report = train_query_adapter(
        model_path, encoder_settings, queries, corpus[targets], tmp_path / "full",
        AdapterTrainSettings(steps=25, batch_size=8, lr=2e-3), progress=False,
        corpus=(corpus, targets, [{t} for t in targets]),
    )
    assert report["objective"] == "full_corpus" and report["corpus_size"] == 60

    def mean_rank(vectors):
        sims = vectors @ corpus.T
        return np.mean([(sims[i] > sims[i, t]).sum() for i, t in enumerate(targets)])

    trained = EncoderEngine(model_path, {"full": tmp_path / "full"}, encoder_settings)
    assert mean_rank(trained.encode(queries, "full")) < mean_rank(base.encode(queries)) - 5


def test_all_positives_objective_lifts_every_judged_doc(tmp_path, model_path, encoder_settings):
    """positives='all': each query's other judged docs climb too (with 'best' they are only masked)."""
    base = EncoderEngine(model_path, None, encoder_settings)
    corpus = _unit_rows(60, base.dim, 2)
    judged = [{3 * i, 3 * i + 1, 3 * i + 2} for i in range(8)]  # 3 relevant docs per query
    targets = [3 * i for i in range(8)]
    others = [(i, r) for i in range(8) for r in sorted(judged[i]) if r != targets[i]]

    def others_rank(vectors):
        sims = vectors @ corpus.T
        return np.mean([(sims[i] > sims[i, r]).sum() for i, r in others])

    ranks = {}
    for mode in ("best", "all"):
        report = train_query_adapter(
            model_path, encoder_settings, QUERIES, corpus[targets], tmp_path / mode,
            AdapterTrainSettings(steps=25, batch_size=8, lr=2e-3, positives=mode), progress=False,
            corpus=(corpus, targets, judged),
        )
        assert report["settings"]["positives"] == mode
        ranks[mode] = others_rank(EncoderEngine(model_path, {mode: tmp_path / mode}, encoder_settings).encode(QUERIES, mode))
    assert ranks["all"] < others_rank(base.encode(QUERIES)) - 5
    assert ranks["all"] < ranks["best"] - 5


def test_all_positives_need_the_full_corpus_objective(tmp_path, model_path, encoder_settings):
    with pytest.raises(ValueError, match="full-corpus"):
        train_query_adapter(
            model_path, encoder_settings, QUERIES, _unit_rows(8, 384, 0), tmp_path / "x",
            AdapterTrainSettings(steps=1, positives="all"), progress=False,
        )
    with pytest.raises(ValueError, match=r"target_modules \['qproj'\] match no linear layer.*'query'"):
        train_query_adapter(
            model_path, encoder_settings, QUERIES, _unit_rows(8, 384, 0), tmp_path / "z",
            AdapterTrainSettings(steps=1, target_modules=("query", "qproj")), progress=False,
        )
    with pytest.raises(ValueError, match="'best' or 'all'"):
        train_query_adapter(
            model_path, encoder_settings, QUERIES, _unit_rows(8, 384, 0), tmp_path / "y",
            AdapterTrainSettings(steps=1, positives="some"), progress=False,
        )


def test_dev_selection_keeps_the_best_step_and_never_worse_than_base(tmp_path, model_path, encoder_settings):
    base = EncoderEngine(model_path, None, encoder_settings)
    queries = QUERIES
    targets = _unit_rows(8, base.dim, 1)
    dev_q = queries[:4]
    dev_base = base.encode(dev_q)
    s = AdapterTrainSettings(steps=20, batch_size=8, lr=2e-3)
    # a dev score that any change from the base model lowers: step 0 (identity adapter) must win
    stay = train_query_adapter(
        model_path, encoder_settings, queries, targets, tmp_path / "stay", s, progress=False,
        dev=(dev_q, lambda v: float(np.sum(v * dev_base, axis=1).mean())), eval_every=5,
    )
    assert stay["best_step"] == 0 and [st for st, _ in stay["dev_curve"]] == [0, 5, 10, 15, 20]
    kept = EncoderEngine(model_path, {"stay": tmp_path / "stay"}, encoder_settings)
    np.testing.assert_allclose(kept.encode(dev_q, "stay"), dev_base, atol=1e-5)
    # a dev score that rewards the training objective: a later step wins and is what gets saved
    go = train_query_adapter(
        model_path, encoder_settings, queries, targets, tmp_path / "go", s, progress=False,
        dev=(dev_q, lambda v: float(np.sum(v * targets[:4], axis=1).mean())), eval_every=5,
    )
    assert go["best_step"] > 0
    best = max(v for _, v in go["dev_curve"])
    saved = EncoderEngine(model_path, {"go": tmp_path / "go"}, encoder_settings).encode(dev_q, "go")
    assert float(np.sum(saved * targets[:4], axis=1).mean()) == pytest.approx(best, abs=1e-4)


def test_patience_stops_after_that_many_steps_without_a_new_best(tmp_path, model_path, encoder_settings):
    base = EncoderEngine(model_path, None, encoder_settings)
    dev_q = QUERIES[:4]
    dev_base = base.encode(dev_q)
    score = lambda v: float(np.sum(v * dev_base, axis=1).mean())  # noqa: E731 - any change lowers it
    targets = _unit_rows(8, base.dim, 1)
    s = dict(steps=30, batch_size=8, lr=2e-3)
    full = train_query_adapter(
        model_path, encoder_settings, QUERIES, targets, tmp_path / "full", AdapterTrainSettings(**s),
        progress=False, dev=(dev_q, score), eval_every=5,
    )
    early = train_query_adapter(
        model_path, encoder_settings, QUERIES, targets, tmp_path / "early", AdapterTrainSettings(**s, patience=10),
        progress=False, dev=(dev_q, score), eval_every=5,
    )
    # the best is step 0, so the run stops at the first check 10 steps after it; the LR is constant,
    # so the steps it ran are exactly the first steps of the full run
    assert full["best_step"] == early["best_step"] == 0 and not full["stopped_early"]
    assert early["stopped_early"] and early["steps_run"] == 10 and len(early["losses"]) == 10
    assert [st for st, _ in early["dev_curve"]] == [0, 5, 10]
    np.testing.assert_allclose([v for _, v in early["dev_curve"]], [v for _, v in full["dev_curve"][:3]], atol=1e-5)
    np.testing.assert_allclose(early["losses"], full["losses"][:10], rtol=1e-4)
    kept = EncoderEngine(model_path, {"early": tmp_path / "early"}, encoder_settings)
    np.testing.assert_allclose(kept.encode(dev_q, "early"), dev_base, atol=1e-5)
    with pytest.raises(ValueError, match="patience.*dev queries"):
        train_query_adapter(
            model_path, encoder_settings, QUERIES, targets, tmp_path / "nodev",
            AdapterTrainSettings(steps=2, patience=5), progress=False,
        )


def test_group_batches_draw_each_batch_from_one_group_and_cover_every_query():
    import random
    from collections import Counter

    from actors.expert_training import group_batches

    groups = [0] * 30 + [1] * 90 + [2] * 3
    batches = group_batches(groups, 8, random.Random(0))
    seen, per_group = Counter(), Counter()
    for _ in range(400):
        b = next(batches)
        assert len({groups[i] for i in b}) == 1 and len(set(b)) == len(b)
        assert len(b) == (3 if groups[b[0]] == 2 else 8)  # a group smaller than the batch is one batch
        seen.update(b)
        per_group[groups[b[0]]] += len(b)
    assert set(seen) == set(range(len(groups)))
    # groups are drawn in proportion to their size: group 1 gets about 3× group 0's batches
    assert 2.0 < per_group[1] / per_group[0] < 4.5
    one = group_batches([0] * 10, 4, random.Random(0))
    first_epoch = [i for _ in range(3) for i in next(one)][:10]
    assert sorted(first_epoch) == list(range(10))  # one group: plain shuffled epochs


def test_preserve_keeps_other_texts_where_the_base_model_puts_them(tmp_path, model_path, encoder_settings):
    base = EncoderEngine(model_path, None, encoder_settings)
    targets = _unit_rows(8, base.dim, 2)
    others = [f"an unrelated passage number {i} on subject {t}" for i, t in enumerate("mnopqrstuvwx")]
    s = AdapterTrainSettings(steps=25, batch_size=8, lr=2e-3)
    free = train_query_adapter(model_path, encoder_settings, QUERIES, targets, tmp_path / "free", s, progress=False)
    kept = train_query_adapter(model_path, encoder_settings, QUERIES, targets, tmp_path / "kept", s, progress=False,
                               preserve=(others, 10.0))
    assert free["preserve"] == {"texts": 0, "weight": 0.0, "encoded": 0}
    assert kept["preserve"] == {"texts": 12, "weight": 10.0, "encoded": 12}  # 25 steps x 8 draws reach all 12
    trained = EncoderEngine(model_path, {"free": tmp_path / "free", "kept": tmp_path / "kept"}, encoder_settings)
    at_base = base.encode(others)

    def drift(name: str) -> float:  # mean 1 - cosine to the base embedding
        return float(1 - np.sum(trained.encode(others, name) * at_base, axis=1).mean())

    assert drift("kept") < 0.5 * drift("free")
    # the expert still learns its own queries
    gain = lambda name: float(np.sum(trained.encode(QUERIES, name) * targets, axis=1).mean())  # noqa: E731
    assert gain("kept") > float(np.sum(base.encode(QUERIES) * targets, axis=1).mean()) + 0.05
    # the base embeddings are encoded when first drawn: one step of 4 draws encodes at most 4 of the 12
    short = train_query_adapter(model_path, encoder_settings, QUERIES, targets, tmp_path / "short",
                                AdapterTrainSettings(steps=1, batch_size=4), progress=False, preserve=(others, 10.0))
    assert 1 <= short["preserve"]["encoded"] <= 4 and short["preserve"]["texts"] == 12


def test_full_corpus_loss_over_own_rows_ignores_every_other_column():
    """own=(start, stop): only those columns compete; the loss equals the plain loss computed on
    that slice alone, whatever the other columns hold (a union's other domains)."""
    import torch

    from actors.expert_training import full_corpus_loss

    logits = torch.tensor(np.random.default_rng(0).normal(size=(2, 8)), dtype=torch.float32)
    rows = [(3, {3, 4}), (5, {5})]
    for all_positives in (True, False):
        sliced = full_corpus_loss(logits[:, 2:7], [(t - 2, {j - 2 for j in judged}) for t, judged in rows], all_positives)
        own = full_corpus_loss(logits, rows, all_positives, [(2, 7), (2, 7)])
        assert float(own) == pytest.approx(float(sliced), abs=1e-6)
        louder = logits.clone()
        louder[:, [0, 1, 7]] += 50.0  # other domains' documents far above every own document
        assert float(full_corpus_loss(louder, rows, all_positives, [(2, 7), (2, 7)])) == pytest.approx(float(own), abs=1e-6)
        assert float(full_corpus_loss(louder, rows, all_positives)) > float(own) + 10  # the union's softmax sees them


def test_own_domain_softmax_enters_the_loss_and_is_checked(tmp_path, model_path, encoder_settings):
    """own_rows: the loss is the mean of the union's and the own rows' softmax (lower than the
    union's alone when the other rows are negatives); rows that miss a judged doc are refused."""
    queries = QUERIES[:4]
    corpus = _unit_rows(40, 384, 5)
    targets = [20, 21, 22, 23]
    args = (model_path, encoder_settings, queries, corpus[targets])
    s = AdapterTrainSettings(steps=1, batch_size=4)
    full = (corpus, targets, [{t} for t in targets])
    union = train_query_adapter(*args, tmp_path / "u", s, progress=False, corpus=full)
    both = train_query_adapter(*args, tmp_path / "b", s, progress=False, corpus=full, own_rows=[(20, 40)] * 4)
    assert both["own_domain_softmax"] and not union["own_domain_softmax"]
    assert both["losses"][0] < union["losses"][0]  # half of it over 20 columns instead of 40
    with pytest.raises(ValueError, match="own_rows of query 0"):
        train_query_adapter(*args, tmp_path / "x", s, progress=False, corpus=full, own_rows=[(0, 20)] * 4)
    with pytest.raises(ValueError, match="needs the full-corpus objective"):
        train_query_adapter(*args, tmp_path / "y", s, progress=False, own_rows=[(20, 40)] * 4)
