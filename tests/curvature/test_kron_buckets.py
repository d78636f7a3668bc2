"""KronBuckets: slots reserved contiguously per bucket, the stacks allocated for them, one flat
buffer under the staged stacks, the batched decomposition per bucket and the masked keep."""
import torch

from soo_ext import ops
from soo_ext.curvature.kron_buckets import KronBuckets, keep_where


def buckets():
    b = KronBuckets()
    assert b.reserve(3, 3, 2) == 0
    assert b.reserve(("x", 2), 2) == 0
    assert b.reserve(3, 3) == 2  # contiguous after the first range
    assert b.reserve(("x", 2), 2, 3) == 1
    return b


def test_reserve_counts_slots_per_bucket():
    b = buckets()
    assert b.sizes == {3: 3, ("x", 2): 2} and b.counts == {3: 3, ("x", 2): 4}


def test_stacks_vectors_and_flat_stacks():
    b = buckets()
    eye = b.stacks(torch.float64, "cpu", identity=True, divisor=4.0)
    assert eye[3].shape == (3, 3, 3) and torch.equal(eye[3][1], torch.eye(3) / 4)
    zero = b.stacks(torch.float32, "cpu", identity=False)
    assert zero[("x", 2)].shape == (4, 2, 2) and not zero[("x", 2)].any()
    v = b.vectors(torch.int64, "cpu")
    assert v[3].shape == (3,) and v[3].dtype == torch.int64
    d = b.vectors(torch.float32, "cpu", fill=1, per_row=True)
    assert d[("x", 2)].shape == (4, 2) and (d[("x", 2)] == 1).all()
    buffer, stacks = b.flat_stacks(torch.float64, "cpu")
    assert buffer.numel() == 3 * 9 + 4 * 4
    stacks[3][2].fill_(5)
    stacks[("x", 2)][0, 1, 1] = 7
    assert buffer.sum() == 5 * 9 + 7  # views of the one buffer
    buffer.zero_()
    assert not stacks[3].any() and not stacks[("x", 2)].any()


def test_decompose_runs_the_op_once_per_bucket():
    b = buckets()
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for key, n in b.sizes.items():
        X = torch.randn(b.counts[key], 5, n, generator=gen, dtype=torch.float64)
        factors[key] = X.transpose(1, 2) @ X + torch.eye(n, dtype=torch.float64)
    calls = []

    def op(key, F):
        calls.append(key)
        return ops.kron_eigh(F)
    results = b.decompose(factors, op)
    assert calls == list(factors) and b.plan is None
    for key, (d, Q, status) in results.items():
        assert (status == 0).all()
        torch.testing.assert_close(Q @ torch.diag_embed(d) @ Q.transpose(1, 2), factors[key])


def test_keep_where_replaces_only_the_taken_factors():
    old = torch.zeros(3, 2, 2)
    new = torch.ones(3, 2, 2, dtype=torch.float64)
    keep_where(torch.tensor([True, False, True]), old, new)
    assert old.dtype == torch.float32
    assert old[0].eq(1).all() and old[1].eq(0).all() and old[2].eq(1).all()
    vec = torch.zeros(3, 2)
    keep_where(torch.tensor([False, True, False]), vec, torch.full((3, 2), 2.0))
    assert vec.tolist() == [[0, 0], [2, 2], [0, 0]]
