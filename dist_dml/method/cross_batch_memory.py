"""A cross-batch memory (Wang et al., CVPR 2020, reimplemented from the paper): a FIFO of the last ``size``
embeddings of global batches, with their labels, image ids and the step they were made at, from which the
samplers draw negatives (and, with ``memory.positives``, positives) besides the current global batch.

Exact across ranks by construction: it is filled after each step from the all-gathered global batch, in
rank order and detached, so every rank holds the same memory and a W-rank run samples as the 1-process
run does. Only the current batch's embeddings receive gradient. Its contents are part of the checkpoint
and do not depend on the world size. Torch only (no process group): it is handed the gathered batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dist_dml.infra.dtypes import DTYPES

MODES = ("shared", "add")


@dataclass(frozen=True)
class MemoryConfig:
    """The cross-batch memory: a queue of the last global batches' embeddings that the sampler draws from
    besides the batch (off at size 0)."""

    size: int = 0  # embeddings kept (0: no memory); e.g. 65536
    start_step: int = 0  # steps before the memory is sampled from (early embeddings drift too fast to help)
    positives: bool = False  # also draw positives from the memory (else only negatives)
    dtype: str = "fp32"  # how the memory stores embeddings: fp32, bf16 or fp16 (distances are computed in fp32)
    # shared: each pair's one negative is drawn from batch + memory (a large memory gives nearly all of them);
    # add: each pair keeps its negative from the batch and gets one more from batch + memory
    mode: str = "shared"
    beta: bool = True  # the memory's pairs move the margin loss's beta (false: they see it, only the batch's move it)

    def validate(self) -> None:
        if self.size < 0 or self.start_step < 0:
            raise ValueError(f"memory.size and memory.start_step must be >= 0, got {self.size} and {self.start_step}")
        if self.mode not in MODES:
            raise ValueError(f"memory.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"memory.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.size > 0


class CrossBatchMemory:
    """The FIFO: row ``i`` of the buffers holds the ``i``-th slot; ``fill`` slots are used, the next write
    goes to ``head``. A stateful part of a run (state_dict / load_state_dict)."""

    def __init__(self, config: MemoryConfig, dim: int, device: torch.device | str = "cpu"):
        config.validate()
        self.config, self.dim = config, dim
        size = config.size
        self.embeddings = torch.zeros((size, dim), dtype=DTYPES[config.dtype], device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.image_ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.steps = torch.full((size,), -1, dtype=torch.long, device=device)  # the step each item was made at
        self.fill, self.head = 0, 0

    def active(self, step: int) -> bool:
        """Whether the samplers draw from the memory at ``step``."""
        return self.config.enabled and self.fill > 0 and step >= self.config.start_step

    def contents(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(embeddings as float32, labels, image ids, steps) of the items held, in slot order (the ring's own:
        no copy to reorder it; the order is the same on every rank, which is all the samplers need)."""
        n = self.fill
        return self.embeddings[:n].float(), self.labels[:n], self.image_ids[:n], self.steps[:n]

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor, image_ids: Tensor, step: int) -> None:
        """Add a global batch (in rank order: the same on every rank), detached; the oldest items make room.
        A batch larger than the memory keeps its last ``size`` items."""
        size = self.config.size
        if size == 0:
            return
        embeddings, labels, image_ids = embeddings.detach()[-size:], labels[-size:], image_ids[-size:]
        n = embeddings.shape[0]
        slots = (self.head + torch.arange(n, device=self.labels.device)) % size
        self.embeddings[slots] = embeddings.to(self.embeddings.dtype)
        self.labels[slots] = labels.to(self.labels.device)
        self.image_ids[slots] = image_ids.to(self.labels.device)
        self.steps[slots] = step
        self.head = (self.head + n) % size
        self.fill = min(size, self.fill + n)

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu().clone(), "labels": self.labels.cpu().clone(),
                "image_ids": self.image_ids.cpu().clone(), "steps": self.steps.cpu().clone(), "fill": self.fill,
                "head": self.head, "size": self.config.size, "dim": self.dim}

    def load_state_dict(self, state: dict) -> None:
        if (int(state["size"]), int(state["dim"])) != (self.config.size, self.dim):
            raise ValueError(f"the saved memory holds {state['size']} x {state['dim']} embeddings, this run's "
                             f"{self.config.size} x {self.dim} (memory.size or model.embedding_dim changed)")
        device = self.labels.device
        self.embeddings.copy_(state["embeddings"].to(device=device, dtype=self.embeddings.dtype))
        for name in ("labels", "image_ids", "steps"):
            getattr(self, name).copy_(state[name].to(device))
        self.fill, self.head = int(state["fill"]), int(state["head"])
