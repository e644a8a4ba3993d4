"""data_prep: every official layout to shards; each source image exactly once, bit-identical."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.cli import main as prep
from data_prep.writer import record_sizes


def make_image(path: Path, seed: int, fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def read_shards(out: Path) -> dict:
    """Independent of the reader: every record of every shard, straight from tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {}
    for split, info in manifest["splits"].items():
        records = []
        for shard in info["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                key = name[:-5]
                meta = json.loads(members[name])
                images = [next(v for n, v in members.items() if n.startswith(f"{key}.{i}.")) for i in range(len(meta["image_ids"]))]
                records.append((meta, images))
        splits[split] = records
    return manifest, splits


def items_of(splits: dict) -> dict:
    """(split, source item) -> (class, image bytes), asserting no item appears twice."""
    out = {}
    for split, records in splits.items():
        for meta, images in records:
            for item, data in zip(meta["items"], images):
                assert (split, item) not in out, f"{item} written twice"
                out[(split, item)] = (meta["class"], data)
    return out


def prep_layout(tmp_path: Path, source: str, src: Path, written: dict, *options: str):
    """prep a fake layout: every source item exactly once, bit-identical, train/test classes disjoint."""
    assert prep([source, "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress", *options]) == 0
    manifest, splits = read_shards(tmp_path / "out")
    assert items_of(splits) == written  # (in-shop: singleton query classes are kept for evaluation)
    check_split_classes(splits)
    return manifest, splits


def check_split_classes(splits, train="train"):
    classes = {split: {m["class"] for m, _ in recs} for split, recs in splits.items()}
    for split in classes:
        if split != train and split in ("test",):
            assert not classes[train] & classes[split], "train and test classes overlap"


def test_sop_layout(tmp_path):
    src, written = tmp_path / "sop", {}
    for split, name, rows in (("train", "Ebay_train.txt", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]),
                              ("test", "Ebay_test.txt", [(6, 3), (7, 3), (8, 4), (9, 4)])):
        lines = ["image_id class_id super_class_id path"]
        for image_id, cls in rows:
            rel = f"bicycle_final/{cls}_{image_id}.JPG"
            written[(split, rel)] = (str(cls), make_image(src / rel, image_id))
            lines.append(f"{image_id} {cls} 1 {rel}")
        (src / name).write_text("\n".join(lines) + "\n")
    manifest, _ = prep_layout(tmp_path, "sop", src, written, "--workers", "2")
    assert manifest["splits"]["train"]["images"] == 5 and manifest["splits"]["test"]["classes"] == 2


def test_cub_layout_splits_classes_at_100(tmp_path):
    src, written = tmp_path / "cub", {}
    images, labels = [], []
    for image_id, cls in enumerate([1, 1, 100, 100, 101, 101, 200, 200], start=1):
        rel = f"{cls:03d}.Bird/img_{image_id}.jpg"
        written[("train" if cls <= 100 else "test", rel)] = (str(cls), make_image(src / "images" / rel, image_id))
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {cls}")
    (src / "images.txt").write_text("\n".join(images))
    (src / "image_class_labels.txt").write_text("\n".join(labels))
    prep_layout(tmp_path, "cub", src, written)


def test_cars196_layout_from_mat(tmp_path):
    from scipy.io import savemat

    src, written = tmp_path / "cars", {}
    rows = []
    for image_id, cls in enumerate([1, 1, 98, 98, 99, 99, 196, 196], start=1):
        rel = f"car_ims/{image_id:06d}.jpg"
        written[("train" if cls <= 98 else "test", rel)] = (str(cls), make_image(src / rel, image_id))
        rows.append((rel, 1, 2, 3, 4, cls, 0))
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
             ("class", "O"), ("test", "O")]
    savemat(src / "cars_annos.mat", {"annotations": np.array([rows], dtype=dtype)})
    prep_layout(tmp_path, "cars196", src, written)


def test_inshop_layout_has_query_and_gallery(tmp_path):
    src, written = tmp_path / "inshop", {}
    rows = [("train", "id_01"), ("train", "id_01"), ("query", "id_02"), ("gallery", "id_02"), ("gallery", "id_02"),
            ("query", "id_03"), ("gallery", "id_03")]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for i, (status, item) in enumerate(rows):
        rel = f"img/WOMEN/{item}/{i:02d}_1_front.jpg"
        written[(status, rel)] = (item, make_image(src / rel, i))
        lines.append(f"{rel} {item} {status}")
    (src / "list_eval_partition.txt").write_text("\n".join(lines))
    manifest, _ = prep_layout(tmp_path, "inshop", src, written)
    assert set(manifest["splits"]) == {"train", "query", "gallery"}


