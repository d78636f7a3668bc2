"""soo_ext.curvature.momentum_pairs alone (no optimizer): the damping of constructed pairs, pairs
that are not stored, the averages and pairs across pair-update steps against a naive float64
transcription, skipped steps, host syncs, the normalised directions, the skip-guarded factors
and the block layout."""
import math
from collections import defaultdict

import pytest
import torch

from soo_ext.curvature.lbfgs_history import LBFGSHistory
from soo_ext.curvature.momentum_pairs import (BlockLayout, MomentumPairs, SkipFactors,
                                              _damping_phi, block_partition, directions,
                                              update_pairs)

from conftest import count_host_syncs

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(autouse=True)
def no_grad():
    """The components run inside an optimizer's step, under no_grad."""
    with torch.no_grad():
        yield

F64 = torch.float64
DAMPING = dict(sigma_low=0.01, sigma_high=1.5, delta=0.01)


def pairs_of(n, m=3, dtype=F64, history_dtype=None):
    """A MomentumPairs over zero averages, as a block's state starts."""
    state = {key: torch.zeros(n, dtype=dtype) for key in MomentumPairs.KEYS}
    return MomentumPairs(state, LBFGSHistory(n, m, dtype, "cpu", history_dtype))


def ones(x):
    return torch.ones((), dtype=x.dtype)


def newest(pairs):
    h = pairs.history
    return h.S[h.newest], h.Y[h.newest]


# ---------------------------------------------------------------------------------------------
# Damping

@pytest.mark.parametrize("tau,delta,phi", [
    (-1.0, 0.01, 0.99 / 2),  # tau < sigma_low: (1 - sigma_low) / (1 - tau)
    (3.0, 0.01, 0.5 / 2),    # tau > sigma_high: (sigma_high - 1) / (tau - 1)
    (1.0, 0.01, 0.99),       # in range: 1, capped at 1 - delta
    (-1.0, 0.6, 0.4),        # the cap also applies to a damped phi
    (0.5, 0.0, 1.0),         # in range and no cap: the pair as it is
])
def test_damping_of_a_constructed_pair(tau, delta, phi):
    assert _damping_phi(tau, 0.01, 1.5, delta) == pytest.approx(phi, rel=1e-15)
    pairs = pairs_of(3)
    s = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    y = tau * s
    stored = pairs.store(s.clone(), y.clone(), s.dot(s).item(), s.dot(y).item(), 0.01, 1.5, delta)
    assert stored and len(pairs) == 1
    s_new, y_new = newest(pairs)
    torch.testing.assert_close(s_new, s, rtol=0, atol=0)
    torch.testing.assert_close(y_new, (phi * tau + 1 - phi) * s, rtol=1e-14, atol=1e-16)
    pairs.direction(torch.zeros(3, dtype=F64))  # completes the Gram entries of the new pair
    h = pairs.history
    assert h.SY[h.newest, h.newest] > 0


@pytest.mark.parametrize("ss,sy", [(0.0, 0.0), (float("inf"), 1.0), (1.0, float("nan")),
                                   (float("nan"), float("nan")), (1.0, float("-inf"))])
def test_pair_with_no_motion_or_nonfinite_products_is_not_stored(ss, sy):
    pairs = pairs_of(3)
    s = torch.zeros(3, dtype=F64)
    assert not pairs.store(s, s.clone(), ss, sy, **DAMPING)
    assert len(pairs) == 0


def test_pair_with_no_motion_is_not_stored_at_a_pair_update():
    # The averages moved (g_bar did, p_bar did not): s = 0, no pair; the averages still roll.
    pairs = pairs_of(3)
    st = pairs.state
    st["p_bar"].fill_(2.0)
    st["p_bar_prev"].fill_(2.0)
    st["g_bar"].fill_(1.0)
    grad = torch.full((3,), 5.0, dtype=F64)
    assert update_pairs([pairs], [grad], ones(grad), False, 0.9, **DAMPING)
    assert len(pairs) == 0
    assert torch.equal(st["g_bar_prev"], torch.ones(3, dtype=F64))
    assert torch.equal(st["g_bar"], grad) and torch.equal(st["p_bar_prev"], st["p_bar"])


# ---------------------------------------------------------------------------------------------
# Across pair-update steps, against a naive transcription

