"""The GPU check: everything a CPU cannot run, in one command of a few minutes on one GPU (under 10).

    ./dml bench gpu                 # on a GPU node (the project's environment, CUDA torch)
    python benchmarks/bench_gpu.py --smoke    # the same code paths at toy sizes on the CPU (gloo, fp32)

One line per figure; exits 1 on any mismatch, 3 on a machine without CUDA (nothing run). Sections:

- nccl: a process group over NCCL at world 1 (an all_reduce checked), and at 2 ranks where 2 GPUs exist;
- train: ResNet-50 and a timm ViT-S/16, bf16 (DeepSpeed ZeRO-1), channels-last, a few hundred steps on
  synthetic tensors (images/s, peak GPU memory), then ResNet-50 fed by the real shard reader with 4, 8
  and 12 workers (images/s against the synthetic rate: is the step data-bound, and how many workers
  does it need);
- syncbn: model.norm=sync on CUDA (torch's SyncBatchNorm via timm's converter) against plain BatchNorm
  at world 1; 2 ranks against 1 process on the concatenated batch where 2 GPUs exist
  (tests/equivalence_worker.py on CUDA: loss, gradients, parameters, statistics);
- faiss: the sharded evaluation of 10,000 queries against 1,000,000 x 128 gallery embeddings with
  faiss-gpu against the same on the CPU (the metrics must agree), then with DBA + QE on the GPU (its time,
  MAP@R and R@1 before and after).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NO_CUDA = 3
FAILED: list[str] = []


def line(text: str) -> None:
    print(text, flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        FAILED.append(what)
        line(f"MISMATCH {what}")


def context(device: str):
    from dist_dml.infra.distributed import DistContext

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    ctx = DistContext.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                "MASTER_PORT": os.environ.get("MASTER_PORT", "0") or "0"}, device=device)
    ctx.init_process_group(timeout_minutes=10)
    return ctx


def nccl_section(ctx, gpus: int, smoke: bool) -> None:
    x = torch.ones(4, device=ctx.device) * 3
    got = ctx.all_reduce_sum(x)
    check(bool(torch.equal(got, x)), "all_reduce at world 1")
    line(f"nccl world=1 backend={ctx.backend} all_reduce=ok")
    if gpus >= 2 and not smoke:
        code = ("import torch, torch.distributed as d; d.init_process_group('nccl'); r = d.get_rank(); "
                "torch.cuda.set_device(r); x = torch.full((4,), float(r + 1), device='cuda'); d.all_reduce(x); "
                "assert float(x[0]) == 3.0, x; d.destroy_process_group()")
        proc = _torchrun_code(code)
        check(proc.returncode == 0, "all_reduce at 2 ranks")
        line(f"nccl world=2 all_reduce={'ok' if proc.returncode == 0 else 'FAILED'}")
    else:
        line(f"nccl world=2 skipped ({gpus} GPU{'s' if gpus != 1 else ''})")


def _torchrun_code(code: str):
    """``code`` as a script under torchrun with 2 processes."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "all_reduce.py"
        script.write_text(code)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                              capture_output=True, text=True, timeout=300)


def engine_for(backbone: str, ctx, precision: str, batch: int, image_size: int):
    from dist_dml.train.engine import TrainEngine
    from dist_dml.config.optimizer import DeepSpeedConfig, OptimizerConfig
    from dist_dml.method.losses import LossConfig, build_loss
    from dist_dml.models.embedding import ModelConfig, TrainModule, build_model
    from dist_dml.method.objective import GlobalBatchObjective
    from dist_dml.method.sampling import SamplerConfig, build_sampler

    model_cfg = ModelConfig(backbone=backbone, embedding_dim=128, norm="frozen")  # the paper configs' choice
    model = build_model(model_cfg, ctx.device, gather=ctx.all_gather_with_grad, image_size=image_size)
    module = TrainModule(model, build_loss(LossConfig(num_classes=100_000, beta_per_class=True)))
    engine = TrainEngine(module, ctx, OptimizerConfig(lr=1e-4), DeepSpeedConfig(zero_stage=1, precision=precision),
                         micro_batch=batch)
    return engine, GlobalBatchObjective(build_sampler(SamplerConfig()), engine.module.loss, ctx)


def timed_steps(engine, objective, batches, ctx, warmup: int) -> float:
    """images/s over the batches after ``warmup`` steps (the device synchronised at both ends)."""
    start, seen = None, 0
    for i, (images, labels, ids) in enumerate(batches):
        if i == warmup:
            _sync(ctx)
            start, seen = time.perf_counter(), 0
        out = objective(engine(images.to(ctx.device, non_blocking=True)), labels, ids, i)
        engine.backward(out.output.loss)
        engine.step()
        seen += len(labels)
    _sync(ctx)
    return seen / (time.perf_counter() - start)


