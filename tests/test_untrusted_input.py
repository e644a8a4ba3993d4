"""Data a user or an adversary hands us (issue 17): a manifest runs nothing and allocates nothing it cannot
back, an image is bounded before it is decoded and converted whatever its mode, an export of NaN or of
objects is refused in one line."""
import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_dml.cli import main as cli
from dist_dml.data import DataConfig, EvalStream, Manifest, ManifestError, TrainStream
from dist_dml.data.opener import join, open_stream

from .conftest import ROOT, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- the manifest ----------------------------------------------------------------------------------

def test_a_shard_name_never_runs_as_shell_code(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hostile = "train-000000.tar; touch pwned #"
    os.rename(shards / "train-000000.tar", shards / hostile)  # the shard still reads under that name
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][0].update(name=hostile))
    root = f"pipe:cat {shards}/{{shard}}"
    with pytest.raises(ManifestError, match="is not a plain relative file name") as refused:
        Manifest(root)
    assert str(shards / "manifest.json") in str(refused.value) and repr(hostile) in str(refused.value)
    err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), f"data.root={root}",
                                      "tracking.enabled=false", "--world-size", "1"]))
    assert "not a plain relative file name" in err
    # Below the manifest check too, a name is quoted for the shell: the command reads that one file.
    stream, _ = open_stream(join(root, hostile))
    assert stream.read() == (shards / hostile).read_bytes()
    stream.close()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["../train-000000.tar", "/etc/passwd", "-n.tar", "a b.tar", "$(id).tar", "x/../y.tar"])
def test_shard_names_must_be_plain_relative_names(shards, name):
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    with pytest.raises(ManifestError, match="not a plain relative file name"):
        Manifest(shards)


def test_counts_that_no_shard_could_hold_are_refused_before_anything_is_allocated(shards, capsys, tmp_path):
    def huge(m):
        split = m["splits"]["train"]
        split["images"] += 10**12 - split["shards"][0]["images"]
        split["records"] += 10**12 - split["shards"][0]["records"]
        split["shards"][0].update(records=10**12, images=10**12)
    edit_manifest(shards, huge)
    with pytest.raises(ManifestError, match="more than its .* bytes can hold"):
        TrainStream(DataConfig(root=str(shards), classes_per_batch=4, images_per_class=2))
    err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), "--world-size", "1"]))
    assert "train-000000.tar" in err
    # A manifest that lies about the shard's size too is refused for the memory its counts would take.
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][0].update(bytes=10**16))
    with pytest.raises(ManifestError, match="would need .* GB for its position and tables alone"):
        Manifest(shards)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(images=s["images"] + 1), "its shards hold"),
    (lambda s: s.update(classes=10**9), "classes in"),
    (lambda s: s["shards"][0].update(records=s["shards"][0]["images"] + 1), "only .* images"),
], ids=["images", "classes", "records"])
def test_counts_are_checked_against_each_other(shards, edit, message):
    edit_manifest(shards, lambda m: edit(m["splits"]["train"]))
    with pytest.raises(ManifestError, match=message):
        Manifest(shards)


def test_a_shard_listed_twice_is_refused(shards, tmp_path, capsys):
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0])))
    err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), "--world-size", "1"]))
    assert "lists train-" in err and "again: each shard once" in err


def test_a_hand_built_split_with_no_records_is_one_line(shards, tmp_path, capsys):
    def empty(m):
        m["splits"]["train"].update(images=0, classes=0, records=0, shards=[{"name": "train-x.tar", "records": 0,
                                                                              "images": 0, "bytes": 0}])
    edit_manifest(shards, empty)
    with pytest.raises(ManifestError, match="split 'train' has no records"):
        TrainStream(DataConfig(root=str(shards), classes_per_batch=4, images_per_class=2))
    err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), "--world-size", "1"]))
    assert "has no records" in err


def test_an_endless_manifest_is_read_only_up_to_its_limit(shards, tmp_path, capsys):
    with open(shards / "manifest.json", "r+b") as f:
        f.truncate(2 << 30)  # 2 GB (sparse): never read whole
    with pytest.raises(ManifestError, match="holds more than 1 MB"):
        Manifest(shards, max_mb=1)
    err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), "--world-size", "1"]))
    assert "data.max_manifest_mb" in err


@contextlib.contextmanager
def hang_guard(seconds: int = 60):
    """A block that blocks for ever fails instead (SIGALRM)."""
    def hung(signum, frame):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_manifest_or_config_that_is_not_a_regular_file_is_refused_without_blocking(shards, tmp_path, capsys):
    """A FIFO blocked train in open() for ever with no output; /dev/zero was read up to the limit. Anything but a
    regular file is refused, and says what it is."""
    (shards / "manifest.json").unlink()
    os.mkfifo(shards / "manifest.json")  # no writer: a plain open() would wait for one for ever
    with hang_guard():
        with pytest.raises(ManifestError, match=r"a named pipe \(FIFO\), not a regular file: refused"):
            Manifest(shards)
        err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), "--world-size",
                                          "1"]))
        assert "FIFO" in err
        (shards / "manifest.json").unlink()
        (shards / "manifest.json").symlink_to("/dev/zero")
        with pytest.raises(ManifestError, match="a character device, not a regular file"):
            Manifest(shards)
        os.mkfifo(tmp_path / "config.yaml")
        err = one_line_error(capsys, cli(["check", str(tmp_path / "config.yaml"), "--world-size", "1"]))
        assert "config.yaml: cannot be read as a config file (a named pipe (FIFO)" in err


