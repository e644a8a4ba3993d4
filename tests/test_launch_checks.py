"""What a launch is told before any process starts (dist-dml check, and the same at a training's start): the
shared memory a node's ranks will use against what it has, settings that do nothing where they are set, and a
world size the split cannot feed."""
from __future__ import annotations

from pathlib import Path

import pytest

from dist_dml.config import load_config
from dist_dml.train import preflight

from .conftest import ROOT, dist_dml_here, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def test_shared_memory_need_is_what_the_loaders_and_the_ring_hold(tiny_shards, tmp_path):
    """Per rank: (4 prefetched per worker + 1) training batches and as many evaluation batches of uint8 images,
    and the prototypes' snapshot ring (slots x classes x dim x 2 bytes in fp16), counted by hand."""
    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path, **{"data.workers": 2, "eval.batch_size": 16,
                                                                       "class_sampling.share": 0.5,
                                                                       "class_sampling.refresh_steps": 3}))
    image = 3 * 28 * 28
    slots = -(-(4 * 2 + 1) // 3) + 1  # ceil(lag / refresh) + 1, lag = 4 x workers + 1
    assert preflight.shm_need(cfg, classes=48) == {"training batches": 9 * 24 * image,
                                                   "evaluation batches": 9 * 16 * image,
                                                   "class prototypes' snapshots": slots * 48 * 32 * 2}
    no_workers = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path, **{"data.workers": 0}))
    assert preflight.shm_need(no_workers, classes=48) == {}


def test_a_node_short_of_shared_memory_is_refused_before_training(tiny_shards, tmp_path, monkeypatch):
    """A container's 64 MB /dev/shm against 8 workers of 224-px batches on 2 ranks: `check` and the training's start
    refuse in one line naming --shm-size (the run died in the DataLoader with 'unable to allocate shared memory'
    and the launcher restarted it); with room, both go on."""
    monkeypatch.setattr(preflight, "shm_free_bytes", lambda: 64 * 2**20)
    big = tiny_overrides(tiny_shards, tmp_path / "run", **{"data.workers": 8, "data.image_size": 224,
                                                           "data.resize": 256, "tracking.enabled": False})
    check = dist_dml_here("check", CONFIG, *big, "--world-size", "2")
    assert check.returncode == 2 and "--shm-size" in check.stderr and "2 processes" in check.stderr, check.stderr
    assert len(check.stderr.strip().splitlines()) == 1
    train = dist_dml_here("train", CONFIG, *big)
    assert train.returncode == 2 and "--shm-size" in train.stderr and "1 process of this run" in train.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    small = tiny_overrides(tiny_shards, tmp_path / "small", **{"tracking.enabled": False})
    assert dist_dml_here("check", CONFIG, *small, "--world-size", "2").returncode == 0


def test_settings_that_do_nothing_are_said_at_check_and_start(tiny_shards, tmp_path):
    """memory.mode=add with memory.size=0, class_sampling.group with class_sampling.share=0: a warning naming them
    (they passed without a word); a section turned on says nothing."""
    inert = tiny_overrides(tiny_shards, tmp_path / "run", **{"memory.mode": "add", "memory.beta": False,
                                                             "class_sampling.group": 3, "tracking.enabled": False,
                                                             "train.steps": 2, "eval.at_start": False})
    check = dist_dml_here("check", CONFIG, *inert, "--world-size", "1")
    assert check.returncode == 0, check.stderr
    assert "memory.mode=add, memory.beta=False do nothing: memory.size=0 turns the memory off" in check.stderr
    assert "class_sampling.group=3 does nothing: class_sampling.share=0 turns the class sampling off" in check.stderr
    train = dist_dml_here("train", CONFIG, *inert)
    assert train.returncode == 0 and "memory.mode=add, memory.beta=False do nothing" in train.stdout
    on = dist_dml_here("check", CONFIG, *tiny_overrides(tiny_shards, tmp_path / "on", **{
        "memory.mode": "add", "memory.size": 64, "tracking.enabled": False}), "--world-size", "1")
    assert on.returncode == 0 and "do nothing" not in on.stderr + on.stdout
