"""The backbone registry: torchvision names, timm:<name> for any model of timm, and tiny_cnn. An entry says how to
build a backbone (random init) as a feature extractor and what its pretrained config says about its input; the
model (dist_dml.models.embedding) and its weights (dist_dml.models.weights) both read it, and it imports neither."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build a backbone (random init) as a feature extractor, and what its
    pretrained config says about its input."""

    name: str  # the library's name
    library: str  # torchvision, timm, or "" (no pretrained weights)
    build: Callable[[int | None], tuple[nn.Module, int]]  # image size (None: its own) -> (module, feature width)
    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875  # evaluation: resize the shorter side to input_size / crop_pct, then crop
    # How its parameters group into layers from the input on (timm's group_matcher format: {group: regex or
    # [(regex, (order,))]}); None: the model's own (timm's models have one), or one layer per top-level module.
    layers: dict | None = None


RESNET_LAYERS = {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)\.(\d+)"}
VIT_LAYERS = {"stem": r"^conv_proj|^class_token|^encoder\.pos_embedding",
              "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)", None), (r"^encoder\.ln", (99999,))]}


def layer_ids(spec: Backbone, backbone: nn.Module) -> dict[str, int]:
    """{parameter name: its layer, 0 at the input}, for layer-wise learning-rate decay: grouped by the entry's
    matcher, the timm model's own (``group_matcher``), or one layer per top-level module (timm's group_parameters
    numbers the groups in depth order)."""
    from timm.models import group_parameters

    matcher = spec.layers or (backbone.group_matcher(coarse=False) if hasattr(backbone, "group_matcher") else None)
    if matcher is None:
        order = {name: i for i, (name, _) in enumerate(backbone.named_children())}
        found = {name: order[name.split(".")[0]] for name, _ in backbone.named_parameters()}
    else:
        groups = group_parameters(backbone, matcher, reverse=False)
        found = {name: layer for layer, names in groups.items() for name in names}
    dense = {layer: i for i, layer in enumerate(sorted(set(found.values())))}  # 0, 1, ... without gaps
    return {name: dense[layer] for name, layer in found.items()}


def _torchvision(name: str, head: str, layers: dict | None = None) -> Backbone:
    def build(image_size: int | None):
        import torchvision

        net = getattr(torchvision.models, name)(weights=None, **({"image_size": image_size} if
                                                               image_size and name.startswith("vit") else {}))
        *path, last = head.split(".")
        owner = net.get_submodule(".".join(path)) if path else net
        features = getattr(owner, last).in_features
        setattr(owner, last, nn.Identity())
        return net, features

    return Backbone(name, "torchvision", build, layers=layers)


def _tiny_cnn(image_size: int | None) -> tuple[nn.Module, int]:
    """A small CNN for CPU demos and tests (no pretrained weights)."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    net = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), *block(128, 128),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 128


BACKBONES: dict[str, Backbone] = {
    "resnet18": _torchvision("resnet18", "fc", RESNET_LAYERS),
    "resnet50": _torchvision("resnet50", "fc", RESNET_LAYERS),
    "vit_b_16": _torchvision("vit_b_16", "heads.head", VIT_LAYERS),
    "tiny_cnn": Backbone("tiny_cnn", "", _tiny_cnn),
}
TIMM = "timm:"


def backbone_spec(name: str) -> Backbone:
    """The registry entry of ``name``: a key of BACKBONES, or timm:<name> for any model timm knows (its input
    size, mean, std and crop from its pretrained config)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if not name.startswith(TIMM):
        raise ValueError(f"model.backbone: unknown backbone {name!r}; known: {sorted(BACKBONES)} or timm:<name>")
    return _timm_spec(name[len(TIMM):])


@functools.lru_cache(maxsize=None)
def _timm_spec(name: str) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"model.backbone: timm has no model {name!r} (timm.list_models() lists them)")
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    cfg = cfg.to_dict() if cfg is not None else {}

    def build(image_size: int | None):
        kwargs = {"num_classes": 0}
        try:  # a ViT's position embedding is sized for its input; a CNN takes any size and no such argument
            net = timm.create_model(name, pretrained=False, **kwargs, **({"img_size": image_size} if image_size else {}))
        except TypeError:
            net = timm.create_model(name, pretrained=False, **kwargs)
        return net, net.num_features

    size = cfg.get("input_size") or (3, 224, 224)
    return Backbone(name, "timm", build, input_size=int(size[-1]), mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
                    std=tuple(cfg.get("std") or IMAGENET_STD), crop_pct=float(cfg.get("crop_pct") or 0.875))
