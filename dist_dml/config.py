"""YAML to typed, validated config sections; dotted `section.key=value` overrides.

Read once, at the edge: `load_config` returns a frozen :class:`RunConfig` whose sections are the
components' own config classes; each component is handed only its section. Any unknown key, wrong
type or impossible combination raises :class:`ConfigError` naming the key, before any process
group starts.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_dml.data import DataConfig
from dist_dml.engine_config import DeepSpeedConfig, OptimizerConfig
from dist_dml.errors import UserError
from dist_dml.files import read_regular
from dist_dml.losses import LossConfig
from dist_dml.memory import MemoryConfig
from dist_dml.data.grouping import ClassSamplingConfig
from dist_dml.models import ModelConfig
from dist_dml.postprocess import parse as parse_postprocess
from dist_dml.sampling import SamplerConfig


class ConfigError(UserError, ValueError):
    pass


# Keys that were renamed: the old name is refused with the new one.
RENAMED = {"eval.grid_queries": "eval.example_queries", "eval.grid_k": "eval.example_k"}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 0  # total optimizer steps; 0: epochs x steps per epoch
    epochs: int = 1  # passes over the training split (when train.steps is 0)
    log_every: int = 10  # steps per log line and MLflow point (loss, active pairs, spread, throughput)
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run
    name: str = ""  # the run's name; "": the config file's name (configs/sop_resnet50.yaml -> sop_resnet50)
    output_dir: str = ""  # "": runs/NAME
    device: str = "auto"  # auto, cpu or cuda
    seed: int = 0  # model initialisation (sampling and data have their own seeds)
    collapse_spread: float = 0.2  # a log window whose embeddings spread less warns of a collapse (healthy: ~1)
    embedding_chunks: int = 1  # embed the local batch in this many chunks (a global batch larger than memory)
    # A fresh start in a folder that holds an earlier run's checkpoints or results: refused, or (true) those moved
    # into OUTPUT/previous/RUN first. Nothing is ever overwritten.
    move_aside: bool = False

    def validate(self) -> None:
        if self.steps < 0 or self.epochs < 1:
            raise ValueError("train.steps must be >= 0 and train.epochs >= 1")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got {self.seed}")
        if self.embedding_chunks < 1:
            raise ValueError(f"train.embedding_chunks must be >= 1, got {self.embedding_chunks}")
        if not 0 <= self.collapse_spread < 2:
            raise ValueError(f"train.collapse_spread must be in [0, 2) (0: no check), got {self.collapse_spread}")
        if self.log_every < 1 or self.max_bad_steps < 1:
            raise ValueError("train.log_every and train.max_bad_steps must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"train.name must be a plain name (letters, digits, . _ -), got {self.name!r}")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    at_start: bool = False  # also evaluate the untrained model
    split: str = "test"  # or "query,gallery" (In-Shop): query against gallery
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)  # the K of the Recall@K reported
    batch_size: int = 128  # images per rank embedded at once
    nmi: bool = True  # faiss k-means with as many clusters as classes
    plots: bool = True  # the final evaluation of a training draws Recall@K, nearest neighbours and the negatives
    example_queries: int = 6  # queries whose nearest neighbours are drawn (nearest_neighbours.png; 0: none)
    example_k: int = 5  # neighbours drawn per query
    max_missing_share: float = 0.0  # images of the split that may go unread (corrupt) before eval fails
    max_unanswerable_share: float = 0.1  # queries with no other item of their class, above which eval fails
    query_chunk: int = 4096  # queries searched against every rank's gallery shard at a time
    nmi_max_classes: int = 10000  # above this many classes, NMI runs on a seeded sample of this many
    index: str = "exact"  # exact, or ivf: approximate (faiss IVF per rank's shard), its recall reported
    ivf_nlist: int = 0  # IVF lists per shard (0: 4 sqrt(shard size))
    ivf_nprobe: int = 64  # lists searched per query (about sqrt of the lists of a million-item shard)
    ivf_check_queries: int = 1000  # queries searched exactly too, for ivf_recall_at_K
    ivf_target_recall: float = 0.9  # ivf_nprobe doubles until ivf_recall_at_K reaches this (0: keep ivf_nprobe)
    # Retrieval post-processing, measured beside the plain metrics (results' "postprocessed"; MLflow pp_*): none, or
    # some of dba (database-side augmentation), qe (alpha query expansion), k_reciprocal (re-ranking) joined by '+'
    postprocess: str = "none"
    qe_k: int = 2  # gallery neighbours averaged into each query (0: none)
    qe_alpha: float = 3.0  # their weight: max(similarity, 0) ** qe_alpha (0: plain average)
    dba_k: int = 2  # gallery neighbours averaged into each gallery item (0: none)
    dba_alpha: float = 3.0  # their weight, as qe_alpha
    kr_k1: int = 20  # k-reciprocal re-ranking (Zhong et al. 2017): the k-reciprocal neighbourhood
    kr_k2: int = 6  # its local query expansion
    kr_lambda: float = 0.3  # the weight of the original distance beside the Jaccard distance
    kr_shortlist: int = 100  # each query's nearest gallery items that are re-ranked

    def validate(self) -> None:
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError("eval.recall_ks must be a non-empty list of positive integers")
        if not 0 <= self.max_missing_share <= 1 or not 0 <= self.max_unanswerable_share <= 1:
            raise ValueError(f"eval.max_missing_share and eval.max_unanswerable_share must be in [0, 1], got "
                             f"{self.max_missing_share} and {self.max_unanswerable_share}")
        if self.index not in ("exact", "ivf"):
            raise ValueError(f"eval.index must be exact or ivf, got {self.index!r}")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 1 or self.ivf_check_queries < 1:
            raise ValueError("eval.ivf_nlist must be >= 0 (0: 4 sqrt(N)), eval.ivf_nprobe and eval.ivf_check_queries >= 1")
        if not 0 <= self.ivf_target_recall <= 1:
            raise ValueError(f"eval.ivf_target_recall must be in [0, 1] (0: no target), got {self.ivf_target_recall}")
        if self.query_chunk < 1 or self.nmi_max_classes < 2:
            raise ValueError(f"eval.query_chunk must be >= 1 and eval.nmi_max_classes >= 2, got {self.query_chunk} "
                             f"and {self.nmi_max_classes}")
        if self.batch_size < 1 or self.every_steps < 0 or self.example_queries < 0 or self.example_k < 1:
            raise ValueError("eval.batch_size and eval.example_k must be >= 1, eval.every_steps and eval.example_queries "
                             ">= 0")
        parse_postprocess(self.postprocess)
        if min(self.qe_k, self.dba_k) < 0 or not all(0 <= a < float("inf") for a in (self.qe_alpha, self.dba_alpha)):
            raise ValueError(f"eval.qe_k, eval.dba_k, eval.qe_alpha and eval.dba_alpha must be >= 0 (and finite), got "
                             f"{self.qe_k}, {self.dba_k}, {self.qe_alpha} and {self.dba_alpha}")
        if self.kr_k1 < 1 or self.kr_k2 < 1 or self.kr_shortlist < 1 or not 0 <= self.kr_lambda <= 1:
            raise ValueError(f"eval.kr_k1, eval.kr_k2 and eval.kr_shortlist must be >= 1 and eval.kr_lambda in [0, 1], "
                             f"got {self.kr_k1}, {self.kr_k2}, {self.kr_shortlist} and {self.kr_lambda}")
        if len(self.split.split(",")) not in (1, 2):
            raise ValueError(f"eval.split must be a split or 'query,gallery', got {self.split!r}")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log to MLflow (rank 0 only); false: no tracking at all
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; neither: MLflow's local default
    experiment: str = ""  # "": the run's name (train.name), so two configs never share an experiment
    run_name: str | None = None  # the MLflow run's name; null: one MLflow makes up (the experiment is train.name)
    system_metrics: bool = True  # MLflow's CPU, memory and GPU metrics of the run
    required: bool = True  # an unreachable server stops the run at start; false: train without tracking
    timeout_s: float = 10.0  # per request to a tracking server (the start-up check, and each log call)
    log_model: bool = True  # the final model as an MLflow Model (pyfunc: uint8 images in, embeddings out)
    register_as: str = ""  # and registered in the model registry under this name
    parent_run_id: str = ""  # the run of a grid (dist-dml grid) this training is a cell of: a child run of it

    def validate(self) -> None:
        if not 0 < self.timeout_s <= 300:
            raise ValueError(f"tracking.timeout_s must be in (0, 300] seconds, got {self.timeout_s}")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    keep_last: int = 3  # whole checkpoints kept (older ones of this run are removed)
    resume: str = "auto"  # auto: the latest checkpoint under train.output_dir, if any; none; or a path
    allow_other_run: bool = False  # auto: continue from a checkpoint another run wrote into this folder

    def validate(self) -> None:
        if self.keep_last < 1 or self.every_steps < 0:
            raise ValueError("checkpoint.keep_last must be >= 1 and checkpoint.every_steps >= 0 (0: only at the end)")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    class_sampling: ClassSamplingConfig = field(default_factory=ClassSamplingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'section.key': value}: MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}



def load_config(path: str | Path | None, overrides: list[str] = (), base_dir: Path | None = None,
                check_data: bool = True, train_data: bool = True) -> RunConfig:
    """The run config from a YAML file (or the defaults) and `section.key=value` overrides; ``check_data``
    False leaves out the checks that read the data's manifest (fetch-weights runs where the data is not);
    ``train_data`` False checks the evaluation's splits only (eval, embed: the training split is never read)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(read_regular(path).decode("utf-8", errors="replace")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as exc:  # a folder, a FIFO, a device: never read (a FIFO would block for ever)
            raise ConfigError(f"{path}: cannot be read as a config file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    name = Path(path).stem if path is not None else "default"
    return build_config(apply_overrides(raw, overrides), source=str(path) if path else "defaults", run_name=name,
                        check_data=check_data, train_data=train_data)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of the raw sections with `section.key=value` overrides applied (values read as YAML)."""
    raw = {name: dict(values) if isinstance(values, dict) else values for name, values in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        try:
            raw[section][name] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem", None) or "not valid YAML"
            raise ConfigError(f"override {item!r}: the value {value!r} is not valid YAML ({where}); quote a "
                              "string, write a list as [1,2]") from None
    return raw


def build_config(raw: dict, source: str = "config", run_name: str = "default", check_data: bool = True,
                 train_data: bool = True) -> RunConfig:
    """Typed, validated sections from raw ones. ``run_name`` (the config file's stem) names the run where
    train.name is not set: its output folder runs/NAME and its MLflow experiment."""
    sections = {}
    known = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, values in raw.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown section {name!r}; known: {sorted(known)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        cls = typing.get_type_hints(RunConfig)[name]
        sections[name] = _build_section(cls, name, values, source)
    config = _named(RunConfig(**sections), run_name)
    try:
        config = _with_backbone_defaults(config, raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate(config, source, check_data, train_data)
    return config


def _with_backbone_defaults(config: RunConfig, raw: dict) -> RunConfig:
    """What the config leaves out, from the backbone's pretrained config: model.mean / model.std, and
    data.image_size and data.resize (image_size / crop_pct); model.pretrained=true as model.weights. The
    resolved values are what the run logs and checkpoints."""
    from dist_dml.backbones import backbone_spec

    model, data = config.model, config.data
    spec = backbone_spec(model.backbone)
    given = raw.get("data") or {}
    size = data.image_size if "image_size" in given else spec.input_size
    resize = data.resize if "resize" in given else max(size, int(round(size / spec.crop_pct)))
    mean, std = model.normalisation()
    weights = model.weights_source if model.weights == "none" and model.pretrained else model.weights
    model = dataclasses.replace(model, mean=tuple(mean), std=tuple(std), weights=weights, pretrained=False)
    return dataclasses.replace(config, model=model, data=dataclasses.replace(data, image_size=size, resize=resize))


def _named(config: RunConfig, name: str) -> RunConfig:
    """train.name, train.output_dir and tracking.experiment filled in from the run's name."""
    train = config.train
    name = train.name or name
    train = dataclasses.replace(train, name=name, output_dir=train.output_dir or f"runs/{name}")
    tracking = dataclasses.replace(config.tracking, experiment=config.tracking.experiment or name)
    return dataclasses.replace(config, train=train, tracking=tracking)


def _build_section(cls, section: str, values: dict, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            renamed = RENAMED.get(f"{section}.{key}")
            if renamed:
                raise ConfigError(f"{source}: {section}.{key} is now {renamed} (\"grid\" names `dist-dml grid` alone)")
            raise ConfigError(f"{source}: unknown key {section}.{key}; known: {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", source)
    return cls(**kwargs)


def _coerce(value, hint, key: str, source: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(v, args[0], key, source) for v in items)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def validate(config: RunConfig, source: str = "config", check_data: bool = True, train_data: bool = True) -> None:
    """Each section's own checks, then the combinations across sections (with ``check_data``, against the
    data's manifest: its training split too unless ``train_data`` is False)."""
    for f in dataclasses.fields(config):
        try:
            getattr(config, f.name).validate()
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    _check_chunks(config, source)
    memory = config.memory
    if memory.enabled and 0 < config.train.steps <= memory.start_step:
        raise ConfigError(f"{source}: memory.start_step={memory.start_step} is not before train.steps="
                          f"{config.train.steps}: the memory would never be sampled from (lower it, or memory.size=0)")
    if not check_data:
        _check_tables(config, None, source)
        return
    data, loss = config.data, config.loss
    if not data.root:
        raise ConfigError(f"{source}: data.root is required (a folder written by `dist-dml prep`)")
    from dist_dml.data import Manifest

    try:
        manifest = Manifest(data.root, data.max_manifest_mb)
        for name in config.eval.split.split(","):
            manifest.split(name)
        if not train_data:
            return
        split = manifest.split(data.train_split)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{source}: data.root: {exc.args[0] if exc.args else exc}") from None
    from dist_dml.data.streams import single_image_problem

    problem = single_image_problem(manifest, data)
    if problem:
        raise ConfigError(f"{source}: data.root: {problem}")
    if loss.beta_per_class and 0 < loss.num_classes < split["classes"]:
        raise ConfigError(f"{source}: loss.num_classes={loss.num_classes} is smaller than the "
                          f"{split['classes']} classes of {data.root} (0 sizes it from the manifest)")
    if loss.beta_per_image and 0 < loss.num_images < split["images"]:
        raise ConfigError(f"{source}: loss.num_images={loss.num_images} is smaller than the "
                          f"{split['images']} images of {data.root} (0 sizes it from the manifest)")
    _check_tables(config, split, source)


def _check_tables(config: RunConfig, split: dict | None, source: str) -> None:
    """Every table a run allocates per memory slot, per class or per image, against this machine's memory, as the
    manifest's counts are (data.manifest): the cross-batch memory (memory.size x (embedding_dim x its dtype's
    bytes + label, id and step)) and the beta tables (a float32 row with Adam's two moments, per class or per
    image of the training split, or loss.num_classes / num_images). Half the machine's memory at most, before
    any process starts (memory.size=10^9 passed check and died allocating 260 GB after the processes started)."""
    from dist_dml.data.manifest import TABLE_BYTES, memory_bytes
    from dist_dml.memory import DTYPES

    loss, memory = config.loss, config.memory
    tables = []
    if memory.enabled:
        item = config.model.embedding_dim * DTYPES[memory.dtype].itemsize + 3 * 8
        tables.append((f"memory.size={memory.size:,}", memory.size * item))
    classes = loss.num_classes or (split["classes"] if split else 0)
    images = loss.num_images or (split["images"] if split else 0)
    if loss.beta_per_class:
        tables.append((f"a per-class beta table of {classes:,} rows", classes * TABLE_BYTES))
    if loss.beta_per_image:
        tables.append((f"a per-image beta table of {images:,} rows", images * TABLE_BYTES))
    sampling = config.class_sampling
    if sampling.enabled and split:
        from dist_dml.data.snapshots import loader_lag, ring_slots

        row = config.model.embedding_dim * DTYPES[sampling.dtype].itemsize
        slots = ring_slots(loader_lag(config.data.workers), sampling.refresh_steps)
        tables.append((f"class_sampling's prototypes of {split['classes']:,} classes and {slots} snapshots",
                       split["classes"] * (row * (1 + slots) + 8)))
    need, have = sum(size for _, size in tables), memory_bytes()
    if need > have / 2:
        shown = ", ".join(f"{what} ({size / 2**30:,.1f} GB)" for what, size in tables)
        raise ConfigError(f"{source}: {shown}: more than half of this machine's {have / 2**30:,.0f} GB of memory; "
                          "lower memory.size (or memory.dtype=bf16), loss.num_classes or loss.num_images (class_sampling: "
                          "a larger refresh_steps keeps fewer snapshots)")


def _check_chunks(config: RunConfig, source: str) -> None:
    """train.embedding_chunks N > 1: the local batch splits into N equal chunks, and no BatchNorm computes
    statistics of its batch (sync or local: per-chunk statistics would make the gradients inexact)."""
    chunks, batch = config.train.embedding_chunks, config.data.local_batch
    if chunks == 1:
        return
    if batch % chunks:
        raise ConfigError(f"{source}: train.embedding_chunks={chunks} does not divide the local batch of {batch} "
                          f"(data.classes_per_batch x data.images_per_class)")
    from dist_dml.models import has_batch_norm

    if config.model.norm != "frozen" and has_batch_norm(config.model):
        raise ConfigError(f"{source}: train.embedding_chunks={chunks} with model.norm={config.model.norm}: "
                          f"{config.model.backbone}'s BatchNorm would compute statistics of each chunk, not of the "
                          "batch, and the gradients would not be those of one pass; model.norm=frozen is exact")


def dump_yaml(config: RunConfig) -> str:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)
