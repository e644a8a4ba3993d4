"""Evaluation: every rank embeds its share of a split and keeps it; the retrieval metrics come from the
sharded search (dist_dml.retrieval.sharded_metrics: one process is the case of one rank).

Metrics (query -> gallery, or each item against all others of one split):
- Recall@K: a relevant item among the K nearest.
- R-Precision and MAP@R (Musgrave et al., 2020), R being the number of relevant gallery items.
- NMI of faiss k-means (as many clusters as classes) against the labels, scored by scikit-learn.
The query itself is excluded by index, not by distance; ties go to the lower gallery index. Queries
with no relevant gallery item (a singleton class) cannot be answered and are left out of every
retrieval metric; their number is reported as `unanswerable`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dist_dml.data import FAULTS
from dist_dml.infra.distributed import DistContext
from dist_dml.infra.errors import UserError
from dist_dml.retrieval.postprocess import Postprocess
from dist_dml.retrieval.sharded_metrics import Embedded

@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation measures and how: the split(s), the metrics, exact or IVF search, the plots, the
    retrieval post-processing, and how much of a split may go unread."""

    every_steps: int = 0  # 0: only at the end (eval.every gives it in epochs or a share of the run)
    every: str = ""  # the interval as a span: "500" steps, "2 epochs" or "10%" of the run; "": every_steps
    at_start: bool = False  # also evaluate the untrained model
    split: str = "test"  # or "query,gallery" (In-Shop): query against gallery
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)  # the K of the Recall@K reported
    batch_size: int = 128  # images per rank embedded at once
    nmi: bool = True  # faiss k-means with as many clusters as classes
    plots: bool = True  # the final evaluation of a training draws Recall@K, nearest neighbours and the negatives
    example_queries: int = 6  # queries whose nearest neighbours are drawn (nearest_neighbours.png; 0: none)
    example_k: int = 5  # neighbours drawn per query
    max_missing_share: float = 0.0  # images of the split that may go unread (corrupt) before eval fails
    max_unanswerable_share: float = 0.1  # queries with no other item of their class, above which eval fails
    query_chunk: int = 4096  # queries searched against every rank's gallery shard at a time
    nmi_max_classes: int = 10000  # above this many classes, NMI runs on a seeded sample of this many
    index: str = "exact"  # exact, or ivf: approximate (faiss IVF per rank's shard), its recall reported
    ivf_nlist: int = 0  # IVF lists per shard (0: 4 sqrt(shard size))
    ivf_nprobe: int = 64  # lists searched per query (about sqrt of the lists of a million-item shard)
    ivf_check_queries: int = 1000  # queries searched exactly too, for ivf_recall_at_K
    ivf_target_recall: float = 0.9  # ivf_nprobe doubles until ivf_recall_at_K reaches this (0: keep ivf_nprobe)
    # Retrieval post-processing, measured beside the plain metrics (results' "postprocessed"; MLflow pp_*): none, or
    # some of dba (database-side augmentation), qe (alpha query expansion), k_reciprocal (re-ranking) joined by '+'
    postprocess: str = "none"
    qe_k: int = Postprocess.qe_k  # gallery neighbours averaged into each query (0: none)
    qe_alpha: float = Postprocess.qe_alpha  # their weight: max(similarity, 0) ** qe_alpha (0: plain average)
    dba_k: int = Postprocess.dba_k  # gallery neighbours averaged into each gallery item (0: none)
    dba_alpha: float = Postprocess.dba_alpha  # their weight, as qe_alpha
    kr_k1: int = Postprocess.kr_k1  # k-reciprocal re-ranking (Zhong et al. 2017): the k-reciprocal neighbourhood
    kr_k2: int = Postprocess.kr_k2  # its local query expansion
    kr_lambda: float = Postprocess.kr_lambda  # the weight of the original distance beside the Jaccard distance
    kr_shortlist: int = Postprocess.kr_shortlist  # each query's nearest gallery items that are re-ranked

    def validate(self) -> None:
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError("eval.recall_ks must be a non-empty list of positive integers")
        if not 0 <= self.max_missing_share <= 1 or not 0 <= self.max_unanswerable_share <= 1:
            raise ValueError(f"eval.max_missing_share and eval.max_unanswerable_share must be in [0, 1], got "
                             f"{self.max_missing_share} and {self.max_unanswerable_share}")
        if self.index not in ("exact", "ivf"):
            raise ValueError(f"eval.index must be exact or ivf, got {self.index!r}")
        if self.ivf_nlist < 0 or self.ivf_nprobe < 1 or self.ivf_check_queries < 1:
            raise ValueError("eval.ivf_nlist must be >= 0 (0: 4 sqrt(N)), eval.ivf_nprobe and eval.ivf_check_queries >= 1")
        if not 0 <= self.ivf_target_recall <= 1:
            raise ValueError(f"eval.ivf_target_recall must be in [0, 1] (0: no target), got {self.ivf_target_recall}")
        if self.query_chunk < 1 or self.nmi_max_classes < 2:
            raise ValueError(f"eval.query_chunk must be >= 1 and eval.nmi_max_classes >= 2, got {self.query_chunk} "
                             f"and {self.nmi_max_classes}")
        if self.batch_size < 1 or self.every_steps < 0 or self.example_queries < 0 or self.example_k < 1:
            raise ValueError("eval.batch_size and eval.example_k must be >= 1, eval.every_steps and eval.example_queries "
                             ">= 0")
        Postprocess.settings(self).check()
        from dist_dml.infra.spans import parse_span

        parse_span(self.every, "eval.every")
        if self.every and self.every_steps:
            raise ValueError(f"eval.every={self.every!r} and eval.every_steps={self.every_steps}: give one of them")
        if len(self.split.split(",")) not in (1, 2):
            raise ValueError(f"eval.split must be a split or 'query,gallery', got {self.split!r}")


