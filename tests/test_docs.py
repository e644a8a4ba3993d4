"""The guide cannot go stale silently: the config reference (docs/config.md) is what the code generates and every key
has a comment; every command written in the code blocks of README.md and docs/ parses (its subcommand and flags),
names config files that exist and overrides that are valid keys of that config; every relative link resolves."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from dist_dml.cli import build_parser
from dist_dml.config import ConfigError, load_config
from dist_dml.config.reference import field_comments, missing_comments, reference, section_doc, sections

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_config_reference_is_what_the_code_generates():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference(), ("docs/config.md is stale: run `./dml run config --reference --out "
                                      "docs/config.md` and commit it")


def test_every_config_key_has_a_comment():
    assert missing_comments() == [], "give each of these keys a comment on its line (or the lines above it)"


def test_every_section_says_what_it_is_for_and_registry_keys_list_their_values():
    """The reference prints each section's own docstring (a dataclass without one has its signature as __doc__,
    which the generator refuses), and the values of the keys that name a registry entry."""
    from dist_dml.method.losses import LOSSES
    from dist_dml.method.sampling import SAMPLERS
    from dist_dml.models.backbones import BACKBONES

    for name, cls in sections():
        assert not section_doc(name, cls).startswith(cls.__name__)

    @dataclasses.dataclass
    class Undocumented:
        key: int = 1  # a key

    with pytest.raises(ValueError, match="the extra section .* has no docstring"):
        section_doc("extra", Undocumented)
    page = reference()
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    assert all(f"`{name}`" in rows["model.backbone"] for name in BACKBONES) and "`timm:NAME`" in rows["model.backbone"]
    assert all(f"`{name}`" in rows["sampler.kind"] for name in SAMPLERS)
    assert all(f"`{name}`" in rows["loss.kind"] for name in LOSSES)


def test_a_key_without_a_comment_is_found():
    @dataclasses.dataclass
    class Section:
        """A section."""

        # the first key's meaning,
        first: int = 1  # and more of it
        second: str = "x"
        third: bool = False  # a flag

    assert field_comments(Section) == {"first": "the first key's meaning, and more of it", "second": "",
                                       "third": "a flag"}


# --- commands written in the guide ------------------------------------------------------------

def code_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of every line in the page's fenced code blocks, continuation lines joined."""
    found, inside, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found.append((start, pending + line))
        pending = ""
    return found


