"""A newcomer's first hour: ./dml and the launch scripts work from any folder without an activated
environment, runs are named after their config, a resume that cannot apply is refused before any
process starts, DeepSpeed's op build is announced, per-loss margins and the flip switch."""
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_dml.train.checkpoints import META
from dist_dml.train.resume_checks import resume_problem
from dist_dml.config import load_config
from dist_dml.data import DataConfig, Manifest, train_image
from dist_dml.method.losses import LossConfig, build_loss
from dist_dml.method.sampling import Triplets

from .conftest import HANG_GUARD_S, ROOT, cpu_env, dist_dml_here, synthetic_shards, tiny_overrides

CONFIG = ROOT / "configs/cpu_synthetic.yaml"


def bare_env(**extra) -> dict:
    """No activated environment: the system's PATH only, no PYTHON, no VIRTUAL_ENV. DIST_DML_VENV only
    where the tests run from an environment other than the repository's .venv."""
    env = {k: v for k, v in cpu_env().items() if k not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        env["DIST_DML_VENV"] = sys.prefix
    return {**env, **extra}


def test_dml_resolves_relative_paths_in_the_callers_folder(tmp_path):
    proc = subprocess.run([str(ROOT / "dml"), "run", "prep", "synthetic", "--classes", "6", "--test-classes", "2",
                           "--per-class", "2", "--size", "16", "--out", "my_shards", "--no-progress"],
                          cwd=tmp_path, env=bare_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "my_shards" / "manifest.json").is_file()
    assert not (ROOT / "my_shards").exists()


def test_launch_script_finds_the_environment_and_a_free_port(tiny_shards, tmp_path):
    """launch/torchrun.sh with no activated environment and port 29500 taken by someone else: it runs with
    the project's Python on a free port, restarting after a crash unless told not to, and the run lands in
    runs/cpu_synthetic of the caller's folder under the MLflow experiment cpu_synthetic."""
    overrides = [o for o in tiny_overrides(tiny_shards, tmp_path) if not o.startswith("train.output_dir=")]
    overrides += ["train.steps=4", "train.log_every=2", "eval.at_start=false", "checkpoint.every_steps=0"]
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # taken already: all the better
        proc = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), "2", "train", str(CONFIG), *overrides],
                              cwd=tmp_path, env=bare_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "rendezvous at 127.0.0.1:29500" not in proc.stdout
    assert "up to 3 restarts after a crash" in proc.stdout  # what the guide says a killed rank gets
    results = json.loads((tmp_path / "runs" / "cpu_synthetic" / "results.json").read_text())
    assert results["steps"] == 4 and results["world_size"] == 2 and results["name"] == "cpu_synthetic"
    assert "[train] done: run 'cpu_synthetic'" in proc.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(results["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "cpu_synthetic"


def test_runs_are_named_after_their_config(tiny_shards):
    root = f"data.root={tiny_shards}"
    cfg = load_config(CONFIG, [root])
    assert (cfg.train.name, cfg.train.output_dir, cfg.tracking.experiment) == \
        ("cpu_synthetic", "runs/cpu_synthetic", "cpu_synthetic")
    sop = load_config(ROOT / "configs/sop_resnet50.yaml", [root])
    assert (sop.train.output_dir, sop.tracking.experiment) == ("runs/sop_resnet50", "sop_resnet50")
    named = load_config(CONFIG, [root, "train.name=ablation-3"])
    assert (named.train.output_dir, named.tracking.experiment) == ("runs/ablation-3", "ablation-3")
    explicit = load_config(CONFIG, [root, "train.output_dir=/tmp/x", "tracking.experiment=shared"])
    assert (explicit.train.output_dir, explicit.tracking.experiment) == ("/tmp/x", "shared")


def fake_checkpoint(output: Path, world_size: int, parts: dict | None = None, **config_changes) -> Path:
    """A checkpoint folder as the trainer writes it, with the META the resume check reads (``parts``: the plain
    values of its parts, as the trainer's index holds them)."""
    folder = output / "checkpoints" / "step00000010"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"not read by the check")
    (output / "checkpoints" / "latest").write_text(folder.name)
    saved = {"model": {"backbone": "tiny_cnn", "embedding_dim": 64}, "deepspeed": {"zero_stage": 2}}
    for key, value in config_changes.items():
        section, name = key.split(".")
        saved[section][name] = value
    files = {"mp_rank_00_model_states.pt": (folder / "mp_rank_00_model_states.pt").stat().st_size}
    (folder / META).write_text(json.dumps({"step": 10, "world_size": world_size, "zero_stage": 2, "config": saved,
                                           "files": files, **(parts or {})}))
    return folder


def test_resume_that_cannot_apply_is_refused_before_any_process_starts(tiny_shards, tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, world_size=2)
    overrides = [f"data.root={tiny_shards}", f"train.output_dir={out}"]
    cfg = load_config(CONFIG, overrides)
    assert resume_problem(cfg) is None
    shape = overrides + ["model.embedding_dim=32"]
    assert "model.embedding_dim=64, but this run has 32" in resume_problem(load_config(CONFIG, shape))
    assert resume_problem(load_config(CONFIG, shape + ["checkpoint.resume=none"])) is None
    missing = resume_problem(load_config(CONFIG, overrides + [f"checkpoint.resume={tmp_path}/nothing"]))
    assert "is not a whole checkpoint: no such folder" in missing
    layered = resume_problem(load_config(CONFIG, overrides + ["optimizer.layer_decay=0.8"]))  # one group per layer
    assert "optimizer.layer_decay=1.0, but this run has 0.8" in layered

    # The launch script refuses before torchrun starts a process.
    proc = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), "1", "train", str(CONFIG), *shape],
                          cwd=tmp_path, env=bare_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot resume" in proc.stderr and "model.embedding_dim=64, but this run has 32" in proc.stderr
    assert "[launch]" not in proc.stdout  # torchrun never started


