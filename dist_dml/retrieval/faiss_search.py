"""The one module that imports faiss: exact k-nearest-neighbour search, k-means, and saved indexes.

Search is exact inner product (cosine on L2-normalised embeddings). Queries go in blocks, and a
gallery larger than `gallery_block` is searched block by block with the results merged, so N beyond
memory works. On GPUs (faiss-gpu) the index is spread over all visible GPUs; k > 2048 stays on the
CPU, where faiss-gpu would fall back anyway.

Determinism: results are ordered by (score descending, gallery index ascending). To make ties at
the k-th place deterministic too, a few extra neighbours are fetched and the order is re-sorted.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

GPU_MAX_K = 2048
_TIE_MARGIN = 8


def gpu_count() -> int:
    try:
        return faiss.get_num_gpus()
    except AttributeError:
        return 0


def _flat_index(vectors: np.ndarray, use_gpu: bool, k: int):
    index = faiss.IndexFlatIP(vectors.shape[1])
    if use_gpu and gpu_count() > 0 and k <= GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(vectors)
    return index


class Gallery:
    """A gallery's exact inner-product indexes, one per block of ``block`` vectors, built once for many
    searches (the sharded evaluation searches one rank's gallery shard chunk after chunk)."""

    def __init__(self, vectors: np.ndarray, k: int, use_gpu: bool = True, block: int = 2_000_000,
                 kind: str = "exact", nlist: int = 0, nprobe: int = 64):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.size = self.vectors.shape[0]
        build = _flat_index if kind == "exact" else lambda v, gpu, kk: _ivf_index(v, nlist, nprobe)
        if kind not in ("exact", "ivf"):
            raise ValueError(f"eval.index must be exact or ivf, got {kind!r}")
        self.blocks = [(g0, build(self.vectors[g0:g0 + block], use_gpu, k), min(block, self.size - g0))
                       for g0 in range(0, self.size, block)]

    @property
    def nlist(self) -> int:
        """The most inverted lists of an IVF block (0 for exact search)."""
        return max((getattr(index, "nlist", 0) for _, index, _ in self.blocks), default=0)

    def set_nprobe(self, nprobe: int) -> None:
        """IVF: search ``nprobe`` lists per query (at most each block's lists)."""
        for _, index, _ in self.blocks:
            index.nprobe = min(nprobe, index.nlist)


def _ivf_index(vectors: np.ndarray, nlist: int, nprobe: int):
    """An IVF (inverted lists of flat vectors, inner product) index: trained on at most 64 x nlist of the
    vectors (seeded), searched in ``nprobe`` lists. Approximate."""
    n, d = vectors.shape
    nlist = max(1, min(nlist or int(4 * np.sqrt(n)), n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = vectors if n <= 64 * nlist else vectors[np.random.default_rng(0).choice(n, 64 * nlist, replace=False)]
    index.train(np.ascontiguousarray(sample))
    index.add(vectors)
    index.nprobe = min(nprobe, nlist)
    return index


def knn(query: np.ndarray, gallery: np.ndarray | Gallery | None, k: int, exclude_self: bool = False,
        use_gpu: bool = True, query_block: int = 16384, gallery_block: int = 2_000_000, progress: bool = False):
    """Top-k gallery neighbours of every query: (scores [nq, k], indices [nq, k]).

    ``gallery=None`` searches the queries against themselves; with ``exclude_self`` each query's own
    index is removed (by index, not by distance). Rows with fewer than k candidates pad with -1. A
    :class:`Gallery` is searched with the indexes it holds.
    """
    query = np.ascontiguousarray(query, dtype=np.float32)
    same = gallery is None
    drop_self = exclude_self and same
    if not isinstance(gallery, Gallery):
        vectors = query if same else gallery
        fetch = min(k + (1 if drop_self else 0) + _TIE_MARGIN, vectors.shape[0])
        gallery = Gallery(vectors, fetch, use_gpu, gallery_block)
    fetch = min(k + (1 if drop_self else 0) + _TIE_MARGIN, gallery.size)
    scores = np.full((query.shape[0], fetch), -np.inf, dtype=np.float32)
    indices = np.full((query.shape[0], fetch), -1, dtype=np.int64)
    bar = tqdm(total=query.shape[0] * len(gallery.blocks), unit="query", desc="[eval] search", disable=not progress,
               mininterval=2)
    for g0, index, part_size in gallery.blocks:
        kk = min(fetch, part_size)
        for q0 in range(0, query.shape[0], query_block):
            d, i = index.search(query[q0:q0 + query_block], kk)
            i = np.where(i >= 0, i + g0, -1)
            merged_d = np.concatenate([scores[q0:q0 + query_block], d], axis=1)
            merged_i = np.concatenate([indices[q0:q0 + query_block], i], axis=1)
            keep = ranked(merged_d, merged_i)[:, :fetch]
            scores[q0:q0 + query_block] = np.take_along_axis(merged_d, keep, 1)
            indices[q0:q0 + query_block] = np.take_along_axis(merged_i, keep, 1)
            bar.update(min(query_block, query.shape[0] - q0))
    bar.close()
    if drop_self:
        own = indices == np.arange(query.shape[0])[:, None]
        order = np.argsort(own, axis=1, kind="stable")  # the query itself (if found) moves last
        scores, indices = np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)
    width = min(k, gallery.size - (1 if drop_self else 0))
    return scores[:, :width], indices[:, :width]


def search_index(index, queries: np.ndarray, k: int, postprocess=None):
    """A saved index's (scores, rows) for ``queries``, after the query-side post-processing the index records
    (a dist_dml.retrieval.postprocess.Postprocess): α-QE expands each query with its ``qe_k`` nearest indexed vectors (those
    of DBA where the index was built with it) before the search. An IVF-PQ index gives its vectors as decoded."""
    from dist_dml.retrieval.postprocess import augment, weights

    queries = np.ascontiguousarray(queries, np.float32)
    k = max(min(k, index.ntotal), 1)  # no more items exist: the same answer without k columns of padding
    if postprocess is not None and "qe" in postprocess and postprocess.qe_k > 0 and index.ntotal:
        scores, rows = index.search(queries, min(postprocess.qe_k, index.ntotal))
        if hasattr(index, "nlist"):  # IVF: reconstruct needs the map from ids to lists
            faiss.extract_index_ivf(index).make_direct_map()
        vectors = np.zeros((*rows.shape, index.d), np.float32)
        vectors[rows >= 0] = index.reconstruct_batch(rows[rows >= 0])
        w = weights(scores, rows, postprocess.qe_alpha)
        queries = augment(queries, np.einsum("nk,nkd->nd", w, vectors.astype(np.float64)))
    return index.search(queries, k)


def ranked(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per row: by score descending, then by index ascending; missing (-1) entries last."""
    missing = indices < 0
    key_index = np.where(missing, np.iinfo(np.int64).max, indices)
    key_score = np.where(missing, np.inf, -scores)
    return np.lexsort((key_index, key_score), axis=1)


def clustering_nmi(vectors: np.ndarray, labels: np.ndarray, use_gpu: bool = True, seed: int = 0) -> float:
    """NMI of faiss k-means with one cluster per class against the labels."""
    clusters = len(np.unique(labels))
    if clusters < 2 or len(labels) <= clusters:
        return 1.0 if clusters == len(labels) else 0.0
    assignment = kmeans_assign(vectors, clusters, seed=seed, use_gpu=use_gpu)
    return normalized_mutual_info(labels, assignment)


def normalized_mutual_info(labels: np.ndarray, assignment: np.ndarray) -> float:
    """scikit-learn's normalized_mutual_info_score (the mutual information over the arithmetic mean of the two
    entropies, natural logs; 1 where both are one group, 0 where the mutual information is 0), from the
    sparse contingency counts. Written out (and tested against scikit-learn): importing scikit-learn would add
    seconds to the start of every evaluating process, for these few lines."""
    _, a = np.unique(np.asarray(labels), return_inverse=True)
    _, b = np.unique(np.asarray(assignment), return_inverse=True)
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    rows, cols = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
    if rows == cols and rows <= 1:
        return 1.0
    if rows == 1 or cols == 1:
        return 0.0
    n = len(a)
    pairs, counts = np.unique(a * cols + b, return_counts=True)
    row_sums, col_sums = np.bincount(a).astype(np.float64), np.bincount(b).astype(np.float64)
    p = counts / n
    terms = p * (np.log(counts) + np.log(n) - np.log(row_sums[pairs // cols]) - np.log(col_sums[pairs % cols]))
    mutual = max(float(np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms).sum()), 0.0)
    if mutual == 0.0:
        return 0.0
    entropy = lambda sums: float(-np.sum(sums / n * np.log(sums / n)))  # noqa: E731
    return mutual / ((entropy(row_sums) + entropy(col_sums)) / 2)


def kmeans_assign(vectors: np.ndarray, clusters: int, seed: int = 0, iterations: int = 20,
                  use_gpu: bool = True, two_level_above: int = 1024) -> np.ndarray:
    """faiss k-means with ``clusters`` centroids; the cluster of every vector.

    Up to ``two_level_above`` clusters: plain k-means, the best of 5 runs where a run is cheap
    (points x clusters below 1e8), since k-means from random seeds can stop in a poor optimum.
    Beyond: faiss's two-level k-means (sqrt(C) coarse clusters, each split in proportion to its
    size), which costs about N x 2 sqrt(C) per iteration instead of N x C: with one class per
    cluster on SOP-sized data, flat k-means would cost more than the retrieval search itself.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    gpu = use_gpu and gpu_count() > 0
    if clusters > two_level_above:
        from faiss.contrib.clustering import two_level_clustering

        centroids, _ = two_level_clustering(vectors, int(np.sqrt(clusters)), clusters, clustering_niter=iterations,
                                            seed=seed, verbose=False, min_points_per_centroid=1)
        index = faiss.IndexFlatL2(vectors.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    else:
        redo = 5 if vectors.shape[0] * clusters < 1e8 else 1
        km = faiss.Kmeans(vectors.shape[1], clusters, niter=iterations, nredo=redo, seed=seed, verbose=False,
                          gpu=gpu, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, vectors.shape[0] // clusters + 1))
        km.train(vectors)
        index = km.index
    _, assignment = index.search(vectors, 1)
    return assignment[:, 0]


def build_index(vectors: np.ndarray, kind: str = "flat", nlist: int = 0, m: int = 16, nbits: int = 8):
    """A searchable index: exact flat inner product, or IVF-PQ for millions (approximate)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivfpq":
        nlist = nlist or max(1, int(4 * np.sqrt(vectors.shape[0])))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nlist, 16)
    else:
        raise ValueError(f"index type must be flat or ivfpq, got {kind!r}")
    index.add(vectors)
    return index


def save_index(index, path: Path) -> None:
    faiss.write_index(faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index, str(path))


def index_from_bytes(data: bytes):
    """An index saved by save_index, from its bytes (read from a file opened earlier)."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def load_index(path: Path):
    """A saved index (save_index); a path that is not a regular file raises OSError (never opened by faiss)."""
    from dist_dml.infra.files import open_regular

    open_regular(path).close()
    return faiss.read_index(str(path))
