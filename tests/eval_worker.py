"""torchrun -m tests.eval_worker SHARDS OUT: each rank embeds its share of the test split; rank 0 saves."""
import sys

import torch

from dist_dml.cli import leave
from dist_dml.data import DataConfig, EvalStream
from dist_dml.infra.distributed import DistContext
from dist_dml.retrieval.evaluation import embed_local
from dist_dml.models.embedding import ModelConfig, build_model


def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="tiny_cnn", embedding_dim=16))


def config(root):
    return DataConfig(root=root, workers=1, image_size=28, resize=32)


def embed_split(model, stream, ctx):
    """Every rank embeds its share of ``stream``; all ranks get the whole split ordered by image id:
    (embeddings, labels, image ids) on the CPU (the evaluation itself keeps each rank's share)."""
    local = embed_local(model, stream, ctx)
    emb, lab, idx = (ctx.all_gather_uneven(t) for t in (local.embeddings, local.labels, local.image_ids))
    order = torch.argsort(idx)
    return emb[order].cpu(), lab[order].cpu(), idx[order].cpu()


def embed_alone(root) -> dict:
    emb, labels, ids = embed_split(model(), EvalStream(config(root), "test", batch_size=7), DistContext())
    return {"embeddings": emb, "labels": labels, "ids": ids}


def main() -> None:
    ctx = DistContext.from_env(device="cpu")
    ctx.init_process_group()
    stream = EvalStream(config(sys.argv[1]), "test", ctx.rank, ctx.world_size, batch_size=7)
    emb, labels, ids = embed_split(model(), stream, ctx)
    if ctx.is_main:
        torch.save({"embeddings": emb, "labels": labels, "ids": ids}, sys.argv[2])
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    main()
    leave(0)  # without the interpreter's teardown, which can abort a finished rank (see dist_dml.cli.leave)
