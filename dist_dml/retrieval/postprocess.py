"""Retrieval post-processing: the layer between trained embeddings and the answer (numpy only; the sharded
passes that feed it live in dist_dml.retrieval.sharded_metrics).

- DBA, database-side augmentation (Arandjelović & Zisserman 2012; weighted as Radenović et al. 2018): each
  gallery item becomes g' = normalise(g + sum_i w_i g_i) over its ``dba_k`` nearest other gallery items,
  w_i = max(s_i, 0) ** ``dba_alpha`` (s_i: the inner product with g).
- α-QE, average query expansion with α weights (Radenović et al. 2018): each query becomes
  q' = normalise(q + sum_i w_i g'_i) over its ``qe_k`` nearest gallery items (DBA's, where DBA ran), and is
  searched again. α = 0 is plain average QE.
- k-reciprocal re-ranking (Zhong et al., CVPR 2017) of each query's shortlist of ``kr_shortlist`` nearest
  gallery items: Zhong's algorithm (k-reciprocal sets with k1, their expansion, local query expansion with
  k2, Jaccard distance mixed with the original distance by λ) on the universe of the query and its
  shortlist. Where the shortlist covers the gallery this is Zhong's re-ranking of that one query; a shortlist
  keeps it O(queries x shortlist²) instead of O(N²).

Applied in that order (DBA on the gallery, then QE on the queries, then re-ranking), whichever are named.
Where queries and gallery are one split, a query is searched as it is (or QE'd) against the gallery's
augmented vectors, itself excluded by id as always; that gallery's DBA has seen the query as a gallery
item, as an index of a whole catalogue would.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

STEPS = ("dba", "qe", "k_reciprocal")  # the order they apply in
INDEX_PARAMETERS = ("dba_k", "dba_alpha", "qe_k", "qe_alpha")  # what an index records of its post-processing


@dataclass(frozen=True)
class Postprocess:
    """What post-processing runs and with which parameters (eval.postprocess and its eval.qe_* / dba_* / kr_*): the
    one place their defaults are written (the eval section and `dist-dml index` take them from here)."""

    steps: tuple[str, ...] = ()
    qe_k: int = 2
    qe_alpha: float = 3.0
    dba_k: int = 2
    dba_alpha: float = 3.0
    kr_k1: int = 20
    kr_k2: int = 6
    kr_lambda: float = 0.3
    kr_shortlist: int = 100

    @classmethod
    def settings(cls, cfg) -> Postprocess:
        """The steps and parameters of an eval config, whether any step runs or not."""
        return cls(parse(cfg.postprocess), cfg.qe_k, cfg.qe_alpha, cfg.dba_k, cfg.dba_alpha, cfg.kr_k1, cfg.kr_k2,
                   cfg.kr_lambda, cfg.kr_shortlist)

    @classmethod
    def of(cls, cfg) -> Postprocess | None:
        """From an eval config (None where eval.postprocess is none)."""
        pp = cls.settings(cfg)
        return pp if pp.steps else None

    @classmethod
    def build(cls, steps: str, parameters: dict) -> Postprocess | None:
        """``steps`` ('+'-joined, or none) with ``parameters`` (some of the fields above, each a number), checked
        (a ValueError naming the eval.* key); None for none."""
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parameters.values()):
            raise ValueError("a parameter is not a number")
        pp = cls(parse(steps), **parameters)
        pp.check()
        return pp if pp.steps else None

    def within(self, findable: int) -> Postprocess:
        """The same post-processing where a query can find at most ``findable`` gallery items: every k cut to
        that many (the neighbours beyond do not exist, so the answer is the same)."""
        return dataclasses.replace(self, qe_k=min(self.qe_k, findable), dba_k=min(self.dba_k, findable),
                                   kr_shortlist=min(self.kr_shortlist, findable))

    def check(self) -> None:
        """A ValueError naming the eval.* key of a parameter out of range."""
        if min(self.qe_k, self.dba_k) < 0 or not all(0 <= a < float("inf") for a in (self.qe_alpha, self.dba_alpha)):
            raise ValueError(f"eval.qe_k, eval.dba_k, eval.qe_alpha and eval.dba_alpha must be >= 0 (and finite), got "
                             f"{self.qe_k}, {self.dba_k}, {self.qe_alpha} and {self.dba_alpha}")
        if self.kr_k1 < 1 or self.kr_k2 < 1 or self.kr_shortlist < 1 or not 0 <= self.kr_lambda <= 1:
            raise ValueError(f"eval.kr_k1, eval.kr_k2 and eval.kr_shortlist must be >= 1 and eval.kr_lambda in [0, 1], "
                             f"got {self.kr_k1}, {self.kr_k2}, {self.kr_shortlist} and {self.kr_lambda}")

    def __contains__(self, step: str) -> bool:
        return step in self.steps

    @property
    def name(self) -> str:
        return "+".join(self.steps)

    def describe(self) -> str:
        """One line: the steps with their parameters."""
        parts = {"dba": f"dba k={self.dba_k} α={self.dba_alpha:g}", "qe": f"qe k={self.qe_k} α={self.qe_alpha:g}",
                 "k_reciprocal": f"k_reciprocal k1={self.kr_k1} k2={self.kr_k2} λ={self.kr_lambda:g} "
                                 f"shortlist={self.kr_shortlist}"}
        return ", ".join(parts[s] for s in self.steps)

    def as_dict(self) -> dict:
        """The parameters of the steps that run (what an index records)."""
        keys = {"dba": ("dba_k", "dba_alpha"), "qe": ("qe_k", "qe_alpha"),
                "k_reciprocal": ("kr_k1", "kr_k2", "kr_lambda", "kr_shortlist")}
        return {"steps": list(self.steps), **{k: getattr(self, k) for s in self.steps for k in keys[s]}}


def parse(spec: str) -> tuple[str, ...]:
    """``none`` or steps joined by '+' (dba, qe, k_reciprocal; any order, each once) -> the steps in the order
    they apply. Anything else is a ValueError that names the choices."""
    names = [s.strip() for s in str(spec).split("+")]
    if names == ["none"]:
        return ()
    unknown = [s for s in names if s not in STEPS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"eval.postprocess must be none or some of {', '.join(STEPS)} joined by '+' (e.g. dba+qe), "
                         f"got {spec!r}")
    return tuple(s for s in STEPS if s in names)


def weights(scores: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """α weights of neighbours: max(score, 0) ** alpha, 0 where there is no neighbour (id -1), float64."""
    w = np.maximum(np.asarray(scores, np.float64), 0.0) ** alpha
    return np.where(np.asarray(ids) >= 0, w, 0.0)


def augment(vectors: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """normalise(v + sums) row by row, in float64, returned as float32; a row whose sum is 0 stays v."""
    out = np.asarray(vectors, np.float64) + sums
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.where(norm > 0, norm, 1.0), vectors).astype(np.float32)


def k_reciprocal(features: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s re-ranking distances of the first item of each universe to the others, for a batch of
    universes ``features`` [B, M, d] (item 0: the query; 1..M-1: its shortlist): [B, M - 1], smaller is nearer.
    Vectorised over the batch, in float64, with Zhong's steps:

    - original distance: squared Euclidean, each column divided by its maximum, transposed;
    - R(p, k1): the items of p's k1 + 1 nearest that have p among their k1 + 1 nearest;
    - expansion: each c in R(p, k1) whose R(c, round(k1 / 2)) shares more than 2/3 of its items with
      R(p, k1) adds them;
    - V(p): exp(-distance) over that set, normalised to sum 1; local QE: the mean of V over p's k2 nearest;
    - Jaccard distance 1 - m / (2 - m), m = sum of elementwise minima of V(query) and V(g);
    - final: (1 - λ) Jaccard + λ original.

    Ranks break ties by position (a stable sort), as the shortlist's own order does."""
    f = np.asarray(features, np.float64)
    b, m, _ = f.shape
    sq = np.einsum("bmd,bmd->bm", f, f)
    dist = sq[:, :, None] + sq[:, None, :] - 2 * (f @ np.transpose(f, (0, 2, 1)))
    dist = np.transpose(dist / dist.max(axis=1, keepdims=True), (0, 2, 1))
    rank = np.argsort(dist, axis=2, kind="stable")

    def reciprocal(k: int) -> np.ndarray:
        """[B, M, M] bool: c in R(p, k)."""
        near = np.zeros((b, m, m), bool)
        np.put_along_axis(near, rank[:, :, :k + 1], True, axis=2)
        return near & np.transpose(near, (0, 2, 1))

    r = reciprocal(k1)
    r_half = reciprocal(int(np.around(k1 / 2.0)))
    half = r_half.astype(np.float32)  # set sizes and overlaps as float32 products: exact below 2 ** 24
    shared = r.astype(np.float32) @ np.transpose(half, (0, 2, 1))  # [b, p, c] = |R(p, k1) & R(c, k1 / 2)|
    joins = r & (shared > 2.0 / 3.0 * r_half.sum(axis=2)[:, None, :])
    expanded = r | ((joins.astype(np.float32) @ half) > 0)
    v = np.where(expanded, np.exp(-dist), 0.0)
    v /= v.sum(axis=2, keepdims=True)
    if k2 != 1:  # the mean of V over each item's k2 nearest, as a product with their indicator / k2
        nearest = np.zeros((b, m, m))
        np.put_along_axis(nearest, rank[:, :, :k2], 1.0 / min(k2, m), axis=2)
        v = nearest @ v
    low = np.minimum(v[:, :1, :], v).sum(axis=2)  # [B, M]: query against each item of its universe
    jaccard = 1 - low / (2 - low)
    return ((1 - lam) * jaccard + lam * dist[:, 0, :])[:, 1:]


def rerank(query: np.ndarray, shortlist: np.ndarray, valid: np.ndarray, pp: Postprocess) -> np.ndarray:
    """The new order of each query's shortlist (positions, [rows, L]) by k-reciprocal distance: ``query``
    [rows, d], ``shortlist`` [rows, L, d] (the shortlisted gallery vectors in their search order), ``valid``
    [rows, L] (a prefix of each row: the neighbours that exist). Invalid positions stay last, in place."""
    rows, width = valid.shape
    order = np.tile(np.arange(width), (rows, 1))
    counts = valid.sum(axis=1)
    for count in np.unique(counts):
        if count < 2:
            continue
        which = np.flatnonzero(counts == count)
        for start in range(0, len(which), 64):  # [64, M, M] float64 temporaries: a few MB at M = 101
            part = which[start:start + 64]
            universe = np.concatenate([query[part][:, None, :], shortlist[part, :count]], axis=1)
            distance = k_reciprocal(universe, pp.kr_k1, pp.kr_k2, pp.kr_lambda)
            order[part, :count] = np.argsort(distance, axis=1, kind="stable")
    return order