def test_a_manifest_nested_beyond_the_parser_is_one_line(shards, tmp_path, capsys):
    (shards / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="not valid JSON .nested deeper"):
        Manifest(shards)
    err = one_line_error(capsys, cli(["check", CONFIG, *tiny_overrides(shards, tmp_path / "run"), "--world-size", "1"]))
    assert "not valid JSON" in err and "Recursion" not in err


# --- images -----------------------------------------------------------------------------------------

def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def bomb_png() -> bytes:
    """A 20000 x 20000 greyscale PNG of a few hundred KB: 400 MB once decoded (1.2 GB as RGB)."""
    return encoded(Image.new("L", (20000, 20000)), "PNG")


def odd_modes() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    return {"png16": encoded(Image.fromarray(rng.integers(0, 65535, (40, 48)).astype(np.uint16)), "PNG"),
            "palette": encoded(rgb.convert("P"), "PNG"), "cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
            "grey_alpha": encoded(rgb.convert("LA"), "PNG")}


@pytest.fixture(scope="module")
def index(tiny_shards, tmp_path_factory):
    """An untrained tiny model, its test split embedded and indexed: (checkpoint, index folder)."""
    from dist_dml.config import load_config
    from dist_dml.models.embedding import build_model

    out = tmp_path_factory.mktemp("search")
    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, out))
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, out / "final_model.pt")
    assert cli(["embed", str(out / "final_model.pt"), "--out", str(out / "emb")]) == 0
    assert cli(["index", str(out / "emb"), "--out", str(out / "idx")]) == 0
    return out / "final_model.pt", out / "idx"


def test_a_decompression_bomb_query_is_refused_before_decoding(index, tmp_path, capsys):
    query = tmp_path / "bomb.png"
    query.write_bytes(bomb_png())
    capsys.readouterr()
    err = one_line_error(capsys, cli(["search", str(index[1]), str(query)]))
    assert "bomb.png" in err and "20000x20000 pixels, more than the 64 megapixels" in err


def test_queries_of_other_modes_are_converted_and_searched(index, tmp_path, capsys):
    paths = []
    for name, data in odd_modes().items():
        paths.append(tmp_path / f"{name}.{'jpg' if name == 'cmyk' else 'png'}")
        paths[-1].write_bytes(data)
    capsys.readouterr()
    assert cli(["search", str(index[1]), *map(str, paths), "--k", "2"]) == 0
    out = capsys.readouterr().out
    for path in paths:
        assert f"{path}:\n    1. score=" in out


def test_a_decompression_bomb_in_a_shard_is_counted_not_decoded(shards, caplog):
    """The bomb replaces one image of a test record: the evaluation leaves it out and says why."""
    from dist_dml.data import tar_members

    victim = sorted(shards.glob("test-*.tar"))[0]
    members = list(tar_members(str(victim), lambda name: True))
    import tarfile

    with tarfile.open(victim, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            if name.endswith(".0.jpg") and i < 3:
                data = bomb_png()  # still named .jpg: the header decides
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    size = victim.stat().st_size
    edit_manifest(shards, lambda m: next(s for s in m["splits"]["test"]["shards"] if s["name"] == victim.name)
                  .update(bytes=size, sha256=None))
    cfg = DataConfig(root=str(shards), image_size=16, resize=20, workers=0)
    faults = {}
    images = 0
    for batch in EvalStream(cfg, "test"):
        images += len(batch.image_ids)
        for key, value in batch.errors.items():
            faults[key] = faults.get(key, 0) + value
    assert faults["bad_images"] == 1
    assert images == Manifest(shards).split("test")["images"] - 1
    assert "20000x20000 pixels, more than the 64 megapixels" in caplog.text


def test_prep_reports_a_decompression_bomb_and_writes_the_rest(tmp_path):
    from data_prep.cli import main as prep

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(src / cls / f"{i}.jpg")
    (src / "a" / "3.png").write_bytes(bomb_png())
    assert prep(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--train-fraction", "0.67",
                 "--max-failed-share", "0.2", "--workers", "1", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["report"]["too_large"] == ["a/3.png"]
    assert sum(s["images"] for s in manifest["splits"].values()) == 9


# --- exported embeddings -----------------------------------------------------------------------------

def export(folder: Path, embeddings: np.ndarray, **columns) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(embeddings)
    arrays = {"embeddings": embeddings, "labels": np.arange(n) // 2, "ids": np.arange(n),
              "classes": np.array([f"c{i // 2}" for i in range(n)]), "items": np.array([f"img{i}.jpg" for i in range(n)])}
    arrays.update(columns)
    for name, array in arrays.items():
        np.save(folder / f"{name}-00000.npy", array, allow_pickle=True)
    return folder


def test_a_nan_embedding_is_never_indexed(tmp_path, capsys):
    emb = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    emb[3, 2] = np.nan
    err = one_line_error(capsys, cli(["index", str(export(tmp_path / "emb", emb)), "--out", str(tmp_path / "idx")]))
    assert "1 of 6 embeddings are not finite" in err and "img3.jpg (id 3)" in err
    assert not (tmp_path / "idx" / "index.faiss").exists()


def test_an_empty_export_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "emb").mkdir()
    err = one_line_error(capsys, cli(["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]))
    assert "no exported embeddings" in err


def test_an_object_array_is_never_unpickled(tmp_path, capsys):
    emb = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    folder = export(tmp_path / "emb", emb, items=np.array([{"x": 1}] * 4, dtype=object))
    err = one_line_error(capsys, cli(["index", str(folder), "--out", str(tmp_path / "idx")]))
    assert "items-00000.npy" in err and "not a plain numeric or text array" in err
