"""Backbones build and give L2-normalised embeddings; uint8 input is normalised inside the model."""
import pytest
import torch

from dist_dml.data import normalize_batch
from dist_dml.models import BACKBONES, ModelConfig, build_model


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
