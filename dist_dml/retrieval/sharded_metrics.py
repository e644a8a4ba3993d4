"""Retrieval metrics over embeddings sharded across ranks: no rank ever holds the whole split.

Each rank keeps the gallery embeddings it extracted. The queries of each rank in turn go to every rank
in chunks of `chunk` (a broadcast); every rank searches its own gallery shard for the chunk's nearest
`fetch` (faiss, exact inner product) and the lists are gathered to the queries' owner, which merges
them exactly — by (score descending, gallery image id ascending), the order of the single-process
search, dropping the query itself where queries and gallery are one split — and scores its queries.
The sums are reduced over ranks. Memory per rank: its shard of the embeddings, one chunk of queries,
and W x chunk x fetch neighbours.

Relevant counts come from the gallery's label histogram, summed over ranks; a class present on one
rank only is found by every other rank's queries all the same. NMI needs the embeddings in one place:
above `nmi_max_classes` classes it runs on the embeddings of a seeded sample of that many classes (and
says so in its name), so it never gathers the whole split.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dist_dml.infra.distributed import DistContext
from dist_dml.retrieval.postprocess import Postprocess, augment, rerank, weights


@dataclass
class Embedded:
    """Embeddings of images with their labels and image ids (tensors), and with ``names``, each image's
    class and item (its source path or id); ``faults``: what could not be read (data.FAULTS)."""

    embeddings: Tensor
    labels: Tensor
    image_ids: Tensor
    classes: list[str] | None = None
    items: list[str] | None = None
    faults: dict[str, int] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)  # the first items whose embedding was not finite (left out)


@dataclass(frozen=True)
class _Arrays:
    """A rank's share of a split as numpy arrays: embeddings (n x d), labels and image ids."""

    emb: np.ndarray
    lab: np.ndarray
    ids: np.ndarray

    @classmethod
    def of(cls, part: Embedded) -> _Arrays:
        return cls(_numpy(part.embeddings), _numpy(part.labels), _numpy(part.image_ids))

    def by_id(self) -> _Arrays:
        """In image-id order (faiss breaks ties by index, so index ties are id ties): no copy if sorted already."""
        if len(self.ids) < 2 or bool(np.all(self.ids[1:] > self.ids[:-1])):
            return self
        order = np.argsort(self.ids, kind="stable")
        return _Arrays(self.emb[order], self.lab[order], self.ids[order])


@dataclass(frozen=True)
class _Plan:
    """What every round of a sharded search shares: each rank's query count, the queries sent at a time, the
    embedding width, the neighbours kept per query, whether queries and gallery are one split, the context."""

    sizes: list[int]
    chunk: int
    dim: int
    k: int
    same: bool
    ctx: DistContext

    @property
    def fetch(self) -> int:
        return self.k + (1 if self.same else 0)  # the query itself, found in its own split, is dropped


