"""LBFGSHistory alone: argument checks, the ring (push order, count, s_scale, storage dtype),
reset, the state_dict round trip, and the Gram entries completed by a push after a push.  Its
direction against the textbook recursion is tested with the op: tests/ops/test_lbfgs_ops.py."""
import pytest
import torch

from soo_ext import LBFGSHistory, reference

from conftest import saved_copy
from op_inputs import random_history

# (gradient dtype, history storage dtype, tolerance)
DTYPES = [(torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5),
          (torch.float32, torch.bfloat16, 1e-5)]
DTYPE_IDS = ["fp64", "fp32", "bf16-history"]


def pairs(count, n, dtype, seed=0):
    """``count`` pairs (s, y) of positive curvature, made in float64 and cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    curvature = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    out = []
    for _ in range(count):
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = s * curvature + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        out.append((s.to(dtype), y.to(dtype)))
    return out


def test_history_rejects_bad_dtypes():
    with pytest.raises(ValueError, match="history_dtype"):
        LBFGSHistory(3, 2, dtype=torch.float64, history_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="history_size"):
        LBFGSHistory(3, 0)
    with pytest.raises(ValueError, match="dtype"):
        LBFGSHistory(3, 2, dtype=torch.float16)


def test_push_fills_the_ring_in_order():
    m, n = 3, 5
    hist = LBFGSHistory(n, m, dtype=torch.float64)
    assert (hist.history_size, hist.newest, hist.count, len(hist)) == (3, 2, 0, 0)
    data = pairs(7, n, torch.float64)
    for k, (s, y) in enumerate(data):  # no direction in between: every push completes the last
        hist.push(s, y)
        assert hist.newest == k % m and hist.count == len(hist) == min(k + 1, m)
        assert torch.equal(hist.S[k % m], s) and torch.equal(hist.Y[k % m], y)
    # the ring has wrapped twice: pairs 6, 4, 5 in the slots 0, 1, 2
    for slot, k in enumerate((6, 4, 5)):
        assert torch.equal(hist.S[slot], data[k][0]) and torch.equal(hist.Y[slot], data[k][1])
    # s_scale scales s (a float or a device tensor), not y; the oldest pair is dropped
    s, y = data[0]
    hist.push(s, y, s_scale=0.5)
    assert (hist.newest, hist.count) == (1, 3)
    assert torch.equal(hist.S[1], 0.5 * s) and torch.equal(hist.Y[1], y)
    hist.push(s, y, s_scale=torch.tensor(-2.0, dtype=torch.float64))
    assert hist.newest == 2 and torch.equal(hist.S[2], -2.0 * s) and torch.equal(hist.Y[2], y)


def test_bfloat16_storage_rounds_the_pairs():
    s, y = pairs(1, 9, torch.float32)[0]
    hist = LBFGSHistory(9, 2, dtype=torch.float32, history_dtype=torch.bfloat16)
    hist.push(s, y)
    assert hist.S.dtype == hist.Y.dtype == torch.bfloat16 and hist.SY.dtype == torch.float32
    assert torch.equal(hist.S[0], s.bfloat16()) and torch.equal(hist.Y[0], y.bfloat16())


def test_reset_forgets_the_pairs():
    m, n = 4, 33
    hist, g = random_history(m, n, m, 1, torch.float64, torch.float64, "cpu")
    s, y = pairs(1, n, torch.float64, seed=1)[0]
    hist.push(s, y)  # its pending Gram entries are forgotten too
    hist.reset()
    assert (hist.newest, hist.count, len(hist)) == (m - 1, 0, 0)
    d, _ = hist.direction(g)
    assert torch.equal(d, -g)  # steepest descent, as with no pair
    # From here on it is a fresh history: the same pair gives the same direction, bit for bit.
    fresh = LBFGSHistory(n, m, dtype=torch.float64)
    hist.push(s, y)
    fresh.push(s, y)
    assert hist.newest == fresh.newest == 0 and hist.count == fresh.count == 1
    for a, b in zip(hist.direction(g), fresh.direction(g)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,hist_dtype", [d[:2] for d in DTYPES], ids=DTYPE_IDS)
@pytest.mark.parametrize("pending", [False, True], ids=["complete", "pending"])
@pytest.mark.parametrize("via_bytes", [False, True], ids=["deepcopy", "bytes"])
def test_state_dict_round_trip_gives_the_same_directions(dtype, hist_dtype, pending, via_bytes):
    m, n = 4, 257
    hist, g = random_history(m, n, m, 1, dtype, hist_dtype, "cpu", seed=2)  # a wrapped ring
    more = pairs(3, n, dtype, seed=3)
    if pending:  # saved between a push and the direction that completes its Gram entries
        hist.push(*more[0])
    saved = saved_copy(hist.state_dict(), via_bytes)
    loaded = LBFGSHistory(n, m, dtype=dtype, history_dtype=hist_dtype)
    loaded.load_state_dict(saved)
    for key in ("S", "Y", "SY", "YY"):  # loaded into its own buffers, not aliasing the dict
        saved[key].fill_(float("nan"))
    assert (loaded.newest, loaded.count) == (hist.newest, hist.count)

    def run(h):
        out = list(h.direction(g))
        for s, y in more[1:]:
            h.push(s, y)
            out += h.direction(g + s)
        return out + [h.S, h.Y, h.SY, h.YY]
    for a, b in zip(run(hist), run(loaded), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("shape,key", [((6, 3), "S"), ((5, 4), "S"), (None, "SY")],
                         ids=["n", "history_size", "gram"])
def test_load_state_dict_refuses_a_shape_mismatch(shape, key):
    hist, _ = random_history(3, 5, 3, 0, torch.float64, torch.float64, "cpu")
    state = hist.state_dict()
    if shape is None:
        state = {**state, "SY": state["SY"][:2, :2]}
        shape = (5, 3)
    with pytest.raises(ValueError, match=f"history {key} has shape"):
        LBFGSHistory(*shape, dtype=torch.float64).load_state_dict(state)


@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
def test_push_after_push_completes_the_first_pairs_gram_entries(dtype, hist_dtype, tol):
    """Push after push, with no direction in between (the ring wraps): each push fills the Gram
    row and column of the pair before it, so SY and YY over all pairs but the newest equal the
    direct products; the newest pair's wait for the next direction."""
    m, n = 6, 513
    hist = LBFGSHistory(n, m, dtype=dtype, history_dtype=hist_dtype)
    acc = reference.accumulation_dtype(dtype)

    def assert_gram(slots):
        idx = torch.tensor(slots, dtype=torch.long)
        S, Y = hist.S[idx].to(acc), hist.Y[idx].to(acc)
        torch.testing.assert_close(hist.SY[idx][:, idx], S @ Y.T, rtol=tol * 10, atol=tol * 10)
        torch.testing.assert_close(hist.YY[idx][:, idx], Y @ Y.T, rtol=tol * 10, atol=tol * 10)
    for k, (s, y) in enumerate(pairs(9, n, dtype, seed=4)):
        hist.push(s, y)
        assert_gram([(hist.newest - j) % m for j in range(1, hist.count)])
        if k < m:  # not wrapped yet: the newest pair's entries are still the zeros of the start
            assert not hist.SY[hist.newest].any() and not hist.SY[:, hist.newest].any()
            assert not hist.YY[hist.newest].any() and not hist.YY[:, hist.newest].any()
    hist.direction(torch.zeros(n, dtype=dtype))
    assert_gram(list(range(m)))
