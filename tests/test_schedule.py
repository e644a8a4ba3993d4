"""Schedules in the data's own units (dist_dml/config/schedule.py): spans in steps, epochs or shares of the run,
resolved to steps at a world size; the learning rates' rule for the global batch."""
from __future__ import annotations

import math

import pytest

from dist_dml.config import load_config
from dist_dml.config.optimizer import LrSchedule
from dist_dml.config.schedule import lr_factor, span_steps
from dist_dml.infra.spans import parse_span
from dist_dml.train.preflight import schedule_at

from .conftest import ROOT, dist_dml_here, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


@pytest.mark.parametrize("text, parsed", [("", None), ("500", (500.0, "steps")), ("500 steps", (500.0, "steps")),
                                          ("2 epochs", (2.0, "epochs")), ("0.5 epoch", (0.5, "epochs")),
                                          ("3ep", (3.0, "epochs")), ("10%", (0.1, "run")), ("100 %", (1.0, "run"))])
def test_a_span_is_steps_epochs_or_a_share_of_the_run(text, parsed):
    assert parse_span(text, "eval.every") == parsed


@pytest.mark.parametrize("text", ["two epochs", "5 hours", "1.5 steps", "150%", "-3", "2 epochs 3"])
def test_a_span_that_means_nothing_is_refused_naming_its_key(text):
    with pytest.raises(ValueError, match="optimizer.warmup"):
        parse_span(text, "optimizer.warmup")


def test_spans_resolve_against_the_epoch_and_the_run():
    assert span_steps("2 epochs", "k", steps_per_epoch=24, total_steps=96) == 48
    assert span_steps("25%", "k", steps_per_epoch=24, total_steps=96) == 24
    assert span_steps("0.01 epochs", "k", steps_per_epoch=24, total_steps=96) == 1  # a span above 0 is a step
    assert span_steps("", "k", steps_per_epoch=24, total_steps=96, otherwise=7) == 7


def test_the_rate_at_the_same_epoch_is_the_same_at_1_2_and_4_ranks(tiny_shards, tmp_path):
    """A config in epochs (warm-up half an epoch, a step decay every epoch, evaluation every 1.5 epochs) on the
    same split at 1, 2 and 4 ranks: an epoch has 24, 12 and 6 steps, and at every point of the run counted in
    epochs the learning-rate multiplier, the evaluations and the checkpoints fall alike."""
    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path, **{
        "data.classes_per_batch": 2, "data.workers": 1, "train.steps": 0, "train.epochs": 4,
        "optimizer.schedule": "step", "optimizer.gamma": 0.5, "optimizer.warmup_steps": 0,
        "optimizer.warmup": "0.5 epochs", "optimizer.decay_every": "1 epoch", "eval.every_steps": 0,
        "eval.every": "1.5 epochs", "checkpoint.every_steps": 0, "checkpoint.every": "50%"}))
    schedules = {w: schedule_at(cfg, w) for w in (1, 2, 4)}
    assert [s.steps_per_epoch for s in schedules.values()] == [24, 12, 6]
    for fraction in (1 / 3, 0.5, 2 / 3, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5):
        rates = set()
        for s in schedules.values():
            multiplier = LrSchedule.of(cfg.optimizer, s)
            rates.add(round(multiplier(round(fraction * s.steps_per_epoch) - 1), 12))
        assert len(rates) == 1, (fraction, rates)
    for s in schedules.values():
        assert (s.eval_every / s.steps_per_epoch, s.checkpoint_every / s.steps_per_epoch) == (1.5, 2.0)
        assert s.total_steps == 4 * s.steps_per_epoch


def test_the_learning_rates_follow_the_global_batch_by_the_rule_stated():
    assert lr_factor("none", 640, 80) == 1.0
    assert lr_factor("linear", 640, 80) == 8.0
    assert math.isclose(lr_factor("sqrt", 640, 80), math.sqrt(8))


def test_check_and_the_start_say_the_schedule_at_their_world_size(tiny_shards, tmp_path):
    """The schedule resolved at the world size asked is printed by `dist-dml check` and at a training's start,
    with the learning-rate rule."""
    over = tiny_overrides(tiny_shards, tmp_path / "run", **{
        "data.classes_per_batch": 2, "train.steps": 6, "optimizer.warmup": "1 epoch", "eval.at_start": False,
        "tracking.enabled": False, "optimizer.lr_scaling": "linear", "optimizer.reference_batch": 3})
    check = dist_dml_here("check", CONFIG, *over, "--world-size", "2")
    assert check.returncode == 0, check.stderr
    assert "an epoch is 12 steps of 12 images on 2 processes" in check.stdout
    assert "warm-up 12 steps" in check.stdout and "learning rates x4 (linear rule" in check.stdout
    train = dist_dml_here("train", CONFIG, *over)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "[train] schedule: an epoch is 24 steps of 6 images on 1 process" in train.stdout
    assert "learning rates x2 (linear rule" in train.stdout


@pytest.mark.parametrize("keys, says", [({"optimizer.warmup": "2 epochs", "optimizer.warmup_steps": 10}, "give one"),
                                        ({"eval.every": "1 epoch", "eval.every_steps": 10}, "give one"),
                                        ({"checkpoint.every": "1x"}, "checkpoint.every='1x'"),
                                        ({"optimizer.lr_scaling": "cube"}, "optimizer.lr_scaling")])
