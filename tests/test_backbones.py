"""The users' own recipe (issue 18): backbones of torchvision and timm, their weights from a local file or a
cache on a node without internet, their normalisation inside the model, and a model that deploys (ONNX)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dist_dml.cli import main as cli
from dist_dml.config import load_config
from dist_dml.models.embedding import ModelConfig, backbone_spec, build_model
from dist_dml.models.weights import WeightsError, offline_reason

from .conftest import HANG_GUARD_S, ROOT, cpu_env, tiny_overrides

CONFIG = str(ROOT / "configs/cpu_synthetic.yaml")


def saved_backbone(backbone: str, path: Path, edit=None) -> dict:
    """A randomly initialised backbone's state dict, saved to ``path`` (.pth or .safetensors) after ``edit``."""
    torch.manual_seed(123)
    state = backbone_spec(backbone).build(None)[0].state_dict()
    if edit:
        edit(state)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # as DDP saves it
    return state


@pytest.mark.parametrize("backbone", ["resnet18", "timm:test_resnet", "timm:test_vit"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file_load_exactly(backbone, suffix, tmp_path):
    state = saved_backbone(backbone, tmp_path / f"w{suffix}")
    torch.manual_seed(0)  # another initialisation: every tensor must come from the file
    model = build_model(ModelConfig(backbone=backbone, weights=str(tmp_path / f"w{suffix}")), weights=str(tmp_path / f"w{suffix}"))
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert f"loaded {len(state)} tensors" in model.weights_report


def test_a_classifier_in_the_file_is_reported_and_left_out(tmp_path):
    saved_backbone("resnet18", tmp_path / "w.pth", lambda s: s.update({"fc.weight": torch.zeros(10, 512),
                                                                         "fc.bias": torch.zeros(10)}))
    model = build_model(ModelConfig(backbone="resnet18"), weights=str(tmp_path / "w.pth"))
    assert "left out 2 it has that the backbone does not (fc.bias, fc.weight" in model.weights_report


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("layer1.0.conv1.weight"), "lacks 1 of the .* tensors .*layer1.0.conv1.weight"),
    (lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 5, 5)}), r"conv1.weight is \(64, 3, 5, 5\) there but"),
    (lambda s: s["layer1.0.conv1.weight"].fill_(float("nan")),
     "tensor 'layer1.0.conv1.weight' holds 36864 NaN or infinite values of 36864: refused"),
], ids=["missing", "shape", "nan"])
def test_a_file_of_another_model_is_refused_in_one_line(edit, message, tmp_path, tiny_shards, capsys):
    saved_backbone("resnet18", tmp_path / "w.safetensors", edit)
    with pytest.raises(WeightsError, match=message):
        build_model(ModelConfig(backbone="resnet18"), weights=str(tmp_path / "w.safetensors"))


def test_a_weights_file_holding_python_objects_is_refused_in_our_words(tmp_path):
    """A .pth whose pickle names a Python class: refused without unpickling, in a line that says so (torch's own
    message, cut to one line, ended in its advice to load with weights_only=False)."""
    import argparse

    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError) as refused:
        build_model(ModelConfig(backbone="resnet18"), weights=str(tmp_path / "w.pth"))
    assert "holds Python objects (argparse.Namespace), not a plain state dict: refused" in str(refused.value)
    assert "weights_only" not in str(refused.value) and "False" not in str(refused.value)


def offline_env(tmp_path: Path) -> dict:
    """No internet (HF_HUB_OFFLINE, which dist_dml honours for torchvision too) and empty caches."""
    return cpu_env(TORCH_HOME=str(tmp_path / "torch_home"), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")


@pytest.mark.parametrize("weights", ["torchvision", "timm"])
def test_pretrained_weights_offline_with_an_empty_cache_are_one_line(weights, tiny_shards, tmp_path):
    backbone = "resnet18" if weights == "torchvision" else "timm:test_vit"
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", **{"model.backbone": backbone, "model.weights": weights,
                                                                  "tracking.enabled": False, "eval.at_start": False})
    for command in (["check", CONFIG, *overrides, "--world-size", "2"], ["train", CONFIG, *overrides]):
        proc = subprocess.run([sys.executable, "-m", "dist_dml.cli", *command], cwd=ROOT, env=offline_env(tmp_path),
                              capture_output=True, text=True, timeout=HANG_GUARD_S)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("dist-dml")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "are not in the cache" in errors[0] and "dist-dml fetch-weights CONFIG" in errors[0]
        assert str(tmp_path / ("torch_home" if weights == "torchvision" else "hf_home")) in errors[0]
        assert "https://" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_downloads_server_is_probed_not_waited_for(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers (a firewall, a proxy that hangs) is given up after
    the probe's timeout, not waited for: with the timeout set to 1 s, the probe ends after about 1 s, not 5 and
    not never (a refused port, which answers at once, would pass whatever the timeout)."""
    import socket
    import time

    import dist_dml.models.weights as weights
    from dist_dml.infra.distributed import free_port

    closed = f"http://127.0.0.1:{free_port()}/resnet18-f37072fd.pth"  # nothing listens there
    assert offline_reason(closed) is not None
    monkeypatch.setattr(weights, "PROBE_TIMEOUT_S", 1.0)
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        start = time.monotonic()
        reason = offline_reason(f"http://127.0.0.1:{hole.getsockname()[1]}/resnet18-f37072fd.pth")
        elapsed = time.monotonic() - start
    assert reason is not None and "timed out" in reason
    assert 0.9 <= elapsed < 4.5, elapsed  # the 1 s timeout, not the default 5 s


def test_a_cached_download_needs_no_network(tmp_path, monkeypatch, capsys):
    """A file in the cache (as fetch-weights leaves it) is what the run loads, offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dist_dml.models.weights import download_of, local_weights

    config = ModelConfig(backbone="resnet18", weights="torchvision")
    cached = download_of(config).cache
    cached.parent.mkdir(parents=True)
    state = saved_backbone("resnet18", cached.with_suffix(".pth"))
    cached.with_suffix(".pth").rename(cached)
    assert local_weights(config) == cached
    model = build_model(config, weights=str(cached))
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in state.items())
    assert cli(["fetch-weights", CONFIG, "model.backbone=resnet18", "model.weights=torchvision"]) == 0
    assert f"ready: resnet18 (torchvision) in {cached}" in capsys.readouterr().out


