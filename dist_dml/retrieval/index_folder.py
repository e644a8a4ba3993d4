"""An index folder (`dist-dml index`, `dist-dml search`): a faiss index over exported embeddings with each item's
id, label, class and source beside it, the model that made them, and the post-processing it carries (DBA on the
indexed vectors, QE on every query).

One writer, many readers (infra.published): a build writes a new version folder beside the current one and makes
it current in one rename of ``meta.json``; a search opens every file of the version ``meta.json`` names before it
reads any, so it answers from the old index with its own columns or the new one, never a mix, whatever is
published meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_dml.infra.errors import UserError, one_line
from dist_dml.infra.published import new_version, open_published, publish
from dist_dml.retrieval.embeddings import Exported
from dist_dml.retrieval.postprocess import INDEX_PARAMETERS, Postprocess

META = "meta.json"
COLUMNS = ("ids", "labels", "classes", "items")  # beside the index, one row per indexed vector
REBUILD = "build the index again with dist-dml index"


def index_postprocess(steps: str, parameters: dict) -> Postprocess | None:
    """The post-processing an index is built to carry (`--postprocess` with its --dba-* / --qe-* values), checked
    as eval.postprocess is but naming the flags; None for none. k-reciprocal re-ranking needs the query among the
    gallery's neighbour lists, which evaluation has and a served index does not."""
    try:
        pp = Postprocess.build(steps, parameters)
    except ValueError as exc:
        message = str(exc)
        for key in ("postprocess", *INDEX_PARAMETERS):
            message = message.replace(f"eval.{key}", f"--{key.replace('_', '-')}")
        raise UserError(message) from None
    if pp is not None and "k_reciprocal" in pp:
        raise UserError("--postprocess k_reciprocal: re-ranking is measured by evaluation (eval.postprocess); an "
                        "index carries dba and qe")
    return pp


def recorded_postprocess(meta: dict, folder: Path) -> Postprocess | None:
    """The post-processing an index's meta.json records (None: none), checked as --postprocess is: the parameters
    of each step it names must be there, and a step an index never carries (k-reciprocal) is refused."""
    recorded = meta.get("postprocess")
    if recorded is None:
        return None
    try:
        steps = "+".join(recorded["steps"]) or "none"
        needed = [key for key in INDEX_PARAMETERS if key.split("_")[0] in recorded["steps"]]
        pp = Postprocess.build(steps, {key: recorded[key] for key in needed})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{folder / META}: damaged (its postprocess: {one_line(exc, 200)}); {REBUILD}") from None
    if pp is not None and "k_reciprocal" in pp:
        raise UserError(f"{folder / META}: damaged (its postprocess names k_reciprocal, which an index never "
                        f"carries: a search would not re-rank); {REBUILD}")
    return pp


def build_index_folder(exported: Exported, out: Path, kind: str, nlist: int, m: int, pp: Postprocess | None,
                       model: dict) -> dict:
    """Index ``exported`` into the folder ``out`` (published whole: see the module's docstring), with DBA applied
    to the indexed vectors where ``pp`` names it; ``model``: the checkpoint and fingerprint that made the
    embeddings. Returns the meta.json written."""
    from dist_dml.retrieval.faiss_search import build_index, save_index

    vectors = exported.embeddings
    if pp is not None and "dba" in pp and pp.dba_k:
        from dist_dml.retrieval.sharded_metrics import database_augmented

        print(f"[index] database-side augmentation of {len(vectors):,} vectors ({pp.describe().split(', ')[0]}): an "
              "exact k-NN search of the whole export, about as long as one search of every item against it "
              "(seconds for 10^4 vectors, minutes for 10^5, hours for 10^6)", flush=True)
        vectors = database_augmented(vectors, exported.ids, pp.dba_k, pp.dba_alpha)
    try:
        index = build_index(vectors, kind, nlist=nlist, m=m)
    except RuntimeError as exc:  # faiss: e.g. too few vectors to train an ivfpq index of these lists
        raise UserError(f"--type {kind} over {len(exported.ids)} embeddings: {one_line(exc, 200)}") from None
    version = new_version(out)
    save_index(index, version / "index.faiss")
    for name in COLUMNS:
        np.save(version / f"{name}.npy", getattr(exported, name))
    meta = {"type": kind, "count": int(len(exported.ids)), "dim": int(exported.embeddings.shape[1]),
            "checkpoint": model.get("checkpoint"), "fingerprint": model.get("fingerprint"),
            **({"postprocess": pp.as_dict()} if pp is not None else {})}
    publish(out, META, meta, version)
    return meta


@dataclass
class Hit:
    """One neighbour of a query: its rank (1 = nearest), score, and the indexed item's columns."""

    rank: int
    score: float
    id: int
    label: int
    item_class: str | None
    item: str | None


class IndexFolder:
    """An index folder opened for searching: its meta.json read and checked, and every file of the version it
    names opened at once (a missing or damaged one is a UserError); :meth:`load` then reads the index and its
    columns from those files."""

    def __init__(self, folder: str | Path, say=print):
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise UserError(f"{self.folder}: not an index folder (no {META}; build one with dist-dml index)")
        self.meta, self._files = open_published(self.folder, META, REBUILD, "the index", say)
        try:
            self.postprocess = recorded_postprocess(self.meta, self.folder)
            missing = [name for name in ("index.faiss", "ids.npy", "labels.npy") if name not in self._files]
            if missing:
                raise UserError(f"{self.folder / META}: damaged (it lists no {', '.join(missing)}); {REBUILD}")
        except BaseException:
            self.close()
            raise
        self.index, self.columns = None, {}

    @property
    def checkpoint(self) -> str | None:
        return self.meta.get("checkpoint")

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("fingerprint")

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files = {}

    def load(self) -> None:
        """The index and its columns (those meta.json lists; a file it does not list is never read), checked
        against each other and the count meta.json records."""
        from dist_dml.retrieval.faiss_search import index_from_bytes

        try:
            index = index_from_bytes(self._files["index.faiss"].read())
            columns = {name: np.load(self._files[f"{name}.npy"], allow_pickle=False)
                       for name in COLUMNS if f"{name}.npy" in self._files}
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            raise UserError(f"{self.folder}: the index is damaged ({one_line(exc, 200)}); {REBUILD}") from None
        finally:
            self.close()
        counts = {"the index": index.ntotal, **{f"{name}.npy": len(column) for name, column in columns.items()}}
        recorded = self.meta.get("count")
        if recorded is not None:
            counts = {f"{META} (its count)": recorded, **counts}
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{what} {n}" for what, n in counts.items())
            raise UserError(f"{self.folder}: its parts disagree ({shown}); {REBUILD}")
        self.index, self.columns = index, columns

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` nearest indexed items of each query vector, after the index's query-side post-processing."""
        from dist_dml.retrieval.faiss_search import search_index

        if self.index is None:
            self.load()
        scores, rows = search_index(self.index, queries, k, self.postprocess)
        columns = self.columns
        found = []
        for score_row, index_row in zip(scores, rows):
            found.append([Hit(rank, float(score), columns["ids"][row], columns["labels"][row],
                              columns["classes"][row] if "classes" in columns else None,
                              columns["items"][row] if "items" in columns else None)
                          for rank, (score, row) in enumerate(zip(score_row, index_row), start=1) if row >= 0])
        return found
