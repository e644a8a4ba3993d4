"""Retrieval metrics against numpy / scikit-learn brute force; distributed extraction; saved indexes."""
import numpy as np
import pytest

from .conftest import HANG_GUARD_S
import torch

from dist_dml.retrieval.evaluation import EvalConfig
from dist_dml.infra.distributed import DistContext
from dist_dml.retrieval.faiss_search import build_index, clustering_nmi, knn, load_index, save_index
from dist_dml.retrieval.sharded_metrics import Embedded, sharded_metrics


def metrics_of(query, qlab, gallery=None, glab=None, ks=(1,)) -> dict:
    """The evaluation's metrics in one process (the sharded search at one rank; image ids = row indices)."""
    as_set = lambda e, lab: Embedded(torch.from_numpy(e), torch.from_numpy(np.asarray(lab)), torch.arange(len(e)))  # noqa: E731
    metrics, _ = sharded_metrics(as_set(query, qlab), None if gallery is None else as_set(gallery, glab),
                                 EvalConfig(recall_ks=tuple(ks), nmi=False), DistContext())
    return metrics


def brute_force(query, qlab, gallery, glab, ks):
    """Plain loops: rank the gallery by (similarity desc, index asc), the query itself removed by index."""
    same = gallery is None
    gallery, glab = (query, qlab) if same else (gallery, glab)
    sim = query.astype(np.float32) @ gallery.astype(np.float32).T
    out = {f"recall_at_{k}": [] for k in ks}
    out.update(r_precision=[], map_at_r=[])
    unanswerable = 0
    for q in range(len(query)):
        order = [j for j in sorted(range(len(gallery)), key=lambda j: (-sim[q, j], j)) if not (same and j == q)]
        rel = [glab[j] == qlab[q] for j in order]
        r = sum(rel)
        if r == 0:
            unanswerable += 1
            continue
        for k in ks:
            out[f"recall_at_{k}"].append(any(rel[:k]))
        out["r_precision"].append(sum(rel[:r]) / r)
        out["map_at_r"].append(sum(rel[i] * sum(rel[: i + 1]) / (i + 1) for i in range(r)) / r)
    result = {k: float(np.mean(v)) for k, v in out.items()}
    result["unanswerable"] = float(unanswerable)
    result["queries"] = float(len(query))
    return result


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_brute_force_on_random_data(seed):
    x = unit(240, 12, seed)
    labels = np.random.default_rng(seed).integers(0, 25, 240)
    got = metrics_of(x, labels, ks=(1, 2, 4, 8))
    want = brute_force(x, labels, None, None, (1, 2, 4, 8))
    assert got == pytest.approx(want, abs=1e-12)


def test_query_gallery_match_brute_force():
    q, g = unit(60, 8, 3), unit(200, 8, 4)
    ql, gl = np.random.default_rng(5).integers(0, 30, 60), np.random.default_rng(6).integers(0, 30, 200)
    got = metrics_of(q, ql, g, gl, ks=(1, 5, 10))
    assert got == pytest.approx(brute_force(q, ql, g, gl, (1, 5, 10)), abs=1e-12)


def test_ties_go_to_the_lower_index_and_self_is_excluded_by_index():
    # Items 0-3 coincide: the query 0 must not find itself, and among equal scores the lower index wins.
    x = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    labels = np.array([7, 8, 7, 8, 9, 9])
    _, idx = knn(x, None, 3, exclude_self=True)
    assert idx[0].tolist() == [1, 2, 3] and idx[3].tolist() == [0, 1, 2]
    got = metrics_of(x, labels, ks=(1, 2))
    assert got["recall_at_1"] == pytest.approx(brute_force(x, labels, None, None, (1,))["recall_at_1"])
    assert got["recall_at_1"] == pytest.approx(3 / 6)  # 0->1 miss, 1->0 miss, 2->0 hit, 3->0 miss, 4->5, 5->4 hit


