"""dist-dml eval / embed / index / search on a small model and tiny shards."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_dml.cli import main as cli
from dist_dml.config import load_config
from dist_dml.retrieval.embeddings import read_embeddings
from dist_dml.serve.trained_model import load_checkpoint
from dist_dml.infra.errors import UserError
from dist_dml.retrieval.evaluation import FAULT_KEYS
from dist_dml.models.embedding import build_model

from .conftest import HANG_GUARD_S, ROOT, tiny_overrides
from .test_data_reader import json_names


@pytest.fixture(scope="module")
def checkpoint(tiny_shards, tmp_path_factory):
    """An untrained tiny model saved as a trainer's final_model.pt."""
    out = tmp_path_factory.mktemp("model")
    cfg = load_config(ROOT / "configs/cpu_synthetic.yaml", tiny_overrides(tiny_shards, out))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict()}, out / "final_model.pt")
    return out / "final_model.pt"


def test_eval_command_matches_in_memory_brute_force(checkpoint, tmp_path, capsys):
    assert cli(["eval", str(checkpoint), "eval.recall_ks=[1,2]", "--out", str(tmp_path / "m.json"),
                "--plots", str(tmp_path / "plots"), "eval.postprocess=qe", "eval.qe_k=1", "eval.qe_alpha=0"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    printed = capsys.readouterr().out
    model, cfg = load_checkpoint(checkpoint)
    from dist_dml.data import EvalStream
    from dist_dml.infra.distributed import DistContext
    from tests.eval_worker import embed_split

    emb, labels, _ = embed_split(model, EvalStream(cfg.data, "test"), DistContext())
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    top = torch.sort(-sim, dim=1, stable=True).indices[:, 0]
    assert metrics["recall_at_1"] == pytest.approx(float((labels[top] == labels).float().mean()))
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"recall_at_k.png", "nearest_neighbours.png"}
    # eval.postprocess=qe (k=1, plain average): the same metrics after it, under "postprocessed", worked here:
    # each query averaged with its nearest other item, then searched again
    expanded = torch.nn.functional.normalize(emb.double() + emb.double()[top], dim=1)
    sim = expanded @ emb.double().T
    sim.fill_diagonal_(-float("inf"))
    top = torch.sort(-sim, dim=1, stable=True).indices[:, 0]
    after = metrics["postprocessed"]
    assert after["postprocess"] == "qe k=1 α=0" and set(after) - {"postprocess"} == set(metrics) - {
        "postprocessed", "nmi", "images_evaluated", "images_expected", *FAULT_KEYS}
    assert after["recall_at_1"] == pytest.approx(float((labels[top] == labels).float().mean()))
    assert '"postprocessed"' in printed


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_embed_two_ranks_then_index_and_search(checkpoint, tmp_path, run_torchrun, fmt, capsys):
    emb_dir = tmp_path / "emb"
    run_torchrun(2, "dist_dml.cli", "embed", str(checkpoint), "--out", str(emb_dir), "--format", fmt, timeout=HANG_GUARD_S)
    from dist_dml.infra.published import published

    current = published(emb_dir, json.loads((emb_dir / "model.json").read_text()))  # the export's version folder
    parts = {p.name for p in current.iterdir()}
    assert len(parts) == (2 if fmt == "parquet" else 10)  # one part per rank
    exported = read_embeddings(emb_dir)
    emb, ids = exported.embeddings, exported.ids
    assert ids.tolist() == list(range(len(ids)))

    # Every exported item carries its class and source item, as the shards' json records say.
    want_names = json_names(Path(load_checkpoint(checkpoint)[1].data.root), "test")
    assert dict(zip(ids.tolist(), zip(exported.classes.tolist(), exported.items.tolist()))) == want_names

    # The index takes the model from the export (no --checkpoint needed).
    assert cli(["index", str(emb_dir), "--out", str(tmp_path / "idx")]) == 0
    from dist_dml.retrieval.faiss_search import load_index

    from dist_dml.infra.published import published

    current = published(tmp_path / "idx", json.loads((tmp_path / "idx" / "meta.json").read_text()))
    _, found = load_index(current / "index.faiss").search(emb[:5], 3)
    want = np.argsort(-(emb[:5] @ emb.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(found, want)

    # An indexed image, searched by file, finds itself first: its product's class and source item.
    import tarfile

    shards = Path(load_checkpoint(checkpoint)[1].data.root)
    with tarfile.open(sorted(shards.glob("test-*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".0.jpg"))
        meta = json.loads(tar.extractfile(member.name.split(".")[0] + ".json").read())
        (tmp_path / "q.jpg").write_bytes(tar.extractfile(member).read())
    capsys.readouterr()
    assert cli(["search", str(tmp_path / "idx"), str(tmp_path / "q.jpg"), "--k", "3"]) == 0
    first = capsys.readouterr().out.splitlines()[1]
    assert f" class={meta['class']} item={meta['items'][0]} id={meta['image_ids'][0]} " in first


def test_search_with_another_model_is_refused(checkpoint, tmp_path, capsys):
    """An index records the model that made it; another model's query embeddings are not comparable."""
    from dist_dml.data import EvalStream
    from dist_dml.infra.distributed import DistContext
    from dist_dml.retrieval.evaluation import embed_local
    from dist_dml.retrieval.embeddings import MODEL_FILE, write_embeddings
    from dist_dml.serve.trained_model import model_fingerprint

    model, cfg = load_checkpoint(checkpoint)
    emb_dir = tmp_path / "emb"
    write_embeddings(embed_local(model, EvalStream(cfg.data, "test"), DistContext(), names=True), emb_dir, 0)
    (emb_dir / MODEL_FILE).write_text(json.dumps({"checkpoint": str(checkpoint), "fingerprint": model_fingerprint(model)}))
    assert cli(["index", str(emb_dir), "--out", str(tmp_path / "idx")]) == 0

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, other)
    image = tmp_path / "q.jpg"
    image.write_bytes(b"refused before it is read")
    capsys.readouterr()
    assert cli(["index", str(emb_dir), "--out", str(tmp_path / "idx2"), "--checkpoint", str(other)]) == 2
    assert "was embedded with" in capsys.readouterr().err
    assert cli(["search", str(tmp_path / "idx"), str(image), "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "--force" in err and len(err.strip().splitlines()) == 1


def test_the_served_model_refuses_an_image_without_pixels(checkpoint):
    """The MLflow model's predict (embed_array) on a zero-height image: a ValueError naming the shape, not a
    ZeroDivisionError in the resize."""
    from dist_dml.serve.trained_model import embed_array

    model, config = load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"H, W >= 1, got uint8 \(1, 0, 5, 3\)"):
        embed_array(model, config, np.zeros((1, 0, 5, 3), np.uint8))


def synthetic_export(folder: Path, n: int, seed: int, part: int = 0) -> None:
    """An export part of n random embeddings (as dist-dml embed writes one, without its model.json)."""
    from dist_dml.retrieval.embeddings import write_embeddings
    from dist_dml.retrieval.sharded_metrics import Embedded

    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) + 1000 * part
    write_embeddings(Embedded(torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1), ids % 7, ids,
                              [str(int(i) % 7) for i in ids], [f"item{int(i)}" for i in ids]), folder, part)


def test_an_index_is_replaced_whole_a_reader_sees_the_old_or_the_new(tmp_path):
    """dist-dml index over an index folder that a search is reading: the new index and its columns are written
    beside the old and made current by one rename of meta.json; a reader that took an older meta.json still reads
    that index with its own columns (the last 3 versions are kept), never the new columns with the old index."""
    from dist_dml.infra.published import published
    from dist_dml.retrieval.faiss_search import load_index

    synthetic_export(tmp_path / "a", 40, seed=1)
    synthetic_export(tmp_path / "b", 25, seed=2)
    idx = tmp_path / "idx"
    metas = []
    for source in ("a", "b", "a", "b"):
        assert cli(["index", str(tmp_path / source), "--out", str(idx)]) == 0
        metas.append(json.loads((idx / "meta.json").read_text()))
    first, second, third, fourth = metas
    assert len({m["version"] for m in metas}) == 4
    for meta, n in ((second, 25), (third, 40), (fourth, 25)):  # two rebuilds ago, the previous and the current
        version = published(idx, meta)
        assert load_index(version / "index.faiss").ntotal == len(np.load(version / "ids.npy")) == n
    with pytest.raises(ValueError, match="the version its meta names, is not there"):
        published(idx, first)  # three rebuilds ago: gone, and said so (never mixed)
    assert sorted(p.name for p in idx.iterdir()) == sorted(["meta.json", *(m["version"] for m in metas[1:])])
    assert fourth["previous"] == [third["version"], second["version"]]


def test_a_search_reads_the_version_it_opened_whatever_is_published_meanwhile(tmp_path, capsys):
    """A search opens every file of its version before reading any: four rebuilds between its opening and its
    reading (the old version's folder removed) change nothing it answers. Where the version is removed before its
    files are opened, it reads meta.json again, says so, and answers from the new index whole."""
    from dist_dml.infra import published as published_module
    from dist_dml.retrieval.index_folder import IndexFolder

    synthetic_export(tmp_path / "a", 40, seed=1)
    synthetic_export(tmp_path / "b", 25, seed=2)
    idx = tmp_path / "idx"
    assert cli(["index", str(tmp_path / "a"), "--out", str(idx)]) == 0
    queries = read_embeddings(tmp_path / "a").embeddings[:3]
    folder = IndexFolder(idx)
    for source in ("b", "a", "b", "b"):
        assert cli(["index", str(tmp_path / source), "--out", str(idx)]) == 0
    assert not (idx / folder.meta["version"]).exists()
    hits = folder.search(queries, 1)
    assert [h[0].score for h in hits] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)  # each query finds itself
    assert len(folder.columns["ids"]) == folder.index.ntotal == 40

    real = published_module.read_json_object
    calls = []

    def read_then_rebuild(path, remedy):  # the first read's version is gone before its files are opened
        meta = real(path, remedy)
        calls.append(meta["version"])
        if len(calls) == 1:
            for source in ("a", "b", "a"):
                assert cli(["index", str(tmp_path / source), "--out", str(idx)]) == 0
        return meta

    published_module.read_json_object = read_then_rebuild
    try:
        said = []
        folder = IndexFolder(idx, say=said.append)
    finally:
        published_module.read_json_object = real
    assert len(calls) == 2 and calls[0] != calls[1] and said and "replaced while it was read" in said[0]
    folder.load()
    assert folder.index.ntotal == len(folder.columns["items"]) == folder.meta["count"] == 40


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(files=list(m["files"])), "not a mapping of names to sizes"),
    (lambda m: m["files"].update({"ids.npy": str(m["files"]["ids.npy"])}), "not a number of bytes"),
    (lambda m: m["files"].update({"../meta.json": 10}), "not a file name"),
    (lambda m: m.update(version="v-nowhere"), "the version its meta names"),
    (lambda m: m.update(count=m["count"] + 1), "its parts disagree"),
    (lambda m: m["files"].pop("labels.npy"), "it lists no labels.npy"),
    (lambda m: m.update(postprocess={"steps": ["k_reciprocal"], "kr_k1": 20}), "never carries"),
])
def test_a_damaged_index_record_is_one_line_whatever_its_shape(tmp_path, capsys, edit, says):
    """meta.json whose files are a list, whose sizes are strings, that names a file outside its version, a version
    that does not exist, a count the index does not hold, no labels, or a re-ranking an index never does: one line
    naming the file, never a traceback or a search that silently does less."""
    synthetic_export(tmp_path / "a", 20, seed=1)
    idx = tmp_path / "idx"
    assert cli(["index", str(tmp_path / "a"), "--out", str(idx)]) == 0
    meta = json.loads((idx / "meta.json").read_text())
    edit(meta)
    (idx / "meta.json").write_text(json.dumps(meta))
    from dist_dml.retrieval.index_folder import IndexFolder

    with pytest.raises(UserError, match=says) as refused:
        IndexFolder(idx, say=lambda line: None).load()
    assert "\n" not in str(refused.value) and str(idx) in str(refused.value)


