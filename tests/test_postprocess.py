"""Retrieval post-processing (DBA, α-QE, k-reciprocal re-ranking) against float64 brute-force references written
from the papers: full similarity matrices, plain loops, and Zhong et al.'s re-ranking as their public code
states it, one probe at a time."""
import numpy as np
import pytest
import torch

from dist_dml.retrieval.evaluation import EvalConfig
from dist_dml.infra.distributed import DistContext
from dist_dml.retrieval.postprocess import parse
from dist_dml.retrieval.sharded_metrics import Embedded, sharded_metrics

KS = (1, 2, 4, 8)


def order_of(scores: np.ndarray, exclude: int | None = None) -> list[int]:
    """Gallery positions by (score descending, position ascending), one excluded."""
    return [j for j in np.lexsort((np.arange(len(scores)), -scores)) if j != exclude]


def expand(vector: np.ndarray, gallery: np.ndarray, k: int, alpha: float, exclude: int | None = None) -> np.ndarray:
    """normalise(v + sum over its k nearest gallery vectors of max(s, 0) ** alpha x g), in float64."""
    scores = gallery @ vector
    out = vector.copy()
    for j in order_of(scores, exclude)[:k]:
        out += max(scores[j], 0.0) ** alpha * gallery[j]
    return out / np.linalg.norm(out)


