"""A training batch from the records a reader chose: each record's K picked images decoded and augmented into one
uint8 tensor, with the decode fallback (an image that does not decode is replaced by another of its record; a
record left with fewer than 2 decodable images gives its places to a neighbour), so a batch always keeps its size
and which images replace which depends on the data alone (a resumed run matches)."""
from __future__ import annotations

import random

import torch

from dist_dml.data.config import DataConfig
from dist_dml.data.faults import FaultCounter
from dist_dml.data.images import ImageTooLarge, new_batch, train_image
from dist_dml.infra.errors import UserError


class DataError(UserError):
    """The data cannot give a batch at all (every record of a slot unreadable, or single-image)."""


class BatchAssembler:
    """Decodes the chosen records of a rank's batches (read-only: pickled into the loader's workers)."""

    def __init__(self, cfg: DataConfig, rank: int, decode_images: bool = True):
        self.cfg, self.rank, self.decode_images = cfg, rank, decode_images

    def assemble(self, chosen, rng: random.Random, faults: FaultCounter) -> dict:
        """The batch of the chosen (record, picks). An image that does not decode is counted and replaced by
        another of its record (the next that decodes); a record left with fewer than 2 decodable images is
        dropped, counted, and its places go to the batch's previous (or next) record, so the batch keeps
        its size. Which images replace which depends on the data alone, so a resumed run matches."""
        cfg = self.cfg
        # Each record's epoch position where this is its first draw (a dropped record was drawn all the same).
        positions = torch.tensor([r.get("position", -1) if r.get("first") else -1 for r, _ in chosen])
        picks_of = [list(picks) for _, picks in chosen]
        images = new_batch(cfg.local_batch, cfg.image_size) if self.decode_images else None
        if images is not None:  # uint8: normalised on the device (normalize_batch)
            dropped = []
            for r, (record, _) in enumerate(chosen):
                picks_of[r] = self._decode_record(record, picks_of[r], images[r * cfg.images_per_class:], rng, faults)
                if picks_of[r] is None:
                    dropped.append(r)
            kept = [r for r in range(len(chosen)) if r not in dropped]
            if not kept:
                raise DataError(f"rank {self.rank}: no record of a batch has 2 decodable images (shards "
                                f"{', '.join(sorted({record['shard'] for record, _ in chosen}))}): see the warnings above")
            k = cfg.images_per_class
            for r in dropped:  # its places: a copy of the nearest kept record's images
                donor = max((d for d in kept if d < r), default=min(kept))
                images[r * k:(r + 1) * k].copy_(images[donor * k:(donor + 1) * k])
                chosen[r], picks_of[r] = chosen[donor], picks_of[donor]
        labels, ids = [], []
        for (record, _), picks in zip(chosen, picks_of):
            for i in picks:
                labels.append(record["label"])
                ids.append(record["image_ids"][i])
        batch = {"labels": torch.tensor(labels), "image_ids": torch.tensor(ids), "errors": faults.delta(),
                 "records": torch.tensor([record["image_ids"][0] for record, _ in chosen]),  # a record's first id names it
                 "positions": positions}
        if images is not None:
            batch["images"] = images
        return batch

    def _decode_record(self, record: dict, picks: list[int], out: torch.Tensor, rng: random.Random,
                       faults: FaultCounter) -> list[int] | None:
        """Decode and augment the record's picked images into out[0..K); the images actually used. A pick
        that does not decode is replaced by another of the record's images (one not used yet first).
        None (counted as dropped) where images failed and fewer than 2 distinct ones decode."""
        bad: set[int] = set()
        used: list[int] = []
        have = len(record["images"])

        def decode_into(i: int, slot: int) -> bool:
            try:
                train_image(record["images"][i][1], self.cfg, rng, out[slot])
                return True
            except (RuntimeError, ValueError) as exc:
                bad.add(i)
                faults.fault("bad_images", f"{record['shard']}#{record['items'][i]}", "skipping image %s of shard "
                             "%s: %s", record["items"][i], record["shard"], why_unused(exc))
                return False

        for slot, pick in enumerate(picks):
            if pick not in bad and decode_into(pick, slot):
                used.append(pick)
                continue
            others = [(pick + j) % have for j in range(1, have)]
            for i in [i for i in others if i not in used] + [i for i in others if i in used]:
                if i not in bad and decode_into(i, slot):
                    used.append(i)
                    break
            else:
                break  # nothing of the record decodes
        if bad and len(used) == len(picks) and len(set(used)) < 2:  # look for a second distinct image
            spare = next(s for s in range(len(used) - 1, -1, -1) if used.count(used[s]) > 1) if len(used) > 1 else None
            for i in range(have):
                if spare is not None and i not in bad and i not in used and decode_into(i, spare):
                    used[spare] = i
                    break
        if bad and (len(used) < len(picks) or len(set(used)) < 2):
            faults.fault("dropped_records", f"{record['shard']}#drop{record['image_ids'][0]}", "dropping a record "
                         "of class %s in shard %s: fewer than 2 of its %d images decode", record["class"],
                         record["shard"], have)
            return None
        return used


def with_picks(record: dict, k: int, rng: random.Random) -> tuple[dict, list[int]]:
    """(record, the K of its images a batch takes): K distinct ones where it has K, else K drawn with repeats."""
    have = len(record["images"])
    return record, rng.sample(range(have), k) if have >= k else [rng.randrange(have) for _ in range(k)]


def why_unused(exc: Exception) -> str:
    """Why an image was not used, for the fault's log line: the size refused, else that it does not decode."""
    return str(exc) if isinstance(exc, ImageTooLarge) else "it does not decode"