# What an evaluation could not use: the reader's faults, and images whose embedding is not finite (left out).
FAULT_KEYS = (*FAULTS, "nonfinite_embeddings")


class EvaluationIncomplete(UserError):
    """More images of an evaluation split went missing than eval.max_missing_share allows."""

    on_every_rank = True


def format_metrics(metrics: dict[str, float]) -> str:
    """One line: R@K and scores to 4 decimals, counts as integers; then the post-processed metrics (what
    eval.postprocess gave), if any."""
    shown = []
    for key, value in metrics.items():
        if isinstance(value, (dict, str)):
            continue
        if key.startswith(("images_", "unanswerable", "queries")) or key in FAULT_KEYS:
            if key not in ("unanswerable", "queries") and (value or key.startswith("images_")):
                shown.append(f"{key}={int(value)}")
        else:
            shown.append(f"{key.replace('recall_at_', 'R@')}={value:.4f}")
    after = metrics.get("postprocessed")
    if isinstance(after, dict):
        shown.append(f"| after {after.get('postprocess', 'post-processing')}: {format_metrics(after)}")
    return " ".join(shown)


def evaluation_problem(metrics: dict[str, float], eval_cfg) -> str | None:
    """Why an evaluation's metrics do not measure what they should (None if they do): more images went
    unread than eval.max_missing_share allows, or more queries have no other item of their class in the
    gallery (unanswerable, left out of every metric) than eval.max_unanswerable_share."""
    expected, evaluated = metrics.get("images_expected", 0), metrics.get("images_evaluated", 0)
    missing = expected - evaluated
    if expected and missing / expected > eval_cfg.max_missing_share:
        faults = ", ".join(f"{k}={int(metrics[k])}" for k in FAULT_KEYS if metrics.get(k))
        return (f"evaluated {int(evaluated)} of the {int(expected)} images the manifest lists ({missing / expected:.1%} "
                f"missing{': ' + faults if faults else ''}), above eval.max_missing_share={eval_cfg.max_missing_share}; "
                "the metrics above cover only the images read (see the reader's warnings for which shards)")
    queries, unanswerable = metrics.get("queries", 0), metrics.get("unanswerable", 0)
    if queries and unanswerable / queries > eval_cfg.max_unanswerable_share:
        return (f"{int(unanswerable)} of its {int(queries)} queries ({unanswerable / queries:.1%}) have no other item of "
                f"their class in the gallery and cannot be answered, above eval.max_unanswerable_share="
                f"{eval_cfg.max_unanswerable_share}: the metrics above cover only the others (an evaluation split "
                "needs 2 or more images per class; the written results say the same)")
    return None


