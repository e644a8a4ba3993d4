"""Class-level batches (class_sampling; dist_dml/data/grouping.py, snapshots.py, the reader's pool): the grouping
rule against a plain loop, the reader's batches against a brute-force pool, a toy with known neighbour classes,
every record once per epoch on any slots, an exact resume from a checkpoint's draws, the snapshot ring's
promises, and a training resumed with the same prototypes bit for bit."""
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_dml.data import DataConfig, TrainStream, read_segments
from dist_dml.data.grouping import ClassSamplingConfig, neighbour_picks
from dist_dml.data.snapshots import FixedSnapshots, SnapshotError, SnapshotRing, loader_lag
from dist_dml.infra.seeding import mix

from .test_coverage import datasets, prep, record_ids  # noqa: F401 (datasets: a module fixture)


def loop_picks(labels, vectors, count, near, group, rng):
    """neighbour_picks written as plain loops, in float64: the rule as DESIGN.md states it."""
    n = len(labels)
    picks, used, neighbours = [], set(), 0
    free = lambda: [i for i in range(n) if i not in picks]  # noqa: E731
    total = min(count, n)
    if vectors is not None:
        near = min(near, total)
        while len(picks) < near:
            options = free()
            seed = options[rng.randrange(len(options))]
            picks.append(seed)
            used.add(labels[seed])
            want = min(group - 1, near - len(picks))
            if want <= 0 or not any(vectors[seed]):
                continue
            scored = []
            for j in free():
                if labels[j] not in used and any(vectors[j]):
                    scored.append((-sum(float(a) * float(b) for a, b in zip(vectors[j], vectors[seed])), j))
            taken = set()
            for _, j in sorted(scored):
                if want == 0:
                    break
                if labels[j] in taken:
                    continue
                taken.add(labels[j])
                picks.append(j)
                used.add(labels[j])
                neighbours += 1
                want -= 1
    while len(picks) < total:
        options = free()
        j = options[rng.randrange(len(options))]
        picks.append(j)
        used.add(labels[j])
    return picks, neighbours


@pytest.mark.parametrize("count, near, group, largest, classes", [
    (8, 4, 4, 25, 12), (8, 8, 3, 25, 12), (8, 0, 4, 25, 12), (30, 30, 5, 25, 12), (5, 2, 2, 25, 12),
    (8, 8, 2, 300, 60), (16, 12, 4, 300, 200)])  # pools large enough that only the top similarities are sorted
def test_the_grouping_rule_equals_a_plain_loop(count, near, group, largest, classes):
    """Small integer prototypes (exact dot products, many ties), repeated classes, classes without one."""
    gen = np.random.default_rng(count * 10 + near + largest)
    for trial in range(20):
        size = int(gen.integers(3, largest))
        labels = gen.integers(0, classes, size)
        table = gen.integers(-2, 3, (classes, 4)).astype(np.float32)
        table[gen.integers(0, classes, 2)] = 0  # classes without a prototype yet
        vectors = table[labels]
        got = neighbour_picks(labels, vectors, count, near, group, random.Random(trial))
        want = loop_picks(labels.tolist(), vectors.tolist(), count, near, group, random.Random(trial))
        assert got == want
        assert len(set(got[0])) == len(got[0]) == min(count, size)
    # Without prototypes: uniform picks, the same as with near = 0.
    labels = np.arange(10)
    want = loop_picks(list(labels), None, 6, 6, 3, random.Random(1))
    assert neighbour_picks(labels, None, 6, 6, 3, random.Random(1)) == want


FAMILIES, SIZE = 10, 4  # 40 classes: ten families of four look-alike classes


def family_table(classes: int) -> torch.Tensor:
    """Prototypes of a hand-built toy: class c near the classes of its family c // 4 (a shared direction plus a small
    class-own one), far from the other families."""
    g = torch.Generator().manual_seed(0)
    own = torch.randn(classes, 16, generator=g) * 0.1
    family = torch.nn.functional.one_hot(torch.arange(classes) // SIZE, 16).float()
    return torch.nn.functional.normalize(family + own, dim=1).half()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """40 classes of 2-3 images, one record each, in 3 shards."""
    return prep(tmp_path_factory.mktemp("toy"), FAMILIES * SIZE, 3)


def toy_config(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"root": str(root), "classes_per_batch": 8, "images_per_class": 2, "workers": 1,
                         "shuffle_buffer": 100, "image_size": 8, "resize": 12, "seed": 2, **kw})


