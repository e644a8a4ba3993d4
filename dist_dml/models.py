"""Backbones with an embedding head: images (uint8 or normalised float) to L2-normalised embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from dist_dml.data import normalize_batch


@dataclass(frozen=True)
class ModelConfig:
    """The `model` section of a run's config."""

    backbone: str = "resnet50"  # a key of BACKBONES
    embedding_dim: int = 128
    pretrained: bool = False  # torchvision's ImageNet weights (downloaded on first use)
    channels_last: bool = True  # on CUDA

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone: unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        if self.embedding_dim < 2:
            raise ValueError(f"model.embedding_dim must be >= 2, got {self.embedding_dim}")


def _resnet(name: str) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(pretrained: bool):
        import torchvision

        net = getattr(torchvision.models, name)(weights="DEFAULT" if pretrained else None)
        features = net.fc.in_features
        net.fc = nn.Identity()
        return net, features

    return build


def _vit(name: str) -> Callable[[bool], tuple[nn.Module, int]]:
    def build(pretrained: bool):
        import torchvision

        net = getattr(torchvision.models, name)(weights="DEFAULT" if pretrained else None)
        features = net.heads.head.in_features
        net.heads = nn.Identity()
        return net, features

    return build


def _tiny_cnn(pretrained: bool) -> tuple[nn.Module, int]:
    """A small CNN for CPU demos and tests (no pretrained weights)."""
    if pretrained:
        raise ValueError("model.backbone tiny_cnn has no pretrained weights")

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    net = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), *block(128, 128),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 128


BACKBONES: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "vit_b_16": _vit("vit_b_16"),
    "tiny_cnn": _tiny_cnn,
}


class EmbeddingModel(nn.Module):
    """A backbone's features through a linear head to L2-normalised float32 embeddings.

    uint8 images (the data streams' output) are normalised here, on the model's device.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = normalize_batch(x)
        x = x.to(self.head.weight.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.normalize(self.head(self.backbone(x)).float(), dim=1)


def build_model(config: ModelConfig, device: torch.device | None = None) -> EmbeddingModel:
    config.validate()
    backbone, features = BACKBONES[config.backbone](config.pretrained)
    channels_last = config.channels_last and device is not None and device.type == "cuda"
    model = EmbeddingModel(backbone, features, config.embedding_dim, channels_last)
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