@torch.no_grad()
def embed_local(model: nn.Module, stream, ctx: DistContext, progress: bool = False, names: bool = False) -> Embedded:
    """This rank's share of ``stream`` (an EvalStream), on ctx.device. The progress bar (rank 0) counts
    rank 0's own images against its share from the manifest."""
    was_training = model.training
    model.eval()
    parts, labels, ids = [], [], []
    classes, items = ([], []) if names else (None, None)
    where = f" (rank 0 of {ctx.world_size})" if ctx.world_size > 1 else ""
    bar = tqdm(total=stream.local_images, unit="img", desc=f"[eval] embed {stream.split}{where}",
               disable=not (progress and ctx.is_main), mininterval=2)
    faults = dict.fromkeys(FAULT_KEYS, 0)
    nonfinite: list[str] = []
    for batch in stream.loader():
        for key, value in (batch.errors or {}).items():
            faults[key] += value
        if not len(batch.image_ids):
            continue
        out = model(batch.images.to(ctx.device)).float()
        finite = torch.isfinite(out).all(dim=1)
        bar.update(len(batch.image_ids))
        if not bool(finite.all()):  # an item that could never be found again: left out, counted, named
            bad = torch.nonzero(~finite).flatten().tolist()
            faults["nonfinite_embeddings"] += len(bad)
            nonfinite += [f"{batch.items[i]} (id {int(batch.image_ids[i])})" for i in bad[:10 - len(nonfinite)]]
            keep = finite.cpu()
            out, batch = out[finite], batch._replace(labels=batch.labels[keep], image_ids=batch.image_ids[keep],
                                                     classes=[c for c, k in zip(batch.classes, keep) if k],
                                                     items=[c for c, k in zip(batch.items, keep) if k])
        parts.append(out)
        labels.append(batch.labels.to(ctx.device))
        ids.append(batch.image_ids.to(ctx.device))
        if names:
            classes += batch.classes
            items += batch.items
    bar.close()
    model.train(was_training)
    dim = model.head.out_features
    return Embedded(torch.cat(parts) if parts else torch.empty(0, dim, device=ctx.device),
                    torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=ctx.device),
                    torch.cat(ids) if ids else torch.empty(0, dtype=torch.long, device=ctx.device), classes, items,
                    faults, nonfinite)


def evaluate(model: nn.Module, data_cfg, eval_cfg, ctx: DistContext, progress: bool = False,
             plots_dir=None, title: str = "", verdicts=None) -> tuple[dict[str, float], list]:
    """Every rank embeds its share of the evaluation split(s) and keeps it; the metrics come from the
    sharded search (dist_dml.retrieval.sharded_metrics): no rank holds the whole split. Every rank gets the metrics, with
    the coverage (images_evaluated of images_expected, and the faults met).

    ``eval_cfg.split`` is one split (each item against the others) or "query,gallery". With
    ``plots_dir``, rank 0 also draws Recall@K against K and the nearest neighbours of a few queries; returns their paths.
    ``verdicts``: the job's sha256 verdicts (data.verify_sha256), so a shard is verified once per job.
    """
    from dist_dml.data import EvalStream, verify
    from dist_dml.retrieval.sharded_metrics import sharded_metrics

    splits = eval_cfg.split.split(",")
    streams = [EvalStream(data_cfg, s, ctx.rank, ctx.world_size, eval_cfg.batch_size, verdicts=verdicts)
               for s in splits]
    for split, stream in zip(splits, streams):
        verify(stream, ctx, repr(split))
    parts = [embed_local(model, stream, ctx, progress) for stream in streams]
    coverage = _coverage(parts, streams, ctx)
    if coverage["nonfinite_embeddings"]:
        report_nonfinite(parts, ctx, int(coverage["nonfinite_embeddings"]), "left out of the evaluation")
    examples = []
    if plots_dir is not None and eval_cfg.example_queries:
        examples = np.random.default_rng(0).permutation(streams[0].num_images)[:eval_cfg.example_queries * 4].tolist()
    query, gallery = parts[0], parts[1] if len(parts) == 2 else None
    metrics, kept = sharded_metrics(query, gallery, eval_cfg, ctx, use_gpu=ctx.device.type == "cuda", keep_ids=examples)
    metrics = {**metrics, **coverage}
    paths = []
    if ctx.is_main and plots_dir is not None:
        chosen = [q for q in examples if q in kept][:eval_cfg.example_queries]
        paths = _plots(metrics, eval_cfg, data_cfg, splits, chosen, kept, plots_dir, title, streams[0].verdicts)
    return metrics, paths


