"""The config reference (docs/config.md), generated from the config's dataclasses: every section's docstring, and
every key's type, default and comment, read from the source (the comment on a field's line, and any comment lines
directly above it), with the values a registry key takes (the backbones, samplers, losses). The dataclasses and
the registries are the one source; `dist-dml config --reference` writes the page, and refuses a section without a
docstring of its own; a test fails where the committed page differs or a key has no comment."""
from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing

HEADER = """# Configuration reference

Generated from the code by `dist-dml config --reference --out docs/config.md`: do not edit by hand
(`tests/test_docs.py` fails when this page differs from what the code generates, or when a key has no
comment). A run's config is a YAML file of these sections (see `configs/`); any key can also be set on
the command line as `section.key=value`, after the config file. An unknown key, a wrong type or a value
out of range stops the run before any process starts, naming the key.
"""


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment lines directly above a field and the comment on its own line, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip() if ":" in stripped else ""
        if name not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        above, at = [], number - 1
        while at >= 1 and lines[at - 1].strip().startswith("#"):
            above.insert(0, comments.get(at, ""))
            at -= 1
        own = comments.get(number, "") if "#" in line else ""
        found[name] = " ".join(part for part in (*above, own) if part)
    return found


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        return f"list of {type_name(args[0])}"
    if args and type(None) in args:
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def default_text(f: dataclasses.Field) -> str:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(value, tuple):
        value = list(value)
    if value == "":
        return '`""`'
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def registry_values() -> dict[str, str]:
    """{section.key: the values it takes}, for the keys that name an entry of a registry."""
    from dist_dml.method.losses import LOSSES
    from dist_dml.method.sampling import SAMPLERS
    from dist_dml.models.backbones import BACKBONES, TIMM

    shown = lambda names: ", ".join(f"`{n}`" for n in names)  # noqa: E731
    return {"model.backbone": f"{shown(BACKBONES)}, or `{TIMM}NAME` for any model of timm",
            "sampler.kind": shown(SAMPLERS), "loss.kind": shown(LOSSES)}


def section_doc(name: str, cls: type) -> str:
    """The section's own docstring; a ValueError where it has none (a dataclass without one gets its signature
    as its __doc__, which the reference would print as if it described the section)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if not doc or doc.startswith(f"{cls.__name__}("):
        raise ValueError(f"the {name} section ({cls.__module__}.{cls.__name__}) has no docstring: give it one "
                         "that says what the section is for")
    return doc


def sections() -> list[tuple[str, type]]:
    from dist_dml.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(RunConfig)]


def missing_comments() -> list[str]:
    """section.key of every field without a comment."""
    missing = []
    for name, cls in sections():
        comments = field_comments(cls)
        missing += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if not comments.get(f.name)]
    return missing


def reference() -> str:
    """docs/config.md."""
    out = [HEADER]
    out.append("Sections: " + ", ".join(f"[`{name}`](#{name})" for name, _ in sections()) + ".\n")
    values = registry_values()
    for name, cls in sections():
        out.append(f"## {name}\n")
        out.append(section_doc(name, cls) + "\n")
        out.append("| key | type | default | what it does |")
        out.append("| --- | --- | --- | --- |")
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        for f in dataclasses.fields(cls):
            text = comments.get(f.name, "")
            if f"{name}.{f.name}" in values:
                text += f". Values: {values[f'{name}.{f.name}']}"
            text = text.replace("|", "\\|")
            out.append(f"| `{name}.{f.name}` | {type_name(hints[f.name])} | {default_text(f)} | {text} |")
        out.append("")
    return "\n".join(out)
