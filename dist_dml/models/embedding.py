"""Backbones with an embedding head: images (uint8 or normalised float) to L2-normalised embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from dist_dml.models.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_spec
from dist_dml.models.weights import load_backbone_weights

WEIGHTS = ("none", "torchvision", "timm")
HEAD_INITS = ("random", "pca")  # model.weights, besides the path of a local file


@dataclass(frozen=True)
class ModelConfig:
    """The embedding model: the backbone, its weights, the head's width and the normalisation of BatchNorm."""

    backbone: str = "resnet50"  # the feature extractor the head sits on
    embedding_dim: int = 128  # the embedding's width (the head's output, L2-normalised)
    # none (random init), torchvision (its default weights), timm (the model's pretrained weights), or a
    # local state dict of the backbone (.pth / .pt / .safetensors). Downloads are cached, once per node.
    weights: str = "none"
    pretrained: bool = False  # an alias of weights=torchvision (or timm for a timm: backbone)
    mean: tuple[float, ...] = ()  # input normalisation (0..1 scale); (): the backbone's pretrained config
    std: tuple[float, ...] = ()  # input standard deviations (0..1 scale); (): the backbone's pretrained config
    channels_last: bool = True  # on CUDA
    # BatchNorm across ranks: sync (statistics of the global batch), frozen (eval mode, running statistics never
    # change: what a fine-tune of pretrained weights wants, a P x K batch's few classes being no ImageNet), local
    # (per-rank statistics; rank 0's buffers broadcast before every evaluation and checkpoint), or auto: frozen
    # where model.weights are pretrained, sync from random weights
    norm: str = "auto"
    norm_affine: bool = True  # frozen: BatchNorm's scale and shift still train
    # The head's start: random, or pca (the backbone's features PCA-whitened on a sample of training images: centred,
    # projected on their principal directions, each scaled to unit variance)
    head_init: str = "random"
    head_init_images: int = 2048  # pca: training images embedded for it, over all ranks

    def validate(self) -> None:
        spec = backbone_spec(self.backbone)  # an unknown name raises here
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.head_init not in HEAD_INITS or self.head_init_images < 2:
            raise ValueError(f"model.head_init must be one of {list(HEAD_INITS)} and model.head_init_images >= 2, got "
                             f"{self.head_init!r} and {self.head_init_images}")
        if self.embedding_dim < 2:
            raise ValueError(f"model.embedding_dim must be >= 2, got {self.embedding_dim}")
        if len(self.mean) not in (0, 3) or len(self.std) not in (0, 3) or any(v <= 0 for v in self.std):
            raise ValueError(f"model.mean and model.std must be 3 values each (std > 0) or empty (the backbone's), got "
                             f"{list(self.mean)} and {list(self.std)}")
        source = self.weights_source
        if source in ("torchvision", "timm") and source != spec.library:
            raise ValueError(f"model.weights={self.weights}: backbone {self.backbone} has "
                             + (f"{spec.library} weights (model.weights={spec.library})" if spec.library else
                                "no pretrained weights (none, or a local file)"))

    @property
    def norm_mode(self) -> str:
        """model.norm with auto resolved: frozen for pretrained weights, sync from random weights."""
        if self.norm != "auto":
            return self.norm
        return "sync" if self.weights_source == "none" else "frozen"

    @property
    def weights_source(self) -> str:
        """none, torchvision, timm, or file (model.weights is a path); pretrained=true means the library's."""
        if self.weights in WEIGHTS:
            if self.weights == "none" and self.pretrained:
                library = backbone_spec(self.backbone).library
                if not library:
                    raise ValueError(f"model.backbone {self.backbone} has no pretrained weights")
                return library
            return self.weights
        return "file"

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) on a 0..1 scale: the config's, else the backbone's pretrained config."""
        spec = backbone_spec(self.backbone)
        return self.mean or spec.mean, self.std or spec.std


def has_batch_norm(config: ModelConfig) -> bool:
    """Whether the backbone has BatchNorm layers (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        backbone, _ = backbone_spec(config.backbone).build(None)
    return bool(_batch_norms(backbone))


NORMS = ("sync", "frozen", "local", "auto")
GatherWithGrad = Callable[[Tensor], Tensor]  # all ranks' tensors concatenated along dim 0, autograd-aware


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm computed in fp32 whatever the model's precision (DeepSpeed's bf16 casts parameters but
    may leave buffers fp32), whose training statistics are those of the global batch over all ranks
    when given ``gather`` (an autograd-aware all-gather; None: this rank's batch). Each rank's
    (count, mean, sum of squared deviations) per channel are gathered and merged (Chan et al.), so the
    forward, the backward and the running statistics equal those of one BatchNorm on the concatenated
    batch, on every rank alike; on the CPU too, where torch's SyncBatchNorm refuses to run.
    Evaluation uses the running statistics. The same parameters and buffers as BatchNorm1d/2d/3d:
    state dicts move freely between them."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, gather: GatherWithGrad | None):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.gather = gather
        # timm's BatchNormAct2d applies dropout and an activation after normalising: kept, in that order.
        self.drop, self.act = getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        if self.training or not self.track_running_stats:
            mean, var = self._batch_statistics(xf, shape)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return self.act(self.drop(y.to(x.dtype)))

    def _batch_statistics(self, xf: Tensor, shape: list[int]) -> tuple[Tensor, Tensor]:
        """(mean, biased variance) per channel over the global batch; updates the running statistics."""
        dims = [0] + list(range(2, xf.dim()))
        count = torch.tensor([float(xf.numel() // xf.shape[1])], device=xf.device)
        mean = xf.mean(dims)
        m2 = ((xf - mean.view(shape)) ** 2).sum(dims)
        parts = torch.cat([count, mean, m2]).unsqueeze(0)
        parts = self.gather(parts) if self.gather is not None else parts  # [ranks, 1 + 2C]
        counts, means, m2s = parts[:, :1], parts[:, 1:1 + self.num_features], parts[:, 1 + self.num_features:]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = global_m2.detach() / max(float(total) - 1.0, 1.0)
                self.running_mean.copy_(self.running_mean.float() * (1 - momentum) + momentum * global_mean.detach())
                self.running_var.copy_(self.running_var.float() * (1 - momentum) + momentum * unbiased)
        return global_mean, global_m2 / total


def _batch_norms(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def with_norm(model: nn.Module, config: "ModelConfig", gather: GatherWithGrad | None = None,
              device: torch.device | None = None) -> nn.Module:
    """``model`` with its BatchNorm layers as ``config.norm`` says, for training (``gather``: the
    autograd all-gather of the run's ranks; an identity in one process).

    sync: global-batch statistics: torch's SyncBatchNorm on CUDA, GlobalBatchNorm on ``gather``
    elsewhere. local: GlobalBatchNorm on this rank's batch (the trainer broadcasts rank 0's buffers).
    frozen: every BatchNorm stays in eval mode (see EmbeddingModel.train) and, without
    ``norm_affine``, its scale and shift are frozen too. Without ``gather`` (evaluation, export)
    nothing changes but frozen's flag.
    """
    norm = config.norm_mode
    if gather is not None:
        if norm == "sync" and device is not None and device.type == "cuda":
            from timm.layers import convert_sync_batchnorm  # torch's, and timm's BatchNormAct2d kept whole

            model = convert_sync_batchnorm(model)
        else:
            for name, bn in _batch_norms(model):
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, child, GlobalBatchNorm(bn, gather if norm == "sync" else None))
    if norm == "frozen":
        model.frozen_norm = True
        for _, bn in _batch_norms(model):
            for p in bn.parameters():
                p.requires_grad_(config.norm_affine)
        model.train(model.training)
    return model


class EmbeddingModel(nn.Module):
    """A backbone's features through a linear head to L2-normalised float32 embeddings.

    uint8 images (the data streams' output) are normalised here, on the model's device, with the
    backbone's mean and std (not part of the state dict: they come from the config), so an exported
    model takes images as they are.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, channels_last: bool = False,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.channels_last = channels_last
        self.frozen_norm = False  # with_norm(..., frozen): BatchNorm layers stay in eval mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)

    def train(self, mode: bool = True) -> "EmbeddingModel":
        super().train(mode)
        if self.frozen_norm:
            for _, bn in _batch_norms(self):
                bn.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """The backbone's features of images (uint8, normalised here, or already normalised float)."""
        if x.dtype == torch.uint8:
            x = (x.float() - self.mean.float()) / self.std.float()
        x = x.to(self.head.weight.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.head(self.features(x)).float(), dim=1)


def pca_head(total: Tensor, outer: Tensor, count: int, dim: int) -> tuple[Tensor, Tensor]:
    """(weight [dim, F], bias [dim]) of a head that PCA-whitens features (Jégou & Chum, ECCV 2012): centred, projected
    onto their ``dim`` principal directions, each scaled to unit variance (its eigenvalue plus 1e-6 of the largest,
    so a direction of no variance is not blown up). From the features' sum ``total`` [F], the sum of their outer
    products ``outer`` [F, F] and ``count``, in float64. Each direction's sign makes its largest component positive
    (as numpy's and torch's eigenvectors come with either). Where ``dim`` exceeds F the rows past F are zero."""
    total, outer = total.double(), outer.double()
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    order = torch.argsort(values, descending=True)[:dim]
    directions = vectors[:, order].T  # [min(dim, F), F]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(dim=1, keepdim=True)))
    scale = torch.rsqrt(values[order].clamp_min(0) + 1e-6 * values.max().clamp_min(1e-12))
    directions = directions * signs * scale[:, None]
    weight = torch.zeros(dim, total.shape[0], dtype=torch.float64)
    weight[:len(directions)] = directions
    return weight, -weight @ mean


def build_model(config: ModelConfig, device: torch.device | None = None, gather: GatherWithGrad | None = None,
                image_size: int | None = None, weights: str | None = None) -> EmbeddingModel:
    """The model of ``config`` for images of ``image_size`` (None: the backbone's own), its backbone loaded
    from the local file ``weights`` (dist_dml.models.weights: a download is fetched into the cache first; its
    report is ``model.weights_report``); with ``gather`` (training) its BatchNorm layers as ``config.norm``
    says (:func:`with_norm`). Evaluation and export build it without either and load a checkpoint."""
    config.validate()
    spec = backbone_spec(config.backbone)
    backbone, features = spec.build(image_size)
    report = None
    if weights is not None:
        report = load_backbone_weights(backbone, weights, config)
    channels_last = config.channels_last and device is not None and device.type == "cuda"
    mean, std = config.normalisation()
    model = EmbeddingModel(backbone, features, config.embedding_dim, channels_last, mean, std)
    model.weights_report = report
    model.backbone_spec = spec  # its layers, for layer-wise learning-rate decay (models.backbones.layer_ids)
    model = with_norm(model, config, gather, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class TrainModule(nn.Module):
    """What DeepSpeed wraps: the embedding model and the loss (whose beta parameters train too)."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
