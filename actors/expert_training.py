"""Training a query-side LoRA expert (offline only: the online app never imports this module).

RouterRetriever experts are LoRA adapters (r=8, alpha=32 on attention query/value) over a frozen
base encoder, trained with a contrastive loss (temperature 0.05, lr 1e-4) on the *query* side only:
documents keep their base-model vectors, so the corpus index is shared by every expert and the
document vectors needed for training come from the base index without re-encoding.

This module holds the training loop, hard-negative mining and the loss plot; the paper's
best-expert pilot grouping is serve.offline.pilots.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .encoder import EncoderSettings, mean_pool


@dataclass(frozen=True)
class AdapterTrainSettings:
    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-4
    rank: int = 8
    alpha: int = 32
    dropout: float = 0.1
    temperature: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    seed: int = 0
    positives: str = "best"  # full-corpus objective: "best" judged doc per query, or "all" of them
    patience: int | None = None  # with dev queries: stop once this many steps pass without a new best


def train_query_adapter(
    model_path: str | os.PathLike,
    encoder_settings: EncoderSettings,
    queries: list[str],
    positives: np.ndarray,
    out_dir: str | os.PathLike,
    settings: AdapterTrainSettings | None = None,
    progress: bool = True,
    hard_negatives: np.ndarray | None = None,
    corpus: tuple[np.ndarray, list[int], list[set[int]]] | None = None,
    dev: tuple[list[str], Callable[[np.ndarray], float]] | None = None,
    eval_every: int = 25,
    groups: Sequence[int] | None = None,
    name: str | None = None,
    on_step: Callable[[int, int], None] | None = None,
    preserve: tuple[list[str], float] | None = None,
    own_rows: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """Train one LoRA adapter so that query i lands near ``positives[i]`` (a frozen doc vector).

    Negatives are the other positives of the batch (in-batch negatives) plus, when given,
    ``hard_negatives[i]`` ([n, H, D] frozen doc vectors mined from the base index).

    ``corpus=(vectors [N, D], target row per query, judged rows per query)`` switches to the
    full-corpus objective: a softmax over EVERY document of the domain (all frozen base vectors,
    so this costs one [batch, N] product), other judged-relevant docs of the query masked out.
    With ``settings.positives == "all"`` every judged doc of the query is a target: the loss is the
    mean over its judged docs of -log softmax(doc | that doc + every NON-judged doc), i.e. one
    InfoNCE term per (query, relevant doc) pair, the other relevant docs never counted as
    negatives. nfcorpus (median 18 relevant docs per training query, all grade 1), npl and
    cranfield otherwise learn from one arbitrary relevant doc per query.
    Every negative — in-batch, hard, easy — is then in the denominator, so a query cannot drift
    to a region where only the few sampled negatives are ranked right (measured: with 4 mined
    negatives + in-batch, 300 steps on nfcorpus lowered test nDCG@10 from 31.8 to 4.6).
    ``dev=(queries, score_fn)``: every ``eval_every`` steps (and before the first) the dev queries
    are embedded and scored (higher is better); the adapter saved is the best-scoring state. A
    fresh LoRA adapter is the identity (B = 0), so when no step beats the start the expert saved
    is exactly the base model on those queries: an expert never does worse than base on its dev
    queries. Dev queries must come from the training side, never from test queries.
    ``settings.patience`` (needs ``dev``): stop early once that many steps have passed since the
    best dev score (the LR is constant, so the steps run are exactly the first ones of a longer run).
    ``groups`` (one id per query, e.g. its domain): every batch is drawn from one group, the
    group picked with probability proportional to its size (multi-task training): each domain's
    queries meet their own domain's in-batch negatives, and short queries are not padded to the
    length of another domain's long ones (ArguAna's ~220-token queries beside 6-token nfcorpus
    ones made a mixed batch ~10× slower).
    ``preserve=(texts, weight)``: texts the adapter should leave where the base model puts them
    (e.g. passages of the OTHER corpora of the served index). Each step adds ``weight`` × the mean
    (1 - cosine) between the adapter's and the base model's embedding of a batch of them, so the
    expert learns its domain without moving other domains' queries. A text's base embedding is
    encoded (adapter off) when the text is first drawn.
    ``own_rows`` (full-corpus objective only; one ``(start, stop)`` per query): the rows of ``corpus``
    that are the query's own domain (a served union holds several). The loss becomes the mean of
    the softmax over every row and the same softmax over the query's own rows only, so an expert
    that learns to push other domains' documents down must still order its own domain's.
    Writes a peft adapter folder plus ``train_report.json`` to ``out_dir``; returns the report.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    settings = settings or AdapterTrainSettings()
    if len(queries) != len(positives):
        raise ValueError("one positive document vector per training query is required")
    if len(queries) < 2:
        raise ValueError("at least 2 training queries are needed for in-batch negatives")
    if settings.positives not in ("best", "all"):
        raise ValueError(f"positives must be 'best' or 'all', not {settings.positives!r}")
    if settings.positives == "all" and corpus is None:
        raise ValueError("positives='all' needs the full-corpus objective (corpus=...)")
    if settings.patience is not None and (settings.patience < 1 or dev is None):
        raise ValueError("patience must be >= 1 steps and needs dev queries (dev=...)")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    base = AutoModel.from_pretrained(str(model_path))
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in settings.target_modules if t not in names]
    if unknown:
        raise ValueError(f"target_modules {unknown} match no linear layer of the base model (it has {sorted(names)})")
    model = get_peft_model(base, config)

    def embed(texts: list[str]):
        """[n, dim] unit vectors of ``texts`` by the model as it is now (with gradients)."""
        e = tokenizer(texts, padding=True, truncation=True, max_length=encoder_settings.max_seq_length, return_tensors="pt")
        return torch.nn.functional.normalize(mean_pool(model(**e).last_hidden_state, e["attention_mask"]), dim=-1)

    def embed_frozen(texts: list[str]):
        """``embed`` in eval mode, without gradients, 64 texts at a time; the model goes back to training."""
        model.eval()
        with torch.no_grad():
            out = torch.cat([embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
        model.train()
        return out

    preserving = preserve is not None and bool(preserve[0]) and preserve[1] > 0
    keep_texts = list(preserve[0]) if preserving else []
    keep_base: dict = {}  # preserved text's row -> the base model's embedding of it
    keep_rng = random.Random(settings.seed + 1)

    def kept_at_base(pick: list[int]):
        """[len(pick), dim] base-model embeddings of the preserved texts ``pick``, each encoded once, when
        first drawn (adapter off): a short run (the 40-step default experts) draws a fraction of them."""
        new = sorted({i for i in pick if i not in keep_base})
        if new:
            with model.disable_adapter():
                keep_base.update(zip(new, embed_frozen([keep_texts[i] for i in new])))
        return torch.stack([keep_base[i] for i in pick])

    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    docs = torch.nn.functional.normalize(torch.as_tensor(np.asarray(positives, dtype=np.float32)), dim=-1)
    negs = None
    full = None
    if corpus is not None:
        cvec, targets, judged = corpus
        if len(targets) != len(queries) or len(judged) != len(queries):
            raise ValueError("corpus targets and judged rows need one entry per query")
        full = torch.nn.functional.normalize(torch.as_tensor(np.asarray(cvec, dtype=np.float32)), dim=-1)
    own = None
    if own_rows is not None:
        if full is None:
            raise ValueError("own_rows needs the full-corpus objective (corpus=...)")
        own = [(int(a), int(b)) for a, b in own_rows]
        if len(own) != len(queries):
            raise ValueError("own_rows needs one (start, stop) per query")
        bad = [i for i, (a, b) in enumerate(own)
               if not 0 <= a < b <= full.shape[0] or not all(a <= r < b for r in {*judged[i], targets[i]})]
        if bad:
            raise ValueError(f"own_rows of query {bad[0]} do not hold its judged documents within the corpus")
    if hard_negatives is not None:
        hard_negatives = np.asarray(hard_negatives, dtype=np.float32)
        if hard_negatives.ndim != 3 or hard_negatives.shape[0] != len(queries):
            raise ValueError("hard_negatives must be [n_queries, H, dim]")
        negs = torch.nn.functional.normalize(torch.as_tensor(hard_negatives), dim=-1)
    if groups is not None and len(groups) != len(queries):
        raise ValueError("groups needs one entry per query")
    losses: list[float] = []
    dev_curve: list[tuple[int, float]] = []
    best_state: dict | None = None
    best_step = settings.steps  # without dev queries the last step is the one kept

    def dev_check(step: int) -> None:
        nonlocal best_state, best_step
        if dev is None:
            return
        dev_queries, score_fn = dev
        score = float(score_fn(embed_frozen(dev_queries).numpy()))
        if not dev_curve or score > max(v for _, v in dev_curve):
            best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            best_step = step
        dev_curve.append((step, score))

    dev_check(0)
    bs = min(settings.batch_size, len(queries))
    t0 = time.perf_counter()
    steps = range(settings.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"train adapter {name or Path(out_dir).name}", unit="step")
    batches = group_batches(groups if groups is not None else [0] * len(queries), bs, rng)
    for _ in steps:
        idx = next(batches)
        q = embed([queries[i] for i in idx])
        if full is not None:
            logits = q @ full.T / settings.temperature
            rows = [(targets[i], judged[i]) for i in idx]
            loss = full_corpus_loss(logits, rows, settings.positives == "all")
            if own is not None:  # the same softmax over each query's own domain only
                loss = (loss + full_corpus_loss(logits, rows, settings.positives == "all",
                                                [own[i] for i in idx])) / 2
        else:
            d = docs[idx]
            logits = q @ d.T / settings.temperature
            # Rows sharing a positive doc are not negatives of each other: mask duplicates.
            same = (d @ d.T > 0.9999) & ~torch.eye(len(idx), dtype=torch.bool)
            logits = logits.masked_fill(same, float("-inf"))
            if negs is not None:  # each query's own mined negatives, appended after the batch columns
                hard = torch.einsum("bd,bhd->bh", q, negs[idx]) / settings.temperature
                logits = torch.cat([logits, hard], dim=1)
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(idx)))
        if preserving:
            pick = [keep_rng.randrange(len(keep_texts)) for _ in range(bs)]
            kept = (embed([keep_texts[i] for i in pick]) * kept_at_base(pick)).sum(dim=1)
            loss = loss + preserve[1] * (1.0 - kept).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
        if progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:  # (steps done, steps planned): an admin job's progress
            on_step(len(losses), settings.steps)
        if dev is not None and (len(losses) % eval_every == 0 or len(losses) == settings.steps):
            dev_check(len(losses))
            if settings.patience is not None and len(losses) - best_step >= settings.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    report = {
        "settings": asdict(settings),
        "num_queries": len(queries),
        "batch_groups": None if groups is None else {str(g): list(groups).count(g) for g in sorted(set(groups))},
        "hard_negatives_per_query": 0 if negs is None else int(negs.shape[1]),
        "objective": "full_corpus" if full is not None else "in_batch+mined",
        "dev_curve": dev_curve,
        "best_step": best_step,
        "num_dev_queries": 0 if dev is None else len(dev[0]),
        "preserve": {"texts": len(keep_texts), "weight": float(preserve[1]) if preserving else 0.0,
                     "encoded": len(keep_base)},
        "corpus_size": 0 if full is None else int(full.shape[0]),
        "own_domain_softmax": own is not None,
        "losses": losses,
        "steps_run": len(losses),
        "stopped_early": len(losses) < settings.steps,
        "seconds": time.perf_counter() - t0,
        "base_model": str(model_path),
    }
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