def test_a_damaged_export_record_is_one_line(tmp_path, checkpoint):
    """model.json whose files are a list, or whose sizes are strings: one line naming it (an AttributeError, or
    '3956 bytes, its meta says 3956', before)."""
    folder = tmp_path / "emb"
    assert cli(["embed", str(checkpoint), "--out", str(folder)]) == 0
    meta = json.loads((folder / "model.json").read_text())
    for edit, says in ((dict(files=list(meta["files"])), "not a mapping of names to sizes"),
                       (dict(files={k: str(v) for k, v in meta["files"].items()}), "not a number of bytes")):
        (folder / "model.json").write_text(json.dumps({**meta, **edit}))
        with pytest.raises(UserError, match=says) as refused:
            read_embeddings(folder)
        assert str(folder / "model.json") in str(refused.value) and "dist-dml embed" in str(refused.value)


def test_a_file_the_meta_does_not_list_is_never_read(tmp_path):
    """items.npy dropped from meta.json's list and replaced in the version folder by a stale one: the search
    reads the columns the meta lists only (no item column), never the stale file."""
    from dist_dml.retrieval.index_folder import IndexFolder

    synthetic_export(tmp_path / "a", 20, seed=1)
    idx = tmp_path / "idx"
    assert cli(["index", str(tmp_path / "a"), "--out", str(idx)]) == 0
    meta = json.loads((idx / "meta.json").read_text())
    meta["files"].pop("items.npy")
    (idx / "meta.json").write_text(json.dumps(meta))
    np.save(idx / meta["version"] / "items.npy", np.array(["stale"] * 20))
    folder = IndexFolder(idx)
    folder.load()
    assert "items" not in folder.columns
    hits = folder.search(read_embeddings(tmp_path / "a").embeddings[:2], 3)
    assert all(hit.item is None for row in hits for hit in row)


def test_an_export_owns_its_folder_stale_parts_are_never_indexed(tmp_path, checkpoint):
    """dist-dml embed into a folder that holds a 3-part export: the new export is read alone (index merged the
    stale parts: 369 embeddings of 319 images, the same hit twice), the stale parts are gone, and index checks the
    parts against the export's own count."""
    from dist_dml.retrieval.embeddings import read_embeddings

    folder = tmp_path / "emb"
    for part in range(3):
        synthetic_export(folder, 10, seed=part, part=part)
    assert cli(["embed", str(checkpoint), "--out", str(folder)]) == 0
    meta = json.loads((folder / "model.json").read_text())
    exported = read_embeddings(folder)
    assert len(exported.ids) == meta["count"] == meta["images"] and len(np.unique(exported.ids)) == len(exported.ids)
    assert not list(folder.glob("*-00002.npy")) and not list(folder.glob("embeddings-*.npy"))
    meta["count"] += 1
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="parts hold .* embeddings, but the export wrote"):
        read_embeddings(folder)