def zhong(probe: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s re_ranking (their public code's steps, loops and all) for one probe: its final distance to
    each gallery item."""
    feats = np.concatenate([probe[None], gallery]).astype(np.float64)
    n = len(feats)
    original = np.array([[np.sum((feats[i] - feats[j]) ** 2) for j in range(n)] for i in range(n)])
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original)
    initial_rank = np.argsort(original, kind="stable")
    for i in range(n):
        forward = initial_rank[i, :k1 + 1]
        backward = initial_rank[forward, :k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for candidate in reciprocal:
            c_forward = initial_rank[candidate, :int(np.around(k1 / 2.0)) + 1]
            c_backward = initial_rank[c_forward, :int(np.around(k1 / 2.0)) + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, reciprocal)) > 2.0 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v = np.array([np.mean(v[initial_rank[i, :k2], :], axis=0) for i in range(n)])
    low = np.array([sum(min(v[0, l], v[j, l]) for l in range(n)) for j in range(n)])
    jaccard = 1 - low / (2.0 - low)
    return (jaccard * (1 - lam) + original[0] * lam)[1:]


def reference(query, qlab, gallery, glab, steps, cfg: EvalConfig) -> dict[str, float]:
    """The metrics after ``steps``, by brute force in float64 (gallery None: each query against the others)."""
    same = gallery is None
    q = query.astype(np.float64)
    g = q.copy() if same else gallery.astype(np.float64)
    glab = qlab if same else glab
    if "dba" in steps:
        g = np.stack([expand(g[i], g, cfg.dba_k, cfg.dba_alpha, exclude=i) for i in range(len(g))])
    if "qe" in steps:
        q = np.stack([expand(q[i], g, cfg.qe_k, cfg.qe_alpha, exclude=i if same else None) for i in range(len(q))])
    orders = []
    for i in range(len(q)):
        order = order_of(g @ q[i], i if same else None)
        if "k_reciprocal" in steps:
            short = order[:cfg.kr_shortlist]
            final = zhong(q[i], g[short], cfg.kr_k1, cfg.kr_k2, cfg.kr_lambda)
            order = [short[j] for j in np.argsort(final, kind="stable")] + order[cfg.kr_shortlist:]
        orders.append(order)
    return metrics_of_orders(orders, qlab, glab)


def metrics_of_orders(orders, qlab, glab) -> dict[str, float]:
    out = {f"recall_at_{k}": [] for k in KS}
    out.update(r_precision=[], map_at_r=[])
    for q, order in enumerate(orders):
        rel = [glab[j] == qlab[q] for j in order]
        r = sum(rel)
        if r == 0:
            continue
        for k in KS:
            out[f"recall_at_{k}"].append(any(rel[:k]))
        out["r_precision"].append(sum(rel[:r]) / r)
        out["map_at_r"].append(sum(rel[i] * sum(rel[:i + 1]) / (i + 1) for i in range(r)) / r)
    return {k: float(np.mean(v)) for k, v in out.items()}


def evaluated(query, qlab, gallery=None, glab=None, **cfg) -> dict:
    """The evaluation's metrics in one process, the post-processed ones under "postprocessed"."""
    as_set = lambda e, lab: Embedded(torch.from_numpy(e), torch.from_numpy(np.asarray(lab)), torch.arange(len(e)))  # noqa: E731
    metrics, _ = sharded_metrics(as_set(query, qlab), None if gallery is None else as_set(gallery, glab),
                                 EvalConfig(**{"recall_ks": KS, "nmi": False, **cfg}), DistContext())
    return metrics


def clustered(n: int, classes: int, seed: int, dim: int = 8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    emb = rng.normal(size=(classes, dim))[labels] + 0.8 * rng.normal(size=(n, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), labels.astype(np.int64)


SETTINGS = [dict(postprocess="dba"), dict(postprocess="qe", qe_k=3, qe_alpha=0.0), dict(postprocess="qe+dba"),
            dict(postprocess="k_reciprocal", kr_k1=6, kr_k2=3),
            dict(postprocess="dba+qe+k_reciprocal", kr_k1=5, kr_k2=2, kr_shortlist=12, kr_lambda=0.5)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["postprocess"])
@pytest.mark.parametrize("mode", ["same", "query_gallery"])
def test_each_transform_equals_its_float64_reference(settings, mode):
    query, qlab = clustered(70, 12, 1)
    gallery, glab = (None, None) if mode == "same" else clustered(90, 12, 2)
    if mode != "same":  # the query split's classes are the gallery's
        glab = glab % 12
    got = evaluated(query, qlab, gallery, glab, **settings)
    want = reference(query, qlab, gallery, glab, parse(settings["postprocess"]), EvalConfig(**settings))
    after = got["postprocessed"]
    for key, value in want.items():
        assert after[key] == pytest.approx(value, abs=1e-12), key
    assert [part.split()[0] for part in after["postprocess"].split(", ")] == list(parse(settings["postprocess"]))
    # the plain metrics are still there, unchanged by the transforms
    assert got["map_at_r"] == pytest.approx(reference(query, qlab, gallery, glab, (), EvalConfig())["map_at_r"],
                                            abs=1e-12)


def test_query_expansion_fixes_a_known_miss():
    """A query whose nearest gallery item is of another class (30° away), with two of its own class just beyond
    (33° and 36°): averaged with its 3 nearest, the query turns towards its class and finds it first."""
    angle = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]  # noqa: E731
    query = np.array([angle(0)], np.float32)
    gallery = np.array([angle(30), angle(-33), angle(-36)], np.float32)
    got = evaluated(query, [0], gallery, [1, 0, 0], postprocess="qe", qe_k=3, qe_alpha=0.0)
    assert got["recall_at_1"] == 0.0
    assert got["postprocessed"]["recall_at_1"] == 1.0
    # k beyond the gallery (and the class) takes what there is: the same as k = 3
    more = evaluated(query, [0], gallery, [1, 0, 0], postprocess="qe", qe_k=50, qe_alpha=0.0)
    drop = lambda m: {k: v for k, v in m["postprocessed"].items() if k != "postprocess"}  # noqa: E731
    assert drop(more) == drop(got)


def test_k_zero_changes_nothing_and_a_query_without_neighbours_is_kept():
    query, qlab = clustered(40, 6, 3)
    plain = evaluated(query, qlab)
    none = evaluated(query, qlab, postprocess="dba+qe", qe_k=0, dba_k=0)["postprocessed"]
    assert {k: none[k] for k in plain} == plain
    # one item alone: no neighbour to expand with or re-rank, one unanswerable query, no failure
    alone = evaluated(query[:1], qlab[:1], postprocess="dba+qe+k_reciprocal", max_unanswerable_share=1.0)
    assert alone["postprocessed"]["unanswerable"] == 1.0


def test_a_postprocess_that_does_not_exist_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="dba, qe, k_reciprocal"):
        EvalConfig(postprocess="qe+rerank").validate()
    with pytest.raises(ValueError, match="must be >= 0"):
        EvalConfig(postprocess="qe", qe_k=-1).validate()


def test_an_index_carries_dba_and_its_searches_apply_qe(tmp_path, capsys):
    """dist-dml index --postprocess dba+qe stores the DBA vectors (the float64 reference's) and its parameters;
    search_index expands each query with the index's QE before searching: the reference's neighbours."""
    import json

    from dist_dml.cli import main as cli
    from dist_dml.retrieval.embeddings import read_embeddings
    from dist_dml.infra.published import published
    from dist_dml.retrieval.faiss_search import load_index, search_index

    from .test_export import synthetic_export

    synthetic_export(tmp_path / "emb", 60, seed=4)
    gallery = read_embeddings(tmp_path / "emb").embeddings.astype(np.float64)
    assert cli(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--postprocess", "qe+dba",
                "--dba-k", "3", "--qe-alpha", "1"]) == 0
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["postprocess"] == {"steps": ["dba", "qe"], "dba_k": 3, "dba_alpha": 3.0, "qe_k": 2, "qe_alpha": 1.0}
    index = load_index(published(tmp_path / "idx", meta) / "index.faiss")
    dba = np.stack([expand(gallery[i], gallery, 3, 3.0, exclude=i) for i in range(len(gallery))])
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), dba, atol=1e-6)

    queries, _ = clustered(5, 3, 9)
    from dist_dml.retrieval.index_folder import recorded_postprocess

    scores, rows = search_index(index, queries, 4, recorded_postprocess(meta, tmp_path / "idx"))
    for query, row in zip(queries.astype(np.float64), rows):
        expanded = expand(query, dba, 2, 1.0)
        assert row.tolist() == order_of(dba @ expanded)[:4]

    # k-reciprocal is evaluation's, and a bad parameter is refused in one line naming the flag
    capsys.readouterr()
    assert cli(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "x"), "--postprocess", "k_reciprocal"]) == 2
    assert "evaluation" in capsys.readouterr().err
    bad_k = ["--postprocess", "qe", "--qe-k", "-2"]
    assert cli(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "x"), *bad_k]) == 2
    assert "--qe-k" in capsys.readouterr().err
    # a meta.json whose post-processing is damaged is refused before any search
    from dist_dml.infra.errors import UserError

    for bad in ({"steps": ["qe"], "qe_k": "2"}, {"steps": "qe"}, {"steps": ["qe", "rerank"]}, {"qe_k": 2}, [1]):
        with pytest.raises(UserError, match="damaged"):
            recorded_postprocess({"postprocess": bad}, tmp_path / "idx")


