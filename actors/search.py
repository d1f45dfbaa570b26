"""FAISS shard searching and the exact merge of shard results.

Each shard holds a contiguous slice of the corpus vectors in an inner-product index built from a
``faiss.index_factory`` string (``Flat``: exact; ``IVF…``, ``HNSW…``, ``…,SQ8``, ``…,PQ…``:
approximate); it returns *global* row ids (its offset + local id). Every shard of one index is
filled from ONE trained index (``train_index`` then ``fill_shard``: the same IVF centroids, the
same PQ/SQ codebooks), so the shards' top-k lists are comparable. Merging concatenates every
shard's top-k and keeps the best k by (score desc, global id asc): for a flat index exactly the
top-k of one index over all vectors (ties broken by the lower id); for an IVF index with a shared
quantizer exactly the top-k the unsharded IVF index returns with the same ``nprobe`` (each shard
probes the same lists).

Search knobs are per call (``faiss.SearchParameters*``, no shared state): ``nprobe`` (IVF lists
visited) and ``ef_search`` (HNSW candidate list).
"""

from __future__ import annotations

import logging
import os
import re

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


def _faiss_message(exc: Exception) -> str:
    """FAISS's C++ error without its source location ("Error in <signature> at <file>:<line>: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return re.sub(r"^Error: '.*?' failed: ", "", text)


def make_index(factory: str, dim: int):
    """An empty inner-product index from a ``faiss.index_factory`` string; ValueError (FAISS's
    reason) when the string does not parse or does not fit ``dim``."""
    import faiss

    if not isinstance(factory, str) or not factory.strip():
        raise ValueError("an index factory string is required (e.g. 'Flat', 'IVF1024,SQ8', 'HNSW32')")
    if "IDMap" in factory:  # shards number their rows themselves (offset + position)
        raise ValueError(f"{factory!r}: IDMap is not supported (a shard's ids are its offset + row)")
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"{factory!r} does not build a FAISS index: {_faiss_message(exc)}") from None


def build_flat_index(vectors: np.ndarray):
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def _unwrap(index):
    """(the innermost index, the wrappers around it, outermost first)."""
    import faiss

    wrappers = []
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            wrappers.append(index)
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            wrappers.append(index)
            index = faiss.downcast_index(index.base_index)
        else:
            return index, wrappers


def index_knobs(index) -> tuple[str, ...]:
    """The search-time knobs this index has: ("nprobe",) for IVF, ("ef_search",) for HNSW, () else."""
    return {"ivf": ("nprobe",), "hnsw": ("ef_search",)}.get(_param_layout(index)[0], ())


def factory_knobs(factory: str, dim: int) -> tuple[str, ...]:
    """index_knobs of an empty index built from ``factory`` (nothing trained)."""
    return index_knobs(make_index(factory, dim))


def _param_layout(index) -> tuple[str | None, list[tuple[str, float]]]:
    """What search parameters this (CPU) index takes: the inner kind ("ivf", "hnsw" or None) and
    its wrappers outermost first; kept apart from the index so a GPU copy is parametrized alike."""
    import faiss

    inner, wrappers = _unwrap(index)
    kind = "ivf" if isinstance(inner, faiss.IndexIVF) else "hnsw" if isinstance(inner, faiss.IndexHNSW) else None
    return kind, [("refine", float(w.k_factor)) if isinstance(w, faiss.IndexRefine) else ("pretransform", 0.0)
                  for w in wrappers]


def _params_from_layout(layout, knobs: dict[str, int]):
    import faiss

    kind, wrappers = layout
    if kind == "ivf" and "nprobe" in knobs:
        params = faiss.SearchParametersIVF(nprobe=int(knobs["nprobe"]))
    elif kind == "hnsw" and "ef_search" in knobs:
        params = faiss.SearchParametersHNSW(efSearch=int(knobs["ef_search"]))
    else:
        return None, []
    keep = [params]
    for wrapper, k_factor in reversed(wrappers):
        if wrapper == "refine":
            params = faiss.IndexRefineSearchParameters(base_index_params=params, k_factor=k_factor)
        else:
            params = faiss.SearchParametersPreTransform(index_params=params)
        keep.append(params)
    return params, keep


def ivf_lists(index) -> int | None:
    """nlist of an IVF index (through wrappers); None for other types."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else None


def training_sample(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """The rows an index is trained on: ``size`` drawn without replacement (seeded), in row order."""
    if size >= len(vectors):
        return vectors
    return vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))]


