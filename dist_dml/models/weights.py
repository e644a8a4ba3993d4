"""Where a backbone's weights come from, on a cluster whose compute nodes often have no internet.

`model.weights`: ``none`` (random init); ``torchvision`` (the model's default weights, cached under
``TORCH_HOME``); ``timm`` (the model's pretrained weights from the Hugging Face hub, cached under
``HF_HOME``); or a local file: a state dict of the backbone (``.pth``/``.pt``, read with
``weights_only=True``, or ``.safetensors``).

Every source ends as a local file, loaded by :func:`load_backbone_weights`: a key the backbone has and
the file lacks, or a tensor of another shape, is refused in one line; keys the file has and the backbone
does not (the classifier a feature extractor drops) are reported. A download happens once per node (the
node's first process fetches into the cache while the others wait for it), never on every rank at once;
offline with nothing cached is one line that names the weights, the URL, the cache path, and how to
pre-fetch them (``dist-dml fetch-weights CONFIG`` on a machine with internet, such as a login node) —
found by ``dist-dml check`` before torchrun starts any process.
"""
from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_dml.models.backbones import backbone_spec
from dist_dml.infra.errors import UserError, one_line
from dist_dml.infra.files import load_plain, regular_file_problem

PROBE_TIMEOUT_S = 5.0


class WeightsError(UserError):
    """Weights that cannot be had (offline and not cached) or do not fit the backbone."""

    on_every_rank = True


@dataclass(frozen=True)
class Download:
    """Pretrained weights that come over the network: what they are, from where, and where they are cached."""

    what: str  # e.g. "torchvision's ResNet50_Weights.IMAGENET1K_V2"
    url: str
    cache: Path  # where the file is (or will be) once fetched
    hf: tuple[str, str] | None = None  # (repo id, file name) for the Hugging Face hub

    def cached(self) -> Path | None:
        if self.hf is not None:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(*self.hf)
            return Path(found) if isinstance(found, str) else None
        return self.cache if self.cache.is_file() else None

    def fetch(self) -> Path:
        """Download into the cache (the library's own downloader: a temporary file, renamed when whole)."""
        if self.hf is not None:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(*self.hf))
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        prefix = re.search(r"-([a-f0-9]{6,})\.", self.cache.name)  # torchvision's files end in a hash prefix
        torch.hub.download_url_to_file(self.url, str(self.cache), hash_prefix=prefix.group(1) if prefix else None,
                                       progress=sys.stderr.isatty())
        return self.cache


def download_of(config) -> Download | None:
    """The download behind ``config`` (a ModelConfig): None for none or a local file."""
    source = config.weights_source
    spec = backbone_spec(config.backbone)
    if source == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(spec.name).DEFAULT
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        return Download(f"torchvision's {type(weights).__name__}.{weights.name} for {spec.name}", weights.url, cache)
    if source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name, allow_unregistered=True)
        cfg = cfg.to_dict() if cfg is not None else {}
        what = f"timm's pretrained weights of {spec.name}"
        if cfg.get("hf_hub_id"):
            repo, name = cfg["hf_hub_id"], cfg.get("hf_hub_filename") or "model.safetensors"
            from huggingface_hub import constants

            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
            return Download(what, f"{endpoint}/{repo}/resolve/main/{name}", cache, hf=(repo, name))
        if cfg.get("url"):
            cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
            return Download(what, cfg["url"], cache)
        raise WeightsError(f"model.weights=timm: timm has no pretrained weights for {spec.name} (give a local file, "
                           "or model.weights=none)")
    return None


