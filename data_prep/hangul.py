"""A real image set at catalogue scale: the 11,172 Hangul syllables, each a class, drawn by Korean type designs.

    python -m data_prep.hangul --out data/hangul [--cache ~/.cache/dist-dml/fonts] [--size 32] [--per-class 6]
                               [--val-fraction 0.1] [--classes N]

Each class is one precomposed syllable (U+AC00 to U+D7A3): classes that differ by one stroke of one jamo are
everywhere, as look-alike products are in a catalogue. The faces are the Korean fonts of Debian's packages
(fetched as data_prep.glyphs fetches its fonts: `apt-get download`, `dpkg-deb -x` into the cache, nothing
installed): every face (a file, or a face of a collection) that draws at least the 2,350 common syllables of
KS X 1001 with ink (some fonts map every syllable, to empty glyphs beyond those), at most
--per-family faces of one family (weights of one design are near-duplicates), and of the CJK collections only
their Korean faces. A class gets --per-class images (few images per product, as in SOP's ~5), each from a face
drawn for it by a seeded choice among the faces that have the syllable, with a seeded jitter (scale, offset, a
slight rotation); "all" draws it in every face. A seeded third of the classes is held out (`test`), a seeded
share of the training classes is the split `val` (--val-fraction); the images are written as
OUT/images/{train,test}/<class>/<face>.png and then as class-grouped shards in OUT/shards (dist-dml prep folder).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = (
    "fonts-nanum", "fonts-nanum-extra", "fonts-nanum-eco", "fonts-unfonts-core", "fonts-unfonts-extra",
    "fonts-baekmuk", "fonts-lexi-gulim", "fonts-lexi-saebom", "fonts-naver-d2coding", "fonts-woowa-bm",
    "fonts-alee", "fonts-noto-cjk", "fonts-noto-cjk-extra", "fonts-wqy-microhei",
)
FIRST, LAST = 0xAC00, 0xD7A3  # the precomposed syllables: 19 initials x 21 medials x 28 finals
SYLLABLES = "".join(chr(c) for c in range(FIRST, LAST + 1))
COVERAGE = 0.2  # a face must draw this share of the syllables (0.21: the 2,350 common ones of KS X 1001)


@dataclass(frozen=True)
class Face:
    """One face of a font file: the file, its index in a collection, its family and its own name."""

    path: Path
    index: int
    family: str
    name: str

    @property
    def key(self) -> str:
        """A plain name for the face's image files."""
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")


def inked(path: Path, index: int) -> list[int]:
    """The syllables face ``index`` of ``path`` draws with ink (mapped to a glyph with an outline: some fonts map every
    syllable, to empty glyphs beyond the 2,350 of KS X 1001)."""
    from fontTools.pens.boundsPen import BoundsPen
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True, fontNumber=index) as font:
        cmap, glyphs = font.getBestCmap() or {}, font.getGlyphSet()
        found = []
        for code in range(FIRST, LAST + 1):
            name = cmap.get(code)
            if name is None:
                continue
            pen = BoundsPen(glyphs)
            glyphs[name].draw(pen)
            if pen.bounds is not None:
                found.append(code)
    return found


def survey(files: list[Path], cache: Path) -> dict[Face, list[int]]:
    """Every Korean face of ``files`` with the syllables it draws (of a CJK collection, only its faces named Korean,
    KR); remembered in ``cache``/hangul-survey.json by file, size and face, as reading the outlines takes minutes."""
    import json
    import logging

    from fontTools.ttLib import TTCollection, TTFont

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # "extra bytes in post.stringData": harmless
    memo_path = cache / "hangul-survey.json"
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    found, started = {}, time.time()
    for n, path in enumerate(files, 1):
        try:
            count = len(TTCollection(path).fonts) if path.suffix.lower() == ".ttc" else 1
        except Exception:  # noqa: BLE001 -- a file fontTools cannot read is not a font we can draw with
            continue
        for index in range(count):
            key = f"{path}:{path.stat().st_size}:{index}"
            if key not in memo:
                try:
                    with TTFont(path, lazy=True, fontNumber=index) as font:
                        names = font["name"]
                        family = str(names.getBestFamilyName() or path.stem)
                        name = str(names.getBestFullName() or f"{family} {index}")
                    korean = count == 1 or " KR" in f" {family} {name}"
                    memo[key] = [family, name, inked(path, index) if korean else []]
                except Exception:  # noqa: BLE001
                    memo[key] = ["", "", []]
            family, name, codes = memo[key]
            if codes:
                found[Face(path, index, family, name)] = codes
        if n % 20 == 0 or n == len(files):
            print(f"[hangul] {n}/{len(files)} font files read for the syllables they draw "
                  f"({time.time() - started:.0f}s)", flush=True)
    memo_path.write_text(json.dumps(memo))
    return found


def faces_of(drawn: dict[Face, list[int]], per_family: int = 3, coverage: float = COVERAGE) -> list[Face]:
    """The faces of a survey that draw at least ``coverage`` of the syllables, at most ``per_family`` of each family
    (regular weights first); of two faces with one name, one."""
    by_family: dict[str, list[tuple[Face, bool]]] = {}
    for face, codes in drawn.items():
        if len(codes) < coverage * len(SYLLABLES):
            continue
        regular = any(w in face.name.lower() for w in ("regular", "medium", "book")) or face.name == face.family
        by_family.setdefault(face.family.lower(), []).append((face, regular))
    chosen = []
    for faces in by_family.values():
        faces.sort(key=lambda fr: (not fr[1], fr[0].name))
        chosen += [face for face, _ in faces[:per_family]]
    keys = {}
    for face in sorted(chosen, key=lambda f: f.name):
        keys.setdefault(face.key, face)
    return list(keys.values())


