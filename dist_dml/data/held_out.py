"""Validation classes held out of the training split at run time (data.val_share): a seeded share of its classes,
never trained on, evaluated as a split of their own.

Which record holds which class follows from the manifest alone (docs/SHARDS.md): records are written in label
order across the split's shards, class ``label`` in ``ceil(n / max_per_record)`` records of ``class_table[label]``'s
``n`` images (the first ``n % records`` of them one image larger), its image ids contiguous in label order. So the
training stream's plan leaves the held-out records out of every epoch without reading a byte, and the evaluation
reads the training shards and keeps their records, renumbered (labels and image ids contiguous from 0) as a split
of their own would be.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dist_dml.data.manifest import Manifest, ManifestError
from dist_dml.data.opener import join
from dist_dml.infra.seeding import mix

if TYPE_CHECKING:
    from dist_dml.data.config import DataConfig

SUFFIX = "[val_share]"  # a split name cannot hold brackets: the held-out classes' name never meets a manifest's


def held_out_name(train_split: str) -> str:
    """The name evaluations give the classes data.val_share holds out of ``train_split``."""
    return train_split + SUFFIX


def is_held_out(split: str) -> bool:
    return split.endswith(SUFFIX)


def held_out_count(classes: int, share: float) -> int:
    """The classes a share holds out: at least one, and one fewer than all at most."""
    return min(classes - 1, max(1, round(share * classes)))


@dataclass(frozen=True)
class HeldOut:
    """The held-out classes of a training split and where their records lie."""

    labels: np.ndarray  # the held-out labels of the training split, ascending
    record_labels: dict[str, np.ndarray]  # {shard location: each record's label}, in the manifest's order
    record_images: dict[str, np.ndarray]  # {shard location: each record's image count}
    label_map: np.ndarray  # per training label: its held-out label (0..classes-1), -1 where trained on
    id_shift: np.ndarray  # per training label: held-out image id minus training image id
    num_images: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def excluded(self) -> dict[str, np.ndarray]:
        """{shard location: which of its records are held out} (what the training plan leaves out)."""
        return {shard: self.label_map[labels] >= 0 for shard, labels in self.record_labels.items()}

    def shard_images(self, shard: str) -> int:
        """Held-out images in ``shard``."""
        return int(self.record_images[shard][self.label_map[self.record_labels[shard]] >= 0].sum())

    def renumber(self, record: dict) -> dict | None:
        """A record of the training split as one of the held-out split (label and image ids from 0); None for a
        record of a class trained on."""
        label = int(record["label"])
        if not 0 <= label < len(self.label_map) or self.label_map[label] < 0:
            return None
        shift = int(self.id_shift[label])
        return {**record, "label": int(self.label_map[label]), "image_ids": [i + shift for i in record["image_ids"]]}


def held_out(manifest: Manifest, cfg: "DataConfig") -> HeldOut | None:
    """The classes data.val_share holds out of data.train_split (seeded by data.val_seed); None without a share.
    Refuses a manifest whose class table does not account for its records (a reader could not know which record
    holds which class)."""
    if not cfg.val_share:
        return None
    split = manifest.split(cfg.train_split)
    where = f"{manifest.path}: data.val_share needs splits.{cfg.train_split}"
    table, per_record = split.get("class_table"), manifest.data.get("max_per_record")
    if not isinstance(table, list) or len(table) != split["classes"] \
            or not all(isinstance(row, list) and len(row) == 2 and isinstance(row[1], int) and row[1] > 0
                       for row in table):
        raise ManifestError(f"{where}.class_table: one [class, images] row per class (docs/SHARDS.md)")
    if not isinstance(per_record, int) or isinstance(per_record, bool) or per_record < 1:
        raise ManifestError(f"{manifest.path}: data.val_share needs max_per_record, a count >= 1 (docs/SHARDS.md)")
    if len(table) < 2:
        raise ManifestError(f"{where} of 2 classes at least: it has {len(table)}, none to train on beside one held out")
    images = np.array([row[1] for row in table], np.int64)
    chunks = np.array([math.ceil(n / per_record) for n in images.tolist()], np.int64)
    labels = np.repeat(np.arange(len(images)), chunks)
    within = np.arange(len(labels)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    sizes = np.repeat(images // chunks, chunks) + (within < np.repeat(images % chunks, chunks))
    shards = split["shards"]
    if len(labels) != sum(s["records"] for s in shards):
        raise ManifestError(f"{where}: its class_table gives {len(labels)} records (max_per_record={per_record}), "
                            f"its shards hold {sum(s['records'] for s in shards)}")
    record_labels, record_images, start = {}, {}, 0
    for shard in shards:
        location, end = join(manifest.root, shard["name"]), start + shard["records"]
        record_labels[location], record_images[location] = labels[start:end], sizes[start:end]
        if int(sizes[start:end].sum()) != shard["images"]:
            raise ManifestError(f"{where}: the class_table puts {int(sizes[start:end].sum())} images in "
                                f"{shard['name']}, which holds {shard['images']}")
        start = end
    count = held_out_count(len(images), cfg.val_share)
    chosen = np.sort(np.random.default_rng(mix(cfg.val_seed, 0x5EED)).choice(len(images), count, replace=False))
    label_map = np.full(len(images), -1, np.int64)
    label_map[chosen] = np.arange(count)
    first = np.cumsum(images) - images  # each class's first image id in the training split
    held_first = np.cumsum(images[chosen]) - images[chosen]
    id_shift = np.zeros(len(images), np.int64)
    id_shift[chosen] = held_first - first[chosen]
    return HeldOut(chosen, record_labels, record_images, label_map, id_shift, int(images[chosen].sum()))
