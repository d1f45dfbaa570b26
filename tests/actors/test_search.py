import numpy as np
import pytest

from actors.search import ShardSearcher, build_flat_index, merge_topk, split_ranges


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_sharded_search_equals_single_index(rng, num_shards, k):
    vectors = rng.normal(size=(1003, 32)).astype(np.float32)
    queries = rng.normal(size=(17, 32)).astype(np.float32)
    single = ShardSearcher(index=build_flat_index(vectors))
    want_s, want_i = single.search(queries, k)
    shards = [
        ShardSearcher(index=build_flat_index(vectors[a:b]), offset=a)
        for a, b in split_ranges(len(vectors), num_shards)
    ]
    got_s, got_i = merge_topk([s.search(queries, k) for s in shards], k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-6, atol=1e-6)
    # and both equal brute force
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got_i, brute)


def test_shards_smaller_than_k_and_ties_break_by_id():
    vectors = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)  # three exact ties
    shards = [ShardSearcher(index=build_flat_index(vectors[a:b]), offset=a) for a, b in [(0, 1), (1, 3), (3, 4)]]
    s, i = merge_topk([sh.search(np.array([[1, 0]], np.float32), 10) for sh in shards], 10)
    assert i.tolist() == [[0, 1, 3, 2]]
    np.testing.assert_allclose(s, [[1, 1, 1, 0]])


def test_split_ranges_cover_everything():
    assert split_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert split_ranges(2, 4)[-1] == (2, 2)
    with pytest.raises(ValueError):
        split_ranges(5, 0)


def test_dimension_mismatch_is_an_error(rng):
    shard = ShardSearcher(index=build_flat_index(rng.normal(size=(4, 8)).astype(np.float32)))
    with pytest.raises(ValueError, match="dim"):
        shard.search(np.zeros((1, 9), np.float32), 2)


def test_shard_roundtrips_through_a_file(tmp_path, rng):
    import faiss

    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    faiss.write_index(build_flat_index(vectors), str(tmp_path / "s.faiss"))
    shard = ShardSearcher(tmp_path / "s.faiss", offset=100)
    s, i = shard.search(vectors[:3], 1)
    assert i[:, 0].tolist() == [100, 101, 102]
    assert shard.device == "cpu"


def test_gpu_search_requested_without_a_gpu_build_is_a_clear_error(rng):
    from actors.search import faiss_gpu_count

    if faiss_gpu_count() > 0:  # a GPU host: the GPU path must actually run
        shard = ShardSearcher(index=build_flat_index(rng.normal(size=(20, 8)).astype(np.float32)), use_gpu="always")
        assert shard.device == "cuda:0" and shard.search(np.ones((1, 8), np.float32), 3)[1].shape == (1, 3)
    else:
        with pytest.raises(RuntimeError, match="sees no GPU"):
            ShardSearcher(index=build_flat_index(rng.normal(size=(20, 8)).astype(np.float32)), use_gpu="always")
        assert ShardSearcher(index=build_flat_index(rng.normal(size=(20, 8)).astype(np.float32)), use_gpu="auto").device == "cpu"


# -- index types from factory strings --------------------------------------------------------------

ANN_TYPES = ["IVF16,Flat", "IVF16,SQ8", "OPQ8,IVF16,PQ8x4", "HNSW16", "HNSW16,SQ8"]


def _unit(rng, n, d=32):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(found, exact):
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


@pytest.mark.parametrize("factory", ANN_TYPES)
def test_every_index_type_builds_searches_and_merges(rng, factory):
    from actors.search import fill_shard, train_index

    vectors, queries = _unit(rng, 3000), _unit(rng, 40)
    template = train_index(factory, vectors)  # one trained template: every shard is filled from it
    defaults = {"nprobe": 4, "ef_search": 32}
    whole = ShardSearcher(index=fill_shard(template, vectors), factory=factory, defaults=defaults)
    shards = [ShardSearcher(index=fill_shard(template, vectors[a:b]), offset=a, factory=factory, defaults=defaults)
              for a, b in split_ranges(len(vectors), 3)]
    got_s, got_i = merge_topk([s.search(queries, 10) for s in shards], 10)
    exact = ShardSearcher(index=build_flat_index(vectors)).search(queries, 10)[1]
    assert got_i.shape == (40, 10) and (got_i >= 0).all() and np.all(np.diff(got_s, axis=1) <= 1e-6)
    if factory.startswith(("IVF", "OPQ")):
        # a shared quantizer: every shard probes the same lists, so the merge IS the unsharded answer
        np.testing.assert_array_equal(got_i, whole.search(queries, 10)[1])
    else:  # HNSW graphs are per shard: the sharded answer is approximate in its own way
        assert _recall(got_i, exact) >= 0.8
    assert whole.knobs == (("ef_search",) if factory.startswith("HNSW") else ("nprobe",))
    assert whole.info()["index"] == factory and whole.info()["knobs"] == {whole.knobs[0]: defaults[whole.knobs[0]]}


