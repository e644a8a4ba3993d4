"""The internals of other libraries that dist_dml.infra.patches relies on, checked on the installed versions: an
upgrade of torch, DeepSpeed or Python that moves one fails here, not in a user's run."""
import sys

import pytest

from dist_dml.infra import patches


def test_every_internal_a_patch_relies_on_is_still_there():
    assert patches.internals_changed() == []


def test_the_check_fails_loudly_when_an_internal_moves(monkeypatch):
    """The check itself can fail: DeepSpeed's recovery-script copy renamed, and torchrun's monitor given another
    signature, are both reported."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monkeypatch.setattr(DeepSpeedEngine, "_copy_recovery_script", lambda self, path, extra: None)
    monkeypatch.setattr(LocalElasticAgent, "_monitor_workers", lambda self, group, timeout: None)
    changed = patches.internals_changed()
    assert any("_copy_recovery_script" in line for line in changed)
    assert any("_monitor_workers" in line for line in changed)


def test_a_hidden_module_cannot_be_imported_inside_the_block_only():
    name = "dist_dml_never_imported_module"
    with patches.hidden_module(name):
        with pytest.raises(ImportError):
            __import__(name)
    assert name not in sys.modules


def test_setup_refuses_an_install_whose_internals_moved(monkeypatch):
    """`dist-dml setup --check-internals` (what ./dml and the Dockerfile run after installing) stops in one line
    naming what moved; without a change it passes."""
    from .conftest import dist_dml_here

    assert dist_dml_here("setup", "--quiet", "--check-internals").returncode == 0
    monkeypatch.setattr(patches, "internals_changed", lambda: ["DeepSpeed 0.19 (installed: 0.20.0)"])
    refused = dist_dml_here("setup", "--quiet", "--check-internals")
    assert refused.returncode == 2
    assert refused.stderr.startswith("dist-dml setup: error: the installed torch or DeepSpeed lacks")
    assert "DeepSpeed 0.19 (installed: 0.20.0)" in refused.stderr and "pyproject.toml" in refused.stderr