def test_folder_layout_keeps_png_as_is_and_splits_classes(tmp_path):
    src, written = tmp_path / "folder", {}
    for cls in ("a", "b", "c", "d"):
        for i in range(3):
            rel = f"{cls}/{i}.png"
            written[rel] = (cls, make_image(src / rel, hash((cls, i)) % 1000, fmt="PNG"))
    assert prep(["folder", "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    manifest, splits = read_shards(tmp_path / "out")
    got = items_of(splits)
    assert {item: v for (_, item), v in got.items()} == written
    assert {split for split, _ in got} == {"train", "test"}
    check_split_classes(splits)
    with tarfile.open(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["name"]) as tar:
        assert any(n.endswith(".0.png") for n in tar.getnames())


def test_csv_with_splits_and_reencoding(tmp_path):
    rows = ["path,label,split"]
    for i, (cls, split) in enumerate([("x", "train"), ("x", "train"), ("y", "test"), ("y", "test")]):
        make_image(tmp_path / f"im{i}.png", i, fmt="PNG")
        rows.append(f"im{i}.png,{cls},{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows))
    out = tmp_path / "out"
    assert prep(["csv", "--src", str(tmp_path / "list.csv"), "--out", str(out), "--reencode", "--max-side", "10",
                 "--no-progress"]) == 0
    _, splits = read_shards(out)
    for records in splits.values():
        for _, images in records:
            for data in images:
                img = Image.open(io.BytesIO(data))
                assert img.format == "JPEG" and max(img.size) == 10


def test_missing_unreadable_and_singleton_are_reported(tmp_path):
    src = tmp_path / "f"
    for cls in ("a", "b"):
        for i in range(3):
            make_image(src / "train" / cls / f"{i}.jpg", i)
    make_image(src / "train" / "lonely" / "0.jpg", 9)
    (src / "train" / "b" / "2.jpg").write_bytes(b"not an image")
    make_image(src / "test" / "c" / "0.jpg", 5)
    make_image(src / "test" / "c" / "1.jpg", 6)
    out = tmp_path / "out"
    assert prep(["folder", "--src", str(src), "--out", str(out), "--max-failed-share", "0.5", "--no-progress"]) == 0
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["unreadable"] == ["train/b/2.jpg"]
    assert report["too_few_images"] == {"train": ["lonely"]}
    # Above the allowed share the run fails and leaves no manifest.
    assert prep(["folder", "--src", str(src), "--out", str(out), "--max-failed-share", "0", "--no-progress"]) == 2
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_rerun_gives_identical_shards_and_chunks_large_classes(tmp_path):
    args = ["synthetic", "--classes", "6", "--test-classes", "2", "--per-class", "10", "--max-per-record", "4",
            "--shard-mb", "0.01", "--no-progress"]
    digests = []
    for run in ("a", "b"):
        assert prep(args + ["--out", str(tmp_path / run)]) == 0
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / run).glob("*.tar")})
    assert digests[0] == digests[1] and len(digests[0]) > 2
    manifest, splits = read_shards(tmp_path / "a")
    sizes = [len(m["image_ids"]) for m, _ in splits["train"] if m["label"] == 0]
    assert sizes == record_sizes(10, 4) == [4, 3, 3]
    ids = sorted(i for m, _ in splits["train"] for i in m["image_ids"])
    assert ids == list(range(manifest["splits"]["train"]["images"]))
    for shard in manifest["splits"]["train"]["shards"]:
        assert hashlib.sha256((tmp_path / "a" / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]


def test_synthetic_classes_are_disjoint_and_sized(tmp_path):
    assert prep(["synthetic", "--classes", "20", "--test-classes", "5", "--per-class", "2:5", "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 0
    manifest, splits = read_shards(tmp_path / "o")
    check_split_classes(splits)
    counts = [n for _, n in manifest["splits"]["train"]["class_table"]]
    assert min(counts) >= 2 and max(counts) <= 5 and len(set(counts)) > 1


def test_bad_source_names_the_file(tmp_path, capsys):
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 2 3\n")
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    assert prep(["sop", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "Ebay_train.txt:2" in capsys.readouterr().err
