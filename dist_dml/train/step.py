"""One training step on a live engine: the local batch's embeddings, the global batch's loss, backward and
the optimizer step. With ``train.embedding_chunks`` N > 1, a global batch larger than memory (gradient
caching, Gao et al. 2021, here for a sampled triplet loss under DeepSpeed):

1. the local batch is embedded in N chunks without autograd (the RNG state before each chunk kept);
2. the gathered global batch is sampled and the loss and its gradient with respect to this rank's
   embeddings (and to the loss's own parameters, beta, and the class centres outside the engine) are computed
   once;
3. each chunk is embedded again with autograd (its RNG state replayed, so dropout draws alike) and
   back-propagated with its slice of that gradient; DeepSpeed accumulates the N backward passes
   (gradient_accumulation_steps N) and steps the optimizer once.

The gradients are those of N = 1 wherever an image's embedding does not depend on the rest of its chunk:
BatchNorm computing statistics of its batch (model.norm sync or local) does, and the config check refuses
it (frozen BatchNorm and LayerNorm models are exact). Peak activation memory is that of one chunk.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dist_dml.method.objective import GlobalBatchObjective, StepResult


def take_step(engine, objective: GlobalBatchObjective, images: Tensor, labels: Tensor, image_ids: Tensor, step: int,
              chunks: int = 1, before_step: Callable[[], None] | None = None) -> tuple[StepResult, bool]:
    """(the step's result, whether it was taken). A step whose loss is not finite on some rank is skipped on
    every rank (no backward, no optimizer step; the learning-rate schedule still moves on). ``before_step`` runs between the last backward and the
    optimizer step (for tests that read the reduced gradients)."""
    device = engine.ctx.device
    if chunks == 1:
        result = objective(engine(images.to(device, non_blocking=True)), labels, image_ids, step)
        if not finite_everywhere(result, engine.ctx):
            engine.skip_step()
            return result, False
        engine.backward(result.output.loss)
        if before_step is not None:
            before_step()
        engine.step()
        return result, True
    parts = images.chunk(chunks)
    states, embedded = [], []
    with torch.no_grad():
        for part in parts:
            states.append(_rng_state(device))
            embedded.append(engine(part.to(device, non_blocking=True)).float())
    local = torch.cat(embedded).requires_grad_()
    result = objective(local, labels, image_ids, step)
    if not finite_everywhere(result, engine.ctx):
        engine.skip_step()
        return result, False
    betas = [p for p in engine.module.loss.parameters() if p.requires_grad]
    # Parameters outside the engine (class centres): their gradient as the engine's backward leaves it, times W.
    outside = list(objective.centres.parameters()) if objective.centres is not None else []
    grads = torch.autograd.grad(result.output.loss, [local, *betas, *outside], allow_unused=True)
    local_grad, beta_grads = grads[0], grads[1:1 + len(betas)]
    for p, g in zip(outside, grads[1 + len(betas):]):
        if g is not None:
            p.grad = g * engine.ctx.world_size if p.grad is None else p.grad + g * engine.ctx.world_size
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    for c, part in enumerate(parts):
        _set_rng_state(states[c], device)
        again = engine(part.to(device, non_blocking=True)).float()
        # A surrogate whose gradient is the loss's: its slice of dL/de through this chunk, and dL/dbeta once.
        surrogate = (again * local_grad[offsets[c]:offsets[c + 1]]).sum()
        for p, g in zip(betas, beta_grads):
            surrogate = surrogate + ((p.float() * g.float()).sum() if c == 0 and g is not None else 0.0 * p.float().sum())
        engine.backward(surrogate, accumulate=True)
        if c == chunks - 1 and before_step is not None:
            before_step()
        engine.step()
    return result, True


def finite_everywhere(result: StepResult, ctx) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(result.output.loss.detach()) else 1.0], device=ctx.device)
    return float(ctx.all_reduce(bad, "max")) == 0.0


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
