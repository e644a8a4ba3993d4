"""Decoding and augmentation: an image's bytes to its uint8 crop, written into its slot of a batch."""
from __future__ import annotations

import io
import math
import random
import re
import warnings

import torch
from torch.utils.data import get_worker_info

from dist_dml.data.config import DataConfig

# --- decoding and augmentation ------------------------------------------------------------------
#
# Per image, on uint8, written straight into its slot of the batch: the random resized crop takes
# its box from the decoded image as a view, then one antialiased bilinear resize to the output size
# runs on channels-last uint8 (torch's vectorised path; decode_image already returns that layout),
# mirrored with probability 1/2. The batch itself is channels-last and, inside a DataLoader worker,
# in shared memory, so it reaches the main process without another copy. Normalisation runs once
# per batch where the model runs (the embedding model, with its backbone's mean and std).

class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than data.max_image_megapixels (a decompression bomb)."""


def import_decoders() -> None:
    """Import what decoding uses (torchvision's decoder, PIL, imagesize: seconds of imports) in this process, before
    a DataLoader forks its workers from it: each worker then starts with them imported, instead of importing
    them at its first image (every worker of every loader, the training's and each evaluation's)."""
    import imagesize  # noqa: F401
    from PIL import Image  # noqa: F401
    from torchvision.io import decode_image  # noqa: F401
    from torchvision.transforms.v2.functional import to_dtype  # noqa: F401


def pixel_limit(cfg: DataConfig) -> int:
    return int(cfg.max_image_megapixels * 1e6)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image's header alone: imagesize for the formats the reader decodes (a
    few times cheaper than PIL's header parse), PIL for the rest."""
    import imagesize

    try:
        width, height = imagesize.get(io.BytesIO(data))
    except Exception:  # noqa: BLE001 -- a malformed header: PIL decides below
        width = height = -1
    if width >= 0 and height >= 0:
        return width, height
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as exc:  # above PIL's own limit (twice MAX_IMAGE_PIXELS)
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return (int(pixels.group(1)) if pixels else 1 << 62), 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ValueError("not a readable image (JPEG, PNG, WebP or GIF)") from None


def check_size(data: bytes, max_pixels: int) -> None:
    """Refuse, from the header alone, an image of more than ``max_pixels`` pixels: a PNG of a few hundred
    KB can declare 20000 x 20000 pixels, which would decode to 1.2 GB."""
    width, height = image_size(data)
    if width * height > max_pixels:
        shown = f"{width}x{height} pixels" if height > 1 else f"{width} pixels"
        raise ImageTooLarge(f"{shown}, more than the {max_pixels / 1e6:g} megapixels an image may have "
                            "(data.max_image_megapixels)")


def decode(data: bytes, max_pixels: int | None = None) -> torch.Tensor:
    """RGB uint8 (3, H, W) (a channels-last view of the decoder's HWC buffer). Greyscale, palette, CMYK and
    alpha images are converted to RGB, 16-bit ones scaled to 8 bits. With ``max_pixels``, an image whose
    header declares more is refused (ImageTooLarge) before it is decoded."""
    from torchvision.io import ImageReadMode, decode_image

    if max_pixels is not None:
        check_size(data, max_pixels)
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # a 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    return image


def crop_box(height: int, width: int, rng: random.Random, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, h, w), drawn from ``rng``: an area share in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, 10 tries, then the central crop with the
    ratio clamped."""
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target, aspect = area * rng.uniform(*scale), math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_into(region: torch.Tensor, out: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (3, h, w) ``region`` into ``out`` (3, H, W), mirrored if
    ``flip``. Mirroring the (smaller) source is bit-identical to mirroring the result; the resize
    writes into ``out`` directly (the .out form of the operator F.interpolate calls)."""
    x = (region.flip(-1) if flip else region).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if x.shape[-2:] == out.shape[-2:]:
        return out.copy_(x[0])
    torch.ops.aten._upsample_bilinear2d_aa.out(x, list(out.shape[-2:]), False, None, None, out=out.unsqueeze(0))
    return out


def new_batch(n: int, size: int) -> torch.Tensor:
    """Empty uint8 (n, 3, size, size), channels-last in memory; in shared memory inside a DataLoader
    worker, so handing it to the main process costs no copy."""
    out = torch.empty((n, size, size, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    return out.permute(0, 3, 1, 2)


def train_image(data: bytes, cfg: DataConfig, rng: random.Random, out: torch.Tensor | None = None) -> torch.Tensor:
    """Training augmentation: random resized crop (area share min_scale..1, aspect 3/4..4/3) to
    image_size, horizontal flip with probability 1/2 where ``cfg.flip``; all draws from ``rng``."""
    out = new_batch(1, cfg.image_size)[0] if out is None else out
    image = decode(data, pixel_limit(cfg))
    top, left, h, w = crop_box(image.shape[1], image.shape[2], rng, (cfg.min_scale, 1.0))
    flip = rng.random() < 0.5 and cfg.flip  # drawn either way: the crops stay the same with or without flips
    return resize_into(image[:, top:top + h, left:left + w], out, flip=flip)


def eval_image(data: bytes, cfg: DataConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluation: the shorter side resized to ``resize``, then the central image_size square
    (torchvision's Resize(resize) + CenterCrop(image_size))."""
    return eval_transform(decode(data, pixel_limit(cfg)), cfg, out)


def eval_transform(image: torch.Tensor, cfg: DataConfig, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`eval_image` of an image already decoded: uint8 (3, H, W)."""
    out = new_batch(1, cfg.image_size)[0] if out is None else out
    _, height, width = image.shape
    short, long = min(height, width), max(height, width)
    scaled = int(cfg.resize * long / short)
    size = (cfg.resize, scaled) if height <= width else (scaled, cfg.resize)
    if size != (height, width):
        image = resize_into(image, torch.empty((*size, 3), dtype=torch.uint8).permute(2, 0, 1))
    top, left = int(round((size[0] - cfg.image_size) / 2)), int(round((size[1] - cfg.image_size) / 2))
    return resize_into(image[:, top:top + cfg.image_size, left:left + cfg.image_size], out)


def normalize_batch(images: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """uint8 (B, 3, H, W) to float32 normalised with ``mean`` and ``std`` (0..1 scale; ImageNet's by default),
    as the embedding model does it for its backbone (dist_dml.models.embedding.EmbeddingModel)."""
    shift = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    scale = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return images.float().sub_(shift).div_(scale)
