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
