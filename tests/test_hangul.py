"""data_prep/hangul.py without a download: font files made here (fontTools' FontBuilder) that draw a few syllables
with ink, map others to empty glyphs, or are collections with non-Korean faces; the survey, the choice of faces, and
a small set built from them (classes, splits, images per class, seeded)."""
import json
from pathlib import Path

import pytest

from data_prep import hangul

SOME = [hangul.FIRST + i for i in range(12)]  # the first 12 syllables


def make_font(path: Path, family: str, style: str, inked: list[int], empty: list[int] = ()) -> Path:
    """A TrueType font whose ``inked`` syllables are boxes (a different box per syllable and per font) and whose
    ``empty`` syllables map to glyphs without an outline."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef"] + [f"uni{c:04X}" for c in [*inked, *empty]]
    glyphs = {".notdef": TTGlyphPen(None).glyph()}
    for i, code in enumerate(inked):
        pen = TTGlyphPen(None)
        w = 200 + 40 * (i % 7) + 13 * len(family)
        pen.moveTo((100, 100)), pen.lineTo((100, 100 + w)), pen.lineTo((100 + w, 100 + w)), pen.lineTo((100 + w, 100))
        pen.closePath()
        pen.moveTo((300, 300)), pen.lineTo((300, 350 + 30 * (i % 5))), pen.lineTo((350, 350)), pen.lineTo((350, 300))
        pen.closePath()
        glyphs[f"uni{code:04X}"] = pen.glyph()
    for code in empty:
        glyphs[f"uni{code:04X}"] = TTGlyphPen(None).glyph()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({code: f"uni{code:04X}" for code in [*inked, *empty]})
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({name: (1000, 0) for name in names})
    builder.setupHorizontalHeader(ascent=900, descent=-100)
    builder.setupNameTable({"familyName": family, "styleName": style, "fullName": f"{family} {style}".strip()})
    builder.setupOS2(sTypoAscender=900, usWinAscent=900, usWinDescent=100)
    builder.setupPost()
    builder.save(str(path))
    return path


@pytest.fixture
def fonts(tmp_path, monkeypatch):
    """Three designs of the 12 syllables (one with two weights), one that maps them all but draws only 3 (the
    rest empty glyphs), in a world of 12 syllables (the coverage rule then asks for 3 of them)."""
    monkeypatch.setattr(hangul, "SYLLABLES", "".join(chr(c) for c in SOME))
    monkeypatch.setattr(hangul, "LAST", SOME[-1])
    folder = tmp_path / "fonts"
    folder.mkdir()
    return [make_font(folder / "a.ttf", "Alpha", "Regular", SOME),
            make_font(folder / "a-bold.ttf", "Alpha", "Bold", SOME),
            make_font(folder / "b.ttf", "Beta", "Regular", SOME),
            make_font(folder / "c.ttf", "Gamma", "Regular", SOME[:10]),
            make_font(folder / "sparse.ttf", "Sparse", "Regular", SOME[:2], empty=SOME[2:])]


def test_the_survey_counts_syllables_drawn_with_ink_and_is_remembered(fonts, tmp_path):
    drawn = hangul.survey(fonts, tmp_path)
    by_name = {face.name: codes for face, codes in drawn.items()}
    assert by_name["Alpha"] == SOME and by_name["Gamma"] == SOME[:10]
    assert by_name["Sparse"] == SOME[:2]  # mapped 12, drawn 2
    memo = json.loads((tmp_path / "hangul-survey.json").read_text())
    assert len(memo) == 5
    # Read again from the memo (the fonts' outlines are not read twice): the same survey.
    assert hangul.survey(fonts, tmp_path) == drawn


def test_faces_need_the_coverage_and_a_family_gives_at_most_per_family(fonts, tmp_path):
    drawn = hangul.survey(fonts, tmp_path)
    names = [f.name for f in hangul.faces_of(drawn, per_family=1, coverage=0.25)]
    assert names == ["Alpha", "Beta", "Gamma"]  # Sparse draws 2 of 12; Alpha's Bold second
    assert len(hangul.faces_of(drawn, per_family=2, coverage=0.25)) == 4


def test_a_small_set_has_its_classes_splits_and_images_per_class(fonts, tmp_path):
    drawn = hangul.survey(fonts, tmp_path)
    faces = hangul.faces_of(drawn, per_family=2, coverage=0.25)
    out = tmp_path / "set"
    counts = hangul.build(out, faces, drawn, size=32, per_class=3, val_fraction=0.25)
    # 12 classes, a third held out; the 2 syllables Gamma lacks still have 3 faces each
    assert counts == {"faces": 4, "classes": 12, "test_classes": 4, "images": 36}
    per_class = {folder.name: sorted(p.name for p in folder.iterdir())
                 for split in ("train", "test") for folder in (out / "images" / split).iterdir()}
    assert len(per_class) == 12 and all(len(files) == 3 for files in per_class.values())
    assert not any("gamma" in name for c in SOME[10:] for name in per_class[f"u{c:04x}"])
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert {name: split["classes"] for name, split in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 4}
    # Seeded: built again, the same faces for every class and the same pixels.
    again = tmp_path / "again"
    hangul.build(again, faces, drawn, size=32, per_class=3, val_fraction=0.25)
    for split in ("train", "test"):
        for folder in (out / "images" / split).iterdir():
            for path in folder.iterdir():
                assert path.read_bytes() == (again / "images" / split / folder.name / path.name).read_bytes()
