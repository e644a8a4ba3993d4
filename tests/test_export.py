"""dist-dml eval / embed / index / search on a small model and tiny shards."""
import json

import numpy as np
import pytest
import torch

from dist_dml.cli import main as cli
from dist_dml.config import load_config
from dist_dml.export import load_checkpoint, read_embeddings
from dist_dml.models import build_model

from .conftest import ROOT, tiny_overrides


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
                "--plots", str(tmp_path / "plots")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    model, cfg = load_checkpoint(checkpoint)
    from dist_dml.data import EvalStream
    from dist_dml.distributed import DistContext
    from dist_dml.evaluation import embed_split

    emb, labels, _ = embed_split(model, EvalStream(cfg.data, "test"), DistContext())
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    top = torch.sort(-sim, dim=1, stable=True).indices[:, 0]
    assert metrics["recall_at_1"] == pytest.approx(float((labels[top] == labels).float().mean()))
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"recall_at_k.png", "retrieval_grid.png"}


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_embed_two_ranks_then_index_and_search(checkpoint, tmp_path, run_torchrun, fmt, capsys):
    emb_dir = tmp_path / "emb"
    run_torchrun(2, "dist_dml.cli", "embed", str(checkpoint), "--out", str(emb_dir), "--format", fmt, timeout=300)
    assert len(list(emb_dir.iterdir())) == (2 if fmt == "parquet" else 6)  # one part per rank
    emb, labels, ids = read_embeddings(emb_dir)
    assert ids.tolist() == list(range(len(ids)))

    assert cli(["index", str(emb_dir), "--out", str(tmp_path / "idx"), "--checkpoint", str(checkpoint)]) == 0
    from dist_dml.search import load_index

    _, found = load_index(tmp_path / "idx" / "index.faiss").search(emb[:5], 3)
    want = np.argsort(-(emb[:5] @ emb.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(found, want)

    # An indexed image, searched by file, finds itself first.
    import tarfile
    from pathlib import Path

    shards = Path(load_checkpoint(checkpoint)[1].data.root)
    with tarfile.open(sorted(shards.glob("test-*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".0.jpg"))
        meta = json.loads(tar.extractfile(member.name.split(".")[0] + ".json").read())
        (tmp_path / "q.jpg").write_bytes(tar.extractfile(member).read())
    capsys.readouterr()
    assert cli(["search", str(tmp_path / "idx"), str(tmp_path / "q.jpg"), "--k", "3"]) == 0
    first = capsys.readouterr().out.splitlines()[1]
    assert f"id={meta['image_ids'][0]} " in first
