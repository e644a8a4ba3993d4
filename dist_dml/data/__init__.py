"""Reading class-grouped shards (docs/SHARDS.md), in four parts:

- :mod:`~dist_dml.data.manifest` the manifest of a shard folder (schema-checked);
- :mod:`~dist_dml.data.shards` the tar parser, records, the faults met, windows and segments of records;
- :mod:`~dist_dml.data.images` decoding and augmentation into a batch;
- :mod:`~dist_dml.data.streams` the P x K training stream, the evaluation stream, their DataLoader.

`DataConfig` (:mod:`~dist_dml.data.config`) is the config's `data` section.
"""
from dist_dml.data.config import DataConfig
from dist_dml.data.images import (crop_box, decode, eval_image, new_batch, normalize_batch, resize_into,
                                  train_image)
from dist_dml.data.manifest import FORMAT, VERSION, Manifest, ManifestError
from dist_dml.data.shards import (FAULTS, IMAGE_EXTENSIONS, ReadErrors, Segment, ShardError, _samples, read_records,
                                  read_segments, record_windows, shard_records, tar_members, undrawn_runs,
                                  window_segments)
from dist_dml.data.streams import EvalBatch, EvalStream, TrainStream, images_by_id, loader, verify

__all__ = ["DataConfig", "crop_box", "decode", "eval_image", "new_batch", "normalize_batch", "resize_into",
           "train_image", "FORMAT", "VERSION", "Manifest", "ManifestError", "FAULTS", "IMAGE_EXTENSIONS",
           "ReadErrors", "Segment", "ShardError", "_samples", "read_records", "read_segments", "record_windows",
           "shard_records", "tar_members", "undrawn_runs", "window_segments", "EvalBatch", "EvalStream",
           "TrainStream", "images_by_id", "loader", "verify"]
