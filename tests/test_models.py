"""Backbones build and give L2-normalised embeddings; uint8 input is normalised inside the model."""
import pytest
import torch

from dist_dml.data import normalize_batch
from dist_dml.models.backbones import BACKBONES
from dist_dml.models.embedding import ModelConfig, build_model


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_backbone_gives_unit_embeddings(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, embedding_dim=24)).eval()
    size = 224 if backbone.startswith("vit") else 64
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        again = model(normalize_batch(images))
    assert out.shape == (2, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out, again)


def test_pretrained_tiny_cnn_is_refused():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model(ModelConfig(backbone="tiny_cnn", pretrained=True))


@pytest.mark.parametrize("affine", [True, False])
def test_frozen_batchnorm_keeps_its_statistics(affine):
    """model.norm=frozen: training steps leave the running statistics bit-identical (BatchNorm stays in
    eval mode even under model.train()); its scale and shift train only with norm_affine."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny_cnn", embedding_dim=8, norm="frozen", norm_affine=affine))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    assert model.training and not any(m.training for m in norms)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)).sum().backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all((m.weight.grad is not None) == affine and m.weight.requires_grad == affine for m in norms)
    # The plain model's statistics do move (the premise of the comparison).
    plain = build_model(ModelConfig(backbone="tiny_cnn", embedding_dim=8)).train()
    start = plain.backbone[1].running_mean.clone()
    plain(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert not torch.equal(plain.backbone[1].running_mean, start)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="model.norm"):
        build_model(ModelConfig(backbone="tiny_cnn", norm="group"))


def test_auto_norm_freezes_pretrained_batchnorm_and_trains_a_random_one():
    """model.norm=auto (the default): pretrained weights keep their BatchNorm statistics (frozen: a P x K batch of
    a few classes would replace ImageNet's), random weights learn theirs over the global batch (sync); a config
    resolves it, and says which."""
    from dist_dml.config import load_config

    assert ModelConfig(backbone="tiny_cnn").norm_mode == "sync"
    assert ModelConfig(backbone="resnet18", weights="torchvision").norm_mode == "frozen"
    assert ModelConfig(backbone="tiny_cnn", weights="/weights/mine.pt").norm_mode == "frozen"
    assert ModelConfig(backbone="resnet18", weights="torchvision", norm="sync").norm_mode == "sync"
    config = load_config(None, ["model.backbone=resnet18", "model.weights=torchvision"], check_data=False)
    assert config.model.norm == "frozen"
    model = build_model(ModelConfig(backbone="tiny_cnn", weights="/x.pt"), gather=lambda t: t)  # no weights loaded
    assert model.frozen_norm