def sharded_metrics(query: Embedded, gallery: Embedded | None, cfg, ctx: DistContext, use_gpu: bool = False,
                    seed: int = 0, keep_ids=()) -> tuple[dict[str, float], dict]:
    """Recall@K, R-Precision, MAP@R (and NMI) of this rank's ``query`` items against every rank's ``gallery``
    (None: each query against the other items of the same split), as the eval config ``cfg`` says (recall_ks,
    nmi, nmi_max_classes, query_chunk, index, ivf_*). Call on every rank; every rank gets the metrics. One
    process is the case of one rank. Also returns, on every rank, the merged neighbours (gallery image ids,
    relevant flags) of the queries whose image ids are in ``keep_ids`` (for plots).

    ``cfg.index="ivf"``: each rank searches its shard through a faiss IVF index (``ivf_nlist`` lists, 0: 4
    sqrt(shard); ``ivf_nprobe`` probed) instead of exactly: approximate, and much faster for millions.
    Its recall against the exact search, on up to ``ivf_check_queries`` queries, is reported as
    ``ivf_recall_at_K`` (the share of the exact top K that the IVF top K holds). With ``ivf_target_recall``
    > 0, that check comes first: ``ivf_nprobe`` doubles until the recall reaches the target (or every list
    is probed), and the search runs with the lists found (reported as ``ivf_nprobe``)."""
    from dist_dml.retrieval.faiss_search import Gallery

    ks = tuple(cfg.recall_ks)
    same = gallery is None
    queries = _Arrays.of(query)
    shard = (queries if same else _Arrays.of(gallery)).by_id()
    dim = queries.emb.shape[1] if queries.emb.ndim == 2 and queries.emb.shape[1] else shard.emb.shape[1]
    counts, relevant_count, k = _relevant(queries.lab, shard.lab, same, ks, ctx)
    sizes = _sizes(len(queries.ids), ctx)
    # Neighbours beyond the gallery do not exist: every width asked for (K, R, and the post-processing's k) is cut
    # to the gallery's items a query can find, which gives the same answer without W x chunk x k of padding.
    findable = max(sum(_sizes(len(shard.ids), ctx)) - (1 if same else 0), 1)
    plan = _Plan(sizes, cfg.query_chunk, dim, min(k, findable), same, ctx)
    index = Gallery(shard.emb, plan.fetch + 8, use_gpu, kind=cfg.index, nlist=cfg.ivf_nlist, nprobe=cfg.ivf_nprobe) \
        if len(shard.ids) else None
    approximate = {}
    if cfg.index == "ivf":  # the recall of the IVF search against exact, with nprobe raised to the target first
        approximate = _ivf_recall(dataclasses.replace(plan, chunk=4096, k=max(ks)), queries, shard, index,
                                  cfg.ivf_check_queries, cfg.ivf_nprobe, cfg.ivf_target_recall)
    sums = np.zeros(len(ks) + 3)  # recall hits per K, R-precision sum, MAP@R sum, answerable count
    kept: dict[int, tuple[list[int], list[bool]]] = {}
    wanted = set(int(i) for i in keep_ids)
    pp = Postprocess.of(cfg)
    described = pp.describe() if pp is not None else ""
    pp = pp.within(findable) if pp is not None else None
    from_plain = _FromPlainPass(pp, plan, queries, shard) if pp is not None else None
    for owner, start, rows, block, block_ids in _blocks(plan, queries):
        mine = ctx.rank == owner
        rides = from_plain is not None and from_plain.rides
        merged = _search(plan, block, block_ids, shard, index, plan.k, merge=mine or rides)
        if from_plain is not None:
            from_plain.take(mine, start, block, block_ids, merged)
        if not mine:
            continue
        _, merged_ids, labels = merged
        q_part = queries.lab[start:start + rows]
        sums += _score(merged_ids, labels, q_part, relevant_count[start:start + rows], ks)
        for row in np.flatnonzero(np.isin(queries.ids[start:start + rows], list(wanted))) if wanted else ():
            rel = (labels[row] == q_part[row]) & (merged_ids[row] >= 0)
            kept[int(queries.ids[start + row])] = (merged_ids[row].tolist(), rel.tolist())
    metrics = {**_means(ctx.all_reduce_sum(torch.from_numpy(sums).to(ctx.device)).cpu().numpy(), ks, sum(sizes)),
               **approximate}
    if cfg.nmi:
        metrics.update(_nmi(queries.emb, queries.lab, None if same else (shard.emb, shard.lab), counts, ctx,
                            cfg.nmi_max_classes, use_gpu, seed))
    if pp is not None:
        nprobe = int(approximate.get("ivf_nprobe", cfg.ivf_nprobe))
        build = lambda vectors: Gallery(vectors, max(plan.fetch, pp.kr_shortlist) + 8, use_gpu, kind=cfg.index,  # noqa: E731
                                        nlist=cfg.ivf_nlist, nprobe=nprobe) if len(vectors) else None
        if ctx.is_main:
            passes = 1 + (from_plain.wants_dba and from_plain.dba is None) + (from_plain.wants_qe and from_plain.expanded is None)
            print(f"[eval] post-processing ({described}): {passes} more k-NN pass{'es' if passes > 1 else ''} over "
                  f"{sum(sizes):,} queries, each about as long as the search before"
                  + (f", and re-ranking {pp.kr_shortlist} candidates a query" if "k_reciprocal" in pp else ""),
                  flush=True)
        metrics["postprocessed"] = {"postprocess": described,
                                    **_postprocessed(pp, plan, queries, shard, index, build, relevant_count, ks, from_plain)}
    merged = {}
    for part in ctx.all_gather_object(kept):
        merged.update(part)
    return metrics, merged