def test_a_schedule_key_given_twice_or_wrong_is_refused(tiny_shards, tmp_path, keys, says):
    from dist_dml.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path, **keys))


@pytest.fixture(scope="module")
def eight_hundred(tmp_path_factory):
    """A split of 800 training records (one class each)."""
    from .conftest import synthetic_shards

    return synthetic_shards(tmp_path_factory.mktemp("eight_hundred"), 800, 4, 0.5)


@pytest.mark.parametrize("name", ["sop_resnet50", "cub_resnet50", "cars_resnet50", "inshop_resnet50",
                                  "sop_vit_small_dinov2"])
def test_the_shipped_configs_train_the_same_per_epoch_on_1_and_8_gpus(name, eight_hundred):
    """Each dataset config on a split of 800 records: at 1 and at 8 processes an epoch has other steps, and the
    run's length, its decays, warm-up, evaluations and checkpoints fall at the same epochs; the rates grow by the
    sqrt rule (x2.83 at 8 GPUs' 640 images)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.root={eight_hundred}", "eval.split=test"])
    one, eight = schedule_at(cfg, 1), schedule_at(cfg, 8)
    assert one.steps_per_epoch > eight.steps_per_epoch
    for key in ("total_steps", "warmup_steps", "decay_every", "eval_every", "checkpoint_every"):
        a, b = getattr(one, key) / one.steps_per_epoch, getattr(eight, key) / eight.steps_per_epoch
        assert a == pytest.approx(b, abs=1 / eight.steps_per_epoch), key  # within a step's rounding
    assert one.eval_every and one.checkpoint_every and one.lr_factor == 1.0
    assert eight.lr_factor == pytest.approx(math.sqrt(8))


def test_a_head_only_warm_up_leaves_the_backbone_bitwise_unchanged(tiny_shards, tmp_path):
    """optimizer.backbone_warmup=4 steps (with the backbone in layer groups, optimizer.layer_decay=0.8): the
    checkpoint of step 4 holds every backbone parameter exactly as initialised while the head has moved; by step
    8 the backbone has moved too."""
    import torch

    from dist_dml.models.embedding import build_model

    out = tmp_path / "run"
    over = tiny_overrides(tiny_shards, out, **{"train.steps": 8, "checkpoint.every_steps": 4, "checkpoint.keep_last": 5,
                                               "optimizer.backbone_warmup": 4, "optimizer.layer_decay": 0.8,
                                               "eval.at_start": False,
                                               "tracking.enabled": False})
    ran = dist_dml_here("train", CONFIG, *over)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "the head alone for 4 steps" in ran.stdout
    cfg = load_config(CONFIG, over)
    torch.manual_seed(cfg.train.seed)  # as the trainer initialises the model
    initial = build_model(cfg.model, image_size=cfg.data.image_size).state_dict()

    def saved(step: int) -> dict:
        from dist_dml.train.engine import WeightsOnlyCheckpointEngine

        with torch.serialization.safe_globals(WeightsOnlyCheckpointEngine.SAFE_GLOBALS):
            states = torch.load(out / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt",
                                weights_only=True)
        return {k[len("model."):]: v for k, v in states["module"].items() if k.startswith("model.")}

    at4, at8 = saved(4), saved(8)
    backbone = [name for name, _ in build_model(cfg.model).backbone.named_parameters()]
    assert backbone and all(torch.equal(at4[f"backbone.{n}"], initial[f"backbone.{n}"]) for n in backbone)
    assert not torch.equal(at4["head.weight"], initial["head.weight"])
    assert any(not torch.equal(at8[f"backbone.{n}"], initial[f"backbone.{n}"]) for n in backbone)


@pytest.mark.parametrize("backbone, stem, last, layers", [("resnet18", "conv1.weight", "layer4.1.conv2.weight", 9),
                                                          ("timm:resnet18", "conv1.weight", "layer4.1.conv2.weight", 9),
                                                          ("timm:vit_tiny_patch16_224", "patch_embed.proj.weight",
                                                           "blocks.11.mlp.fc2.weight", 13)])
def test_layer_decay_gives_each_backbone_layer_its_rate(backbone, stem, last, layers):
    """optimizer.layer_decay=0.5 on torchvision's and timm's models: the stem learns at lr x 0.5^layers, the block
    nearest the head at lr x 0.5, the head at head_lr, beta at its own; every trained parameter in one group."""
    from dist_dml.config.optimizer import OptimizerConfig
    from dist_dml.method.losses import LossConfig, build_loss
    from dist_dml.models.embedding import ModelConfig, TrainModule, build_model
    from dist_dml.train.engine import param_groups

    module = TrainModule(build_model(ModelConfig(backbone=backbone), image_size=64), build_loss(LossConfig()))
    groups = param_groups(module, OptimizerConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5))
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert sorted(rate) == sorted(id(p) for p in named.values() if p.requires_grad)
    assert rate[id(named[f"model.backbone.{stem}"])] == pytest.approx(1e-3 * 0.5 ** layers)
    assert rate[id(named[f"model.backbone.{last}"])] == pytest.approx(1e-3 * 0.5)
    assert rate[id(named["model.head.weight"])] == 1e-2 and rate[id(named["loss.beta.global_beta"])] == 1e-2
    assert len({g["name"] for g in groups}) == len(groups) == layers + 2
    plain = param_groups(module, OptimizerConfig(lr=1e-3))
    assert [g["name"] for g in plain] == ["backbone", "head", "beta"]
