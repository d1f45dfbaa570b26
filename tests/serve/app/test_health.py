"""Replica health checks that catch a wedged replica (serve.app.health), and the deployments'
check_health over a real FAISS shard whose search never returns."""

import asyncio
import threading

import numpy as np
import pytest

from actors.search import build_flat_index
from serve.app.health import InFlight, Wedged


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_in_flight_reports_the_oldest_running_call_and_forgets_finished_ones():
    clock = _Clock()
    flight = InFlight(clock)
    assert flight.oldest_age_s() == 0.0
    with flight.track():
        clock.now += 5
        with flight.track():
            clock.now += 2
            assert len(flight) == 2 and flight.oldest_age_s() == 7.0
        assert flight.oldest_age_s() == 7.0
    assert len(flight) == 0 and flight.oldest_age_s() == 0.0


def test_check_fails_only_past_the_threshold_and_says_why():
    clock = _Clock()
    flight = InFlight(clock)
    with pytest.raises(RuntimeError), flight.track():  # a failing call is forgotten too
        raise RuntimeError("boom")
    flight.check("X", 1.0)  # idle: healthy however long ago the last call was
    with flight.track():
        clock.now += 10
        flight.check("X", 10.0)  # busy, not past it: healthy
        clock.now += 0.5
        with pytest.raises(Wedged, match=r"X: the oldest of 1 in-flight calls has run 10 s \(limits.stuck_after_s = 10\)"):
            flight.check("X", 10.0)


def test_a_shard_replica_whose_search_hangs_fails_its_health_check(tmp_path):
    """The SearchShard deployment class (what Serve runs) over a real index file: healthy when
    idle and while searching normally; unhealthy once a search has hung past stuck_after_s, so
    Serve replaces it. Before: no check_health at all, the replica stayed 'healthy' forever."""
    import faiss

    from serve.app.deployments import SearchShardDeployment
    from serve.app.settings import ShardDeploymentSettings

    rng = np.random.default_rng(0)
    path = tmp_path / "shard_000.faiss"
    faiss.write_index(build_flat_index(rng.standard_normal((50, 8)).astype(np.float32)), str(path))
    replica = SearchShardDeployment.func_or_class(
        ShardDeploymentSettings(index_path=str(path), offset=0, use_gpu="never", num_threads=1, stuck_after_s=0.3)
    )
    release = threading.Event()
    real_search = replica.shard.search

    def hanging_search(queries, k, knobs=None):
        release.wait(10)
        return real_search(queries, k)

    async def main():
        scores, ids = await replica.search(rng.standard_normal((2, 8)).astype(np.float32), 3)
        assert ids.shape == (2, 3)
        replica.check_health()  # idle after a normal search
        replica.shard.search = hanging_search
        hung = asyncio.ensure_future(replica.search(rng.standard_normal((1, 8)).astype(np.float32), 3))
        await asyncio.sleep(0.1)
        replica.check_health()  # running, not yet past the threshold
        await asyncio.sleep(0.4)
        with pytest.raises(Wedged, match="search shard shard_000"):
            replica.check_health()
        release.set()
        await hung
        replica.check_health()  # the call came back: healthy again

    asyncio.run(main())


def test_a_shard_given_a_knob_its_index_lacks_searches_with_its_own(tmp_path, caplog):
    """The ingress validated the request against another index type (a rollout changing
    index.factory): the shard answers with its own knobs and says so, instead of failing."""
    import faiss

    from actors.search import fill_shard, train_index
    from serve.app.deployments import SearchShardDeployment
    from serve.app.settings import ShardDeploymentSettings

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 8)).astype(np.float32)
    path = tmp_path / "shard_000.faiss"
    faiss.write_index(fill_shard(train_index("IVF4,Flat", vectors), vectors), str(path))
    replica = SearchShardDeployment.func_or_class(ShardDeploymentSettings(
        index_path=str(path), offset=0, factory="IVF4,Flat", search_defaults={"nprobe": 2}, mmap=True, use_gpu="never",
        num_threads=1, stuck_after_s=5))
    q = vectors[:3]
    want = replica.shard.search(q, 5, {"nprobe": 2})
    got = asyncio.run(replica.search(q, 5, {"ef_search": 64}))
    np.testing.assert_array_equal(got[1], want[1])
    assert "has no search knob ['ef_search']" in caplog.text