class _FromPlainPass:
    """What the plain pass computes for the post-processing, from the neighbour lists it finds anyway (merged on
    every rank when it does): DBA's augmented gallery where queries and gallery are one split, and the expanded
    queries of QE without DBA (QE after DBA needs the augmented gallery's lists). Each saves one k-NN pass."""

    def __init__(self, pp: Postprocess, plan: _Plan, queries: _Arrays, shard: _Arrays):
        self.pp, self.shard, self.ctx = pp, shard, plan.ctx
        self.wants_dba, self.wants_qe = "dba" in pp and pp.dba_k > 0, "qe" in pp and pp.qe_k > 0
        self.dba = np.empty_like(shard.emb) if self.wants_dba and plan.same and pp.dba_k <= plan.k else None
        self.expanded = np.empty_like(queries.emb) if self.wants_qe and not self.wants_dba and pp.qe_k <= plan.k \
            else None
        self.rides = self.dba is not None or self.expanded is not None

    def take(self, mine: bool, start: int, block: np.ndarray, block_ids: np.ndarray, merged) -> None:
        """One chunk of the plain pass (every rank calls it; ``merged``: the chunk's merged lists)."""
        if not self.rides:
            return
        scores, ids, _ = merged
        for out, k, alpha in ((self.dba, self.pp.dba_k, self.pp.dba_alpha),
                              (self.expanded, self.pp.qe_k, self.pp.qe_alpha)):
            if out is None:
                continue
            sums = _expansion(scores[:, :k], ids[:, :k], alpha, self.shard, self.ctx)
            if mine and out is self.dba:  # the chunk's items are gallery items: into the shard's (id) order
                out[np.searchsorted(self.shard.ids, block_ids)] = augment(block, sums)
            elif mine:
                out[start:start + len(block)] = augment(block, sums)


def _postprocessed(pp: Postprocess, plan: _Plan, queries: _Arrays, shard: _Arrays, index, build, relevant_count,
                   ks, from_plain: _FromPlainPass) -> dict[str, float]:
    """The retrieval metrics after ``pp`` (dist_dml.retrieval.postprocess): DBA replaces this rank's gallery shard by its
    augmented vectors (a second copy of the shard, indexed by ``build``), QE expands each chunk of queries
    before its search, k-reciprocal re-ranks each query's shortlist. Sharded as the plain search: each rank
    adds the weighted vectors it holds and the sums are all-reduced, so memory stays O(shard + chunk x k).
    ``from_plain``: what the plain pass computed already."""
    ctx = plan.ctx
    if from_plain.dba is not None:
        shard = _Arrays(from_plain.dba, shard.lab, shard.ids)
        index = build(shard.emb)
    elif from_plain.wants_dba:
        shard = augmented_gallery(dataclasses.replace(plan, sizes=_sizes(len(shard.ids), ctx), same=True), shard,
                                  index, pp.dba_k, pp.dba_alpha)
        index = build(shard.emb)
    reranking = "k_reciprocal" in pp
    fetch = max(plan.k, pp.kr_shortlist) if reranking else plan.k
    sums = np.zeros(len(ks) + 3)
    if from_plain.expanded is not None:
        queries = _Arrays(from_plain.expanded, queries.lab, queries.ids)
    for owner, start, rows, block, block_ids in _blocks(plan, queries):
        if from_plain.wants_qe and from_plain.expanded is None:
            scores, ids, _ = _search(plan, block, block_ids, shard, index, pp.qe_k, merge=True)
            block = augment(block, _expansion(scores, ids, pp.qe_alpha, shard, ctx))
        mine = ctx.rank == owner
        merged = _search(plan, block, block_ids, shard, index, fetch, merge=mine or reranking)
        if reranking:
            _, ids, labels = merged
            order = _reranked(plan, block, ids, shard, pp, mine)
            if mine:
                merged = (None, np.take_along_axis(ids, order, 1)[:, :plan.k],
                          np.take_along_axis(labels, order, 1)[:, :plan.k])
        if mine:
            sums += _score(merged[1], merged[2], queries.lab[start:start + rows], relevant_count[start:start + rows],
                           ks)
    return _means(ctx.all_reduce_sum(torch.from_numpy(sums).to(ctx.device)).cpu().numpy(), ks, sum(plan.sizes))