def test_flat_recall_is_one_and_nprobe_trades_recall_per_call(rng):
    from actors.search import fill_shard, train_index

    vectors, queries = _unit(rng, 3000), _unit(rng, 40)
    exact = ShardSearcher(index=build_flat_index(vectors)).search(queries, 10)[1]
    flat = ShardSearcher(index=fill_shard(train_index("Flat", vectors), vectors))
    assert _recall(flat.search(queries, 10)[1], exact) == 1.0 and flat.knobs == ()
    ivf = ShardSearcher(index=fill_shard(train_index("IVF16,Flat", vectors), vectors), factory="IVF16,Flat",
                        defaults={"nprobe": 2})
    default = ivf.search(queries, 10)[1]
    recalls = [_recall(ivf.search(queries, 10, {"nprobe": n})[1], exact) for n in (1, 4, 16)]
    assert recalls[0] < recalls[1] < recalls[2] == 1.0  # all 16 lists: exhaustive, so exact
    # knobs are per call: the default is untouched by the calls above
    np.testing.assert_array_equal(ivf.search(queries, 10)[1], default)
    np.testing.assert_array_equal(ivf.search(queries, 10, {"nprobe": 2})[1], default)


def test_a_knob_the_index_lacks_is_an_error_naming_it(rng):
    from actors.search import fill_shard, train_index

    vectors = _unit(rng, 500)
    flat = ShardSearcher(index=build_flat_index(vectors))
    with pytest.raises(ValueError, match=r"no search knob \['nprobe'\]"):
        flat.search(vectors[:1], 3, {"nprobe": 4})
    hnsw = ShardSearcher(index=fill_shard(train_index("HNSW8", vectors), vectors), factory="HNSW8",
                         defaults={"ef_search": 16, "nprobe": 3})
    assert hnsw.defaults == {"ef_search": 16}  # only the index's own knobs are kept
    with pytest.raises(ValueError, match="nprobe"):
        hnsw.search(vectors[:1], 3, {"nprobe": 4})
    with pytest.raises(ValueError, match="needs a default"):
        ShardSearcher(index=fill_shard(train_index("HNSW8", vectors), vectors), factory="HNSW8")


@pytest.mark.parametrize("factory, match", [
    ("IVFx", "could not parse"), ("PQ7", "multiple of the number of subquantizers"), ("IDMap,Flat", "IDMap"), ("", "required"),
])
def test_a_bad_factory_string_says_why(factory, match):
    from actors.search import make_index

    with pytest.raises(ValueError, match=match):
        make_index(factory, 32)


def test_training_with_too_few_vectors_is_a_clear_error(rng):
    from actors.search import train_index

    with pytest.raises(ValueError, match=r"at least one vector per IVF list \(64\); 10 given"):
        train_index("IVF64,Flat", _unit(rng, 10))
    with pytest.raises(ValueError, match="training on 100 vectors failed"):
        train_index("PQ8", _unit(rng, 100))  # 256 centroids per sub-quantizer


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "HNSW16"])
def test_a_memory_mapped_shard_answers_like_a_loaded_one(tmp_path, rng, factory):
    import faiss

    from actors.search import fill_shard, train_index

    vectors, queries = _unit(rng, 2000), _unit(rng, 20)
    faiss.write_index(fill_shard(train_index(factory, vectors), vectors), str(tmp_path / "s.faiss"))
    defaults = {"nprobe": 4, "ef_search": 32}
    loaded = ShardSearcher(tmp_path / "s.faiss", 7, factory=factory, defaults=defaults)
    mapped = ShardSearcher(tmp_path / "s.faiss", 7, factory=factory, defaults=defaults, mmap=True)
    assert mapped.info()["mmap"] is True and loaded.info()["mmap"] is False
    for a, b in zip(loaded.search(queries, 10), mapped.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
