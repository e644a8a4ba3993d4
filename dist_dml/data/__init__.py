"""Reading class-grouped shards (docs/SHARDS.md), one job per module:

- :mod:`~dist_dml.data.format` the shard format, stated once for the writer (data_prep) and the reader;
- :mod:`~dist_dml.data.manifest` a shard folder's manifest (schema- and bounds-checked);
- :mod:`~dist_dml.data.opener` where shard bytes come from (local files, http(s), pipe:, object stores, a cache);
- :mod:`~dist_dml.data.tar` the tar parser; :mod:`~dist_dml.data.records` records, read with retries;
- :mod:`~dist_dml.data.faults` what could not be read, counted; :mod:`~dist_dml.data.verify` sha256 verdicts;
- :mod:`~dist_dml.data.plan` an epoch's windows and segments of records (arithmetic, no I/O);
- :mod:`~dist_dml.data.position` a rank's checkpointed position in the training stream;
- :mod:`~dist_dml.data.images` decoding and augmentation into a batch;
- :mod:`~dist_dml.data.streams` the P x K training stream (its split, plan, position and workers' reader),
  the evaluation stream, their DataLoader.

`DataConfig` (:mod:`~dist_dml.data.config`) is the config's `data` section.
"""
from dist_dml.data.config import DataConfig
from dist_dml.data.faults import FAULTS, ReadErrors
from dist_dml.data.format import FORMAT, IMAGE_EXTENSIONS, VERSION
from dist_dml.data.images import (crop_box, decode, eval_image, new_batch, normalize_batch, resize_into,
                                  train_image)
from dist_dml.data.manifest import Manifest, ManifestError
from dist_dml.data.plan import EpochPlan, Segment, record_windows, undrawn_runs, window_segments
from dist_dml.data.position import Start, StreamPosition
from dist_dml.data.records import read_records, read_segments, shard_records
from dist_dml.data.streams import (EvalBatch, EvalStream, TrainReader, TrainSplit, TrainStream, images_by_id, loader,
                                   verify)
from dist_dml.data.tar import ShardError, _samples, tar_members
from dist_dml.data.verify import Verdicts

__all__ = ["DataConfig", "crop_box", "decode", "eval_image", "new_batch", "normalize_batch", "resize_into",
           "train_image", "FORMAT", "VERSION", "Manifest", "ManifestError", "FAULTS", "IMAGE_EXTENSIONS",
           "ReadErrors", "Segment", "ShardError", "_samples", "read_records", "read_segments", "record_windows",
           "shard_records", "tar_members", "undrawn_runs", "window_segments", "EvalBatch", "EvalStream",
           "TrainStream", "images_by_id", "loader", "verify", "Verdicts", "EpochPlan", "Start", "StreamPosition",
           "TrainReader", "TrainSplit"]
