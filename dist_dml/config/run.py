"""YAML to typed, validated config sections; dotted `section.key=value` overrides.

Read once, at the edge: `load_config` returns a frozen :class:`RunConfig` whose sections are the
components' own config classes; each component is handed only its section. Any unknown key, wrong
type or impossible combination raises :class:`ConfigError` naming the key, before any process
group starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_dml.config.optimizer import DeepSpeedConfig, OptimizerConfig
from dist_dml.config.sections import CheckpointConfig, TrackingConfig, TrainConfig
from dist_dml.data.config import DataConfig
from dist_dml.data.grouping import ClassSamplingConfig
from dist_dml.infra.errors import UserError
from dist_dml.infra.files import read_regular
from dist_dml.method.cross_batch_memory import MemoryConfig
from dist_dml.method.losses import LossConfig
from dist_dml.method.proxies import ProxyConfig
from dist_dml.method.sampling import SamplerConfig
from dist_dml.models.embedding import ModelConfig
from dist_dml.retrieval.evaluation import EvalConfig


class ConfigError(UserError, ValueError):
    pass


# Keys of earlier versions, refused with the key that replaced them (a config written for one says what to change).
REPLACED = {"eval.grid_queries": "eval.example_queries", "eval.grid_k": "eval.example_k"}


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
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what a run writes as OUTPUT/config.yaml)."""
        return dump_yaml(self)

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
    data.image_size and data.resize (image_size / crop_pct); model.pretrained=true as model.weights; model.norm=auto
    as frozen or sync. The resolved values are what the run logs and checkpoints."""
    from dist_dml.models.backbones import backbone_spec

    model, data = config.model, config.data
    spec = backbone_spec(model.backbone)
    given = raw.get("data") or {}
    size = data.image_size if "image_size" in given else spec.input_size
    resize = data.resize if "resize" in given else max(size, int(round(size / spec.crop_pct)))
    mean, std = model.normalisation()
    weights = model.weights_source if model.weights == "none" and model.pretrained else model.weights
    model = dataclasses.replace(model, mean=tuple(mean), std=tuple(std), weights=weights, pretrained=False,
                                norm=model.norm_mode)
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
            if f"{section}.{key}" in REPLACED:
                raise ConfigError(f"{source}: {section}.{key} is now {REPLACED[f'{section}.{key}']}")
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
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a span of 500 steps, a name of digits
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def validate(config: RunConfig, source: str = "config", check_data: bool = True, train_data: bool = True) -> None:
    """Each section's own checks, then the combinations across sections (with ``check_data``, against the
    data's manifest: its training split too unless ``train_data`` is False)."""
    from dist_dml.method.proxies import KINDS as CENTRE_LOSSES

    if config.loss.kind in CENTRE_LOSSES:
        kind = config.loss.kind
        raise ConfigError(f"{source}: loss.kind={kind}: the losses against class centres are the proxy section's: "
                          f"proxy.kind={kind} loss.weight=0 trains it alone, proxy.kind={kind} adds it to the pair loss")
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
    sampling = config.class_sampling
    if sampling.enabled and 0 < config.train.steps <= sampling.start_step:
        raise ConfigError(f"{source}: class_sampling.start_step={sampling.start_step} is not before train.steps="
                          f"{config.train.steps}: no batch would be class-level (lower it, or class_sampling.share=0)")
    if config.loss.weight == 0 and not config.proxy.enabled:
        raise ConfigError(f"{source}: loss.weight=0 leaves nothing to train: it is for a run of a loss against class "
                          "centres alone (proxy.kind=proxy_anchor, norm_softmax, cosface or arcface)")
    _check_selection(config, source)
    if not check_data:
        _check_tables(config, None, source)
        return
    data, loss = config.data, config.loss
    if not data.root:
        raise ConfigError(f"{source}: data.root is required (a folder written by `dist-dml prep`)")
    from dist_dml.data import Manifest
    from dist_dml.data.held_out import held_out

    try:
        manifest = Manifest(data.root, data.max_manifest_mb)
        for name in [*config.eval.split.split(","), *([data.val_split] if data.val_split else [])]:
            manifest.split(name)
        if not train_data:
            return
        split = manifest.split(data.train_split)
        held = held_out(manifest, data)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"{source}: data.root: {exc.args[0] if exc.args else exc}") from None
    if held is not None and "val" in manifest.data["splits"]:
        raise ConfigError(f"{source}: data.val_share={data.val_share} holds training classes out, but "
                          f"{manifest.path} has a prepared validation split 'val': validate on it "
                          "(data.val_split=val), or drop data.val_share")
    from dist_dml.data.train_reader import single_image_problem

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