def full_corpus_loss(
    logits, rows: Sequence[tuple[int, set[int]]], all_positives: bool, own: Sequence[tuple[int, int]] | None = None,
):
    """The full-corpus softmax loss of a batch: ``logits`` [batch, N] (query · every doc / T), one
    ``(target row, judged rows)`` per query. ``all_positives``: the mean over the query's judged docs
    of -log softmax(doc | that doc + every NON-judged doc) (one InfoNCE term per relevant doc, the
    other relevant docs never negatives); otherwise cross-entropy towards the target with the other
    judged docs masked out. ``own``: one ``(start, stop)`` per query — only those columns compete
    (the query's own domain in a union), every other document is left out of the denominator."""
    import torch

    out = torch.zeros_like(logits, dtype=torch.bool)  # columns outside the softmax
    if own is not None:
        out[:] = True
        for r, (a, b) in enumerate(own):
            out[r, a:b] = False
    if all_positives:
        pos = torch.zeros_like(logits, dtype=torch.bool)
        for r, (target, judged) in enumerate(rows):
            pos[r, sorted({*judged, target})] = True
        # -log(e^s_p / (e^s_p + sum_neg e^s_n)) = softplus(logsumexp_neg - s_p), per judged p
        neg_lse = torch.logsumexp(logits.masked_fill(pos | out, float("-inf")), dim=1, keepdim=True)
        per_pair = torch.nn.functional.softplus(neg_lse - logits).masked_fill(~pos, 0.0)
        return (per_pair.sum(dim=1) / pos.sum(dim=1)).mean()
    for r, (target, judged) in enumerate(rows):
        others = [j for j in judged if j != target]
        if others:
            out[r, others] = True
    targets = torch.as_tensor([t for t, _ in rows])
    return torch.nn.functional.cross_entropy(logits.masked_fill(out, float("-inf")), targets)


