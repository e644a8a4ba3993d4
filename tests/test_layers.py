"""The architecture: import-linter's contracts (pyproject.toml, [tool.importlinter]) hold on the code, and fail on a
copy of it with one import upward; the package's top level stays small and no module grows past the size one
reader can hold."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_dml"


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages under ``root`` (its own pyproject.toml), in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_import_upward_breaks_them(tmp_path):
    """The data layer importing the trainer, and the loss math importing the distributed context: both found."""
    for name in ("dist_dml", "data_prep"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "dist_dml" / "data" / "plan.py", "a") as f:
        f.write("\n\ndef _upward():\n    from dist_dml.train import trainer  # noqa: F401\n")
    with open(tmp_path / "dist_dml" / "method" / "losses.py", "a") as f:
        f.write("\n\ndef _ranks():\n    from dist_dml.infra.distributed import DistContext  # noqa: F401\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "dist_dml.data.plan -> dist_dml.train.trainer" in result.stdout
    assert "dist_dml.method.losses -> dist_dml.infra.distributed" in result.stdout


def test_the_top_level_is_small_and_no_module_is_long():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these by job: {long}"
