"""A real image set for the quality benchmark: the same character drawn by many type designers.

    python -m data_prep.glyphs --out data/glyphs [--cache ~/.cache/dist-dml/fonts] [--size 64]

Each class is one character (Latin letters with their accented forms, digits: 250-odd classes, many of them
look-alikes such as a, à, á, â, ã, ä, å, ā, ă, ą); each image is that character in one font file. The fonts
come from Debian's font packages (`apt-get download`, unpacked with `dpkg-deb -x` into the cache: no root,
nothing installed), at most two files per font family so that one design does not fill a class. A seeded third
of the classes is held out (`test/`), and the images are written as OUT/images/{train,test}/<class>/<font>.png,
then as class-grouped shards in OUT/shards (dist-dml prep folder; --val-fraction holds out a seeded share of the
training characters as the split `val`). Glyphs a font does not have (no cmap entry)
or draws empty are skipped. Needs a Debian-like machine with apt; the packages are named in PACKAGES.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

PACKAGES = (
    "fonts-urw-base35", "fonts-texgyre", "fonts-liberation2", "fonts-dejavu-extra", "fonts-freefont-ttf",
    "fonts-crosextra-carlito", "fonts-crosextra-caladea", "fonts-linuxlibertine", "fonts-ebgaramond",
    "fonts-cantarell", "fonts-comfortaa", "fonts-lato", "fonts-open-sans", "fonts-roboto-unhinted",
    "fonts-inconsolata", "fonts-sil-gentium", "fonts-sil-charis", "fonts-sil-andika", "fonts-lobster",
    "fonts-firacode", "fonts-hack", "fonts-jetbrains-mono", "fonts-yanone-kaffeesatz", "fonts-league-spartan",
    "fonts-quicksand", "fonts-oldstandard", "fonts-junicode", "fonts-cabin", "fonts-go", "fonts-mononoki",
    "fonts-paratype", "fonts-dancingscript", "fonts-stix", "fonts-cmu", "fonts-lmodern", "fonts-femkeklaver",
    "fonts-breip", "fonts-dustin", "fonts-f500", "fonts-humor-sans", "fonts-isabella", "fonts-tomsontalks",
    "fonts-beteckna", "fonts-inter", "fonts-croscore", "fonts-bebas-neue", "fonts-fantasque-sans",
    "fonts-averia-gwf", "fonts-averia-sans-gwf", "fonts-averia-serif-gwf", "fonts-prociono", "fonts-radisnoir",
    "fonts-rufscript", "fonts-sora",
)
# Digits, ASCII letters, the Latin-1 letters and Latin Extended-A: the accented forms are look-alike classes.
CHARACTERS = "".join(chr(c) for c in [*range(0x30, 0x3A), *range(0x41, 0x5B), *range(0x61, 0x7B),
                                      *range(0xC0, 0x100), *range(0x100, 0x180)]
                     if chr(c).isalnum() and c not in (0xD7, 0xF7))


def fetch_fonts(cache: Path, packages=PACKAGES, suffixes=(".ttf", ".otf"), who: str = "glyphs") -> list[Path]:
    """The font files (by ``suffixes``) of ``packages``, downloaded and unpacked into ``cache`` once (each package's
    .deb is kept; a package that cannot be fetched is reported and skipped); ``who`` prefixes what it says."""
    debs, unpacked = cache / "debs", cache / "files"
    debs.mkdir(parents=True, exist_ok=True)
    unpacked.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        print(f"[{who}] downloading {len(missing)} Debian font packages into {debs} (apt-get download; about "
              f"{len(missing) // 10 + 1} min)", flush=True)
    for package in missing:
        done = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"[{who}] warning: {package}: {done.stderr.strip().splitlines()[-1:] or 'not fetched'}; skipped",
                  file=sys.stderr, flush=True)
    wanted = {deb.name.split("_")[0]: deb for deb in sorted(debs.glob("*.deb")) if deb.name.split("_")[0] in packages}
    for name, deb in wanted.items():
        target = unpacked / name
        if not target.is_dir():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return sorted(p for name in wanted for p in (unpacked / name).rglob("*")
                  if p.suffix.lower() in suffixes and p.is_file())


def chosen_fonts(files: list[Path], per_family: int = 2) -> list[Path]:
    """At most ``per_family`` files of each font family (by the family name the font states), regular first."""
    from fontTools.ttLib import TTFont

    by_family: dict[str, list[Path]] = {}
    for path in files:
        try:
            with TTFont(path, lazy=True, fontNumber=0) as font:
                family = str(font["name"].getBestFamilyName() or path.stem).lower()
        except Exception:  # noqa: BLE001 -- a file fontTools cannot read is not a font we can draw with
            continue
        by_family.setdefault(family, []).append(path)
    regular_first = lambda p: (not any(w in p.stem.lower() for w in ("regular", "book", "roman")), p.name)  # noqa: E731
    return sorted(p for paths in by_family.values() for p in sorted(paths, key=regular_first)[:per_family])


def inked_glyph(face, char: str, size: int):
    """``char`` drawn black on white by ``face`` (a PIL font of 4 x size), cropped to its ink; None where the face
    draws it empty (a blank or missing glyph)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (8 * size, 8 * size), 255)
    ImageDraw.Draw(canvas).text((2 * size, 2 * size), char, font=face, fill=0)
    box = Image.eval(canvas, lambda v: 255 - v).getbbox()
    if box is None or box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return None
    return canvas.crop(box)