def test_a_resume_of_another_table_size_or_world_size_is_refused_at_check(tmp_path):
    """The memory's size, the beta tables' sizes and the data split's records are read from the checkpoint's index
    and compared before any process starts (they failed after the engine was built); `check --world-size W`
    refuses a W at which DeepSpeed cannot load the ZeRO-2 state: a 2,080-element head before a per-image beta
    table of 10^6 leaves ranks 62 and 63 of 64 with none of the head and some of beta (worked by hand: groups are
    padded to a multiple of 2W and cut in W equal slices; at 62 ranks every rank holds some of each). The split
    holds 70 records, one class per record a step (P = 1), so 64 ranks have records to draw."""
    tiny_shards = synthetic_shards(tmp_path / "shards", 70, 4, 0.03)
    out = tmp_path / "run"
    shapes = {"group_backbone": 100000, "group_head": 2080, "group_beta": 1000001, "beta_images": 1000000}
    fake_checkpoint(out, world_size=2, parts={"memory": {"size": 4096, "dim": 64}, "shapes": shapes,
                                              "data": {"records": 10 ** 6}})
    base = [f"data.root={tiny_shards}", f"train.output_dir={out}", "memory.size=4096", "data.classes_per_batch=1"]
    records = resume_problem(load_config(CONFIG, base))
    assert "a data position over a 'train' split (data.root, data.train_split) whose record count is 1000000" in records
    records_now = Manifest(tiny_shards).split("train")["shards"]
    fake_checkpoint(tmp_path / "fits", world_size=2, parts={"memory": {"size": 4096, "dim": 64}, "shapes": shapes,
                                                            "data": {"records": sum(s["records"] for s in records_now)}})
    base = [f"data.root={tiny_shards}", f"train.output_dir={tmp_path / 'fits'}", "data.classes_per_batch=1"]
    assert resume_problem(load_config(CONFIG, base + ["memory.size=4096"])) is None
    assert resume_problem(load_config(CONFIG, base)) is None  # a run without the memory leaves it
    assert "memory.size of 4096, but this run's is 8192" in resume_problem(load_config(CONFIG, base + ["memory.size=8192"]))
    beta = resume_problem(load_config(CONFIG, base + ["loss.beta_per_image=true", "loss.num_images=2000000"]))
    assert "a per-image beta table of size 1000000, but this run's is 2000000" in beta

    for world, refused in ((2, False), (4, False), (62, False), (64, True)):
        check = dist_dml_here("check", str(CONFIG), *base, "--world-size", str(world))
        assert (check.returncode == 2) == refused, check.stderr
    assert "the head param group (2080 elements) leaves ranks 62 to 63 without an element" in check.stderr
    assert "resume with at most 62 processes, or with 2" in check.stderr
    assert "at most 1 processes" not in check.stderr
    assert dist_dml_here("check", str(CONFIG), *base, "--world-size", "0").returncode == 2