def selectable_metrics(config: RunConfig) -> list[str]:
    """The metrics an evaluation of this run computes that checkpoint.best_by may name: Recall@K of eval.recall_ks,
    MAP@R and R-Precision; the same after eval.postprocess (pp_*); and of the weights' average (ema_*, train.ema)."""
    plain = [*(f"recall_at_{k}" for k in config.eval.recall_ks), "map_at_r", "r_precision"]
    names = plain + ([f"pp_{m}" for m in plain] if config.eval.postprocess != "none" else [])
    return names + ([f"ema_{m}" for m in names] if config.train.ema else [])


def _check_selection(config: RunConfig, source: str) -> None:
    """checkpoint.best_by names a metric the evaluation computes, on a validation split; train.patience counts
    its evaluations."""
    best_by, patience = config.checkpoint.best_by, config.train.patience
    if best_by == "none":
        if patience:
            raise ConfigError(f"{source}: train.patience={patience} counts evaluations without a better "
                              "checkpoint.best_by, which is none: name the metric to select by")
        return
    if best_by not in selectable_metrics(config):
        raise ConfigError(f"{source}: checkpoint.best_by={best_by!r} is not a metric this run's evaluation computes; "
                          f"it computes {', '.join(selectable_metrics(config))}")
    if not config.data.validation_split:
        raise ConfigError(f"{source}: checkpoint.best_by={best_by} selects on validation classes: give data.val_split "
                          "(dist-dml prep --val-fraction writes a split 'val') or data.val_share (a share of the "
                          "training classes held out at run time); selecting on the test split would "
                          "report a figure chosen by the test itself")


def inert_settings(config: RunConfig) -> list[str]:
    """Keys set away from their default in a section that is off, where they do nothing: one line each (printed by
    `dist-dml check` and at a training's start; a grid's axis may turn a section off on purpose, so not refused)."""
    notes = []
    for section, on, switch in (("memory", config.memory.enabled, "memory.size=0"),
                                ("class_sampling", config.class_sampling.enabled, "class_sampling.share=0"),
                                ("proxy", config.proxy.enabled, "proxy.kind=none")):
        if on:
            continue
        values, defaults = getattr(config, section), type(getattr(config, section))()
        changed = [f"{section}.{f.name}={getattr(values, f.name)}" for f in dataclasses.fields(values)
                   if getattr(values, f.name) != getattr(defaults, f.name)]
        if changed:
            notes.append(f"{', '.join(changed)} {'does' if len(changed) == 1 else 'do'} nothing: {switch} turns the "
                         f"{section.replace('_', ' ')} off")
    return notes


def _check_tables(config: RunConfig, split: dict | None, source: str) -> None:
    """Every table a run allocates per memory slot, per class or per image, against this machine's memory, as the
    manifest's counts are (data.manifest): the cross-batch memory (memory.size x (embedding_dim x its dtype's
    bytes + label, id and step)) and the beta tables (a float32 row with Adam's two moments, per class or per
    image of the training split, or loss.num_classes / num_images). Half the machine's memory at most, before
    any process starts (a table that does not fit would otherwise fail after every process has started)."""
    from dist_dml.data.manifest import TABLE_BYTES, memory_bytes
    from dist_dml.infra.dtypes import DTYPES

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
    from dist_dml.models.embedding import has_batch_norm

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
