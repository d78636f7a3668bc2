"""soo::all_finite (the skip guard's check) against its reference and torch.isfinite.

The answer is a bool: exact on every path, so every case compares for equality.  Random tensors
hold the float format's extremes among random values (the largest finite value, the smallest
normal and subnormal, -0), so only an inf or a NaN may turn the answer; one is planted at the
first, the last or a random position, or at every position of a short tensor (every lane and
tail position of the kernels' vector loops)."""
import math

import pytest
import torch

from soo_ext import ops, reference
from soo_ext._support import guard

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
NONFINITE = [math.nan, math.inf, -math.inf]
requires_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")


def finite_tensor(n, dtype, seed, device="cpu"):
    """``n`` random finite values of ``dtype``, the format's extremes among them."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    t = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 4, -0.0],
                            dtype=dtype)
    where = torch.randint(0, max(n, 1), (min(n, len(extremes)),), generator=gen)
    t[where] = extremes[:len(where)]
    return t.to(device)


def planted(n, dtype, seed, position, value, device="cpu"):
    """A finite tensor with ``value`` at ``position`` ('first', 'last', 'middle': a random one, or
    an index)."""
    t = finite_tensor(n, dtype, seed, device)
    if position == "middle":
        position = int(torch.randint(0, n, (), generator=torch.Generator().manual_seed(seed + 1)))
    index = {"first": 0, "last": n - 1}.get(position, position)
    t[index] = value
    return t


def oracle(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def assert_answer(tensors, want):
    out = ops.all_finite(tensors)
    assert out.dtype == torch.bool and out.shape == () and out.device == tensors[0].device
    assert bool(out) == want == bool(reference.all_finite(tensors)) == oracle(tensors)


SIZES = [1, 2, 7, 33, 1001, 65_537, 1_000_003]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_planted_values(device, dtype, n):
    assert_answer([finite_tensor(n, dtype, seed=n, device=device)], True)
    for position in ("first", "last", "middle"):
        for k, value in enumerate(NONFINITE):
            t = planted(n, dtype, n + k, position, value, device)
            assert_answer([t], False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_every_position_of_a_short_tensor(device, dtype, offset):
    """n = 70 covers four 32-byte vectors a step, single vectors and a scalar tail for every
    width; ``offset``: a view starting off the allocation's alignment."""
    n = 70
    for index in range(n):
        base = planted(n + offset, dtype, seed=index, position=offset + index,
                       value=NONFINITE[index % 3], device=device)
        assert_answer([base[offset:]], False)
        assert_answer([base[:offset + index], base[offset + index + 1:]], True)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_encodings(device):
    """Every encoding with the exponent all ones is non-finite (quiet and signalling NaNs, any
    payload, either sign); the largest exponent below is finite."""
    for dtype, width in ((torch.float64, torch.int64), (torch.float32, torch.int32),
                         (torch.bfloat16, torch.int16), (torch.float16, torch.int16)):
        info = torch.finfo(dtype)
        bits = torch.tensor([info.max], dtype=dtype).view(width)  # exponent all ones but one
        mantissa_bits = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7,
                         torch.float16: 10}[dtype]
        inf_bits = torch.tensor([math.inf], dtype=dtype).view(width)
        sign = torch.tensor([-0.0], dtype=dtype).view(width)
        for payload in (0, 1, 1 << (mantissa_bits - 1), (1 << mantissa_bits) - 1):
            for s in (0, 1):
                v = (inf_bits | payload | (sign if s else 0)).view(dtype)
                assert_answer([finite_tensor(9, dtype, seed=payload, device=device),
                               v.to(device)], False)
        assert_answer([(bits | sign).view(dtype).to(device), bits.view(dtype).to(device)], True)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_empty_tensors(device):
    tensors = [finite_tensor(n, dt, seed=i, device=device)
               for i, (n, dt) in enumerate(zip((5, 0, 1001, 33, 0, 2), DTYPES + DTYPES[:2]))]
    assert_answer(tensors, True)
    for i, t in enumerate(tensors):
        if t.numel():
            bad = [u.clone() for u in tensors]
            bad[i][-1] = math.nan
            assert_answer(bad, False)
    empty = [torch.empty(0, dtype=dt, device=device) for dt in DTYPES]
    assert_answer(empty, True)
    assert_answer([torch.empty(3, 0, dtype=torch.float32, device=device)], True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_tensors(device, dtype):
    """Permuted (dense: read in place), strided with gaps (a non-finite value in a gap is not an
    element), expanded, and 0-dim tensors."""
    M = finite_tensor(33 * 17, dtype, seed=5, device=device).view(33, 17)
    assert_answer([M.t()], True)
    Mt = M.clone()
    Mt[32, 16] = math.inf
    assert_answer([Mt.t()], False)
    assert_answer([Mt.t()[1:]], False)  # with gaps: a copy, the inf in it
    assert_answer([Mt[:, :16]], True)  # the inf is in the column left out
    gaps = M.clone()
    gaps[:, 1::2] = math.nan
    assert_answer([gaps[:, ::2]], True)
    gaps[10, 4] = -math.inf
    assert_answer([gaps[:, ::2]], False)
    row = finite_tensor(17, dtype, seed=6, device=device)
    assert_answer([row.expand(5, 17)], True)
    row[3] = math.nan
    assert_answer([row.expand(5, 17)], False)
    assert_answer([torch.tensor(1.5, dtype=dtype, device=device)], True)
    assert_answer([torch.tensor(math.inf, dtype=dtype, device=device)], False)


@pytest.mark.parametrize("threads", [1, 2])
def test_chunks_over_threads(threads):
    """The CPU kernel splits a tensor into chunks of 2^16 elements over threads: values at the
    chunks' edges are seen with any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for index in (65_535, 65_536, 131_071, 200_000 - 1):
            assert_answer([planted(200_000, torch.float32, index, index, math.nan)], False)
        assert_answer([finite_tensor(200_000, torch.float32, seed=1)], True)
    finally:
        torch.set_num_threads(before)


def test_many_tensors():
    """More tensors than one CUDA launch takes (48 a launch), the bad one in the last batch."""
    for device in DEVICES:
        tensors = [finite_tensor(n % 37, torch.float32, seed=n, device=device) for n in range(100)]
        assert_answer(tensors, True)
        tensors[98][5] = math.inf
        assert_answer(tensors, False)


def test_the_skip_guard_uses_the_op():
    """SkipGuard's check is soo::all_finite where the compiled module is in use, else the same
    by torch ops."""
    t = [finite_tensor(10, torch.float32, seed=0)]
    guard.all_finite(t)  # resolves the op
    want = torch.ops.soo.all_finite.default if ops.extension_loaded() else None
    assert guard._fused_all_finite is want
    assert bool(guard.all_finite(t)) and not bool(guard.all_finite(t + [torch.tensor(math.nan)]))


@pytest.mark.parametrize("bad, match", [
    (lambda: ops.all_finite([]), "must not be empty"),
    (lambda: reference.all_finite([]), "must not be empty"),
    (lambda: ops.all_finite([torch.ones(3), torch.ones(3, dtype=torch.int32)]), "float16, got"),
    (lambda: ops.all_finite([torch.ones(3, dtype=torch.complex64)]), "float16, got"),
    (lambda: ops.all_finite([torch.ones(3), torch.empty(3, device="meta")]), "one device"),
])
def test_bad_arguments_are_refused(bad, match):
    with pytest.raises(RuntimeError, match=match):
        bad()


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_checks_its_arguments(device):
    """The kernels' own checks (the skip guard calls the op without the wrapper's)."""
    op = torch.ops.soo.all_finite.default
    with pytest.raises(RuntimeError, match="requires a non-empty list of Tensors"):
        op([])  # the dispatcher's own error
    with pytest.raises(RuntimeError, match="float16, got"):
        op([torch.ones(3, device=device), torch.ones(3, dtype=torch.int64, device=device)])
    if device == "cuda":
        with pytest.raises(RuntimeError, match="one device"):
            op([torch.ones(3, device=device), torch.ones(3)])


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = [finite_tensor(37, dt, seed=3, device=device) for dt in DTYPES]
    torch.library.opcheck(torch.ops.soo.all_finite.default, (tensors,))
    tensors[2][4] = math.nan
    torch.library.opcheck(torch.ops.soo.all_finite.default, (tensors,))
    torch.library.opcheck(torch.ops.soo.all_finite.default,
                          ([torch.empty(0, device=device), tensors[0][::3]],))