def dist_dml_argv(words: list[str]) -> list[str] | None:
    """The dist-dml arguments of a command line (./dml, dist-dml, launch/ scripts, sbatch), None for another."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words:
        return None
    head, rest = Path(words[0]).name, words[1:]
    if head == "dml":
        verb, rest = (rest[0], rest[1:]) if rest else ("help", [])
        if verb == "demo":
            return ["demo", *rest]
        if verb == "run":
            return rest
        if verb == "launch":
            script, rest = rest[0], rest[1:]
            assert script in ("torchrun", "multinode", "slurm"), f"./dml launch {script}: no such script"
            if script == "slurm":  # sbatch's options first (./dml puts them before the script)
                while rest and rest[0] not in ("train", "eval", "embed", "grid", "check"):
                    rest = rest[1:]
            return rest[1:] if script == "torchrun" else rest
        if verb == "bench":
            name = rest[0] if rest else "core"
            assert (ROOT / "benchmarks" / f"bench_{name}.py").is_file(), f"./dml bench {name}: no such benchmark"
            return []
        assert verb in ("test", "setup"), f"./dml {verb}: not a verb of ./dml"
        return []
    if head == "dist-dml":
        return rest
    if head == "torchrun.sh":
        return rest[1:]
    if head in ("multinode_local.sh", "slurm.sbatch"):
        return rest
    if head == "sbatch":
        scripts = [i for i, w in enumerate(rest) if w.endswith(".sbatch")]
        return rest[scripts[0] + 1:] if scripts else None
    if head == "bash" and rest and rest[0].startswith("launch/"):
        return dist_dml_argv(rest)
    return None


PLACEHOLDER = re.compile(r"^(\.\.\.|.*[<>].*|[A-Z][A-Z_]*|\$.*|.*\.\.\..*)$")


def check_command(words: list[str]) -> str | None:
    """Why a documented command would not run as written (None: it would, as far as parsing tells)."""
    try:
        argv = dist_dml_argv(words)
    except AssertionError as exc:
        return str(exc)
    if not argv:
        return None
    argv = [w for w in argv if not PLACEHOLDER.match(w)]
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        return f"dist-dml {' '.join(argv)}: does not parse"
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        return f"dist-dml {' '.join(argv)}: unknown arguments {bad}"
    overrides = [*getattr(args, "overrides", []), *extra]
    config = getattr(args, "config", None)
    if config and config.endswith((".yaml", ".yml")):
        if not (ROOT / config).is_file():
            return f"{config}: no such config file"
    else:
        config = None  # eval/embed take a checkpoint: the overrides apply to its config
    overrides = [o for o in overrides if "=" in o and not PLACEHOLDER.match(o.split("=", 1)[1])]
    try:
        load_config(ROOT / config if config else None, overrides, check_data=False)
    except ConfigError as exc:
        return f"{' '.join(words)}: {exc}"
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for number, line in code_lines(page):
            for part in re.split(r"&&|;|\|\|", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if words and dist_dml_argv_safe(words) is not None:
                    found.append((f"{page.relative_to(ROOT)}:{number}", words))
    return found


def dist_dml_argv_safe(words: list[str]) -> list[str] | None:
    try:
        return dist_dml_argv(words)
    except (AssertionError, IndexError):
        return []


def test_every_documented_command_parses_with_existing_configs_and_valid_keys():
    commands = documented_commands()
    assert len(commands) > 20  # the guide's commands were found
    problems = [f"{where}: {why}" for where, words in commands if (why := check_command(words))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line, why", [
    ("./dml run train configs/cpu_synthetic.yaml train.stepz=3", "unknown key train.stepz"),
    ("./dml run train configs/nowhere.yaml", "configs/nowhere.yaml: no such config file"),
    ("./dml run index runs/demo/embeddings --out x --flavour flat", "unknown arguments"),
    ("./dml launch torchrun 2 train configs/cpu_synthetic.yaml class_sampling.share=2", "class_sampling.share must"),
    ("./dml bench nothing", "no such benchmark"),
])
def test_a_broken_command_is_found(line, why):
    assert why in (check_command(shlex.split(line)) or "")


def outside_or_broken(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` that do not resolve, or lead out of the repository ``root`` (a reader of a
    clone has nothing there), and paths into a folder out of it written as code (`../shared/x`)."""
    found = []
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or not path.is_relative_to(root.resolve()):
            found.append(f"{page.relative_to(root)}: {target}")
    found += [f"{page.relative_to(root)}: `{m}`" for m in re.findall(r"`(\.\./[\w.-]+/[^`]*)`", text)]
    return found


def test_every_relative_link_resolves_inside_the_repository(tmp_path):
    broken = [line for page in PAGES for line in outside_or_broken(page)]
    assert not broken, broken
    root = tmp_path / "repo"  # the check itself: a link and a path out of a repository, one link inside
    (root / "docs").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "DESIGN.md").write_text("contracts")
    (root / "docs" / "design.md").write_text("contracts")
    page = root / "docs" / "page.md"
    page.write_text("See [the contracts](../../shared/DESIGN.md), `../shared/DESIGN.md` and [ours](design.md).")
    assert outside_or_broken(page, root) == ["docs/page.md: ../../shared/DESIGN.md", "docs/page.md: `../shared/DESIGN.md`"]


def test_the_errors_the_guide_quotes_are_the_codes_messages():
    """docs/operations.md's table quotes fragments of the one-line errors: each is in the code's messages."""
    sources = "".join(p.read_text() for folder in ("dist_dml", "data_prep") for p in (ROOT / folder).rglob("*.py"))
    sources = re.sub(r"\"\s*\n\s*f?\"", "", sources)  # messages split over lines, joined
    table = (ROOT / "docs" / "operations.md").read_text().split("| the line says |", 1)[1].split("\n\n", 1)[0]
    quoted = [q for row in table.splitlines()[2:] for q in re.findall(r"`([^`]+)`", row.split(" | ")[0])]
    assert len(quoted) >= 8
    missing = [q for q in quoted if q not in sources]
    assert not missing, missing


def test_config_prints_a_config_resolved_and_refuses_a_bad_key(tmp_path):
    from .conftest import dist_dml_here

    ran = dist_dml_here("config", str(ROOT / "configs/cpu_synthetic.yaml"), "class_sampling.share=0.5")
    assert ran.returncode == 0 and "class_sampling:\n  share: 0.5\n" in ran.stdout, ran.stderr
    ran = dist_dml_here("config", str(ROOT / "configs/cpu_synthetic.yaml"), "class_sampling.shares=0.5")
    assert ran.returncode == 2 and "unknown key class_sampling.shares" in ran.stderr
    ran = dist_dml_here("config", "--reference", "--out", str(tmp_path / "config.md"))
    assert ran.returncode == 0 and (tmp_path / "config.md").read_text() == reference()