def render(font_path: Path, characters: str, size: int) -> dict[str, "Image.Image"]:  # noqa: F821
    """Each character the font has, black on white, its ink box scaled to fill 80 % of a size x size image."""
    from fontTools.ttLib import TTFont
    from PIL import Image, ImageFont

    with TTFont(font_path, lazy=True, fontNumber=0) as font:
        cmap = font.getBestCmap() or {}
    out = {}
    face = ImageFont.truetype(str(font_path), size=4 * size)
    for char in characters:
        if ord(char) not in cmap:
            continue
        glyph = inked_glyph(face, char, size)
        if glyph is None:
            continue  # drawn empty (a blank or missing glyph)
        scale = 0.8 * size / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                             Image.LANCZOS)
        image = Image.new("L", (size, size), 255)
        image.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
        out[char] = image.convert("RGB")
    return out


def build(out: Path, cache: Path, size: int = 64, held_out: float = 1 / 3, seed: int = 0,
          min_images: int = 8, val_fraction: float = 0.0) -> dict[str, int]:
    """The image folder and its shards (see the module's docstring); the counts written."""
    fonts = chosen_fonts(fetch_fonts(cache))
    print(f"[glyphs] drawing {len(CHARACTERS)} characters in {len(fonts)} font files at {size} px (about "
          f"{len(fonts) // 300 + 1} min)", flush=True)
    drawn: dict[str, dict[str, object]] = {}
    for i, path in enumerate(fonts, 1):
        for char, image in render(path, CHARACTERS, size).items():
            drawn.setdefault(char, {})[path.stem] = image
        if i % 25 == 0 or i == len(fonts):
            print(f"[glyphs] {i}/{len(fonts)} fonts drawn", flush=True)
    classes = sorted(c for c, images in drawn.items() if len(images) >= min_images)
    test = set(random.Random(seed).sample(classes, round(len(classes) * held_out)))
    images_dir = out / "images"
    for char in classes:
        split = "test" if char in test else "train"
        folder = images_dir / split / f"u{ord(char):04x}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in drawn[char].items():
            image.save(folder / f"{name}.png")
    counts = {"fonts": len(fonts), "classes": len(classes), "test_classes": len(test),
              "images": sum(len(drawn[c]) for c in classes)}
    print(f"[glyphs] {counts['images']} images of {counts['classes']} characters ({counts['test_classes']} held "
          f"out) in {images_dir}", flush=True)
    to_shards(images_dir, out / "shards", val_fraction)
    return counts


def to_shards(images_dir: Path, shards: Path, val_fraction: float) -> None:
    """``images_dir``/{train,test}/<class>/ as class-grouped shards in ``shards`` (dist-dml prep folder), a seeded
    ``val_fraction`` of the training classes as the split 'val'."""
    from data_prep.cli import main as prep

    if prep(["folder", "--src", str(images_dir), "--out", str(shards), "--max-per-record", "64",
             "--val-fraction", str(val_fraction), "--no-progress"]) != 0:
        raise SystemExit(2)


FONT_CACHE = Path.home() / ".cache" / "dist-dml" / "fonts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=FONT_CACHE)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="a seeded share of the training characters written as the split 'val' (validation)")
    args = parser.parse_args(argv)
    build(args.out, args.cache, args.size, seed=args.seed, val_fraction=args.val_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
