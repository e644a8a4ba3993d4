"""Coverage of the training stream at the users' scale, simulated without a process group: every record
of the split once per epoch (up to each slot's last batch), disjoint across (rank, worker) slots, the
same steps on every rank, every class drawn, for any number of shards against slots; batches that
sample the whole catalogue; one DataLoader through many epochs."""
import json
import statistics
from pathlib import Path

import pytest

from dist_dml.data import DataConfig, Manifest, TrainStream, read_records, read_segments
from dist_dml.data import record_windows


def prep(out: Path, classes: int, min_shards: int, per_class: str = "2:3", seed: int = 0) -> Path:
    from data_prep.cli import main

    assert main(["synthetic", "--classes", str(classes), "--test-classes", "2", "--per-class", per_class,
                 "--size", "12", "--shard-mb", "1000", "--min-shards", str(min_shards), "--seed", str(seed),
                 "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    return out


SHARD_COUNTS = (1, 3, 4, 64, 200)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[int, Path]:
    """400 products of 2-3 images (one record each) in 1, 3, 4, 64 and 200 shards."""
    return {n: prep(tmp_path_factory.mktemp(f"shards{n}"), 400, n) for n in SHARD_COUNTS}


def record_ids(root: Path) -> set[int]:
    """Every training record, named by its first image id, read independently of the stream."""
    shards = Manifest(root).shard_paths("train")
    return {r["image_ids"][0] for r in read_records(shards)}


def draw_epoch(root: Path, ranks: int, workers: int, epoch: int, p: int = 4, **data):
    """{(rank, worker): [record ids drawn]} and {rank: batches} of one epoch, every logical worker run
    in this process as its DataLoader worker would run it (``data``: more DataConfig fields)."""
    cfg = DataConfig(root=str(root), classes_per_batch=p, images_per_class=2, workers=workers, shuffle_buffer=50,
                     image_size=8, resize=12, seed=5, **data)
    drawn, steps, labels = {}, {}, set()
    for rank in range(ranks):
        stream = TrainStream(cfg, rank, ranks, decode_images=False)
        steps[rank] = stream.steps_in_epoch(epoch)
        for worker in range(workers):
            batches = list(stream.worker_batches(epoch, worker))
            assert [b["index"] for b in batches] == list(range(worker, steps[rank], workers))
            drawn[rank, worker] = [i for b in batches for i in b["records"].tolist()]
            labels |= {label for b in batches for label in b["labels"].tolist()}
    return drawn, steps, labels, stream


@pytest.mark.parametrize("ranks,workers", [(1, 1), (2, 2), (4, 2), (8, 8)])
@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_every_record_once_per_epoch_disjoint_across_slots(datasets, ranks, workers, shards):
    root = datasets[shards]
    assert len(Manifest(root).shard_paths("train")) == shards
    everything = record_ids(root)
    for epoch in (0, 1):
        drawn, steps, labels, stream = draw_epoch(root, ranks, workers, epoch)
        assert len(set(steps.values())) == 1  # the same number of steps on every rank
        sets = {slot: set(ids) for slot, ids in drawn.items()}
        assert set().union(*sets.values()) == everything  # every record drawn
        assert sum(len(s) for s in sets.values()) == len(everything)  # by one slot only
        for slot, ids in drawn.items():
            assert len(ids) - len(sets[slot]) < 4  # draws again only to fill its last batch (< P)
        assert labels == set(range(stream.num_classes))  # every class
        # Windows of R // slots or one more records, in batches of P = 4: 400 over 64 slots is 6 or 7,
        # 2 batches per worker.
        longest = -(-len(everything) // (ranks * workers))
        assert steps[0] == workers * -(-longest // 4)


def test_a_window_that_starts_mid_shard_reads_the_right_records(datasets):
    """Slot by slot, the records a window yields are exactly the records at its positions in the epoch's
    shard order, read from the whole shards with the reference reader."""
    root = datasets[3]
    stream = TrainStream(DataConfig(root=str(root), classes_per_batch=4, images_per_class=2, workers=2,
                                    image_size=8, resize=12), 1, 3, decode_images=False)
    order = stream.shard_order(0)
    sequence = [r["image_ids"][0] for r in read_records(order)]
    position = 0
    for segments in stream.slot_segments(0):
        got = [r["image_ids"][0] for r in read_segments(segments)]
        assert got == sequence[position:position + len(got)]
        position += len(got)
    assert position == len(sequence)


def test_batches_sample_the_whole_catalogue(tmp_path):
    """2,000 products in 4 shards, 8 ranks: the classes of a batch spread over the catalogue's name order
    like a uniform sample (std of their normalised rank ~0.29), not over a shard's run of neighbours
    (at most ~0.07 when shards hold classes in name order, as prep wrote them before)."""
    root = prep(tmp_path / "catalogue", 2000, 4, per_class="2")
    table = json.loads((root / "manifest.json").read_text())["splits"]["train"]["class_table"]
    rank_of_label = {label: sorted(table, key=lambda c: int(c[0])).index(entry) / len(table)
                     for label, entry in enumerate(table)}
    cfg = DataConfig(root=str(root), classes_per_batch=16, images_per_class=2, workers=1, image_size=8, resize=12)
    spreads = []
    for rank in range(8):
        for batch in TrainStream(cfg, rank, 8, decode_images=False).worker_batches(0, 0):
            spreads.append(statistics.pstdev(rank_of_label[l] for l in batch["labels"][::2].tolist()))
    assert statistics.mean(spreads) > 0.22, statistics.mean(spreads)


def test_prep_min_shards_and_seeded_class_order(tmp_path):
    a = json.loads((prep(tmp_path / "a", 50, 7) / "manifest.json").read_text())["splits"]["train"]
    b = json.loads((prep(tmp_path / "b", 50, 7) / "manifest.json").read_text())["splits"]["train"]
    c = json.loads((prep(tmp_path / "c", 50, 7, seed=1) / "manifest.json").read_text())["splits"]["train"]
    assert len(a["shards"]) == 7 and {s["records"] for s in a["shards"]} <= {7, 8}
    names = [int(name) for name, _ in a["class_table"]]
    assert sorted(names) == list(range(50)) and names != sorted(names)  # shuffled, every class once
    assert a["class_table"] == b["class_table"] and a["class_table"] != c["class_table"]  # by the seed


def test_fewer_shards_than_slots_is_reported_with_the_numbers(datasets):
    cfg = DataConfig(root=str(datasets[4]), classes_per_batch=4, images_per_class=2, workers=8, image_size=8,
                     resize=12)
    note = TrainStream(cfg, 0, 8, decode_images=False).layout_note()
    assert "4 training shards for 64 (rank x worker) slots" in note and "--min-shards 64" in note
    assert TrainStream(DataConfig(**{**cfg.__dict__, "root": str(datasets[200])}), 0, 8).layout_note() is None
    assert "network" not in note


def test_fewer_remote_shards_than_slots_say_what_an_epoch_fetches(datasets):
    """Read through a command (a stream cannot seek), a window starting inside a shard reads the shard from
    its first record: the note gives the records an epoch fetches, counted here record by record."""
    root = f"pipe:cat {datasets[4]}/"
    cfg = DataConfig(root=root, classes_per_batch=4, images_per_class=2, workers=8, image_size=8, resize=12)
    stream = TrainStream(cfg, 0, 8, decode_images=False)
    counts = [stream.records[s] for s in stream.shard_order(0)]
    starts = [sum(counts[:i]) for i in range(len(counts) + 1)]
    fetched = 0
    for a, b in record_windows(counts, 64, 4):
        furthest = {}  # shard -> the furthest record this slot takes in it, plus one
        for pos in range(a, b):
            pos %= starts[-1]
            shard = next(i for i in range(len(counts)) if starts[i] <= pos < starts[i + 1])
            furthest[shard] = max(furthest.get(shard, 0), pos - starts[shard] + 1)
        fetched += sum(furthest.values())
    assert stream.fetched_records(0) == fetched
    assert fetched > 6 * stream.num_records  # 16 windows a shard: about 8x
    note = stream.layout_note()
    assert f"fetches {fetched} records to draw {stream.num_records}" in note and "--min-shards 64" in note
    cached = TrainStream(DataConfig(**{**cfg.__dict__, "cache_dir": "/tmp/cache"}), 0, 8, decode_images=False)
    assert "network" not in cached.layout_note()


def at(stream, epoch: int, step: int) -> None:
    """The stream's position set to (epoch, step), as a resume of the same geometry leaves it."""
    stream.position.set_epoch(epoch)
    stream.position.step = step


def test_one_loader_runs_through_epochs_as_separate_ones_would(datasets):
    """Tiny epochs (2 steps per worker) in one DataLoader with 2 worker processes, from a resume in the
    middle of an epoch: the same batches as one loader per epoch."""
    cfg = DataConfig(root=str(datasets[3]), classes_per_batch=4, images_per_class=2, workers=2,
                     image_size=8, resize=12, shuffle_buffer=50)
    first = TrainStream(cfg, 1, 2, decode_images=False)
    at(first, 2, 3)
    steps = first.steps_in_epoch(2)
    through = [(b["epoch"], b["index"], b["image_ids"].tolist()) for b in first.loader(epochs=3)]
    separate = []
    for epoch, start in ((2, 3), (3, 0), (4, 0)):
        stream = TrainStream(cfg, 1, 2, decode_images=False)
        at(stream, epoch, start)
        separate += [(b["epoch"], b["index"], b["image_ids"].tolist()) for b in stream.loader()]
    assert through == separate and len(through) == 3 * steps - 3
    # The trainer's bookkeeping follows the batches.
    for epoch, index, _ in through:
        assert (first.position.epoch, first.position.step) == (epoch, index)
        first.position.advance()


# --- the position in global samples: resuming at another world size ------------------------------

def run_ranks(root: Path, ranks: int, workers: int, state: dict | None, steps: int | None, p: int = 4, **data):
    """Every rank of a world of ``ranks`` x ``workers`` from ``state`` (None: a fresh start) for ``steps``
    steps (None: to the end of the epoch), batches taken as the trainer takes them. Returns the state a
    checkpoint would keep (draws summed over ranks, as the trainer's all-reduce does), the draws per record
    of this stretch, and the steps taken."""

    cfg = DataConfig(root=str(root), classes_per_batch=p, images_per_class=2, workers=workers, shuffle_buffer=50,
                     image_size=8, resize=12, seed=5, **data)
    streams = [TrainStream(cfg, rank, ranks, decode_images=False) for rank in range(ranks)]
    for stream in streams:
        if state is not None:
            stream.position.load_state_dict(state)
    first = streams[0].position
    epoch, start, base = first.epoch, first.step, first.start.resumed(first.epoch)[0]
    total = first.steps_in_epoch(epoch)
    assert all(s.steps_in_epoch(epoch) == total for s in streams)  # the same on every rank
    stop = total if steps is None else min(total, start + steps)
    draws = []
    for stream in streams:
        batches = {w: stream.worker_batches(epoch, w, start) for w in range(workers)}
        for step in range(start, stop):
            batch = next(batches[(step - base) % workers])
            assert (batch["epoch"], batch["index"]) == (epoch, step)
            stream.position.consume(batch)
            finished = stream.position.advance()
        draws.append(finished or stream.position.local_draws())
    before, here = draws[0][0], sum(d[1] for d in draws)
    if stop == total:
        return None, here, stop - start
    return first.state_dict(drawn=before + here), here, stop - start


@pytest.mark.parametrize("worlds", [[(2, 2), (1, 1)], [(1, 1), (2, 1)], [(2, 2), (3, 1), (2, 2)], [(4, 1), (4, 1)]],
                         ids=["2x2->1", "1->2", "2x2->3->2x2", "4->4 exact"])
def test_resuming_at_another_world_size_neither_replays_nor_skips_a_record(datasets, worlds):
    """An epoch run in stretches at different world sizes (and workers): every record's first draw
    happens exactly once over the stretches, whatever the resumes; every class is drawn."""
    import numpy as np

    root = datasets[4]
    count = TrainStream(DataConfig(root=str(root)), decode_images=False).num_records
    total, state = np.zeros(count, np.int64), None
    for i, (ranks, workers) in enumerate(worlds):
        last = i == len(worlds) - 1
        state, here, taken = run_ranks(root, ranks, workers, state, None if last else 7)
        assert taken > 0
        total += here
    assert total.min() == 1 and total.max() == 1, (np.bincount(total))


def test_an_exact_resume_matches_the_uninterrupted_epoch(datasets):
    """Same world, same workers: the resumed epoch's batches are the uninterrupted run's."""
    root = datasets[3]
    _, whole, _ = run_ranks(root, 2, 2, None, None)
    state, first, _ = run_ranks(root, 2, 2, None, 5)
    assert state["base_step"] == 0 and state["base_drawn"] is None
    _, rest, _ = run_ranks(root, 2, 2, state, None)
    assert ((first + rest) == whole).all()


@pytest.mark.parametrize("ranks, workers, shards", [(8, 8, 4), (3, 2, 7), (1, 1, 1)])
def test_the_epoch_plan_cuts_every_record_into_one_window_without_reading_a_byte(ranks, workers, shards):
    """EpochPlan is arithmetic over the manifest's counts: shards that do not exist are planned alike. Every
    record of an epoch falls in one slot's window exactly once, every rank takes the same steps, and a
    resumed layout over the records left covers exactly those."""
    import numpy as np

    from dist_dml.data.plan import EpochPlan

    records = {f"nowhere/train-{i:06d}.tar": 97 + 13 * i for i in range(shards)}
    plan = EpochPlan(records, ranks, workers, classes_per_batch=5, seed=3)
    offsets = plan.offsets(2)
    seen = np.zeros(sum(records.values()), np.int64)
    for segments in plan.segments(2):
        for shard, skip, take in segments:
            seen[offsets[shard] + skip:offsets[shard] + skip + take] += 1
    assert (seen == 1).all()  # at least 5 (P) records per slot here: no window is widened
    assert plan.shard_order(2) == EpochPlan(records, ranks, workers, 5, seed=3).shard_order(2)  # every rank alike
    drawn = np.random.default_rng(0).random(seen.size) < 0.6
    left = np.zeros(seen.size, np.int64)
    for segments in plan.segments(2, drawn):
        for shard, skip, take in segments:
            left[offsets[shard] + skip:offsets[shard] + skip + take] += 1
    assert (left[~drawn] >= 1).all() and not left[drawn].any()
    assert plan.steps(2, base=40, drawn=drawn) > 40 and plan.steps(2) % workers == 0
