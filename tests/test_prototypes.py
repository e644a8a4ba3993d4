"""Class prototypes (dist_dml/prototypes.py) against a float64 loop reference, within fp16 rounding for any order of
the global batch's images, in fp16 within fp16's error, and through a state dict bit for bit."""
import numpy as np
import pytest
import torch

from dist_dml.method.class_prototypes import PrototypeTable

CLASSES, DIM = 12, 8


def batches(steps: int, seed: int = 0):
    """Global batches of 6 classes x 3 images (some classes again, some never), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        labels = torch.randperm(CLASSES - 2, generator=g)[:6].repeat_interleave(3)
        yield torch.nn.functional.normalize(torch.randn(len(labels), DIM, generator=g), dim=1), labels


def loop_reference(steps: int, momentum: float):
    """Plain loops in float64: per step, each present class's normalised mean, folded into its EMA."""
    table, updated = {}, {}
    for step, (emb, labels) in enumerate(batches(steps)):
        for c in sorted(set(labels.tolist())):
            mean = emb.double()[labels == c].sum(0)
            mean = mean / mean.norm()
            if c in table:
                mixed = momentum * table[c] + (1 - momentum) * mean
                table[c] = mixed / mixed.norm()
            else:
                table[c] = mean
            updated[c] = step
    return table, updated


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-6), ("fp16", 2e-3)])
def test_prototypes_equal_a_float64_loop(dtype, tol):
    protos = PrototypeTable(CLASSES, DIM, momentum=0.8, dtype=dtype)
    for step, (emb, labels) in enumerate(batches(7)):
        protos.update(emb, labels, step)
    want, updated = loop_reference(7, 0.8)
    for c in range(CLASSES):
        if c in want:
            np.testing.assert_allclose(protos.table[c].double().numpy(), want[c].numpy(), atol=tol)
            assert int(protos.updated[c]) == updated[c]
        else:
            assert int(protos.updated[c]) == -1 and not protos.table[c].any()
    stats = protos.stats(7)
    assert stats["prototype_share"] == len(want) / CLASSES
    assert stats["prototype_mean_age"] == pytest.approx(np.mean([7 - updated[c] for c in want]))


def test_prototypes_do_not_depend_on_how_the_batch_was_split_and_round_trip_bit_for_bit():
    """The global batch as 1 rank or as 3 ranks' shares gathered in rank order is one batch: the same table.
    A table reloaded from its state dict goes on exactly as the one that never stopped."""
    a, b = PrototypeTable(CLASSES, DIM), PrototypeTable(CLASSES, DIM)
    for step, (emb, labels) in enumerate(batches(4, seed=1)):
        a.update(emb, labels, step)
        shares = [(emb[i::3], labels[i::3]) for i in range(3)]  # uneven interleaved shares, gathered in rank order
        b.update(torch.cat([e for e, _ in shares]), torch.cat([lab for _, lab in shares]), step)
    torch.testing.assert_close(a.table.float(), b.table.float(), rtol=0, atol=1e-3)  # fp16 storage; sums reordered
    c = PrototypeTable(CLASSES, DIM)
    c.load_state_dict(a.state_dict())
    for step, (emb, labels) in enumerate(batches(3, seed=2), start=4):
        a.update(emb, labels, step)
        c.update(emb, labels, step)
    assert torch.equal(a.table, c.table) and torch.equal(a.updated, c.updated)
    with pytest.raises(ValueError, match="class count or model.embedding_dim changed"):
        PrototypeTable(CLASSES + 1, DIM).load_state_dict(a.state_dict())


def test_a_million_classes_of_128_fit_in_256_mb_at_fp16():
    protos = PrototypeTable(1_000_000, 128, dtype="fp16")
    assert protos.table.element_size() * protos.table.nelement() == 256_000_000
    with pytest.raises(ValueError, match="momentum in"):
        PrototypeTable(10, 4, momentum=1.0)
