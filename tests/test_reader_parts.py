"""The reader's parts against independent references: the tar parser against Python's tarfile and
webdataset, the augmentation against torchvision transforms v2."""
import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from dist_dml.data.tar import _samples
from dist_dml.data import (DataConfig, ShardError, crop_box, decode, eval_image, new_batch, resize_into,
                           tar_members, train_image)

from .conftest import synthetic_shards


def write_tar(path: Path, fmt: int) -> list[tuple[str, bytes]]:
    """A tar in ``fmt`` with awkward members; returns its regular files as tarfile reads them back."""
    rng = random.Random(fmt)
    names = ["k1.json", "k1.0.jpg", "k1.1.jpg", "empty.0.jpg", "odd.0.jpg", "d" * 120 + "/long.0.jpg"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["produit-é.0.jpg", "n" * 140 + ".0.jpg"]  # non-ASCII; a name no ustar header holds
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            size = {"empty.0.jpg": 0, "odd.0.jpg": 513}.get(name, rng.randrange(1, 3000))
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(rng.randrange(256) for _ in range(size))))
            if i == 2:
                link = tarfile.TarInfo("k1.link")
                link.type, link.linkname = tarfile.SYMTYPE, "k1.json"
                tar.addfile(link)
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_match_tarfile(tmp_path, fmt):
    path = tmp_path / "t.tar"
    expected = write_tar(path, fmt)
    assert list(tar_members(str(path), lambda name: True)) == expected
    asked = []
    kept = list(tar_members(str(path), lambda name: asked.append(name) or name.endswith(".json")))
    assert asked == [name for name, _ in expected]  # only regular files are offered
    assert kept == [m for m in expected if m[0].endswith(".json")]


def test_damaged_tar_yields_whole_members_then_raises(tmp_path):
    path = tmp_path / "t.tar"
    expected = write_tar(path, tarfile.GNU_FORMAT)
    data = path.read_bytes()
    raised = 0
    for cut in range(0, len(data), 173):
        path.write_bytes(data[:cut])
        got = []
        try:
            for member in tar_members(str(path), lambda name: True):
                got.append(member)
        except ShardError:
            raised += 1
        assert got == expected[:len(got)]  # never a partial member
    assert raised > 20
    # A flipped byte in the third header: the checksum catches it, members before it were read.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[2].offset
    damaged = bytearray(data)
    damaged[third + 10] ^= 0x20
    path.write_bytes(bytes(damaged))
    got = []
    with pytest.raises(ShardError, match=f"checksum at byte {third}"):
        for member in tar_members(str(path), lambda name: True):
            got.append(member)
    assert got == expected[:1]  # the folder is member 0; k1.json is the only file before byte `third`


def test_samples_group_like_webdataset(tmp_path):
    from webdataset.tariterators import tarfile_samples

    root = synthetic_shards(tmp_path / "s", 12, 0, 0.05)
    records = 0
    for shard in sorted(root.glob("*.tar")):
        ours = list(_samples(tar_members(str(shard), lambda name: True)))
        theirs = [(s.pop("__key__"), {k: v for k, v in s.items() if not k.startswith("__")})
                  for s in tarfile_samples([{"url": str(shard)}])]
        assert ours == theirs
        records += len(ours)
    assert records == 12 > len(list(root.glob("*.tar")))


def test_a_cut_shard_loses_no_whole_record(tmp_path):
    from dist_dml.data import FaultCounter, read_records

    root = synthetic_shards(tmp_path / "s", 6, 0, 1)
    shard = sorted(root.glob("*.tar"))[0]
    data = shard.read_bytes()
    ends, ids = {}, {}  # per record key: where its last member's data ends; its image ids (tarfile's reading)
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key = member.name.split(".")[0]
            ends[key] = member.offset_data + member.size
            if member.name.endswith(".json"):
                ids[key] = json.loads(tar.extractfile(member).read())["image_ids"]
    errors = FaultCounter()
    assert [r["image_ids"] for r in read_records([str(shard)], faults=errors)] == list(ids.values())
    assert len(ids) == 6 and not errors.corrupt_shards
    last = max(ends.values())
    for cut in sorted(set(range(0, last, 331)) | {e + d for e in ends.values() for d in (-1, 0, 1)}):
        shard.write_bytes(data[:cut])
        errors = FaultCounter()
        got = [r["image_ids"] for r in read_records([str(shard)], faults=errors)]
        assert got == [ids[key] for key in ids if ends[key] <= cut], cut  # every whole record, only those
        assert errors.corrupt_shards == {str(shard)}, cut  # reported, even when cut between records


def jpeg(height: int, width: int, seed: int) -> bytes:
    from torchvision.io import encode_jpeg

    image = (torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    return encode_jpeg(image, quality=95).numpy().tobytes()


SHAPES = [(256, 256), (300, 500), (500, 180), (224, 224), (231, 400)]


@pytest.mark.parametrize("shape", SHAPES)
def test_augmentation_is_torchvision_v2_bit_for_bit(shape):
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    data, cfg = jpeg(*shape, seed=shape[0]), DataConfig(image_size=224, resize=256)
    image = decode(data).contiguous()
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(image)
    assert torch.equal(eval_image(data, cfg), reference)
    rng = random.Random(0)
    out = new_batch(2, 224)
    for _ in range(4):
        top, left, h, w = crop_box(*shape, rng, (0.16, 1.0))
        reference = TF.resized_crop(image, top, left, h, w, [224, 224], antialias=True)
        assert torch.equal(resize_into(image[:, top:top + h, left:left + w], out[0]), reference)
        assert torch.equal(resize_into(image[:, top:top + h, left:left + w], out[1], flip=True), reference.flip(-1))


def test_crop_box_follows_random_resized_crop():
    rng = random.Random(3)
    shares, aspects = [], []
    for _ in range(2000):
        top, left, h, w = crop_box(300, 400, rng, (0.2, 0.9))
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        shares.append(h * w / (300 * 400))
        aspects.append(w / h)
    assert 0.19 < min(shares) < 0.25 and 0.85 < max(shares) < 0.91
    assert 0.72 < min(aspects) < 0.78 and 1.28 < max(aspects) < 1.36
    # No box of the asked share and ratio fits a strip: the central crop, ratio clamped to 4/3.
    assert crop_box(30, 1000, random.Random(0), (0.9, 1.0)) == (0, 480, 30, 40)


def test_train_image_is_a_function_of_its_rng():
    data, cfg = jpeg(260, 330, seed=1), DataConfig(image_size=64, resize=72)
    a, b = train_image(data, cfg, random.Random(5)), train_image(data, cfg, random.Random(5))
    assert torch.equal(a, b) and a.shape == (3, 64, 64)
    assert not torch.equal(a, train_image(data, cfg, random.Random(6)))