def augmented_gallery(plan: _Plan, shard: _Arrays, index, k: int, alpha: float) -> _Arrays:
    """DBA of a gallery sharded over the ranks (``plan``: every rank's shard size, ``same``): this rank's shard
    with each vector replaced by normalise(g + sum of its k nearest other gallery items, weighted
    max(s, 0) ** alpha). Call on every rank; ``index`` searches this rank's shard."""
    out = np.empty_like(shard.emb)
    for owner, start, rows, block, block_ids in _blocks(plan, shard):
        scores, ids, _ = _search(plan, block, block_ids, shard, index, k, merge=True)
        sums = _expansion(scores, ids, alpha, shard, plan.ctx)
        if plan.ctx.rank == owner:
            out[start:start + rows] = augment(block, sums)
    return _Arrays(out, shard.lab, shard.ids)


def database_augmented(vectors: np.ndarray, ids: np.ndarray, k: int, alpha: float, chunk: int = 4096) -> np.ndarray:
    """DBA of a whole gallery held in one process (dist-dml index): its vectors, ``ids`` ascending, each replaced
    as augmented_gallery says (the same code at one rank)."""
    from dist_dml.retrieval.faiss_search import Gallery

    vectors = np.ascontiguousarray(vectors, np.float32)
    k = min(k, max(len(ids) - 1, 0))  # no more other items exist
    shard = _Arrays(vectors, np.zeros(len(ids), np.int64), np.asarray(ids, np.int64))
    plan = _Plan([len(ids)], chunk, vectors.shape[1], k, True, DistContext())
    return augmented_gallery(plan, shard, Gallery(vectors, k + 9, use_gpu=False), k, alpha).emb


def _sizes(count: int, ctx: DistContext) -> list[int]:
    """Every rank's ``count``, in rank order."""
    return [int(n) for n in ctx.all_gather_no_grad(torch.tensor([count], device=ctx.device)).cpu()]


def _rows_of(ids: np.ndarray, shard: _Arrays) -> tuple[np.ndarray, np.ndarray]:
    """(row in this rank's shard, whether this rank holds it) of each gallery image id (-1: none); the shard is
    in id order."""
    if not len(shard.ids):
        return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    rows = np.minimum(np.searchsorted(shard.ids, ids), len(shard.ids) - 1)
    return rows, (ids >= 0) & (shard.ids[rows] == ids)


def _expansion(scores: np.ndarray, ids: np.ndarray, alpha: float, shard: _Arrays, ctx: DistContext) -> np.ndarray:
    """What QE and DBA add to each row's vector: sum_j max(s_j, 0) ** alpha x vector(ids[:, j]) [rows, d], float64.
    Each rank adds the vectors it holds, then an all-reduce: every rank gets the sums (call on every rank)."""
    w = weights(scores, ids, alpha)
    rows, held = _rows_of(ids, shard)
    local = np.zeros((len(ids), shard.emb.shape[1]), np.float64)
    for j in range(ids.shape[1]):
        take = np.flatnonzero(held[:, j])
        local[take] += w[take, j, None] * shard.emb[rows[take, j]].astype(np.float64)
    return ctx.all_reduce_sum(torch.from_numpy(local).to(ctx.device)).cpu().numpy()


def _vectors_of(ids: np.ndarray, shard: _Arrays, ctx: DistContext) -> np.ndarray:
    """The gallery vectors of ``ids`` [rows, L] -> [rows, L, d] float32 (zeros for -1), on every rank: each
    rank writes the ones it holds and an all-reduce sums them (exact: one rank holds each)."""
    rows, held = _rows_of(ids, shard)
    part = np.zeros((*ids.shape, shard.emb.shape[1]), np.float32)
    part[held] = shard.emb[rows[held]]
    return ctx.all_reduce_sum(torch.from_numpy(part).to(ctx.device)).cpu().numpy()