def draw(face: Face, char: str, size: int, rng: random.Random, font_cache: dict):
    """``char`` in ``face``, black on white in a size x size RGB image, its ink box scaled to a seeded 70-90 % of
    the image, shifted by up to size/16 and turned by up to 4 degrees; None where the face draws it empty."""
    from PIL import Image, ImageFont

    from data_prep.glyphs import inked_glyph

    font = font_cache.get(face)
    if font is None:
        font = font_cache[face] = ImageFont.truetype(str(face.path), size=4 * size, index=face.index)
    glyph = inked_glyph(font, char, size)
    if glyph is None:
        return None
    scale = rng.uniform(0.7, 0.9) * size / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    glyph = glyph.rotate(rng.uniform(-4, 4), resample=Image.BICUBIC, expand=True, fillcolor=255)
    shift = size // 16
    image = Image.new("L", (size, size), 255)
    image.paste(glyph, ((size - glyph.width) // 2 + rng.randint(-shift, shift),
                        (size - glyph.height) // 2 + rng.randint(-shift, shift)))
    return image.convert("RGB")


def coverage_table(faces: list[Face], drawn: dict[Face, list[int]]) -> dict[str, list[Face]]:
    """Each syllable -> the faces that draw it."""
    table: dict[str, list[Face]] = {char: [] for char in SYLLABLES}
    for face in faces:
        for code in drawn[face]:
            table[chr(code)].append(face)
    return table


def build(out: Path, faces: list[Face], drawn: dict[Face, list[int]], size: int = 32, per_class: int | None = 6,
          held_out: float = 1 / 3, seed: int = 0, val_fraction: float = 0.0, classes: int = 0,
          min_images: int = 2) -> dict[str, int]:
    """The image folder and its shards (the module's docstring) from ``faces`` (``drawn``: the syllables each draws);
    the counts written. ``per_class`` None: every face; ``classes`` > 0: the first that many syllables."""
    table = coverage_table(faces, drawn)
    chars = SYLLABLES[:classes] if classes else SYLLABLES
    total = sum(len(table[c]) if per_class is None else min(per_class, len(table[c])) for c in chars)
    print(f"[hangul] drawing {total:,} images of {len(chars):,} syllables in {len(faces)} faces at {size} px (about "
          f"{total / 2000 / 60 + 0.5:.0f} min)", flush=True)
    pool = [c for c in chars if len(table[c]) >= min_images]
    test = set(random.Random(seed).sample(pool, round(len(pool) * held_out)))
    images_dir, fonts, written, started = out / "images", {}, 0, time.time()
    for i, char in enumerate(pool, 1):
        rng = random.Random(f"{seed}-{ord(char)}")
        chosen = table[char] if per_class is None else rng.sample(table[char], min(per_class, len(table[char])))
        folder = images_dir / ("test" if char in test else "train") / f"u{ord(char):04x}"
        folder.mkdir(parents=True, exist_ok=True)
        for face in chosen:
            image = draw(face, char, size, rng, fonts)
            if image is not None:
                image.save(folder / f"{face.key}.png")
                written += 1
        if i % 1000 == 0 or i == len(pool):
            rate = written / max(time.time() - started, 1e-9)
            print(f"[hangul] {i:,}/{len(pool):,} syllables, {written:,} images ({rate:,.0f} images/s)", flush=True)
    counts = {"faces": len(faces), "classes": len(pool), "test_classes": len(test), "images": written}
    from data_prep.glyphs import to_shards

    to_shards(images_dir, out / "shards", val_fraction)
    return counts


def main(argv: list[str] | None = None) -> int:
    from data_prep.glyphs import FONT_CACHE, fetch_fonts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=FONT_CACHE)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per-class", default="6", help="images per syllable, each in a seeded face; all: every face")
    parser.add_argument("--per-family", type=int, default=3, help="faces of one family at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="a seeded share of the training syllables written as the split 'val' (validation)")
    parser.add_argument("--classes", type=int, default=0, help="only the first N syllables (0: all 11,172)")
    args = parser.parse_args(argv)
    per_class = None if args.per_class == "all" else int(args.per_class)
    if per_class is not None and per_class < 2:
        parser.error("--per-class must be >= 2 (a class needs a positive pair) or all")
    drawn = survey(fetch_fonts(args.cache, PACKAGES, (".ttf", ".otf", ".ttc"), "hangul"), args.cache)
    faces = faces_of(drawn, args.per_family)
    if len(faces) < 2:
        raise SystemExit(f"[hangul] {len(faces)} Korean faces found in {args.cache}: the font packages could not be "
                         "fetched (apt-get download needs Debian's package lists)")
    print(f"[hangul] {len(faces)} faces: " + ", ".join(f.name for f in faces), flush=True)
    counts = build(args.out, faces, drawn, args.size, per_class, seed=args.seed, val_fraction=args.val_fraction,
                   classes=args.classes)
    print(f"[hangul] {counts['images']:,} images of {counts['classes']:,} syllables ({counts['test_classes']:,} held "
          f"out) in {args.out / 'images'}, shards in {args.out / 'shards'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
