"""Configs: the shipped YAML files load; every bad config stops with a message naming the key."""
import subprocess
import sys

import pytest

from dist_dml.cli import main as cli
from dist_dml.config import ConfigError, load_config

from .conftest import HANG_GUARD_S, ROOT, cpu_env

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path, tiny_shards):
    split = "test" if "inshop" not in path.stem else None
    overrides = [f"data.root={tiny_shards}"] + ([] if split else ["eval.split=test"])
    if "val_split:" in path.read_text():  # the tiny set has no 'val' split: its test split stands in for one
        overrides.append("data.val_split=test")
    cfg = load_config(path, overrides)
    assert cfg.data.images_per_class >= 2 and cfg.loss.alpha == 0.2 and cfg.loss.beta_init == 1.2


def test_overrides_are_typed(tiny_shards):
    cfg = load_config(ROOT / "configs/cpu_synthetic.yaml",
                      [f"data.root={tiny_shards}", "optimizer.lr=1e-3", "eval.recall_ks=[1,5]", "tracking.uri="])
    assert cfg.optimizer.lr == 1e-3 and cfg.eval.recall_ks == (1, 5) and cfg.tracking.uri is None


BAD = [
    (["nonsense.key=1"], "unknown section 'nonsense'"),
    (["data.colour=red"], "unknown key data.colour"),
    (["optimizer.lr=fast"], "optimizer.lr must be float"),
    (["data.images_per_class=1"], "data.images_per_class (K) must be at least 2"),
    (["data.batch_size=100"], "data.batch_size=100 is not classes_per_batch x images_per_class"),
    (["loss.beta_per_class=true", "loss.num_classes=3"], "loss.num_classes=3 is smaller than the 48 classes"),
    (["sampler.kind=clever"], "sampler.kind: unknown sampler 'clever'"),
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage must be 0, 1 or 2"),
    (["optimizer.head_lr=-1"], "optimizer.head_lr must be a positive finite rate"),
    (["optimizer.lr=.nan"], "optimizer.lr must be a positive finite rate"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be finite and >= 0"),
    (["deepspeed.zero_stage=0", "deepspeed.precision=bf16"], "bf16 needs deepspeed.zero_stage 1 or 2"),
    (["model.backbone=alexnet"], "model.backbone: unknown backbone 'alexnet'"),
    (["eval.split=validation"], "no split 'validation'"),
    (["data.root=/nonexistent/shards"], "no manifest"),
    # Tables allocated per memory slot, class or image, against this machine's memory before any process starts.
    (["memory.size=1000000000"], "memory.size=1,000,000,000 (260.8 GB): more than half of this machine's"),
    (["loss.beta_per_image=true", "loss.num_images=2000000000"], "a per-image beta table of 2,000,000,000 rows"),
    (["memory.size=64", "train.steps=10", "memory.start_step=10"], "the memory would never be sampled from"),
    (["eval.grid_k=3"], "eval.grid_k is now eval.example_k"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_config_stops_before_training(overrides, message, tiny_shards, capsys):
    code = cli(["train", str(ROOT / "configs/cpu_synthetic.yaml"), f"data.root={tiny_shards}", *overrides])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)


def test_bad_config_exit_code_reaches_the_shell(tiny_shards):
    proc = subprocess.run([sys.executable, "-m", "dist_dml.cli", "train", str(ROOT / "configs/cpu_synthetic.yaml"),
                           f"data.root={tiny_shards}", "data.images_per_class=1"],
                          capture_output=True, text=True, env=cpu_env(), timeout=HANG_GUARD_S)
    assert proc.returncode == 2 and "images_per_class" in proc.stderr
    assert "deepspeed" not in proc.stderr.lower()  # stopped before the engine or a process group


# Values that are meaningful although they look out of range: sampler.nonzero_loss_cutoff=inf switches it off;
# proxy.margin=-1 is the paper's margin (its default).
ALLOWED = {("sampler.nonzero_loss_cutoff", ".inf"), ("proxy.margin", "-1")}


def test_every_numeric_key_is_range_checked(tiny_shards):
    """Each numeric key of the config, set to -1 (and a float one to NaN and infinity), stops at the check
    with its name; a new key without a range check fails here."""
    base = load_config(ROOT / "configs/cpu_synthetic.yaml", [f"data.root={tiny_shards}"])
    accepted = []
    for section, values in base.to_dict().items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            for bad in ("-1", ".nan", ".inf") if isinstance(value, float) else ("-1",):
                if (f"{section}.{key}", bad) in ALLOWED:
                    continue
                try:
                    load_config(ROOT / "configs/cpu_synthetic.yaml", [f"data.root={tiny_shards}", f"{section}.{key}={bad}"])
                    accepted.append(f"{section}.{key}={bad}")
                except ConfigError as exc:
                    assert f"{section}.{key}" in str(exc) or key in str(exc), str(exc)
    assert not accepted


def test_overrides_may_follow_options(tiny_shards, tmp_path, capsys):
    """`dist-dml check CONFIG --world-size 1 data.root=...`: argparse took positionals before the options only,
    and refused the overrides after them; they are overrides like any other now, and an unknown option is not."""
    config = str(ROOT / "configs/cpu_synthetic.yaml")
    run = [f"data.root={tiny_shards}", f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false"]
    assert cli(["check", config, "--world-size", "1", *run]) == 0
    assert "--world-size" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["check", config, "--world-size", "1", "--bogus", *run])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
