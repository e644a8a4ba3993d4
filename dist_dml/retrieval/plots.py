"""Plots for MLflow: sampled-negative distances against q(d), Recall@K against K, a few queries' nearest neighbours,
R@1 per cell of `dist-dml grid`."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def negative_distances(histogram: np.ndarray, dim: int, cutoff: float, nonzero_cutoff: float, path: Path,
                       steps: tuple[int, int] | None = None) -> Path:
    """The paper's figure: the histogram of sampled-negative distances over [0, 2] (over ``steps``, first
    and last), the density q(d) of distances between uniform points on the sphere in R^dim, and the
    uniform density on [cutoff, nonzero cutoff] that distance-weighted sampling aims at."""
    plt = _pyplot()
    bins = len(histogram)
    width = 2.0 / bins
    centres = np.arange(bins) * width + width / 2
    density = histogram / (histogram.sum() * width)
    log_q = (dim - 2) * np.log(centres) + (dim - 3) / 2 * np.log(np.clip(1 - centres ** 2 / 4, 1e-12, None))
    q = np.exp(log_q - log_q.max())
    q /= q.sum() * width
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(centres, density, width=width, alpha=0.6, label="sampled negatives")
    ax.plot(centres, q, label=f"q(d): uniform points on the sphere, n={dim}")
    ax.hlines(1 / (nonzero_cutoff - cutoff), cutoff, nonzero_cutoff, colors="k", linestyles="dashed",
              label="uniform on [cutoff, nonzero-loss cutoff]")
    ax.set_xlabel("distance")
    ax.set_ylabel("density")
    span = f", steps {steps[0]}-{steps[1]}" if steps else ""
    ax.set_title(f"Sampled negative distances ({int(histogram.sum()):,} draws{span})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def recall_curve(metrics: dict[str, float], ks, path: Path, title: str = "Recall@K") -> Path:
    """Recall@K against K on a log axis: one labelled tick per K, no minor tick labels."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(5, 3.5))
    after = metrics.get("postprocessed") or {}
    curves = [("embeddings", metrics, -12 if after else 6)]
    if after:
        curves.append((f"after {after.get('postprocess', 'post-processing')}", after, 6))
    for label, values, offset in curves:
        ax.plot(list(ks), [values[f"recall_at_{k}"] for k in ks], marker="o", label=label)
        for k in ks:
            ax.annotate(f"{values[f'recall_at_{k}']:.3f}", (k, values[f"recall_at_{k}"]), textcoords="offset points",
                        xytext=(0, offset), ha="center", fontsize=7)
    if after:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def nearest_neighbours(queries: list[int], neighbours: np.ndarray, relevant: np.ndarray, query_ids: np.ndarray,
                   gallery_ids: np.ndarray, query_images: dict, gallery_images: dict, path: Path) -> Path:
    """One row per query: the query, then its nearest gallery images framed green (right) or red (wrong).

    ``*_ids`` map row positions to image ids; ``*_images`` map image ids to uint8 CHW tensors."""
    plt = _pyplot()
    cols = neighbours.shape[1] + 1
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.4 * cols, 1.5 * len(queries)), squeeze=False)
    for row, q in enumerate(queries):
        cells = [(query_images.get(int(query_ids[q])), "query", "black")]
        cells += [(gallery_images.get(int(gallery_ids[n])), f"#{i + 1}", "green" if relevant[q, i] else "red")
                  for i, n in enumerate(neighbours[q]) if n >= 0]
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(cells):
                ax.axis("off")
                continue
            image, title, colour = cells[col]
            if image is not None:
                ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_title(title, fontsize=7, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if col else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def grid_recall(rows: list[dict], path: Path) -> Path:
    """dist-dml grid: R@1 per cell (mean over its seeds, the standard deviation as an error bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 4))
    names = [r["cell"] for r in rows]
    ax.bar(range(len(rows)), [r["recall_at_1"] for r in rows], yerr=[r["recall_at_1_std"] for r in rows], capsize=4,
           alpha=0.8)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['recall_at_1']:.3f}", (i, r["recall_at_1"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("R@1 (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title("Recall@1 per cell of the grid", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
