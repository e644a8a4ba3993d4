"""Converters from the official dataset layouts to a list of SourceImage.

Each converter reads only the dataset's own index files and names each image by its path relative
to the source root; class splits follow each dataset's zero-shot protocol (train and test classes
disjoint).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from data_prep.source import SourceImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


class SourceError(ValueError):
    """A source layout that cannot be read: names the file and line."""


def _image(src: Path, split: str, cls: str, rel: str) -> SourceImage:
    return SourceImage(split, cls, rel, ("file", str(src / rel)))


def _need(path: Path) -> Path:
    if not path.is_file():
        raise SourceError(f"{path}: not found (is --src the dataset's root folder?)")
    return path


def sop(src: Path) -> tuple[list[SourceImage], tuple[str, ...]]:
    """Stanford Online Products: Ebay_train.txt / Ebay_test.txt (image_id class_id super_class_id path)."""
    images = []
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = _need(src / name)
        for lineno, line in enumerate(path.read_text().splitlines()[1:], start=2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise SourceError(f"{path}:{lineno}: expected 'image_id class_id super_class_id path', got {line!r}")
            images.append(_image(src, split, parts[1], parts[3]))
    return images, ("train",)


def cub(src: Path) -> tuple[list[SourceImage], tuple[str, ...]]:
    """CUB-200-2011: images.txt + image_class_labels.txt; classes 1-100 train, 101-200 test."""
    paths = _id_table(_need(src / "images.txt"))
    labels = _id_table(_need(src / "image_class_labels.txt"))
    images = []
    for image_id, rel in paths.items():
        if image_id not in labels:
            raise SourceError(f"{src / 'image_class_labels.txt'}: no class for image {image_id}")
        cls = int(labels[image_id])
        images.append(_image(src / "images", "train" if cls <= 100 else "test", str(cls), rel))
    return images, ("train",)


def _id_table(path: Path) -> dict[str, str]:
    table = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2:
            raise SourceError(f"{path}:{lineno}: expected 'id value', got {line!r}")
        table[parts[0]] = parts[1].strip()
    return table


def cars196(src: Path) -> tuple[list[SourceImage], tuple[str, ...]]:
    """Cars196: cars_annos.mat (annotations: relative_im_path, class, ...); classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    path = _need(src / "cars_annos.mat")
    try:
        annos = loadmat(str(path), squeeze_me=True)["annotations"]
    except (KeyError, ValueError, OSError) as exc:
        raise SourceError(f"{path}: cannot read the 'annotations' table ({exc})") from exc
    images = []
    for row in annos:
        rel, cls = str(row["relative_im_path"]), int(row["class"])
        images.append(_image(src, "train" if cls <= 98 else "test", str(cls), rel))
    return images, ("train",)


def inshop(src: Path) -> tuple[list[SourceImage], tuple[str, ...]]:
    """In-Shop Clothes: list_eval_partition.txt (count, header, then image_name item_id status)."""
    path = _need(src / "list_eval_partition.txt")
    lines = path.read_text().splitlines()
    images = []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[2] not in ("train", "query", "gallery"):
            raise SourceError(f"{path}:{lineno}: expected 'image_name item_id train|query|gallery', got {line!r}")
        images.append(_image(src, parts[2], parts[1], parts[0]))
    return images, ("train",)


def _split_classes(classes: list[str], train_fraction: float) -> dict[str, str]:
    """Disjoint classes: the first share (in sorted order) trains, the rest tests."""
    ordered = sorted(classes)
    cut = round(len(ordered) * train_fraction)
    return {c: ("train" if i < cut else "test") for i, c in enumerate(ordered)}


def folder(src: Path, train_fraction: float = 0.5) -> tuple[list[SourceImage], tuple[str, ...]]:
    """SRC/<class>/<image>, or SRC/<split>/<class>/<image> when SRC has train/ and test/ folders."""
    if not src.is_dir():
        raise SourceError(f"{src}: not a folder")
    if (src / "train").is_dir() and (src / "test").is_dir():
        images = []
        for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            images += [_image(src, split_dir.name, cls, rel) for cls, rel in _class_files(src, split_dir)]
        return images, ("train",)
    files = _class_files(src, src)
    split_of = _split_classes(list({cls for cls, _ in files}), train_fraction)
    return [_image(src, split_of[cls], cls, rel) for cls, rel in files], ("train",)


def _class_files(root: Path, parent: Path) -> list[tuple[str, str]]:
    out = []
    for cls_dir in sorted(p for p in parent.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                out.append((cls_dir.name, str(f.relative_to(root))))
    return out


def csv_file(src: Path, train_fraction: float = 0.5) -> tuple[list[SourceImage], tuple[str, ...]]:
    """A CSV of path,label[,split] (paths relative to the CSV's folder); a header row is allowed."""
    rows = []
    with open(_need(src)) as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (lineno == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) not in (2, 3):
                raise SourceError(f"{src}:{lineno}: expected path,label[,split], got {row!r}")
            rows.append([c.strip() for c in row])
    root = src.parent
    if rows and all(len(r) == 3 for r in rows):
        return [_image(root, r[2], r[1], r[0]) for r in rows], ("train",)
    if any(len(r) == 3 for r in rows):
        raise SourceError(f"{src}: give a split on every row or on none")
    split_of = _split_classes(list({r[1] for r in rows}), train_fraction)
    return [_image(root, split_of[r[1]], r[1], r[0]) for r in rows], ("train",)


SOURCES: dict[str, Callable[..., tuple[list[SourceImage], tuple[str, ...]]]] = {
    "sop": sop,
    "cub": cub,
    "cars196": cars196,
    "inshop": inshop,
    "folder": folder,
    "csv": csv_file,
}