class NaivePairs:
    """The averages and pairs of one block, written out (float64, oldest pair first)."""

    def __init__(self, n, m, mu_p, mu_g, beta):
        self.m, self.mu_p, self.mu_g, self.beta = m, mu_p, mu_g, beta
        self.p_bar = self.g_bar = torch.zeros(n, dtype=F64)
        self.p_prev = self.g_prev = None
        self.S, self.Y = [], []

    def accumulate(self, p, g):
        self.p_bar = self.mu_p * self.p_bar + p
        self.g_bar = self.mu_g * self.g_bar + g

    def pair_update(self, g, sigma_low, sigma_high, delta):
        if self.p_prev is not None:
            s, y = self.p_bar - self.p_prev, self.g_bar - self.g_prev
            if self.S:
                s = (1 - self.beta) * s + self.beta * self.S[-1]
                y = (1 - self.beta) * y + self.beta * self.Y[-1]
            tau = (s.dot(y) / s.dot(s)).item()
            if tau < sigma_low:
                phi = (1 - sigma_low) / (1 - tau)
            elif tau > sigma_high:
                phi = (sigma_high - 1) / (tau - 1)
            else:
                phi = 1.0
            phi = min(phi, 1 - delta)
            y = phi * y + (1 - phi) * s
            self.S = (self.S + [s])[-self.m:]
            self.Y = (self.Y + [y])[-self.m:]
        self.p_prev, self.g_prev = self.p_bar.clone(), self.g_bar.clone()
        self.g_bar = g.clone()