def report_nonfinite(parts: list[Embedded], ctx: DistContext, count: int, what: str) -> str:
    """The line that names items whose embedding is not finite (every rank's first few), printed by rank 0
    and returned. Call on every rank (a gather)."""
    named = [name for part in ctx.all_gather_object([n for p in parts for n in p.nonfinite]) for name in part]
    line = (f"{count} embeddings are not finite (NaN or inf), {what}: {', '.join(named[:10])}"
            f"{' and more' if count > len(named[:10]) else ''}; the model gives no usable embedding for them")
    if ctx.is_main:
        print(f"[eval] warning: {line}", file=sys.stderr, flush=True)
    return line


def _coverage(parts: list[Embedded], streams, ctx: DistContext) -> dict[str, float]:
    """images_evaluated / images_expected over the splits, and the faults met, summed over ranks."""
    local = [sum(len(p.image_ids) for p in parts), sum(s.num_images for s in streams) if ctx.is_main else 0]
    local += [sum(p.faults[k] for p in parts) for k in FAULT_KEYS]
    total = ctx.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=ctx.device)).cpu().tolist()
    return {"images_evaluated": total[0], "images_expected": total[1], **dict(zip(FAULT_KEYS, total[2:]))}


def _plots(metrics: dict, eval_cfg, data_cfg, splits, chosen: list[int], kept: dict, plots_dir, title: str,
           verdicts) -> list:
    """Recall@K against K, and the ``chosen`` queries' nearest gallery images (``kept``: their
    merged neighbours' gallery image ids and relevance)."""
    from pathlib import Path

    from dist_dml.retrieval import plots
    from dist_dml.data import images_by_id

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    queries = int(metrics.get("images_evaluated", 0)) if len(splits) == 1 else None
    what = f"Recall@K on {' -> '.join(splits)}" + (f" ({queries:,} queries)" if queries else "")
    paths = [plots.recall_curve(metrics, eval_cfg.recall_ks, plots_dir / "recall_at_k.png",
                                f"{what}{', ' + title if title else ''}")]
    if chosen:
        lists = [kept[q][0][:eval_cfg.example_k] for q in chosen]
        g_ids = np.array(sorted({n for ids in lists for n in ids if n >= 0}), dtype=np.int64)
        where = {int(n): i for i, n in enumerate(g_ids)}
        neighbours = np.array([[where.get(n, -1) for n in ids] for ids in lists], dtype=np.int64)
        relevant = np.array([kept[q][1][:eval_cfg.example_k] for q in chosen], dtype=bool)
        q_images = images_by_id(data_cfg, splits[0], chosen, verdicts)
        g_images = q_images if len(splits) == 1 else {}
        g_images = {**g_images, **images_by_id(data_cfg, splits[-1], [int(n) for n in g_ids], verdicts)}
        paths.append(plots.nearest_neighbours(list(range(len(chosen))), neighbours, relevant, np.array(chosen), g_ids,
                                              q_images, g_images, plots_dir / "nearest_neighbours.png"))
    return paths