@pytest.mark.parametrize("mode", ["same", "query_gallery"])
def test_a_k_beyond_the_gallery_is_cut_to_it_with_the_same_answer_in_little_memory(mode):
    """eval.qe_k, eval.dba_k, eval.kr_shortlist and a Recall@K of 10^5 over a gallery of 60: the metrics of the k
    cut to the gallery, without allocating k columns of padding per query (1-3 GB at 10^5-10^7 before)."""
    import tracemalloc

    query, qlab = clustered(60, 6, 5)
    gallery, glab = (None, None) if mode == "same" else clustered(60, 6, 6)
    findable = 59 if mode == "same" else 60
    huge = dict(qe_k=100_000, dba_k=100_000, kr_shortlist=100_000, recall_ks=(1, 100_000))
    fit = dict(qe_k=findable, dba_k=59, kr_shortlist=findable, recall_ks=(1, findable))
    for steps in ("dba+qe", "k_reciprocal"):
        tracemalloc.start()
        got = evaluated(query, qlab, gallery, glab, postprocess=steps, **huge)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        want = evaluated(query, qlab, gallery, glab, postprocess=steps, **fit)
        assert peak < 64 * 2**20, peak
        values = lambda m: [m[key] for key in ("recall_at_1", "map_at_r", "r_precision")]  # noqa: E731
        assert values(got) == pytest.approx(values(want), abs=1e-6)
        assert values(got["postprocessed"]) == pytest.approx(values(want["postprocessed"]), abs=1e-6)
        assert got[f"recall_at_100000"] == pytest.approx(want[f"recall_at_{findable}"], abs=1e-6)


def test_an_index_and_its_search_cut_k_to_what_they_hold(tmp_path):
    """dist-dml index --dba-k and search --k far beyond the 40 indexed items: the index and the hits of k = 39 / 40,
    in little memory."""
    import json
    import tracemalloc

    from dist_dml.cli import main as cli
    from dist_dml.retrieval.embeddings import read_embeddings
    from dist_dml.retrieval.index_folder import IndexFolder

    from .test_export import synthetic_export

    synthetic_export(tmp_path / "emb", 40, seed=3)
    for name, k in (("huge", 100_000), ("fit", 39)):
        assert cli(["index", str(tmp_path / "emb"), "--out", str(tmp_path / name), "--postprocess", "dba+qe",
                    "--dba-k", str(k), "--qe-k", str(k)]) == 0
    huge, fit = IndexFolder(tmp_path / "huge"), IndexFolder(tmp_path / "fit")
    queries = read_embeddings(tmp_path / "emb").embeddings[:4]
    tracemalloc.start()
    got = huge.search(queries, 10_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    want = fit.search(queries, 40)
    assert peak < 64 * 2**20, peak
    assert [[(h.id, h.score) for h in row] for row in got] == [[(h.id, h.score) for h in row] for row in want]
    assert all(len(row) == 40 for row in got)
    assert json.loads((tmp_path / "huge" / "meta.json").read_text())["postprocess"]["dba_k"] == 100_000