def offline_reason(url: str) -> str | None:
    """Why ``url`` cannot be downloaded from here (an offline switch, or no answer within PROBE_TIMEOUT_S),
    or None if its server answers."""
    for key in ("DIST_DML_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(key, "").lower() in ("1", "true", "yes", "on"):
            return f"{key}={os.environ[key]}"
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered: a download can be tried
    except (urllib.error.URLError, OSError) as exc:
        return one_line(getattr(exc, "reason", exc), 200)


def prefetch_hint(download: Download, reason: str) -> str:
    return (f"{download.what} are not in the cache ({download.cache}) and cannot be downloaded from {download.url} "
            f"here ({reason}): run `dist-dml fetch-weights CONFIG` (the same config and overrides) on a machine with "
            "internet that shares this cache (TORCH_HOME / HF_HOME), e.g. a login node, or give model.weights=PATH "
            "of a local file")


def weights_problem(config) -> str | None:
    """Why a run with this ModelConfig could not have its weights (a missing file; offline with nothing
    cached), or None. For the launch scripts' check: probes the download's server at most once."""
    if config.weights_source == "file":
        return None if Path(config.weights).is_file() else f"model.weights={config.weights}: no such file"
    download = download_of(config)
    if download is None or download.cached() is not None:
        return None
    reason = offline_reason(download.url)
    return prefetch_hint(download, reason) if reason else None


def local_weights(config, ctx=None) -> Path | None:
    """The local file to load the backbone from, fetched into the cache first where it is a download: by
    each node's first process (ctx.local_rank 0) while the others wait, then every rank reads the cached
    file. Every rank raises the same WeightsError where a node could not fetch it. Call on every rank."""
    source = config.weights_source
    if source == "none":
        return None
    if source == "file":
        path = Path(config.weights)
        if not path.is_file():
            raise WeightsError(f"model.weights={config.weights}: no such file")
        return path
    download = download_of(config)
    problem = None
    if ctx is None or ctx.local_rank == 0:
        problem = _fetch_once(download)
    problems = [p for p in (ctx.all_gather_object(problem) if ctx is not None else [problem]) if p]
    if problems:
        raise WeightsError(problems[0])
    path = download.cached()
    if path is None:  # another node's cache, not shared with this rank's
        raise WeightsError(f"{download.what}: fetched by this node's first process but not found in {download.cache} "
                           "by this one (give every process of a node the same TORCH_HOME / HF_HOME)")
    return path


def _fetch_once(download: Download) -> str | None:
    """Fetch ``download`` into the cache unless it is there; why not, if it could not be."""
    if download.cached() is not None:
        return None
    reason = offline_reason(download.url)
    if reason:
        return prefetch_hint(download, reason)
    print(f"[weights] downloading {download.what} from {download.url} into {download.cache} (once per node; "
          "a few seconds to minutes by size)", flush=True)
    try:
        download.fetch()
    except Exception as exc:  # noqa: BLE001 -- urllib, the hub client and the file system all raise their own
        return prefetch_hint(download, one_line(exc, 200))
    return None


def fetch_weights(config) -> Path | None:
    """`dist-dml fetch-weights`: the weights of this ModelConfig in the local cache (downloaded if missing)."""
    if config.weights_source in ("none", "file"):
        return local_weights(config)
    download = download_of(config)
    problem = _fetch_once(download)
    if problem:
        raise WeightsError(problem)
    return download.cached()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (weights_only): a checkpoint's "state_dict",
    "model" or "module" entry if it has one, without DDP's "module." prefix."""
    path = Path(path)
    if path.suffix != ".safetensors":
        state = load_plain(path, "state dict", WeightsError, prefix="model.weights: ")
    else:
        problem = regular_file_problem(path)
        if problem:
            raise WeightsError(f"model.weights: {problem}")
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 -- a damaged or foreign file raises anything
            raise WeightsError(f"model.weights: {path} is not a readable state dict ({one_line(exc, 200)})") \
                from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model.weights: {path} holds no state dict of tensors")
    for name, tensor in state.items():  # a NaN in the weights is a run that stops at its first step, later
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"model.weights: {path}: tensor {name!r} holds {bad} NaN or infinite value"
                               f"{'s' if bad > 1 else ''} of {tensor.numel()}: refused")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_backbone_weights(backbone: nn.Module, path: Path, config) -> str:
    """Load ``path`` into ``backbone``; a line saying what was loaded and what was left out. A key the
    backbone has and the file lacks, or a tensor of another shape, is a WeightsError naming it."""
    state = read_state_dict(path)
    spec = backbone_spec(config.backbone)
    if spec.library == "timm":  # timm's own adaptation of its checkpoints (e.g. a ViT's position embedding)
        adapt = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
        if adapt is not None:
            state = adapt(state, backbone)
    mine = backbone.state_dict()
    # BatchNorm's step counter is missing from older checkpoints; torch fills it in (it drives no computation here).
    missing = [k for k in mine if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"model.weights: {path} lacks {len(missing)} of the {len(mine)} tensors of backbone "
                           f"{config.backbone} (first: {', '.join(missing[:3])}): not weights of this model")
    for key, tensor in mine.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"model.weights: {path}: {key} is {tuple(state[key].shape)} there but "
                               f"{tuple(tensor.shape)} in backbone {config.backbone} (another model, or another "
                               "input size)")
    unexpected = sorted(k for k in state if k not in mine)
    backbone.load_state_dict({k: state[k] for k in mine if k in state}, strict=False)
    left = f"; left out {len(unexpected)} it has that the backbone does not ({', '.join(unexpected[:4])}" \
           f"{', ...' if len(unexpected) > 4 else ''}: a classifier head is dropped)" if unexpected else ""
    return f"[weights] loaded {len(mine)} tensors of backbone {config.backbone} from {path}{left}"