def _reranked(plan: _Plan, block: np.ndarray, ids: np.ndarray, shard: _Arrays, pp: Postprocess, mine: bool,
              most: int = 1 << 22) -> np.ndarray | None:
    """The k-reciprocal order of each row's shortlist (its first pp.kr_shortlist ids) on the chunk's owner (None
    elsewhere): the shortlist's vectors gathered and re-ranked a few rows at a time, at most ``most`` numbers of
    vectors at once whatever the chunk. Call on every rank."""
    order = np.tile(np.arange(ids.shape[1]), (len(ids), 1)) if mine else None
    valid = (ids >= 0) & (np.arange(ids.shape[1]) < pp.kr_shortlist)[None]
    step = max(1, most // max(ids.shape[1] * shard.emb.shape[1], 1))
    for r0 in range(0, len(ids), step):
        vectors = _vectors_of(ids[r0:r0 + step], shard, plan.ctx)
        if mine:
            order[r0:r0 + step] = rerank(block[r0:r0 + step], vectors, valid[r0:r0 + step], pp)
    return order


def _relevant(q_lab: np.ndarray, g_lab: np.ndarray, same: bool, ks, ctx: DistContext):
    """(per-class gallery counts over all ranks, relevant items per local query, the k every rank fetches:
    the largest K or R of any query anywhere)."""
    classes = int(ctx.all_reduce(torch.tensor([max(int(g_lab.max(initial=-1)), int(q_lab.max(initial=-1))) + 1],
                                              device=ctx.device), "max"))
    counts = ctx.all_reduce_sum(torch.from_numpy(np.bincount(g_lab, minlength=classes).astype(np.int64))
                                .to(ctx.device)).cpu().numpy()
    relevant_count = counts[q_lab] - (1 if same else 0) if len(q_lab) else np.zeros(0, np.int64)
    k = int(ctx.all_reduce(torch.tensor([max(max(ks), int(relevant_count.max(initial=0)))], device=ctx.device), "max"))
    return counts, relevant_count, k


def _means(total: np.ndarray, ks, queries: int) -> dict[str, float]:
    """The metrics from the sums over all queries (_score's, reduced over ranks)."""
    answerable = total[-1]
    share = lambda i: float(total[i] / answerable) if answerable else 0.0  # noqa: E731
    metrics = {f"recall_at_{kk}": share(i) for i, kk in enumerate(ks)}
    metrics.update(r_precision=share(len(ks)), map_at_r=share(len(ks) + 1), unanswerable=float(queries - answerable),
                   queries=float(queries))
    return metrics


def _blocks(plan: _Plan, queries: _Arrays, limit: int | None = None):
    """Every rank's queries in turn, in chunks, sent to every rank: yields on every rank (owner, start, rows,
    the chunk's vectors [rows, d] float32, their image ids). ``limit``: at most that many queries of each rank."""
    ctx = plan.ctx
    for owner, n in enumerate(plan.sizes):
        n = min(n, limit) if limit is not None else n
        for start in range(0, n, plan.chunk):
            rows = min(plan.chunk, n - start)
            block = torch.zeros(rows, plan.dim, dtype=torch.float32, device=ctx.device)
            block_ids = torch.zeros(rows, dtype=torch.int64, device=ctx.device)
            if ctx.rank == owner:
                block.copy_(torch.from_numpy(queries.emb[start:start + rows]))
                block_ids.copy_(torch.from_numpy(queries.ids[start:start + rows]))
            ctx.broadcast_(block, src=owner)
            ctx.broadcast_(block_ids, src=owner)
            yield owner, start, rows, block.cpu().numpy(), block_ids.cpu().numpy()


def _search(plan: _Plan, block: np.ndarray, block_ids: np.ndarray, shard: _Arrays, index, k: int, merge: bool):
    """The ``k`` nearest gallery items of a chunk that every rank holds (``block``), over every rank's shard
    (through ``index``: a faiss Gallery or an _Exact search; None where the shard is empty), merged exactly
    where ``merge``: (scores, gallery image ids, their labels), each [rows, k]; None where not ``merge``.
    Call on every rank."""
    from dist_dml.retrieval.faiss_search import knn

    ctx, rows = plan.ctx, len(block)
    fetch = k + (1 if plan.same else 0)  # the query itself, found in its own split, is dropped
    found = np.full((rows, fetch, 2), -1, np.int64)  # (gallery image id, its label)
    found_scores = np.full((rows, fetch), -np.inf, np.float32)
    if index is not None and fetch:
        scores, hits = index.search(block, fetch) if isinstance(index, _Exact) else knn(block, index, fetch)
        width, hit = hits.shape[1], hits >= 0
        found_scores[:, :width] = np.where(hit, scores, -np.inf)
        found[:, :width, 0] = np.where(hit, shard.ids[np.maximum(hits, 0)], -1)
        found[:, :width, 1] = np.where(hit, shard.lab[np.maximum(hits, 0)], -1)
    all_scores = ctx.all_gather_no_grad(torch.from_numpy(found_scores).to(ctx.device)[None]).cpu().numpy()
    all_found = ctx.all_gather_no_grad(torch.from_numpy(found).to(ctx.device)[None]).cpu().numpy()
    if not merge:
        return None
    return _merge(all_scores, all_found, block_ids if plan.same else None, k)


def _rounds(plan: _Plan, queries: _Arrays, shard: _Arrays, index, limit: int | None = None):
    """Every rank's queries in turn, in chunks, searched against every rank's shard (through ``index``: a faiss
    Gallery or an _Exact search; None where the shard is empty): yields, on the chunk's owner only, (start, rows,
    merged gallery ids [rows, k], their labels). ``limit``: at most that many queries of each rank."""
    for owner, start, rows, block, block_ids in _blocks(plan, queries, limit):
        merged = _search(plan, block, block_ids, shard, index, plan.k, merge=plan.ctx.rank == owner)
        if merged is not None:
            yield start, rows, merged[1], merged[2]


class _Exact:
    """The exact search of a few queries against a shard, block by block, without a copy of the shard (a
    faiss flat index would copy it: the recall check of an IVF search must not double a rank's memory).
    Queries go 256 at a time and each block of ``block`` vectors keeps its best k + 8 per query
    (argpartition), so the temporaries stay a few tens of MB whatever the shard and the query count."""

    def __init__(self, vectors: np.ndarray, block: int = 8192, query_block: int = 256):
        self.vectors, self.block, self.query_block = vectors, block, query_block
        self.size = len(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = [self._search(queries[q0:q0 + self.query_block], k) for q0 in range(0, len(queries), self.query_block)]
        if not found:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([s for s, _ in found]), np.concatenate([i for _, i in found])

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from dist_dml.retrieval.faiss_search import ranked

        best_s = np.full((len(queries), 0), -np.inf, np.float32)
        best_i = np.zeros((len(queries), 0), np.int64)
        for g0 in range(0, self.size, self.block):
            scores = queries @ self.vectors[g0:g0 + self.block].T
            keep = min(k + 8, scores.shape[1])
            part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
            cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
            cand_i = np.concatenate([best_i, part + g0], axis=1)
            order = ranked(cand_s, cand_i)[:, :k]  # the search's own order: score down, then index up
            best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        return best_s, best_i


def _ivf_recall(plan: _Plan, queries: _Arrays, shard: _Arrays, ivf, check: int, nprobe: int,
                target: float) -> dict[str, float]:
    """The share of the exact top ``plan.k`` that the IVF top k holds, on up to ``check`` queries (spread over
    the ranks): what the approximate metrics are worth. With ``target`` > 0, ``nprobe`` doubles until the
    share reaches it or every list of every rank is probed; ``ivf`` is left searching with that many.
    Returns ivf_recall_at_k and ivf_nprobe, the same on every rank."""
    ctx, k, sizes = plan.ctx, plan.k, plan.sizes
    limit = max(1, check // max(len(sizes), 1))
    exact = [ids for *_, ids, _ in _rounds(plan, queries, shard, _Exact(shard.emb) if ivf is not None else None, limit)]
    most = int(ctx.all_reduce(torch.tensor([ivf.nlist if ivf is not None else 0], device=ctx.device), "max"))
    tried = []
    while True:
        if ivf is not None:
            ivf.set_nprobe(nprobe)
        found = [ids for *_, ids, _ in _rounds(plan, queries, shard, ivf, limit)]
        hits = total = 0
        for a, b in zip(exact, found):
            for row_a, row_b in zip(a, b):
                want = set(row_a[row_a >= 0].tolist())
                hits += len(want & set(row_b[row_b >= 0].tolist()))
                total += len(want)
        hits, total = ctx.all_reduce_sum(torch.tensor([float(hits), float(total)], dtype=torch.float64,
                                                      device=ctx.device)).cpu().tolist()
        recall = hits / total if total else 1.0
        tried.append(f"{nprobe}: {recall:.3f}")
        if target <= 0 or recall >= target or nprobe >= most:
            break
        nprobe = min(2 * nprobe, most)
    if ctx.is_main and target > 0:
        print(f"[eval] IVF recall@{k} against exact on {min(check, sum(sizes))} queries, by lists probed: "
              f"{', '.join(tried)}; searching {nprobe} of up to {most} lists per rank "
              f"(eval.ivf_target_recall {target})", flush=True)
    return {f"ivf_recall_at_{k}": recall, "ivf_nprobe": float(nprobe)}


def _merge(scores: np.ndarray, found: np.ndarray, own: np.ndarray | None, k: int):
    """(scores, gallery ids, their labels), each [rows, k]: every rank's lists merged by (score descending, id
    ascending), the query's own id dropped (``own``), id -1 (score -inf) where fewer than k exist."""
    from dist_dml.retrieval.faiss_search import ranked

    scores = np.concatenate(list(scores), axis=1)
    ids = np.concatenate([f[..., 0] for f in found], axis=1)
    labels = np.concatenate([f[..., 1] for f in found], axis=1)
    if own is not None:
        mine = ids == own[:, None]
        scores, ids = np.where(mine, -np.inf, scores), np.where(mine, -1, ids)
    order = ranked(scores, ids)[:, :k]  # the single-process search's order: score down, then gallery id up
    scores, ids, labels = (np.take_along_axis(a, order, 1) for a in (scores, ids, labels))
    if ids.shape[1] < k:
        pad = np.full((ids.shape[0], k - ids.shape[1]), -1, np.int64)
        ids, labels = np.concatenate([ids, pad], axis=1), np.concatenate([labels, pad], axis=1)
        scores = np.concatenate([scores, np.full(pad.shape, -np.inf, np.float32)], axis=1)
    return scores, ids, np.where(ids >= 0, labels, -1)


def _score(ids: np.ndarray, labels: np.ndarray, q_lab: np.ndarray, counts: np.ndarray, ks) -> np.ndarray:
    """Sums over these queries: recall hits per K, R-precision, MAP@R, answerable queries."""
    relevant = (ids >= 0) & (labels == q_lab[:, None])
    answerable = counts > 0
    rel, r = relevant[answerable], counts[answerable]
    out = [float(rel[:, :kk].any(axis=1).sum()) for kk in ks]
    within = np.arange(rel.shape[1])[None, :] < r[:, None]
    hits = rel & within
    out.append(float((hits.sum(1) / np.maximum(r, 1)).sum()))
    precision = np.cumsum(hits, axis=1) / np.arange(1, rel.shape[1] + 1)[None, :]
    out.append(float(((precision * hits).sum(1) / np.maximum(r, 1)).sum()))
    out.append(float(answerable.sum()))
    return np.array(out)


def _nmi(q_emb, q_lab, gallery, counts, ctx: DistContext, max_classes: int, use_gpu: bool, seed: int) -> dict:
    """NMI of k-means on the embeddings (queries and gallery), gathered to every rank: all of them up to
    ``max_classes`` classes, else those of a seeded sample of ``max_classes`` classes."""
    from dist_dml.retrieval.faiss_search import clustering_nmi

    emb = q_emb if gallery is None else np.concatenate([q_emb, gallery[0]])
    lab = q_lab if gallery is None else np.concatenate([q_lab, gallery[1]])
    present = ctx.all_reduce_sum(torch.from_numpy(np.bincount(lab, minlength=len(counts)).astype(np.int64))
                                 .to(ctx.device)).cpu().numpy()
    classes = np.flatnonzero(present)
    name = "nmi"
    if len(classes) > max_classes:
        sample = np.random.default_rng(seed).choice(classes, max_classes, replace=False)
        keep = np.isin(lab, sample)
        emb, lab = emb[keep], lab[keep]
        name = f"nmi_{max_classes}_classes"
    emb_all = ctx.all_gather_uneven(torch.from_numpy(np.ascontiguousarray(emb, np.float32)).to(ctx.device)).cpu()
    lab_all = ctx.all_gather_uneven(torch.from_numpy(lab.astype(np.int64)).to(ctx.device)).cpu()
    value = clustering_nmi(emb_all.numpy(), lab_all.numpy(), use_gpu=use_gpu, seed=seed) if ctx.is_main else 0.0
    return {name: float(ctx.broadcast_object(value))}


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)