def _sync(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(ctx) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if ctx.device.type == "cuda" else 0.0


def synthetic_batches(n: int, batch: int, size: int, classes: int = 32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(classes).repeat_interleave(batch // classes)
    for step in range(n):
        yield images, labels, (torch.arange(batch) + step * batch) % 100_000


def train_section(ctx, smoke: bool, data: Path | None) -> None:
    precision = "fp32" if smoke else "bf16"
    batch, size, steps, warmup = (8, 32, 6, 2) if smoke else (128, 224, 300, 30)
    rates = {}
    for backbone in (["tiny_cnn"] if smoke else ["resnet50", "timm:vit_small_patch16_224"]):
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine, objective = engine_for(backbone, ctx, precision, batch, size)
        rates[backbone] = timed_steps(engine, objective, synthetic_batches(steps, batch, size, batch // 4), ctx, warmup)
        line(f"train backbone={backbone} precision={precision} channels_last={engine.module.model.channels_last} "
             f"batch={batch} synthetic_images_s={rates[backbone]:.0f} peak_gpu_mb={_peak_mb(ctx):.0f}")
        if data is not None and backbone == ("tiny_cnn" if smoke else "resnet50"):
            reader_section(engine, objective, ctx, data, rates[backbone], batch, size, smoke)
        del engine, objective
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def reader_section(engine, objective, ctx, data: Path, synthetic: float, batch: int, size: int, smoke: bool) -> None:
    """The same engine fed by the real reader (decode, crop, P x K) with 4, 8 and 12 workers."""
    from dist_dml.data import DataConfig, TrainStream

    enough = None
    for workers in ([1] if smoke else [4, 8, 12]):
        cfg = DataConfig(root=str(data), classes_per_batch=batch // 4, images_per_class=4, workers=workers,
                         image_size=size, resize=int(size / 0.875), shuffle_buffer=200)
        stream = TrainStream(cfg, ctx.rank, ctx.world_size)
        steps = 4 if smoke else 80
        batches = ((b["images"], b["labels"], b["image_ids"]) for _, b in zip(range(steps), stream.loader(1 << 20)))
        rate = timed_steps(engine, objective, batches, ctx, warmup=1 if smoke else 10)
        ratio = rate / synthetic
        if enough is None and ratio >= 0.9:
            enough = workers
        line(f"reader workers={workers} images_s={rate:.0f} synthetic_images_s={synthetic:.0f} ratio={ratio:.2f} "
             f"data_bound={ratio < 0.9}")
    line(f"reader workers_needed={enough if enough is not None else 'more than tried'} (ratio >= 0.9 of synthetic)")


def syncbn_section(ctx, gpus: int, smoke: bool) -> None:
    from dist_dml.models.embedding import ModelConfig, build_model

    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone="tiny_cnn", embedding_dim=16)).to(ctx.device).train()
    synced = build_model(ModelConfig(backbone="tiny_cnn", embedding_dim=16, norm="sync"), ctx.device,
                         gather=ctx.all_gather_with_grad).to(ctx.device).train()
    synced.load_state_dict(plain.state_dict())
    kinds = sorted({type(m).__name__ for m in synced.modules() if "BatchNorm" in type(m).__name__})
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device=ctx.device)
    with torch.no_grad():
        diff = float((plain(x) - synced(x)).abs().max())
    check(diff < 1e-4, f"sync BatchNorm at world 1 differs from BatchNorm by {diff:.2e}")
    line(f"syncbn world=1 layers={','.join(kinds)} max_diff={diff:.2e}")
    if gpus < 2 or smoke:
        line(f"syncbn world=2 equivalence skipped ({gpus} GPU{'s' if gpus != 1 else ''})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for world in (1, 2):
            out = Path(tmp) / f"w{world}.pt"
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "-m",
                                   "tests.equivalence_worker", "--zero", "1", "--steps", "3", "--device", "cuda",
                                   "--backbone", "timm:test_resnet", "--out", str(out)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
            if proc.returncode:
                check(False, f"equivalence worker at {world} ranks failed: {proc.stderr[-500:]}")
                return
            results[world] = torch.load(out, weights_only=True)[1]
        one, two = results[1], results[2]
        loss = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["loss"], two["loss"]))
        grad = max(float((two["grads"][s][k] - v).abs().max() / max(float(v.abs().max()), 1e-12))
                   for s, grads in enumerate(one["grads"]) for k, v in grads.items())
        check(loss < 1e-4 and grad < 1e-3, f"2 ranks against 1: loss {loss:.1e}, gradients {grad:.1e}")
        line(f"equivalence ranks=2 vs 1 loss_rel_diff={loss:.1e} grad_rel_diff={grad:.1e}")


def faiss_section(ctx, smoke: bool) -> None:
    from dist_dml.retrieval.faiss_search import gpu_count
    from dist_dml.retrieval.sharded_metrics import Embedded, sharded_metrics

    n, queries, dim = (20_000, 500, 32) if smoke else (1_000_000, 10_000, 128)
    rng = np.random.default_rng(0)
    classes = n // 10
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), 10)
    gallery = centres[labels] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    q_labels = rng.integers(0, classes, queries)
    query = centres[q_labels] + 0.6 * rng.normal(size=(queries, dim)).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    as_tensors = lambda e, lab, first: Embedded(torch.from_numpy(e), torch.from_numpy(lab), torch.arange(first, first + len(e)))  # noqa: E731
    from dist_dml.retrieval.evaluation import EvalConfig

    args = dict(cfg=EvalConfig(recall_ks=(1, 10, 100), nmi=False), ctx=ctx)
    found = {}
    for where in (["cpu"] if gpu_count() == 0 else ["gpu", "cpu"]):
        start = time.perf_counter()
        found[where], _ = sharded_metrics(as_tensors(query, q_labels, 0), as_tensors(gallery, labels, 0),
                                          use_gpu=where == "gpu", **args)
        line(f"faiss {where} queries={queries} gallery={n} dim={dim} s={time.perf_counter() - start:.1f} "
             f"recall_at_1={found[where]['recall_at_1']:.4f} recall_at_100={found[where]['recall_at_100']:.4f}")
    where = "gpu" if "gpu" in found else "cpu"
    if where == "gpu" or smoke:  # DBA + QE: two more k-NN passes, DBA's over the whole gallery (N x N on the GPU)
        start = time.perf_counter()
        after, _ = sharded_metrics(as_tensors(query, q_labels, 0), as_tensors(gallery, labels, 0), use_gpu=where == "gpu",
                                   cfg=EvalConfig(recall_ks=(1, 10, 100), nmi=False, postprocess="dba+qe"), ctx=ctx)
        pp = after["postprocessed"]
        line(f"faiss {where} postprocess=dba+qe s={time.perf_counter() - start:.1f} map_at_r={after['map_at_r']:.4f}"
             f"->{pp['map_at_r']:.4f} recall_at_1={after['recall_at_1']:.4f}->{pp['recall_at_1']:.4f}")
    if "gpu" not in found:
        line("faiss gpu skipped: faiss has no GPU here (install faiss-gpu: pip install -e '.[gpu]')")
        return
    worst = max(abs(found["gpu"][k] - found["cpu"][k]) for k in found["cpu"])
    # Exact search on both; only near-ties (float summation order) may swap, each moving a recall by 1/queries.
    check(worst <= 5 / queries, f"faiss-gpu metrics differ from the CPU's by {worst:.4f}")
    line(f"faiss gpu_vs_cpu max_metric_diff={worst:.5f}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the code paths, not the figures")
    parser.add_argument("--no-reader", action="store_true", help="skip the shard reader's part")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        line("[bench_gpu] no CUDA device here (torch.cuda.is_available() is false): this check needs a GPU node; "
             "nothing was run (--smoke runs its code paths on the CPU)")
        return NO_CUDA
    device = "cpu" if args.smoke else "cuda"
    from dist_dml.infra.accelerator import configure

    configure(device)
    gpus = torch.cuda.device_count() if not args.smoke else 0
    started = time.time()
    line(f"[bench_gpu] {'smoke test on the CPU' if args.smoke else torch.cuda.get_device_name(0)}, {gpus} GPU(s), "
         f"torch {torch.__version__}: nccl, training, reader, syncbn, faiss (a few minutes)")
    ctx = context(device)
    nccl_section(ctx, gpus, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        data = None
        if not args.no_reader:
            from data_prep.cli import main as prep

            data = Path(tmp) / "data"
            classes, size = ("60", "48") if args.smoke else ("2000", "256")
            prep(["synthetic", "--classes", classes, "--test-classes", "4", "--per-class", "4:6", "--size", size,
                  "--min-shards", "16", "--out", str(data), "--no-progress"])
        train_section(ctx, args.smoke, data)
    syncbn_section(ctx, gpus, args.smoke)
    faiss_section(ctx, args.smoke)
    ctx.shutdown()
    line(f"[bench_gpu] {'OK' if not FAILED else f'{len(FAILED)} MISMATCH(ES)'} in {time.time() - started:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