def group_batches(groups: Sequence[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of query indices, each from ONE group, the group drawn with probability
    proportional to its size; within a group, epochs of shuffled order (a short tail carries over
    into the next epoch, never twice in one batch). One group = plain shuffled epochs."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    ids = sorted(members)
    sizes = [len(members[g]) for g in ids]
    queues: dict[int, list[int]] = {g: [] for g in ids}
    while True:
        g = ids[0] if len(ids) == 1 else rng.choices(ids, sizes)[0]
        take = min(batch_size, len(members[g]))
        if len(queues[g]) < take:
            fresh = list(members[g])
            rng.shuffle(fresh)
            tail = set(queues[g])  # queries still queued go to the end of the new epoch: no repeats in a batch
            queues[g].extend(sorted(fresh, key=lambda i: i in tail))
        batch, queues[g] = queues[g][:take], queues[g][take:]
        yield batch


def mine_hard_negatives(
    query_vectors: np.ndarray,
    corpus_vectors: np.ndarray,
    positive_rows: list[set[int]],
    num_negatives: int,
    skip_top: int = 0,
) -> np.ndarray:
    """Row ids [n, H] of the base model's top-ranked NON-relevant docs for each query.

    ``skip_top`` ignores the first ranks (often unjudged relevant docs). Queries with too few
    candidates repeat their last negative.
    """
    from .search import ShardSearcher, build_flat_index

    searcher = ShardSearcher(index=build_flat_index(corpus_vectors), use_gpu="auto")
    depth = num_negatives + skip_top + max((len(p) for p in positive_rows), default=0) + 1
    _, ids = searcher.search(query_vectors, min(depth, corpus_vectors.shape[0]))
    out = np.zeros((len(positive_rows), num_negatives), dtype=np.int64)
    for i, row in enumerate(ids):
        cands = [int(r) for r in row if r >= 0 and int(r) not in positive_rows[i]][skip_top:]
        if not cands:
            raise ValueError(f"query {i}: no non-relevant document to use as a negative")
        cands = (cands + [cands[-1]] * num_negatives)[:num_negatives]
        out[i] = cands
    return out


def plot_losses(losses: list[float], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, lw=0.8, alpha=0.5, label="step")
    if len(losses) >= 10:
        w = max(len(losses) // 20, 5)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(range(w - 1, len(losses)), smooth, lw=1.8, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
