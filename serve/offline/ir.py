"""IR helpers shared by training, pilots and evaluation: which queries train and which test
(the split rules), qrels with dataset-qualified doc ids, exact top-k runs and per-query metrics
(ir-measures)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from actors.beir import available_splits, load_qrels, load_queries, seeded_half_split

from serve.config import RouterServeConfig

from .indexing import Corpus


SELF_RETRIEVAL_DOMAINS = {"arguana"}


def training_queries(data_dir: Path, domain: str, max_queries: int | None = None) -> list[tuple[str, str, dict[str, int]]]:
    """(query id, query text, judged docs) for the domain's training queries.

    The 'train' split where one exists; otherwise the train half of a seeded split of the judged
    queries (actors.beir.seeded_half_split), so the other half stays unseen for evaluation.
    A deterministic sample (by hash of the query id) of at most ``max_queries``.
    """
    queries = load_queries(data_dir, domain)
    splits = available_splits(data_dir, domain)
    if "train" in splits:
        qrels = load_qrels(data_dir, domain, "train")
        qids = sorted(qrels)
    else:
        qrels = load_qrels(data_dir, domain, "test" if "test" in splits else splits[0])
        qids, _ = seeded_half_split(sorted(qrels))
    qids = [q for q in qids if q in queries and any(s > 0 for s in qrels[q].values())]
    qids.sort(key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    return [(qid, queries[qid], {d: s for d, s in qrels[qid].items() if s > 0}) for qid in qids[:max_queries]]


def domain_examples(cfg: RouterServeConfig, data_dir: Path, domain: str, corpus) -> list[tuple[str, str, int, set[int]]]:
    """(qid, text, best judged row, all judged rows) for the domain's training queries whose judged
    docs are in ``corpus``; the same deterministic sample for training and for pilots."""
    row_of = {d: i for i, d in enumerate(corpus.doc_ids)}
    examples = []
    for qid, text, judged in training_queries(data_dir, domain):
        rows = {row_of[d] for d in judged if d in row_of}
        if rows:
            best = max((d for d in judged if d in row_of), key=lambda d: (judged[d], d))
            examples.append((qid, text, row_of[best], rows))
        if len(examples) == cfg.experts.training.max_queries:
            break
    if len(examples) < 2:
        raise ValueError(f"domain {domain!r}: fewer than 2 training queries with a judged document in the corpus")
    return examples


def split_dev(examples: list, fraction: float, minimum: int = 10) -> tuple[list, list]:
    """Hold out a deterministic slice of the TRAINING queries to choose the best step."""
    # at least ``minimum`` dev queries when the domain has 3× that many (npl: 46 training queries
    # → 10 dev), none below that: a smaller dev set would choose the step by noise
    n_dev = max(int(len(examples) * fraction), minimum)
    if fraction <= 0 or len(examples) < 3 * minimum:
        return examples, []
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"dev:{e[0]}".encode()).hexdigest())
    dev = {e[0] for e in ranked[:n_dev]}
    return [e for e in examples if e[0] not in dev], [e for e in examples if e[0] in dev]


def examples_qrels(domain: str, examples: list, corpus) -> dict[str, dict[str, int]]:
    """{qid: {dataset/doc_id: 1}} for (qid, text, best row, judged rows) examples (judged = relevant)."""
    return {q: {qualify(domain, corpus.doc_ids[r]): 1 for r in rows} for q, _, _, rows in examples}


def eval_queries(data_dir: Path, domain: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(qid -> text, qrels) of the evaluation queries: never those used for training or pilots."""
    queries = load_queries(data_dir, domain)
    splits = available_splits(data_dir, domain)
    qrels = load_qrels(data_dir, domain, "test")
    if "train" not in splits:
        _, test_half = seeded_half_split(sorted(qrels))
        qrels = {q: qrels[q] for q in test_half}
    qrels = {q: r for q, r in qrels.items() if q in queries and any(v > 0 for v in r.values())}
    return {q: queries[q] for q in qrels}, qrels