@pytest.mark.parametrize("mu_p,mu_g,beta,damping", [
    (0.999, 0.999, 0.9, DAMPING),
    (0.9, 0.8, 0.5, dict(sigma_low=0.2, sigma_high=1.2, delta=0.1)),
    (0.0, 0.0, 0.0, dict(sigma_low=0.01, sigma_high=1.01, delta=0.01)),  # classic pairs
])
def test_averages_and_pairs_match_naive_transcription(mu_p, mu_g, beta, damping):
    gen = torch.Generator().manual_seed(0)
    sizes, m, T = (5, 3), 2, 3
    blocks = [pairs_of(n, m) for n in sizes]
    naive = [NaivePairs(n, m, mu_p, mu_g, beta) for n in sizes]
    A = [torch.randn(n, n, dtype=F64, generator=gen) for n in sizes]
    H = [a @ a.T / n + 0.1 * torch.eye(n, dtype=F64) for a, n in zip(A, sizes)]  # quadratics
    x = [torch.randn(n, dtype=F64, generator=gen) for n in sizes]
    mu = [torch.tensor(mu_p, dtype=F64), torch.tensor(mu_g, dtype=F64)]
    first = True
    for k in range(1, 7 * T + 1):
        g = [h @ xi + 0.1 * torch.randn(len(xi), dtype=F64, generator=gen)
             for h, xi in zip(H, x)]
        for b, nb, xi, gi in zip(blocks, naive, x, g):
            b.accumulate(xi, gi, *mu, ones(xi))
            nb.accumulate(xi, gi)
        if k % T == 0:
            assert update_pairs(blocks, g, ones(g[0]), first, beta, **damping)
            first = False
            for nb, gi in zip(naive, g):
                nb.pair_update(gi, **damping)
        for b, nb in zip(blocks, naive):
            st = b.state
            for ours, theirs in [(st["p_bar"], nb.p_bar), (st["g_bar"], nb.g_bar)]:
                torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
            assert len(b) == len(nb.S)
            if nb.S:
                s, y = newest(b)
                torch.testing.assert_close(s, nb.S[-1], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(y, nb.Y[-1], rtol=1e-12, atol=1e-12)
        x = [xi - 0.1 * gi for xi, gi in zip(x, g)]
    assert all(len(nb.S) == m for nb in naive)  # the ring has wrapped
    for b in blocks:
        assert b.history.count == m and b.history.newest == (m - 1 + 6) % m  # 6 pushes
        s, y = newest(b)
        assert s.dot(y) > 0  # every stored pair, damped, has positive curvature


def test_skipped_pair_update_changes_nothing():
    pairs = pairs_of(4)
    st = pairs.state
    gen = torch.Generator().manual_seed(1)
    for key in MomentumPairs.KEYS:
        st[key].copy_(torch.randn(4, dtype=F64, generator=gen))
    pairs.store(torch.randn(4, dtype=F64, generator=gen), torch.randn(4, dtype=F64, generator=gen),
                1.0, 1.0, **DAMPING)
    pairs.save()
    before = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
    history = {k: v.clone() if torch.is_tensor(v) else v for k, v in st["history"].items()}
    grad = torch.randn(4, dtype=F64, generator=gen)
    # A skipped step: the accumulators are multiplied by 1 and get nothing added ...
    pairs.accumulate(grad, torch.zeros(4, dtype=F64), ones(grad), ones(grad), 0 * ones(grad))
    # ... and the pair update sees okf = 0.
    assert not update_pairs([pairs], [grad], 0 * ones(grad), False, 0.9, **DAMPING)
    for key, v in before.items():
        assert torch.equal(st[key], v), key
    pairs.save()
    for key, v in history.items():
        assert torch.equal(st["history"][key], v) if torch.is_tensor(v) else st["history"][key] == v


def test_first_pair_update_only_records_the_averages():
    pairs = pairs_of(3)
    st = pairs.state
    st["p_bar"].fill_(1.0)
    st["g_bar"].fill_(2.0)
    grad = torch.full((3,), 3.0, dtype=F64)
    assert update_pairs([pairs], [grad], ones(grad), True, 0.9, **DAMPING)
    assert len(pairs) == 0
    assert torch.equal(st["p_bar_prev"], st["p_bar"]) and torch.equal(st["g_bar_prev"],
                                                                      torch.full((3,), 2.0, dtype=F64))
    assert torch.equal(st["g_bar"], grad)


def test_pair_update_syncs_once(monkeypatch):
    blocks = [pairs_of(3), pairs_of(4)]
    for b in blocks:
        b.state["p_bar"].normal_()
        b.state["g_bar"].normal_()
    grads = [torch.ones(3, dtype=F64), torch.ones(4, dtype=F64)]
    count = count_host_syncs(monkeypatch)
    update_pairs(blocks, grads, ones(grads[0]), False, 0.9, **DAMPING)
    assert count[0] == 1


def test_history_is_adopted_from_the_state():
    pairs = pairs_of(3, m=2)
    pairs.store(torch.tensor([1.0, 0, 0], dtype=F64), torch.tensor([1.0, 1, 0], dtype=F64),
                1.0, 1.0, **DAMPING)
    pairs.save()
    resumed = MomentumPairs(pairs.state, LBFGSHistory(3, 2, F64, "cpu"))
    assert len(resumed) == 1
    for a, b in zip(newest(resumed), newest(pairs)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Directions

@pytest.mark.parametrize("normalize", ["l2", "kl", None])
@pytest.mark.parametrize("ok", [True, False])
def test_directions_are_normalised_over_all_blocks(normalize, ok):
    # Without pairs d = -g: the normalisation alone is seen.
    blocks = [pairs_of(3), pairs_of(2)]
    grads = [torch.tensor([0.3, -0.4, 0.1], dtype=F64), torch.tensor([0.2, 0.0], dtype=F64)]
    okf = torch.tensor(float(ok), dtype=F64)
    ds, coef = directions(blocks, grads, normalize, 0.05, -okf)
    for d, g in zip(ds, grads):
        assert torch.equal(d, -g)
    gg = sum(g.dot(g).item() for g in grads)
    scale = {"l2": 1 / math.sqrt(gg), "kl": min(1.0, math.sqrt(0.05 / gg)), None: 1.0}[normalize]
    assert coef.item() == pytest.approx(-scale * ok, rel=1e-15)


@pytest.mark.parametrize("ok", [True, False])
def test_direction_of_a_zero_gradient_has_coefficient_zero(ok):
    # d = 0: the l2 norm is 0 and c is 0 (not inf, which would make c d NaN)
    blocks, grads = [pairs_of(3)], [torch.zeros(3, dtype=F64)]
    ds, coef = directions(blocks, grads, "l2", 0.05, -torch.tensor(float(ok), dtype=F64))
    assert coef.item() == 0 and torch.equal(ds[0] * coef, torch.zeros(3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Skip-guarded factors

def test_skip_factors(monkeypatch):
    factors = SkipFactors(F64, torch.device("cpu"))
    ok, skipped = torch.tensor(True), torch.tensor(False)
    count = count_host_syncs(monkeypatch)

    def values(ok, decays, scales):
        out = factors(ok, decays, scales)
        assert all(t.dim() == 0 and t.dtype == F64 for t in out)
        synced = count[0]
        out = [t.item() for t in out]
        count[0] = synced  # (these reads are the test's)
        return out
    assert values(ok, [0.999, 0.9], [-1.0]) == [0.999, 0.9, -1.0]
    assert values(skipped, [0.999, 0.9], [-1.0]) == [1.0, 1.0, 0.0]
    # a value changed by a schedule is refilled; so is the layout of a longer list
    assert values(ok, [0.999, 0.5], [-1.0]) == [0.999, 0.5, -1.0]
    assert values(ok, [0.9, 0.5, 0.25], [2.0]) == [0.9, 0.5, 0.25, 2.0]
    assert values(skipped, [0.9, 0.5, 0.25], [2.0]) == [1.0, 1.0, 1.0, 0.0]
    assert count[0] == 0


# ---------------------------------------------------------------------------------------------
# Block layout

def params_of(*shapes):
    return [torch.zeros(s, dtype=F64, requires_grad=True) for s in shapes]


def test_block_partition():
    ps = params_of(2, 3, 4)
    assert block_partition(None, ps) is None and block_partition("groups", ps) == "groups"
    assert block_partition([[ps[2], ps[0]], [ps[1]]], ps) == ((2, 0), (1,))
    for blocks, match in [("layers", "blocks"), ([[ps[0]], []], "empty"),
                          ([[ps[0], ps[1]], [ps[1]]], "twice"), ([ps[0]], "Tensor"),
                          ([[ps[0], torch.zeros(2)]], "not one of")]:
        with pytest.raises(ValueError, match=match):
            block_partition(blocks, ps)


def test_block_layout():
    ps = params_of((2, 2), 3, 4, 5)
    groups = [[ps[0], ps[1]], [ps[2], ps[3]]]
    state = defaultdict(dict)  # as Optimizer.state
    # One block over ps[3] (group 1) and ps[0] (group 0), sorted by group; ps[1], ps[2] left out.
    layout = BlockLayout(groups, ((3, 0),), state, 4, None, "X")
    (pre,), (plain,) = layout.pre, layout.plain
    assert pre.params == [ps[0], ps[3]] and plain.params == [ps[1], ps[2]]
    assert [(s.group, s.start, s.end) for s in pre.segments] == [(0, 0, 4), (1, 4, 9)]
    assert [(s.group, s.start, s.end) for s in plain.segments] == [(0, 0, 3), (1, 3, 7)]
    assert set(state[ps[0]]) == {"momentum_buffer", "history", *MomentumPairs.KEYS}
    assert set(state[ps[1]]) == {"momentum_buffer"} and plain.pairs is None
    assert layout.history_size == 4 and not layout.has_pairs()

    # gather: params and grads into the flat buffers (a missing grad is zero), negated if asked
    for i, p in enumerate(ps):
        p.fill_(i + 1)
        p.grad = torch.full_like(p, 10.0 * (i + 1))
    ps[3].grad = None
    pre.gather(True, "X")
    assert torch.equal(pre.param, torch.tensor([1.0] * 4 + [4.0] * 5, dtype=F64))
    assert torch.equal(pre.grad, torch.tensor([-10.0] * 4 + [0.0] * 5, dtype=F64))
    # per-group options, segment by segment
    pre.add_weight_decay([0.5, 0.0])
    assert torch.equal(pre.grad, torch.tensor([-9.5] * 4 + [0.0] * 5, dtype=F64))
    pre.scale(pre.grad, [torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64)])
    assert torch.equal(pre.grad, torch.tensor([-19.0] * 4 + [0.0] * 5, dtype=F64))
    # the momentum step: buf <- m buf + coef d, p <- p - lr buf per segment; ps[3] has no
    # gradient: it and its part of buf are left alone
    buf = pre.state["momentum_buffer"]
    buf.fill_(1.0)
    ones = torch.ones(9, dtype=F64)
    two, three = torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    ok, zero = torch.tensor(True), torch.zeros((), dtype=F64)
    assert torch.equal(pre.absent(), torch.tensor([False] * 4 + [True] * 5))
    pre.momentum_step(ones, torch.tensor(0.5, dtype=F64), [two, three], [0.1, 0.2], ok, zero)
    assert torch.equal(buf, torch.tensor([2.5] * 4 + [1.0] * 5, dtype=F64))
    assert torch.equal(ps[0], torch.full((2, 2), 1 - 0.25, dtype=F64))
    assert torch.equal(ps[3], torch.full((5,), 4.0, dtype=F64))
    ps[3].grad = torch.zeros(5, dtype=F64)
    assert pre.absent() is None
    pre.momentum_step(ones, torch.tensor(0.5, dtype=F64), [two, three], [0.1, 0.2], ok, zero)
    assert torch.equal(ps[3], torch.full((5,), 4.0 - 0.2 * 3.5, dtype=F64))
    # a skipped step (ok False: coef 0 and m 1 come from the guard) moves nothing
    before = [p.clone() for p in ps]
    pre.momentum_step(ones, torch.tensor(0.0, dtype=F64), [torch.ones((), dtype=F64)] * 2,
                      [0.1, 0.2], torch.tensor(False), zero)
    assert all(torch.equal(a, b) for a, b in zip(ps, before))

    # A state saved with other blocks is refused.
    with pytest.raises(ValueError, match="X state 'momentum_buffer' has shape"):
        BlockLayout(groups, None, state, 4, None, "X")


def test_block_gather_refuses_sparse_gradients():
    (p,) = params_of(3)
    layout = BlockLayout([[p]], None, defaultdict(dict), 2, None, "X")
    p.grad = torch.zeros(3, dtype=F64).to_sparse()
    with pytest.raises(RuntimeError, match="X does not support sparse gradients"):
        layout.pre[0].gather(False, "X")