def test_fetch_weights_of_a_local_file_reads_what_it_holds(tmp_path, capsys):
    """fetch-weights with model.weights=FILE said "ready" without reading the file: it now loads it as a training
    would, says how many tensors it gave the backbone, and refuses one of another model in one line."""
    state = saved_backbone("resnet18", tmp_path / "w.safetensors")
    assert cli(["fetch-weights", CONFIG, "model.backbone=resnet18", f"model.weights={tmp_path / 'w.safetensors'}"]) == 0
    assert f"loaded {len(state)} tensors" in capsys.readouterr().out
    assert cli(["fetch-weights", CONFIG, "model.backbone=resnet50", f"model.weights={tmp_path / 'w.safetensors'}"]) == 2
    assert "model.weights" in capsys.readouterr().err


def test_a_timm_backbone_takes_its_normalisation_and_input_size(tiny_shards):
    cfg = load_config(CONFIG, [f"data.root={tiny_shards}", "model.backbone=timm:test_vit", "data.image_size=32"])
    assert cfg.model.mean == (0.5, 0.5, 0.5) and cfg.model.std == (0.5, 0.5, 0.5)  # its pretrained config's
    bare = load_config(None, [f"data.root={tiny_shards}", "model.backbone=timm:test_vit"])
    assert (bare.data.image_size, bare.data.resize) == (160, 168)  # 160 px, crop_pct 0.95
    model = build_model(cfg.model, image_size=32).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        by_hand = model.head(model.backbone((images.float() / 255 - 0.5) / 0.5))
        torch.testing.assert_close(model(images), torch.nn.functional.normalize(by_hand, dim=1))
    from dist_dml.train.engine import param_groups
    from dist_dml.config.optimizer import OptimizerConfig
    from dist_dml.method.losses import build_loss
    from dist_dml.models.embedding import TrainModule

    groups = {g["name"]: g["params"] for g in param_groups(TrainModule(model, build_loss(cfg.loss)), OptimizerConfig())}
    assert [id(p) for p in groups["head"]] == [id(p) for p in model.head.parameters()]  # timm's own head is the backbone's
    assert len(groups["backbone"]) == len(list(model.backbone.parameters())) and "beta" in groups


def test_unknown_timm_models_and_wrong_weights_are_one_line(tiny_shards, capsys):
    for override, message in (("model.backbone=timm:no_such_net", "timm has no model 'no_such_net'"),
                              ("model.weights=timm", "has no pretrained weights")):
        assert cli(["check", CONFIG, f"data.root={tiny_shards}", override, "--world-size", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# --- ONNX -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["tiny_cnn", "timm:test_vit"])
def test_the_onnx_export_embeds_as_torch_does(backbone, tiny_shards, tmp_path, capsys):
    import onnxruntime

    from dist_dml.serve.trained_model import load_checkpoint

    size = 28 if backbone == "tiny_cnn" else 32  # the ViT's 16-px patches must tile the crop
    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path, **{"model.backbone": backbone,
                                                                    "data.image_size": size, "data.resize": size + 4}))
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(cfg.model, image_size=cfg.data.image_size).state_dict(),
                "config": cfg.to_dict()}, tmp_path / "final_model.pt")
    assert cli(["export", str(tmp_path / "final_model.pt"), "--onnx", str(tmp_path / "model.onnx")]) == 0
    assert "onnxruntime equals torch within 0.0001" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (shape,) = [i.shape for i in session.get_inputs()]
    assert shape[1:] == [size, size, 3] and not isinstance(shape[0], int)  # uint8 NHWC, a dynamic batch
    model, _ = load_checkpoint(tmp_path / "final_model.pt")
    rng = np.random.default_rng(5)
    for n in (1, 7):
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        got = session.run(["embeddings"], {"images": images})[0]
        with torch.no_grad():  # the graph takes crops of the evaluation's size as they are
            want = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_the_gpu_check_on_a_machine_without_cuda_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py")], cwd=ROOT,
                          env=cpu_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1 and "no CUDA device here" in proc.stdout and "nothing was run" in proc.stdout