def train_index(factory: str, sample: np.ndarray):
    """An empty index of ``factory`` trained on ``sample`` (IVF centroids, PQ/SQ codebooks); one
    trained index is the template of every shard (fill_shard). Indexes that need no training
    (Flat, HNSW, …) come back untrained-but-ready."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = make_index(factory, sample.shape[1])
    if not index.is_trained:
        nlist = ivf_lists(index)
        if nlist is not None and len(sample) < nlist:
            raise ValueError(f"{factory!r}: training needs at least one vector per IVF list ({nlist}); "
                             f"{len(sample)} given (fewer lists, or more vectors)")
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(f"{factory!r}: training on {len(sample)} vectors failed: {_faiss_message(exc)}") from None
    return index


def fill_shard(trained, vectors: np.ndarray):
    """A copy of the trained template holding ``vectors`` (rows 0..n-1 of the shard)."""
    import faiss

    index = faiss.clone_index(trained)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def read_index(path: str | os.PathLike, mmap: bool = False):
    """A shard file; ``mmap``: its codes stay in the page cache, mapped (faiss IO_FLAG_MMAP_IFC:
    flat and SQ/PQ codes, IVF lists, HNSW vectors), so a replica starts without reading them and
    replicas on one node share the pages. A mapped index is read-only (shards never add)."""
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)


class ShardSearcher:
    """One FAISS shard: inner-product search over its slice, returning global ids.

    ``factory``: the index's factory string (reported, not used to build); ``defaults``: the
    search knobs used when a call names none (only those the index has are kept); ``mmap``: map
    the file instead of reading it (read_index)."""

    def __init__(
        self,
        index_path: str | os.PathLike | None = None,
        offset: int = 0,
        *,
        index=None,
        use_gpu: str = "auto",
        num_threads: int | None = 1,
        factory: str = "Flat",
        defaults: dict[str, int] | None = None,
        mmap: bool = False,
    ) -> None:
        import faiss

        if num_threads:
            faiss.omp_set_num_threads(num_threads)
        faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD
        if index is None:
            if index_path is None:
                raise ValueError("index_path or index is required")
            index = read_index(index_path, mmap)
        self.offset = int(offset)
        self.factory = factory
        self.mmap = bool(mmap and index_path is not None)
        self.knobs = index_knobs(index)
        self._layout = _param_layout(index)  # taken from the CPU index: a GPU copy is parametrized alike
        self.defaults = {k: int(v) for k, v in (defaults or {}).items() if k in self.knobs}
        missing = [k for k in self.knobs if k not in self.defaults]
        if missing:
            raise ValueError(f"index {factory!r} needs a default for {missing}")
        self._params: dict[tuple, tuple] = {}  # knob values -> (SearchParameters, what it refers to)
        self.device = "cpu"
        want_gpu = use_gpu == "always" or (use_gpu == "auto" and faiss_gpu_count() > 0)
        if want_gpu:
            if faiss_gpu_count() == 0:
                raise RuntimeError("search.use_gpu='always' but this faiss build sees no GPU")
            self._gpu_res = faiss.StandardGpuResources()
            try:
                gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            except RuntimeError as exc:
                if use_gpu == "always":
                    raise RuntimeError(f"search.use_gpu='always': index {factory!r} has no GPU version in this faiss "
                                       f"build ({_faiss_message(exc)})") from None
                logger.warning("index %r stays on the CPU: %s", factory, _faiss_message(exc))
            else:
                index, self.device = gpu_index, "cuda:0"
        self.index = index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def info(self) -> dict:
        return {"ntotal": self.ntotal, "offset": self.offset, "device": self.device, "index": self.factory,
                "knobs": dict(self.defaults), "mmap": self.mmap}

    def resolve_knobs(self, knobs: dict[str, int] | None) -> dict[str, int]:
        """The knob values a call runs with: the defaults, overridden by ``knobs``; a knob this
        index does not have is a ValueError naming it."""
        extra = sorted(set(knobs or {}) - set(self.knobs))
        if extra:
            raise ValueError(f"index {self.factory!r} has no search knob {extra} (its knobs: {list(self.knobs)})")
        return {**self.defaults, **{k: int(v) for k, v in (knobs or {}).items()}}

    def _search_params(self, knobs: dict[str, int]):
        key = tuple(sorted(knobs.items()))
        if key not in self._params:
            self._params[key] = _params_from_layout(self._layout, knobs)
        return self._params[key][0]

    def search(self, queries: np.ndarray, k: int, knobs: dict[str, int] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.dim}")
        resolved = self.resolve_knobs(knobs)
        params = self._search_params(resolved) if self.knobs else None
        kk = min(k, self.ntotal)
        if kk <= 0:
            return (
                np.full((queries.shape[0], 0), -np.inf, dtype=np.float32),
                np.full((queries.shape[0], 0), -1, dtype=np.int64),
            )
        scores, ids = self.index.search(queries, kk, params=params)
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