def test_deepspeed_op_build_is_announced_and_lands_in_the_environment(tmp_path):
    """The first line of a setup that must build the op says so, and for how long, before the build."""
    env = cpu_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.Popen([sys.executable, "-m", "dist_dml.cli", "setup"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert "building DeepSpeed's CPU communication op" in first and "minutes" in first, first
    assert str(tmp_path / "ext") in first
    # Without TORCH_EXTENSIONS_DIR the ops go to this environment's folder, not the per-user cache.
    env.pop("TORCH_EXTENSIONS_DIR")
    out = subprocess.run([sys.executable, "-c", "import os, dist_dml.infra.accelerator as a; a.configure(); "
                          "print(os.environ['TORCH_EXTENSIONS_DIR'])"],
                         env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.stdout.strip() == str(Path(sys.prefix) / "torch_extensions"), out.stderr


def test_importing_dist_dml_changes_no_environment_variable():
    """The accelerator and DeepSpeed's build environment are set by dist_dml.infra.accelerator.configure, which
    the entry points call; importing any module of the package (after the libraries it uses, which set
    variables of their own) changes nothing."""
    code = ("import os, importlib, pkgutil, torch, deepspeed, mlflow, faiss, timm, webdataset, dist_dml, data_prep; "
            "before = dict(os.environ); "
            "names = [m.name for p in (dist_dml, data_prep) for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.') "
            "if m.name != 'dist_dml.serve.mlflow_model']; "
            "[importlib.import_module(n) for n in names]; "
            "print(len(names), sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))")
    env = {k: v for k, v in cpu_env().items() if k not in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    count, changed = out.stdout.strip().splitlines()[-1].split(" ", 1)  # after DeepSpeed's own lines
    assert int(count) > 30 and changed == "[]", out.stdout + out.stderr[-2000:]


def test_deepspeed_is_imported_without_mlflow_which_imports_after():
    """DeepSpeed's autotuner imports MLflow whenever it can (3 s of each rank's start here): dist_dml.train.engine
    hides it during DeepSpeed's import, so a rank that does not track never loads it, and the rank that
    tracks imports it as usual afterwards."""
    code = ("import sys, dist_dml.infra.accelerator as a; a.configure('cpu'); import dist_dml.train.engine; "
            "import deepspeed.autotuning.autotuner as tuner; hidden = 'mlflow' not in sys.modules; "
            "import mlflow.pyfunc; print(hidden, tuner.has_mlflow, mlflow.pyfunc.PythonModel.__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.stdout.strip().splitlines()[-1] == "True False PythonModel", out.stdout + out.stderr[-2000:]


def test_the_cpu_op_is_built_once_whatever_is_on_path():
    """DeepSpeed loads its CPU op through torch, which runs the first `ninja` on PATH; ninja 1.11 (the
    system's) and 1.13 (this environment's) hash a build command differently, so alternating starts
    rebuilt the op each time (`./dml demo` then `./dml test`). Every entry point (dist_dml.infra.accelerator.configure)
    now puts this environment's first."""
    load = ("import dist_dml.infra.accelerator as a; a.configure('cpu'); "  # as every entry point does first
            "import dist_dml.train.engine; from deepspeed.accelerator import get_accelerator; "
            "from torch.utils.cpp_extension import _get_build_directory as where; "
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False); "
            "print(where('deepspeed_shm_comm', verbose=False))")
    first = subprocess.run([sys.executable, "-c", load], env=cpu_env(), check=True, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    built = Path(first.stdout.strip().splitlines()[-1]) / "deepspeed_shm_comm.so"
    before = built.stat().st_mtime_ns
    system_first = {**cpu_env(), "PATH": "/usr/bin:/bin"}  # a bare start: the system's ninja first, if any
    for env in (system_first, cpu_env()):
        proc = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert built.stat().st_mtime_ns == before


def test_each_loss_has_its_own_default_margin(tiny_shards):
    assert LossConfig().alpha == 0.2 and LossConfig(kind="triplet").alpha == 0.2
    assert LossConfig(kind="contrastive").alpha == 1.0 and LossConfig(kind="contrastive", alpha=0.5).alpha == 0.5
    cfg = load_config(CONFIG, [f"data.root={tiny_shards}", "loss.kind=contrastive"])
    assert cfg.loss.alpha == 1.0
    # Hand-worked: a negative at distance 0.5 still pushes with the default margin: (1 - 0.5)^2 = 0.25.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.875, 0.4841229]])  # |x0 - x2| = 0.5
    out = build_loss(LossConfig(kind="contrastive"))(x, torch.tensor([0, 0, 1]), torch.arange(3),
                                                     Triplets(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), 1, 0))
    assert float(out.loss) == pytest.approx(0.25, rel=1e-5)  # one active term: the negative's


def test_flip_off_gives_the_same_crops_unmirrored():
    from torchvision.io import encode_jpeg

    image = encode_jpeg(torch.randint(0, 255, (3, 40, 52), dtype=torch.uint8), quality=95).numpy().tobytes()
    on, off = DataConfig(image_size=24, resize=32), DataConfig(image_size=24, resize=32, flip=False)
    mirrored = 0
    for seed in range(16):
        a, b = train_image(image, on, random.Random(seed)), train_image(image, off, random.Random(seed))
        if not torch.equal(a, b):
            assert torch.equal(a, b.flip(-1))
            mirrored += 1
    assert 0 < mirrored < 16
