"""Shards read from a server or a command (issue 12): through http and `pipe:cat` the batches are the local
files' bit for bit, in training (windows that start mid-shard, skipped by reading) and evaluation; a shard
whose transfer breaks is retried with back-off, visibly, and counted corrupt if it keeps breaking, while
the epoch goes on; data.verify_sha256 catches a modified shard."""
import contextlib
import functools
import json
import http.server
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from dist_dml.data import DataConfig, EvalStream, TrainStream, Verdicts


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the files named in ``server.breaks`` (name -> times left) are cut after half their
    bytes, as a server that dies mid-transfer."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = Path(self.path).name
        self.server.gets[name] = self.server.gets.get(name, 0) + 1
        time.sleep(self.server.delay_s)
        return super().do_GET()

    def copyfile(self, source, outputfile):
        name = Path(self.path).name
        left = self.server.breaks.get(name, 0)
        if not left:
            return super().copyfile(source, outputfile)
        self.server.breaks[name] = left - 1
        data = source.read()
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serving(folder: Path):
    """An http server of ``folder`` on 127.0.0.1 that counts the GETs of each file (``gets``)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    httpd.breaks, httpd.gets, httpd.delay_s = {}, {}, 0.0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(tiny_shards):
    with serving(tiny_shards) as httpd:
        yield httpd


def url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/"


def config(root: str, **extra) -> DataConfig:
    values = dict(root=root, classes_per_batch=4, images_per_class=2, workers=1, image_size=16, resize=20,
                  shuffle_buffer=10, read_retries=2, retry_backoff_s=0.05)
    values.update(extra)
    return DataConfig(**values)


def train_batches(cfg: DataConfig, ranks: int = 3) -> list[dict]:
    """Epoch 0 of every rank (3 ranks: windows of 16 records start mid-shard), read in one process as one job
    (one set of sha256 verdicts)."""
    out, verdicts = [], Verdicts()
    for rank in range(ranks):
        out += list(TrainStream(cfg, rank, ranks, verdicts=verdicts).worker_batches(0, 0))
    return out


def eval_batches(cfg: DataConfig) -> list:
    return list(EvalStream(cfg, "test", 0, 1, batch_size=16))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    keys = ("images", "labels", "image_ids", "positions")
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in keys)


@pytest.fixture(scope="module")
def local(tiny_shards):
    return train_batches(config(str(tiny_shards))), eval_batches(config(str(tiny_shards)))


def test_http_and_pipe_read_the_same_batches_as_local_files(server, tiny_shards, local):
    for root in (url(server), f"pipe:cat {tiny_shards}/", "pipe:cat " + str(tiny_shards) + "/{shard}"):
        assert same_batches(train_batches(config(root)), local[0]), root
        remote = eval_batches(config(root))
        assert len(remote) == len(local[1]), root
        for x, y in zip(remote, local[1]):
            assert torch.equal(x.images, y.images) and torch.equal(x.image_ids, y.image_ids) and x.items == y.items


def test_a_transfer_cut_once_is_retried_and_nothing_is_lost(server, local, caplog):
    victim = "train-000003.tar"
    server.breaks[victim] = 1
    with caplog.at_level(logging.WARNING, logger="dist_dml.data"):
        batches = train_batches(config(url(server)))
    assert same_batches(batches, local[0])
    assert any(victim in r.message and "retry 1 of 2" in r.message for r in caplog.records), caplog.text
    assert sum(b["errors"]["corrupt_shards"] for b in batches) == 0


def test_a_transfer_cut_inside_a_record_is_retried_from_that_record(tiny_shards, tmp_path, local):
    """The cut comes after a record's json and first image, inside its second: the part read is not that
    record (it would be counted malformed and lost); the retry reads it from its start."""
    import tarfile

    victim = tiny_shards / "train-000003.tar"
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    key = lambda m: m.name.split(".", 1)[0]
    second = next(m for i, m in enumerate(members) if i >= 2 and key(members[i - 2]) == key(members[i - 1]) == key(m)
                  and members[i - 2].name.endswith(".json"))
    cut = second.offset_data + second.size // 2
    script = tmp_path / "cut_once.sh"
    script.write_text(f'if [ "$1" = {victim.name} ] && [ ! -e {tmp_path}/cut ]; then touch {tmp_path}/cut; '
                      f'head -c {cut} {tiny_shards}/$1; else cat {tiny_shards}/$1; fi\n')
    logger = logging.getLogger("dist_dml.data")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        batches = train_batches(config(f"pipe:sh {script} {{shard}}"))
    finally:
        logger.removeHandler(handler)
    assert (tmp_path / "cut").exists() and any(victim.name in m and "retry 1 of 2" in m for m in seen), seen
    assert same_batches(batches, local[0])
    assert sum(b["errors"]["bad_records"] + b["errors"]["corrupt_shards"] for b in batches) == 0


def test_a_transfer_that_keeps_breaking_is_counted_and_the_epoch_goes_on(server, local, caplog):
    victim = "train-000003.tar"
    server.breaks[victim] = 100
    with caplog.at_level(logging.WARNING, logger="dist_dml.data"):
        batches = train_batches(config(url(server)))
    assert len(batches) == len(local[0])  # every step still comes
    assert sum(b["errors"]["corrupt_shards"] for b in batches) == 1
    messages = [r.message for r in caplog.records if victim in r.message]
    assert any("retry 2 of 2" in m for m in messages) and any("skipping the rest of shard" in m for m in messages)
    # The records read before the cut are kept; the rest of the shard is not drawn.
    drawn = {int(p) for b in batches for p in b["positions"] if p >= 0}
    assert 0 < len(drawn) < TrainStream(config(url(server)), 0, 3).num_records


def modified_copy(tiny_shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shards with one byte flipped inside an image of the second training shard (the tar
    stays valid: only its hash tells)."""
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    victim = sorted(copy.glob("train-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[2048] ^= 0xFF  # inside the first image member
    victim.write_bytes(bytes(data))
    return copy, victim


def test_sha256_verification_catches_a_modified_shard(tiny_shards, tmp_path):
    copy, _ = modified_copy(tiny_shards, tmp_path)
    unchecked = train_batches(config(str(copy)))
    assert sum(b["errors"]["corrupt_shards"] for b in unchecked) == 0  # the tar reads fine: only the hash knows
    checked = train_batches(config(str(copy), verify_sha256=True))
    assert sum(b["errors"]["corrupt_shards"] for b in checked) == 1
    intact = train_batches(config(str(tiny_shards), verify_sha256=True))
    assert sum(b["errors"]["corrupt_shards"] for b in intact) == 0


def test_sha256_is_verified_once_per_job_over_the_ranks(tiny_shards, tmp_path, run_torchrun):
    """Two ranks over http fetch every shard exactly as often as one process reading both ranks' windows:
    each shard whole once for its hash (by one rank, not by every reader that meets it), the modified
    shard never again, and the other shards as their windows read them. Both ranks hold the same verdicts,
    and each window that meets the modified shard counts it corrupt."""
    from tests.conftest import HANG_GUARD_S

    copy, victim = modified_copy(tiny_shards, tmp_path)
    values = dict(classes_per_batch=4, images_per_class=2, workers=1, image_size=16, resize=20, shuffle_buffer=10,
                  verify_sha256=True)
    with serving(copy) as httpd:
        root = url(httpd)
        one_process = train_batches(DataConfig(root=root, **values), ranks=2)
        alone = {n: c for n, c in httpd.gets.items() if n.startswith("train-")}
        httpd.gets.clear()
        out = tmp_path / "verdicts.json"
        proc = run_torchrun(2, "tests.verify_worker", json.dumps({"root": root, **values}), str(out),
                            timeout=HANG_GUARD_S)
        job = {n: c for n, c in httpd.gets.items() if n.startswith("train-")}
    shard_names = sorted(p.name for p in copy.glob("train-*.tar"))
    assert sorted(alone) == shard_names and alone[victim.name] == 1
    assert job == alone
    ranks = json.loads(out.read_text())
    assert ranks[0]["failed"] == ranks[1]["failed"] == [root + victim.name]
    assert ranks[0]["verified"] == ranks[1]["verified"] == sorted(root + n for n in shard_names if n != victim.name)
    assert sum(r["corrupt"] for r in ranks) == sum(b["errors"]["corrupt_shards"] for b in one_process) >= 1
    assert f"{len(shard_names) - 1} of {len(shard_names)} training shards match the manifest" in proc.stdout


def test_a_shard_cache_fetches_each_remote_shard_once_per_machine(server, tiny_shards, local, tmp_path):
    """data.cache_dir: 3 ranks' windows over http (several start mid-shard) read the local files' batches
    while each shard is fetched once; another epoch, or another run, fetches nothing; 4 threads wanting
    one uncached shard at once fetch it once."""
    from dist_dml.data.opener import ShardCache

    cache = tmp_path / "cache"
    cfg = config(url(server), cache_dir=str(cache))
    assert same_batches(train_batches(cfg), local[0])
    shard_names = sorted(p.name for p in tiny_shards.glob("train-*.tar"))
    assert {n: c for n, c in server.gets.items() if n.startswith("train-")} == {n: 1 for n in shard_names}
    copies = sorted(cache.glob("*-train-*.tar"))
    assert [p.read_bytes() for p in copies] == [(tiny_shards / p.name.split("-", 1)[1]).read_bytes() for p in copies]
    shards_fetched = lambda: {n: c for n, c in server.gets.items() if n.endswith(".tar")}
    before = shards_fetched()
    again = [b for rank in range(3) for b in TrainStream(cfg, rank, 3).worker_batches(1, 0)]
    assert again and shards_fetched() == before

    server.delay_s = 0.5
    shared = ShardCache(str(tmp_path / "other"))
    location = url(server) + "test-000000.tar"
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(shared.path(location))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and server.gets["test-000000.tar"] == 1
    assert Path(paths[0]).read_bytes() == (tiny_shards / "test-000000.tar").read_bytes()


def test_a_cached_shard_that_fails_its_hash_leaves_the_cache(tiny_shards, tmp_path):
    copy, victim = modified_copy(tiny_shards, tmp_path)
    cache = tmp_path / "cache"
    with serving(copy) as httpd:
        checked = train_batches(config(url(httpd), cache_dir=str(cache), verify_sha256=True))
    assert sum(b["errors"]["corrupt_shards"] for b in checked) >= 1
    cached = {p.name.split("-", 1)[1] for p in cache.glob("*-train-*.tar")}
    assert victim.name not in cached and len(cached) == len(list(copy.glob("train-*.tar"))) - 1


def test_a_cached_fetch_that_keeps_breaking_is_counted_leaves_no_part_and_is_fetched_when_it_heals(server, local,
                                                                                                    tmp_path):
    victim = "train-000003.tar"
    server.breaks[victim] = 100
    cache = tmp_path / "cache"
    cfg = config(url(server), cache_dir=str(cache))
    broken = train_batches(cfg)
    assert sum(b["errors"]["corrupt_shards"] for b in broken) >= 1
    assert server.gets[victim] >= 3  # the first fetch and its 2 retries, per window that meets it
    assert not any(victim in p.name and not p.name.endswith(".lock") for p in cache.iterdir())  # no copy, no part
    server.breaks[victim] = 0
    assert same_batches(train_batches(cfg), local[0])