def test_singleton_classes_are_unanswerable_not_wrong():
    x = unit(30, 6, 9)
    labels = np.array([i // 3 for i in range(27)] + [100, 101, 102])
    got = metrics_of(x, labels, ks=(1,))
    assert got["unanswerable"] == 3
    assert got == pytest.approx(brute_force(x, labels, None, None, (1,)), abs=1e-12)


def test_hand_worked_map_at_r():
    # One query, R = 3 relevant, ranked relevant, not, relevant, relevant:
    # R-Precision = 2/3, MAP@R = (1/1 + 0 + 2/3) / 3.
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    angles = np.array([0.1, 0.2, 0.3, 0.4])
    g = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    got = metrics_of(q, np.array([1]), g, np.array([1, 0, 1, 1]), ks=(1,))
    assert got["r_precision"] == pytest.approx(2 / 3)
    assert got["map_at_r"] == pytest.approx((1 + 2 / 3) / 3)


def test_nmi_against_scikit_learn_kmeans():
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    centres = unit(5, 16, 1) * 4
    labels = np.repeat(np.arange(5), 40)
    x = (centres[labels] + 0.3 * rng.standard_normal((200, 16))).astype(np.float32)
    reference = normalized_mutual_info_score(labels, KMeans(5, n_init=5, random_state=0).fit_predict(x))
    assert clustering_nmi(x, labels) == pytest.approx(reference, abs=1e-9) == pytest.approx(1.0)
    noise = unit(200, 16, 2)
    assert clustering_nmi(noise, labels) < 0.3


def test_nmi_is_scikit_learns():
    """dist_dml's NMI against scikit-learn's on random labelings (few and many groups, unequal sizes,
    non-contiguous ids) and the edge cases: identical, one group each, one group against many, independent."""
    from sklearn.metrics import normalized_mutual_info_score

    from dist_dml.retrieval.faiss_search import normalized_mutual_info

    rng = np.random.default_rng(3)
    for n, k, c in ((50, 2, 3), (500, 20, 20), (2000, 300, 250), (40, 40, 5)):
        labels, assignment = rng.integers(0, k, n) * 7 + 100, rng.integers(0, c, n)
        assert normalized_mutual_info(labels, assignment) == pytest.approx(
            normalized_mutual_info_score(labels, assignment), rel=1e-12, abs=1e-12)
        mixed = np.where(rng.random(n) < 0.7, labels, assignment)  # partly agreeing
        assert normalized_mutual_info(labels, mixed) == pytest.approx(
            normalized_mutual_info_score(labels, mixed), rel=1e-12, abs=1e-12)
    same = rng.integers(0, 9, 100)
    cases = [(same, same), (np.zeros(10), np.ones(10)), (np.zeros(10), np.arange(10)),
             (np.arange(10), np.zeros(10)), (np.repeat([0, 1], 10), np.tile([0, 1], 10))]
    for labels, assignment in cases:
        assert normalized_mutual_info(labels, assignment) == pytest.approx(
            normalized_mutual_info_score(labels, assignment), abs=1e-12), (labels, assignment)


def test_two_level_kmeans_recovers_many_separated_clusters():
    from sklearn.metrics import normalized_mutual_info_score

    from dist_dml.retrieval.faiss_search import kmeans_assign

    rng = np.random.default_rng(1)
    centres = unit(300, 32, 7) * 3
    labels = np.repeat(np.arange(300), 6)
    x = (centres[labels] + 0.05 * rng.standard_normal((1800, 32))).astype(np.float32)
    assignment = kmeans_assign(x, 300, two_level_above=100)
    assert normalized_mutual_info_score(labels, assignment) > 0.95


def test_blocked_search_equals_one_block():
    q, g = unit(300, 16, 1), unit(1000, 16, 2)
    whole = knn(q, g, 10)
    blocked = knn(q, g, 10, query_block=64, gallery_block=128)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_allclose(whole[0], blocked[0], rtol=1e-6)


def test_flat_index_saved_loaded_searched_is_exact(tmp_path):
    g, q = unit(500, 32, 3), unit(20, 32, 4)
    save_index(build_index(g, "flat"), tmp_path / "index.faiss")
    _, idx = load_index(tmp_path / "index.faiss").search(q, 5)
    sim = q @ g.T
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, want)


def test_ivfpq_index_finds_most_true_neighbours():
    g = unit(4000, 32, 5)
    q = g[:50] + 0.01 * unit(50, 32, 6)
    index = build_index(g, "ivfpq", nlist=32, m=8)
    _, idx = index.search(q.astype(np.float32), 1)
    assert (idx[:, 0] == np.arange(50)).mean() > 0.8


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_extraction_each_image_once(world, tiny_shards, tmp_path, run_torchrun):
    out = tmp_path / "emb.pt"
    run_torchrun(world, "tests.eval_worker", str(tiny_shards), str(out), timeout=HANG_GUARD_S)
    got = torch.load(out, weights_only=True)
    from tests.eval_worker import embed_alone

    want = embed_alone(str(tiny_shards))
    assert torch.equal(got["ids"], torch.arange(len(got["ids"])))
    assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["labels"], want["labels"])
    torch.testing.assert_close(got["embeddings"], want["embeddings"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["same", "query_gallery"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_evaluation_equals_the_single_process_brute_force(world, mode, tmp_path, run_torchrun):
    """Each rank keeps only its embeddings; the merged neighbours and the metrics equal the whole set's
    brute force in one process (Recall@K, R-Precision, MAP@R), also for query/gallery splits and a class
    present on one rank only."""
    import numpy as np

    from tests.sharded_worker import CONFIG, KEEP, KS, sets

    out = tmp_path / "metrics.pt"
    run_torchrun(world, "tests.sharded_worker", mode, str(out), timeout=HANG_GUARD_S)
    got = torch.load(out, weights_only=False)
    query, gallery = sets(mode)
    want = brute_force(query[0], query[1], None if gallery is None else gallery[0],
                       None if gallery is None else gallery[1], KS)
    for key, value in want.items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # Post-processed (DBA, QE, k-reciprocal; each checked against float64 brute force in test_postprocess): the
    # same metrics as one process holding the whole set.
    def whole(part):
        return None if part is None else Embedded(*(torch.from_numpy(a) for a in part))

    one, _ = sharded_metrics(whole(query), whole(gallery), CONFIG, DistContext())
    after, want_after = dict(got["metrics"]["postprocessed"]), dict(one["postprocessed"])
    assert after.pop("postprocess") == want_after.pop("postprocess")
    assert after == pytest.approx(want_after, rel=1e-12, abs=1e-12)  # (the sums' order over ranks)
    assert one["postprocessed"]["map_at_r"] != one["map_at_r"]  # the transforms did change the ranking
    # The kept queries' neighbours, by brute force in float64: the same gallery ids in the same order.
    g_emb, g_lab = (query[0], query[1]) if gallery is None else (gallery[0], gallery[1])
    for qid in KEEP:
        scores = g_emb.astype(np.float64) @ query[0][qid].astype(np.float64)
        if gallery is None:
            scores[qid] = -np.inf
        ranked = np.argsort(-scores, kind="stable")[: len(got["kept"][qid][0])]
        assert got["kept"][qid][0] == ranked.tolist()
        assert got["kept"][qid][1] == (g_lab[ranked] == query[1][qid]).tolist()


def test_ivf_reports_its_recall_against_exact():
    """eval.index=ivf: probing every list is the exact search (recall 1, the same metrics); probing one
    list is approximate, and says by how much."""
    from tests.sharded_worker import KS, dataset

    emb, labels, ids = (torch.from_numpy(a) for a in dataset(2000, 50, 4))
    ivf = lambda **kw: EvalConfig(recall_ks=KS, nmi=False, index="ivf", ivf_nlist=16, ivf_check_queries=300,  # noqa: E731
                                  ivf_target_recall=0.0, **kw)
    exact, _ = sharded_metrics(Embedded(emb, labels, ids), None, EvalConfig(recall_ks=KS, nmi=False), DistContext())
    full, _ = sharded_metrics(Embedded(emb, labels, ids), None, ivf(ivf_nprobe=16), DistContext())
    assert full.pop("ivf_recall_at_8") == 1.0 and full.pop("ivf_nprobe") == 16
    assert full == pytest.approx(exact, rel=1e-12)
    checked = ids[:300].tolist()  # the queries the recall check takes (ivf_check_queries, in order)
    rough, kept = sharded_metrics(Embedded(emb, labels, ids), None, ivf(ivf_nprobe=1), DistContext(), keep_ids=checked)
    assert 0.0 < rough["ivf_recall_at_8"] < 1.0
    assert rough["ivf_nprobe"] == 1.0
    # An independent count: the IVF search's own top 8 of those queries (its merged lists) against a brute-force
    # top 8 by (similarity down, id up), the query itself left out.
    x = emb.numpy().astype(np.float64)
    overlap = 0
    for q in checked:
        sim = x @ x[q]
        sim[q] = -np.inf
        exact = set(sorted(range(len(x)), key=lambda j: (-sim[j], j))[:8])
        overlap += len(exact & set(kept[q][0][:8]))
    assert abs(rough["ivf_recall_at_8"] - overlap / (8 * len(checked))) <= 2 / (8 * len(checked))  # a tie at most


def test_ivf_target_recall_raises_the_lists_probed_to_the_fewest_that_reach_it():
    """ivf_target_recall: nprobe doubles from ivf_nprobe until the checked recall reaches the target. The
    lists it settles on reach it and half of them do not (measured with fixed nprobe); a target of 1 ends
    in the exact metrics."""
    from tests.sharded_worker import KS, dataset

    emb, labels, ids = (torch.from_numpy(a) for a in dataset(2000, 50, 4))
    run = lambda **kw: sharded_metrics(Embedded(emb, labels, ids), None, EvalConfig(  # noqa: E731
        recall_ks=KS, nmi=False, index="ivf", ivf_nlist=16, ivf_check_queries=300, **{"ivf_target_recall": 0.0, **kw}),
        DistContext())[0]
    tuned = run(ivf_nprobe=1, ivf_target_recall=0.8)
    chosen = int(tuned["ivf_nprobe"])
    assert chosen in (2, 4, 8, 16) and tuned["ivf_recall_at_8"] >= 0.8
    fixed = run(ivf_nprobe=chosen)
    assert fixed == tuned  # the search ran with the lists chosen
    assert run(ivf_nprobe=chosen // 2)["ivf_recall_at_8"] < 0.8
    exact, _ = sharded_metrics(Embedded(emb, labels, ids), None, EvalConfig(recall_ks=KS, nmi=False), DistContext())
    full = run(ivf_nprobe=1, ivf_target_recall=1.0)
    assert full.pop("ivf_recall_at_8") == 1.0 and full.pop("ivf_nprobe") <= 16
    assert full == pytest.approx(exact, rel=1e-12)
