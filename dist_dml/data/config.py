"""The `data` section of a run's config."""
from __future__ import annotations

from dataclasses import dataclass

from dist_dml.data.held_out import held_out_name


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are, how a P x K batch is read from them, how images are augmented, and what a reader
    tolerates."""

    root: str = ""  # folder with manifest.json and the shards, or a URL prefix (http(s)://, pipe:, s3://, gs://)
    train_split: str = "train"  # the manifest's split that training reads
    # The manifest's split of validation classes (dist-dml prep --val-fraction writes 'val'): what periodic
    # evaluations measure and checkpoint.best_by selects on, the test split then evaluated once, at the end ("": none)
    val_split: str = ""
    # A share of the training split's classes held out of training at run time and validated on instead of
    # val_split (their records read from the training shards: a prepared split reads less at scale); 0: none
    val_share: float = 0.0
    val_seed: int = 0  # which classes val_share holds out: the same for one manifest, share and seed
    classes_per_batch: int = 16  # P, per rank
    images_per_class: int = 4  # K
    workers: int = 2  # DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # records each worker shuffles among (class_sampling: the pool batches are chosen from)
    image_size: int = 224  # training crop / evaluation center crop
    resize: int = 256  # evaluation resize before the center crop
    min_scale: float = 0.16  # random resized crop's smallest area share
    flip: bool = True  # random horizontal flip in training (off for text, digits, logos)
    seed: int = 0  # shard order, windows, shuffle buffer, K-of-record picks and augmentation (per epoch)
    batch_size: int = 0  # per rank; optional, checked against P x K
    max_member_mb: float = 256.0  # a tar member declaring more is damage: its shard is counted corrupt
    read_retries: int = 3  # a remote shard whose read fails is tried again this often (then counted corrupt)
    retry_backoff_s: float = 1.0  # the first wait before a retry; it doubles with each
    cache_dir: str = ""  # remote shards: each downloaded once per machine to this folder, then read locally
    cache_gb: float = 0.0  # the cache's size limit (0: none); the least recently fetched shards go first
    max_manifest_mb: float = 256.0  # manifest.json is read with this limit (a million classes: about 40 MB)
    max_image_megapixels: float = 64.0  # an image declaring more pixels is refused before it is decoded
    self_pairs: bool = False  # train records of one image as two crops of it (else they are counted and skipped)
    verify_sha256: bool = False  # read every shard whole against the manifest's sha256 once per job, before training

    @property
    def validation_split(self) -> str:
        """The split periodic evaluations validate on: data.val_split, the classes data.val_share holds out
        (named ``<train_split>[val_share]``), or "" for none."""
        if self.val_share:
            return held_out_name(self.train_split)
        return self.val_split

    @property
    def local_batch(self) -> int:
        return self.classes_per_batch * self.images_per_class

    def validate(self) -> None:
        if self.images_per_class < 2:
            raise ValueError(f"data.images_per_class (K) must be at least 2 to give positives, got {self.images_per_class}")
        if self.classes_per_batch < 1:
            raise ValueError(f"data.classes_per_batch (P) must be at least 1, got {self.classes_per_batch}")
        if self.batch_size and self.batch_size != self.local_batch:
            raise ValueError(f"data.batch_size={self.batch_size} is not classes_per_batch x images_per_class = "
                             f"{self.classes_per_batch} x {self.images_per_class} = {self.local_batch}")
        if not 0 < self.image_size <= self.resize:
            raise ValueError(f"data.image_size={self.image_size} must be positive and at most data.resize={self.resize} "
                             "(evaluation resizes the shorter side to resize, then crops image_size)")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"data.min_scale={self.min_scale} must be in (0, 1]")
        if self.val_split and self.val_split == self.train_split:
            raise ValueError(f"data.val_split={self.val_split!r} is the training split: validation needs classes the "
                             "training never sees (dist-dml prep --val-fraction writes a split 'val')")
        if not 0 <= self.val_share < 1:
            raise ValueError(f"data.val_share must be in [0, 1) (a share of the training classes), got {self.val_share}")
        if self.val_share and self.val_split:
            raise ValueError(f"data.val_split={self.val_split!r} and data.val_share={self.val_share} both name "
                             "validation classes: give one (a prepared split, or a share held out of training)")
        if self.seed < 0 or self.val_seed < 0:
            raise ValueError(f"data.seed and data.val_seed must be >= 0, got {self.seed} and {self.val_seed}")
        if self.workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.workers must be >= 0 and data.shuffle_buffer >= 1")
        if not 0 < self.max_manifest_mb < float("inf") or not 0 < self.max_image_megapixels < float("inf"):
            raise ValueError(f"data.max_manifest_mb and data.max_image_megapixels must be positive and finite, got "
                             f"{self.max_manifest_mb} and {self.max_image_megapixels}")
        if not 0 < self.max_member_mb < float("inf"):
            raise ValueError(f"data.max_member_mb must be positive and finite, got {self.max_member_mb}")
        if not 0 <= self.cache_gb < float("inf"):
            raise ValueError(f"data.cache_gb must be >= 0 and finite (0: no limit), got {self.cache_gb}")
        if self.read_retries < 0 or not 0 <= self.retry_backoff_s <= 600:
            raise ValueError(f"data.read_retries must be >= 0 and data.retry_backoff_s in [0, 600], got "
                             f"{self.read_retries} and {self.retry_backoff_s}")