def test_a_toy_with_known_neighbour_classes_gets_batches_of_whole_families(toy):
    """share 1, groups of 4: every group is one family (its seed's three look-alikes), so every batch holds
    two whole families; random batches (share 0) hold almost none."""
    cfg = toy_config(toy)
    stream = TrainStream(cfg, decode_images=False, class_sampling=ClassSamplingConfig(share=1.0, group=SIZE))
    assert stream.num_classes == FAMILIES * SIZE
    snapshots = FixedSnapshots(family_table(stream.num_classes))
    batches = list(stream.worker_batches(0, 0, snapshots=snapshots))
    for batch in batches:
        records = batch["labels"].view(8, 2)[:, 0] // SIZE  # each record's family, in pick order
        assert records[:4].unique().numel() == 1 and records[4:].unique().numel() == 1, records
        assert batch["grouped"] == 6
    random_batches = list(TrainStream(cfg, decode_images=False).worker_batches(0, 0))
    whole = sum(int((b["labels"].view(8, 2)[:, 0] // SIZE).bincount().max() == SIZE) for b in random_batches)
    assert whole <= 1


def reference_batches(stream: TrainStream, epoch: int, worker: int, snapshots, cs: ClassSamplingConfig):
    """The reader's class-level batches from scratch: the window's records read in order (the plan's segments,
    the reference reader), a pool of data.shuffle_buffer of them refilled after each batch, each batch's picks
    by the loop rule on the snapshot of its step, with the batch's own generator; the first pass only."""
    cfg = stream.cfg
    segments = stream.plan.segments(epoch)[stream.rank * stream.plan.workers + worker]
    window = [r for r in read_segments(segments) if len(r["images"]) >= 2]
    pool, out = [], []
    steps = stream.steps_in_epoch(epoch)
    before = sum(stream.steps_in_epoch(e) for e in range(epoch))  # the run's steps before the epoch
    for index in range(worker, steps, stream.plan.workers):
        while window and len(pool) < cfg.shuffle_buffer:
            pool.append(window.pop(0))
        if len(pool) < cfg.classes_per_batch:
            break  # the last batches draw again from the window: not modelled here
        rng = random.Random(mix(cfg.seed, epoch, stream.rank, index, 2))
        labels = [r["label"] for r in pool]
        number = snapshots.number(before + index)
        vectors = None if number is None else snapshots.rows(number, np.array(labels)).tolist()
        picks, _ = loop_picks(labels, vectors, cfg.classes_per_batch, cs.near(cfg.classes_per_batch), cs.group, rng)
        out.append([pool[i]["image_ids"][0] for i in picks])
        pool = [r for i, r in enumerate(pool) if i not in picks]
    return out


@pytest.mark.parametrize("buffer", [10, 23, 1000])
def test_the_readers_batches_equal_a_brute_force_pool(datasets, buffer):  # noqa: F811
    """Two ranks x two workers, 400 records in 4 shards (windows start mid-shard), a pool smaller than, about,
    and larger than a window; prototypes from step 3 on (random batches before)."""
    cs = ClassSamplingConfig(share=0.75, group=3)
    cfg = DataConfig(root=str(datasets[4]), classes_per_batch=4, images_per_class=2, workers=2, shuffle_buffer=buffer,
                     image_size=8, resize=12, seed=5)
    for rank in (0, 1):
        stream = TrainStream(cfg, rank, 2, decode_images=False, class_sampling=cs)
        g = torch.Generator().manual_seed(rank)
        table = torch.nn.functional.normalize(torch.randn(stream.num_classes, 6, generator=g), dim=1)
        snapshots = FixedSnapshots(table.half(), start=3)
        for worker in (0, 1):
            got = [b["records"].tolist() for b in stream.worker_batches(1, worker, snapshots=snapshots)]
            want = reference_batches(stream, 1, worker, snapshots, cs)
            assert len(want) >= len(got) - 2 and got[:len(want)] == want


@pytest.mark.parametrize("ranks, workers", [(1, 1), (2, 2), (8, 1)])
def test_every_record_once_per_epoch_with_class_level_batches(datasets, ranks, workers):  # noqa: F811
    """The coverage contract with class_sampling on, at a pool smaller than the windows: every record drawn in
    each epoch by one slot only, again only to fill a slot's last batch, the same steps on every rank."""
    root = datasets[3]
    everything = record_ids(root)
    cs = ClassSamplingConfig(share=0.5, group=2)
    cfg = DataConfig(root=str(root), classes_per_batch=4, images_per_class=2, workers=workers, shuffle_buffer=12,
                     image_size=8, resize=12, seed=5)
    for epoch in (0, 1):
        drawn, steps, grouped = {}, set(), 0
        for rank in range(ranks):
            stream = TrainStream(cfg, rank, ranks, decode_images=False, class_sampling=cs)
            snapshots = FixedSnapshots(torch.nn.functional.normalize(torch.randn(stream.num_classes, 8), dim=1))
            steps.add(stream.steps_in_epoch(epoch))
            for worker in range(workers):
                batches = list(stream.worker_batches(epoch, worker, snapshots=snapshots))
                drawn[rank, worker] = [i for b in batches for i in b["records"].tolist()]
                grouped += sum(b["grouped"] for b in batches)
        assert len(steps) == 1
        sets = {slot: set(ids) for slot, ids in drawn.items()}
        assert set().union(*sets.values()) == everything
        assert sum(len(s) for s in sets.values()) == len(everything)
        assert all(len(ids) - len(sets[slot]) < 4 for slot, ids in drawn.items())
        assert grouped > 0


def run_class_ranks(root: Path, ranks: int, workers: int, state, steps, snapshots_of, cs):
    """tests/test_coverage.run_ranks with class_sampling: every rank's batches from ``state`` (None: a fresh start)
    for ``steps`` steps; the state a checkpoint keeps and each step's batches (records, per rank)."""
    cfg = DataConfig(root=str(root), classes_per_batch=4, images_per_class=2, workers=workers, shuffle_buffer=9,
                     image_size=8, resize=12, seed=5)
    streams = [TrainStream(cfg, rank, ranks, decode_images=False, class_sampling=cs) for rank in range(ranks)]
    for stream in streams:
        if state is not None:
            stream.position.load_state_dict(state)
    first = streams[0].position
    epoch, start = first.epoch, first.step
    stop = min(first.steps_in_epoch(epoch), start + steps)
    taken = {}
    for rank, stream in enumerate(streams):
        reader = stream.reader(first_step=start, snapshots=snapshots_of(rank))
        batches = {w: reader.worker_batches(epoch, w, start) for w in range(workers)}
        for step in range(start, stop):
            batch = next(batches[step % workers])
            taken.setdefault(step, []).append(batch["records"].tolist())
            stream.position.consume(batch)
            stream.position.advance()
    drawn = sum(s.position.local_draws()[1] for s in streams) + first.local_draws()[0]
    return first.state_dict(drawn=drawn), taken


def test_a_resume_from_a_checkpoints_draws_continues_with_the_same_batches(datasets):  # noqa: F811
    """2 ranks x 2 workers, a pool of 9: stopped at step 5 and resumed from the state a checkpoint keeps (the
    pool replayed by the epoch's draws, not by the snapshots it was chosen by: those of the first steps are
    gone), the batches from step 5 on are the uninterrupted run's."""
    cs = ClassSamplingConfig(share=0.5, group=2)
    tables = {}

    def snapshots_of(rank):
        # Any snapshot: the batches before the resume were chosen by other ones than those after.
        class Changing(FixedSnapshots):
            def number(self, step):
                return step

            def rows(self, n, labels, who=""):
                if (rank, n) not in tables:
                    g = torch.Generator().manual_seed(100 * rank + n)
                    tables[rank, n] = torch.nn.functional.normalize(torch.randn(400, 5, generator=g), dim=1)
                return tables[rank, n][torch.from_numpy(labels)].numpy()
        return Changing(None)

    root = datasets[4]
    _, whole = run_class_ranks(root, 2, 2, None, 1000, snapshots_of, cs)
    state, before = run_class_ranks(root, 2, 2, None, 5, snapshots_of, cs)
    assert state["step"] == 5
    _, after = run_class_ranks(root, 2, 2, state, 1000, snapshots_of, cs)
    assert {**before, **after} == whole and min(after) == 5 and len(whole) > 8


def test_the_snapshot_ring_binds_batches_to_snapshots_and_refuses_a_torn_read():
    lag = loader_lag(2)  # a DataLoader of 2 workers asks 8 batches ahead
    assert lag == 9
    ring = SnapshotRing(5, 3, "fp16", every=4, lag=lag)
    assert ring.slots == 4  # ceil(9 / 4) + 1: a slot is not written again while a batch bound to it may be read
    assert [ring.number(t) for t in (0, 8, 9, 12, 13, 17)] == [None, None, 0, 0, 1, 2]
    table = torch.nn.functional.normalize(torch.randn(5, 3), dim=1)
    ring.publish(0, torch.zeros(5, 3))
    ring.publish(1, table)
    assert np.array_equal(ring.rows(1, np.array([4, 0])), table.half().float()[[4, 0]].numpy())
    assert not ring.rows(0, np.array([1])).any()
    ring.publish(5, table)  # slot 1 again: snapshot 1 is gone
    with pytest.raises(SnapshotError, match="snapshot 1 was overwritten"):
        ring.rows(1, np.array([0]))
    held = ring.held(0)
    assert [n for n, _ in held] == [0, 5]
    again = SnapshotRing(5, 3, "fp16", every=4, lag=lag)
    again.restore(held)
    assert again.floor == 0 and np.array_equal(again.rows(5, np.arange(5)), ring.rows(5, np.arange(5)))


def test_class_sampling_keys_are_validated():
    for bad in (dict(share=1.5), dict(group=1), dict(refresh_steps=0), dict(momentum=1.0), dict(dtype="int8")):
        with pytest.raises(ValueError, match="class_sampling"):
            ClassSamplingConfig(**bad).validate()


def test_a_resumed_training_continues_with_the_same_prototypes_and_batches(tiny_shards, tmp_path):
    """Two trainings with class_sampling (refreshed every 2 steps, groups from step 7): one straight to step 16,
    one stopped at step 8 (mid-epoch: 6 steps an epoch) and resumed from its checkpoint there; at step 16 both
    hold the same prototypes and the same model, bit for bit (the same batches in the same order)."""
    from .conftest import ROOT, dist_dml_here, tiny_overrides
    from .test_training import checkpoint_client_state

    def train(out, steps):
        overrides = tiny_overrides(tiny_shards, out, **{
            "train.steps": steps, "checkpoint.every_steps": 8, "checkpoint.keep_last": 3, "eval.at_start": False,
            "tracking.enabled": False, "class_sampling.share": 0.5, "class_sampling.refresh_steps": 2,
            "class_sampling.group": 2, "train.log_every": 4})
        proc = dist_dml_here("train", str(ROOT / "configs/cpu_synthetic.yaml"), *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = train(straight, 16)
    assert "records chosen as near classes" in log and "0.0% of rank 0's records" in log
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000016")
    (resumed / "results.json").unlink()
    log = train(resumed, 16)
    assert "step00000008 at step 8" in log, log[-2000:]
    want = checkpoint_client_state(straight / "checkpoints" / "step00000016")["parts"]["prototypes"]
    got = checkpoint_client_state(resumed / "checkpoints" / "step00000016")["parts"]["prototypes"]
    for key in ("table", "updated", "snapshot_numbers", "snapshots"):
        assert torch.equal(got[key], want[key]), key
    assert (got["updated"] >= 0).all()  # every class has a prototype
    final = [torch.load(p / "final_model.pt", weights_only=True)["state_dict"] for p in (straight, resumed)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_prototypes_are_identical_on_every_rank_and_equal_a_loop_reference(run_torchrun, tmp_path):
    """Two ranks, 6 steps: after each step every rank holds the same table bit for bit (checked in the worker);
    rank 0's table equals one process's on the same global batches bit for bit and a float64 loop within fp16's
    rounding; the snapshot published after step 6 is that table."""
    from dist_dml.method.class_prototypes import PrototypeTable

    from .conftest import HANG_GUARD_S
    from .prototypes_worker import CLASSES, DIM

    out = tmp_path / "prototypes.pt"
    run_torchrun(2, "tests.prototypes_worker", str(out), timeout=HANG_GUARD_S)
    saved = torch.load(out, weights_only=True)
    alone = PrototypeTable(CLASSES, DIM, momentum=0.7, dtype="fp16")
    reference, updated = {}, {}
    for step, (embeddings, labels) in enumerate(saved["batches"]):
        assert len(labels) == 12  # 2 ranks x 6
        alone.update(embeddings, labels, step)
        for c in sorted(set(labels.tolist())):
            mean = embeddings.double()[labels == c].sum(0)
            mean = mean / mean.norm()
            if c in reference:
                mixed = 0.7 * reference[c] + 0.3 * mean
                reference[c] = mixed / mixed.norm()
            else:
                reference[c] = mean
            updated[c] = step
    assert torch.equal(alone.table, saved["table"]) and torch.equal(alone.updated, saved["updated"])
    for c in range(CLASSES):
        if c in reference:
            assert torch.allclose(saved["table"][c].double(), reference[c], atol=3e-3)
            assert saved["updated"][c] == updated[c]
        else:
            assert not saved["table"][c].any() and saved["updated"][c] == -1
    assert saved["newest"] == 3 and torch.equal(saved["snapshot"], saved["table"])
