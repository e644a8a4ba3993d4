"""Reading class-grouped shards (docs/SHARDS.md), one job per module:

- :mod:`~dist_dml.data.format` the shard format, stated once for the writer (data_prep) and the reader;
- :mod:`~dist_dml.data.manifest` a shard folder's manifest (schema- and bounds-checked);
- :mod:`~dist_dml.data.opener` where shard bytes come from (local files, http(s), pipe:, object stores, a cache);
- :mod:`~dist_dml.data.tar` the tar parser; :mod:`~dist_dml.data.records` records, read with retries;
- :mod:`~dist_dml.data.faults` how shards are read (ReadPolicy) and what could not be read (FaultCounter);
- :mod:`~dist_dml.data.verify` sha256 verdicts, once per job;
- :mod:`~dist_dml.data.plan` an epoch's windows and segments of records (arithmetic, no I/O);
- :mod:`~dist_dml.data.position` a rank's checkpointed position in the training stream;
- :mod:`~dist_dml.data.images` decoding and augmentation; :mod:`~dist_dml.data.batch_assembly` a training batch
  from the chosen records, with the decode fallback;
- :mod:`~dist_dml.data.loading` the read policy of a split, the shard cache, the job-wide check, the DataLoader;
- :mod:`~dist_dml.data.train_stream` the P x K training stream (its split, plan and position);
- :mod:`~dist_dml.data.train_reader` the split and the read-only reader its DataLoader's workers get: one batch
  loop, random or class-level batches;
- :mod:`~dist_dml.data.grouping` class-level batches (the `class_sampling` section, the rule, a worker's pool),
  :mod:`~dist_dml.data.snapshots` the prototypes' snapshots the workers read;
- :mod:`~dist_dml.data.held_out` the classes data.val_share holds out of training (from the manifest alone);
- :mod:`~dist_dml.data.eval_stream` the evaluation stream.

`DataConfig` (:mod:`~dist_dml.data.config`) is the config's `data` section.
"""
from dist_dml.data.config import DataConfig
from dist_dml.data.eval_stream import EvalBatch, EvalStream, images_by_id
from dist_dml.data.faults import FAULTS, FaultCounter, ReadPolicy
from dist_dml.data.format import FORMAT, IMAGE_EXTENSIONS, VERSION
from dist_dml.data.images import (crop_box, decode, eval_image, new_batch, normalize_batch, resize_into,
                                  train_image)
from dist_dml.data.loading import loader, verify
from dist_dml.data.manifest import Manifest, ManifestError
from dist_dml.data.plan import EpochPlan, Segment, record_windows, undrawn_runs, window_segments
from dist_dml.data.position import Start, StreamPosition
from dist_dml.data.records import read_records, read_segments, shard_records
from dist_dml.data.tar import ShardError, tar_members
from dist_dml.data.train_reader import SplitError, TrainReader, TrainSplit
from dist_dml.data.train_stream import TrainStream
from dist_dml.data.verify import Verdicts

__all__ = ["DataConfig", "crop_box", "decode", "eval_image", "new_batch", "normalize_batch", "resize_into",
           "train_image", "FORMAT", "VERSION", "Manifest", "ManifestError", "FAULTS", "IMAGE_EXTENSIONS",
           "FaultCounter", "ReadPolicy", "Segment", "ShardError", "read_records", "read_segments", "record_windows",
           "shard_records", "tar_members", "undrawn_runs", "window_segments", "EvalBatch", "EvalStream",
           "TrainStream", "images_by_id", "loader", "verify", "Verdicts", "EpochPlan", "Start", "StreamPosition",
           "TrainReader", "TrainSplit", "SplitError"]