def qualify(dataset: str, doc_id: str) -> str:
    """Doc ids are only unique within a dataset (cranfield and npl both use 1, 2, …)."""
    return f"{dataset}/{doc_id}"


def ranked_corpora(run: dict[str, dict[str, float]], qids: list[str]) -> list[list[str]]:
    """Per query of ``qids``: the corpus of each hit of ``run`` (``search_run``'s qualified ids),
    best first — what the corpus guard (actors.routing.unknown_corpus_guard) counts."""
    return [[hit.partition("/")[0] for hit in sorted(run[q], key=run[q].get, reverse=True)] for q in qids]


def search_run(
    query_vectors: np.ndarray, qids: list[str], corpus: Corpus, k: int, drop_self: bool, domain: str, searcher=None,
) -> dict[str, dict[str, float]]:
    """Top-k run {qid: {dataset/doc_id: score}} by exact inner product (FAISS flat), or with
    ``searcher`` (an actors.search.ShardSearcher over ``corpus.vectors``, e.g. an approximate one)."""
    from actors.search import ShardSearcher, build_flat_index

    searcher = searcher or ShardSearcher(index=build_flat_index(corpus.vectors), use_gpu="auto")
    scores, ids = searcher.search(query_vectors, k + (1 if drop_self else 0))
    run: dict[str, dict[str, float]] = {}
    for qi, qid in enumerate(qids):
        hits: dict[str, float] = {}
        for s, i in zip(scores[qi], ids[qi]):
            if i < 0:
                continue
            doc, ds = corpus.doc_ids[int(i)], corpus.datasets[int(i)]
            if drop_self and doc == qid and ds == domain:
                continue
            doc = qualify(ds, doc)
            if doc not in hits:
                hits[doc] = float(s)
            if len(hits) == k:
                break
        run[qid] = hits
    return run


def measures():
    from ir_measures import R, nDCG

    return nDCG @ 10, R @ 100


def per_query(qrels, run, measure) -> dict[str, float]:
    import ir_measures

    values = {m.query_id: m.value for m in ir_measures.iter_calc([measure], qrels, run)}
    return {q: values.get(q, 0.0) for q in qrels}


def dev_scorer(domain: str, dev_examples: list, corpus):
    """(dev queries, score_fn): mean nDCG@10 (ir-measures, judged docs binary) over the domain."""
    from ir_measures import nDCG

    qids = [q for q, _, _, _ in dev_examples]
    qrels = examples_qrels(domain, dev_examples, corpus)

    def score(vectors: np.ndarray) -> float:
        run = search_run(vectors, qids, corpus, 10, domain in SELF_RETRIEVAL_DOMAINS, domain)
        return float(np.mean(list(per_query(qrels, run, nDCG @ 10).values())))

    return [t for _, t, _, _ in dev_examples], score


def union_offset(union, domain: str, corpus) -> int:
    """Where ``domain``'s rows start in ``union`` (a concatenation of per-dataset caches, see
    load_corpus_vectors); checked row by row against the domain's own corpus (doc ids repeat
    across datasets, so a row is (dataset, doc id))."""
    try:
        offset = union.datasets.index(domain)
    except ValueError:
        raise ValueError(f"domain {domain!r} is not in the union {sorted(set(union.datasets))}") from None
    n = len(corpus.doc_ids)
    if (union.doc_ids[offset : offset + n] != corpus.doc_ids or union.datasets[offset : offset + n] != [domain] * n
            or not np.array_equal(union.vectors[offset : offset + n], corpus.vectors)):
        raise ValueError(f"the union's rows of {domain!r} are not its own corpus's rows; rebuild the vector caches")
    return offset


def shift_rows(examples: list, offset: int) -> list:
    """(qid, text, best row, judged rows) examples with their rows moved by ``offset``."""
    return [(q, t, best + offset, {r + offset for r in rows}) for q, t, best, rows in examples]
