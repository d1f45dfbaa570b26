"""FAISS shard searching and the exact merge of shard results.

Each shard holds a contiguous slice of the corpus vectors in an exact inner-product index; it
returns *global* row ids (its offset + local id). Merging concatenates every shard's top-k and
keeps the best k by (score desc, global id asc), which is exactly the top-k of one index over all
vectors (ties broken by the lower id).
"""

from __future__ import annotations

import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

# faiss 1.15 skips BLAS for query batches below this threshold (slow for batches of 20-64).
_BLAS_THRESHOLD = 8


def faiss_gpu_count() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get else 0
    except Exception:  # CPU build raises or returns 0 depending on version
        return 0


def build_flat_index(vectors: np.ndarray):
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


class ShardSearcher:
    """One FAISS shard: exact inner-product search over its slice, returning global ids."""

    def __init__(
        self,
        index_path: str | os.PathLike | None = None,
        offset: int = 0,
        *,
        index=None,
        use_gpu: str = "auto",
        num_threads: int | None = 1,
    ) -> None:
        import faiss

        if num_threads:
            faiss.omp_set_num_threads(num_threads)
        faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD
        if index is None:
            if index_path is None:
                raise ValueError("index_path or index is required")
            index = faiss.read_index(str(index_path))
        self.offset = int(offset)
        self.device = "cpu"
        want_gpu = use_gpu == "always" or (use_gpu == "auto" and faiss_gpu_count() > 0)
        if want_gpu:
            if faiss_gpu_count() == 0:
                raise RuntimeError("search.use_gpu='always' but this faiss build sees no GPU")
            self._gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            self.device = "cuda:0"
        self.index = index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def info(self) -> dict:
        return {"ntotal": self.ntotal, "offset": self.offset, "device": self.device}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.dim}")
        kk = min(k, self.ntotal)
        if kk <= 0:
            return (
                np.full((queries.shape[0], 0), -np.inf, dtype=np.float32),
                np.full((queries.shape[0], 0), -1, dtype=np.int64),
            )
        scores, ids = self.index.search(queries, kk)
        ids = ids.astype(np.int64)
        valid = ids >= 0
        ids = np.where(valid, ids + self.offset, -1)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        return scores, ids


def merge_topk(
    results: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard (scores [B, k_i], global ids [B, k_i]) into the global top-k."""
    if not results:
        raise ValueError("no shard results to merge")
    scores = np.concatenate([r[0] for r in results], axis=1)
    ids = np.concatenate([r[1] for r in results], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    b = scores.shape[0]
    kk = min(k, scores.shape[1])
    out_s = np.empty((b, kk), dtype=np.float32)
    out_i = np.empty((b, kk), dtype=np.int64)
    for row in range(b):
        # lexsort: last key is primary → score descending, then id ascending.
        order = np.lexsort((ids[row], -scores[row]))[:kk]
        out_s[row] = scores[row, order]
        out_i[row] = ids[row, order]
    return out_s, out_i


def split_ranges(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of near-equal size; never more shards than rows (min 1)."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(num_shards)]
