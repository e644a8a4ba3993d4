"""Procedural product images: a class is a product, its images are photos of it.

A product (from the class id alone) has a body shape, a palette, a pattern and a logo; each image
(from class id and image index) shows it at another pose, scale and place, under other light, on
another background, partly occluded. Identity survives the variation, so embeddings can learn it.
Everything is a function of (seed, class, index): re-running renders the same bytes.
"""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageEnhance

from data_prep.source import SourceImage

SHAPES = ("box", "bottle", "round", "tall", "diamond")
PATTERNS = ("plain", "stripes", "band", "dots", "split")


def _rng(*parts: int) -> random.Random:
    return random.Random(hash_parts(*parts))


def hash_parts(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def _product(class_id: int, seed: int, size: int) -> Image.Image:
    """The product itself on a transparent canvas: its look depends on the class alone."""
    rng = _rng(seed, class_id, 1)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    shape, pattern = rng.choice(SHAPES), rng.choice(PATTERNS)
    main, second, logo = _colour(rng), _colour(rng), _colour(rng)
    w, h = size * rng.uniform(0.45, 0.8), size * rng.uniform(0.45, 0.9)
    if shape == "tall":
        w *= 0.6
    x0, y0 = (size - w) / 2, (size - h) / 2
    box = [x0, y0, x0 + w, y0 + h]
    if shape == "round":
        draw.ellipse(box, fill=main)
    elif shape == "diamond":
        draw.polygon([(size / 2, y0), (x0 + w, size / 2), (size / 2, y0 + h), (x0, size / 2)], fill=main)
    elif shape == "bottle":
        draw.rounded_rectangle([x0, y0 + h * 0.3, x0 + w, y0 + h], radius=w * 0.2, fill=main)
        draw.rectangle([x0 + w * 0.35, y0, x0 + w * 0.65, y0 + h * 0.3], fill=second)
    else:
        draw.rounded_rectangle(box, radius=min(w, h) * 0.1, fill=main)
    mask = canvas.getchannel("A")
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    if pattern == "stripes":
        step = max(3, int(size * rng.uniform(0.06, 0.15)))
        for x in range(0, size, 2 * step):
            od.rectangle([x, 0, x + step - 1, size], fill=second)
    elif pattern == "band":
        yb = y0 + h * rng.uniform(0.3, 0.6)
        od.rectangle([0, yb, size, yb + h * 0.2], fill=second)
    elif pattern == "dots":
        step = max(4, int(size * 0.15))
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                od.ellipse([x - step / 4, y - step / 4, x + step / 4, y + step / 4], fill=second)
    elif pattern == "split":
        od.rectangle([0, 0, size / 2, size], fill=second)
    lx, ly = x0 + w * rng.uniform(0.25, 0.6), y0 + h * rng.uniform(0.25, 0.6)
    r = min(w, h) * rng.uniform(0.12, 0.22)
    (od.ellipse if rng.random() < 0.5 else od.rectangle)([lx - r, ly - r, lx + r, ly + r], fill=logo)
    canvas.paste(overlay, (0, 0), Image.composite(overlay.getchannel("A"), Image.new("L", (size, size), 0), mask))
    return canvas


def render(class_id: int, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """One photo of product ``class_id``."""
    rng = _rng(seed, class_id, index, 2)
    product = _product(class_id, seed, size)
    scale = rng.uniform(0.6, 1.0)
    side = max(8, int(size * scale))
    view = product.rotate(rng.uniform(-35, 35), resample=Image.BILINEAR).resize((side, side), Image.BILINEAR)
    background = Image.new("RGB", (size, size), _colour(rng))
    bd = ImageDraw.Draw(background)
    for _ in range(rng.randrange(4)):  # clutter
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(3, max(4, size // 4))
        bd.rectangle([x - r, y - r, x + r, y + r], fill=_colour(rng))
    background.paste(view, (rng.randrange(size - side + 1), rng.randrange(size - side + 1)), view)
    image = ImageEnhance.Brightness(background).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:  # occlusion
        d = ImageDraw.Draw(image)
        ow, oh = rng.randrange(size // 8, size // 3), rng.randrange(size // 8, size // 3)
        ox, oy = rng.randrange(size - ow), rng.randrange(size - oh)
        d.rectangle([ox, oy, ox + ow, oy + oh], fill=_colour(rng))
    return image


def render_jpeg(class_id: int, index: int, size: int = 64, seed: int = 0, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    render(class_id, index, size, seed).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_images(classes: int, per_class: str | int, test_classes: int, size: int = 64, seed: int = 0,
                     quality: int = 90):
    """SourceImages of ``classes`` training and ``test_classes`` held-out products.

    ``per_class``: a count ("4") or an inclusive range ("2:8", drawn per class from the seed).
    """
    low, high = _count_range(per_class)
    images = []
    for class_id in range(classes + test_classes):
        split = "train" if class_id < classes else "test"
        count = low if low == high else _rng(seed, class_id, 3).randint(low, high)
        for index in range(count):
            images.append(SourceImage(split, str(class_id), f"synthetic/{class_id}/{index}",
                                      (render_jpeg, class_id, index, size, seed, quality)))
    return images


def _count_range(per_class: str | int) -> tuple[int, int]:
    text = str(per_class)
    low, _, high = text.partition(":")
    low_i, high_i = int(low), int(high or low)
    if not 1 <= low_i <= high_i:
        raise ValueError(f"--per-class must be N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return low_i, high_i
