"""soo_ext.curvature.kbfgs: the double damping's guarantees, the masked BFGS update against the
op's (and both batched over layers), the L-BFGS matrix product against the textbook two-loop
recursion, the H_a refresh, the pass statistics (low-precision rows, a pass after a non-finite
one), and the zero-padded groups of layers whose pairs are updated as one batch."""
import math

import pytest
import torch

from soo_ext import LBFGSHistory, reference
from soo_ext.curvature.kbfgs import (PairGroup, PassStatistics, bfgs_update_, double_damping,
                                     lbfgs_matrix_product, oldest_first, refresh_inverses_,
                                     size_groups)
from soo_ext.curvature.kfac_layers import KFACLayer

F64 = torch.float64


def spd(n, gen, scale=1.0):
    X = torch.randn(n, n, dtype=F64, generator=gen)
    return scale * (X @ X.T / n + 0.1 * torch.eye(n, dtype=F64))


@pytest.mark.parametrize("seed", range(40))
def test_double_damping_bounds(seed):
    """Powell's damping on H: s~^T y >= mu1 y^T H y; then the Levenberg-Marquardt step:
    s~^T y~ >= mu2 s~^T s~ (so y~ enters H_g with positive curvature); a pair that meets a
    bound is not changed by that damping."""
    gen = torch.Generator().manual_seed(seed)
    n, mu1, mu2 = 6, 0.2, math.sqrt(0.3)
    H = spd(n, gen, scale=10 ** (seed % 5 - 2))
    s, y = torch.randn(n, dtype=F64, generator=gen), torch.randn(n, dtype=F64, generator=gen)
    if seed % 4 == 0:
        y = H.inverse() @ s  # the curvature of H itself: s^T y = y^T H y, Powell keeps s
    Hy = H @ y
    s2, y2 = double_damping(s, y, Hy, mu1, mu2)
    tol = 1e-12 * (1 + abs(float(y @ Hy)) + float(s2 @ s2))
    assert float(s2 @ y) >= mu1 * float(y @ Hy) - tol
    assert float(s2 @ y2) >= mu2 * float(s2 @ s2) - tol
    if float(s @ y) >= mu1 * float(y @ Hy):
        assert torch.equal(s2, s)
    if float(s2 @ y) >= mu2 * float(s2 @ s2):
        assert torch.equal(y2, y)


def test_double_damping_of_a_zero_pair_is_finite():
    z = torch.zeros(4, dtype=F64)
    s, y = double_damping(z, z, z, 0.2, 0.5)
    assert torch.equal(s, z) and torch.equal(y, z)


def test_bfgs_update_is_the_ops_update_and_masked():
    gen = torch.Generator().manual_seed(0)
    H = spd(5, gen)
    s, y = torch.randn(5, dtype=F64, generator=gen), torch.randn(5, dtype=F64, generator=gen)
    s, y = double_damping(s, y, H @ y, 0.2, 0.5)
    expected = H.clone()
    reference.bfgs_direction(expected, s, y, torch.zeros(5, dtype=F64), True)
    got = H.clone()
    bfgs_update_(got, s, y, torch.tensor(True))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
    kept = H.clone()
    bfgs_update_(kept, s, torch.zeros_like(y), torch.tensor(False))  # s^T y = 0: masked
    assert torch.equal(kept, H)


def test_bfgs_update_of_a_pair_at_the_rounding_level_does_not_overflow():
    """float32, a pair ~1e-11 with s^T y < 0 (the output gradient's batch mean of a layer that
    feeds a BatchNorm is 0, so y is rounding noise): Powell's damping makes s~ ~ H y and
    rho = 1 / s~^T y~ ~ 1e21, whose square overflows float32; the update is O(1) all the same
    and equals the float64 one of the same float32 pair within float32 rounding.  Bound:
    u = H y and the dots are n-term sums, rho s two more roundings, each entry of the update
    a sum of four products: |error| <= (2n + 10) eps T, T the sum of the terms' magnitudes."""
    gen = torch.Generator().manual_seed(0)
    n, F32 = 6, torch.float32
    H = spd(n, gen).to(F32)
    s = 1e-11 * torch.randn(n, dtype=F64, generator=gen)
    y = 1e-11 * (torch.randn(n, dtype=F64, generator=gen) - s / s.norm())
    s, y = s.to(F32), y.to(F32)
    s, y = double_damping(s, y, H @ y, 0.2, math.sqrt(0.3))
    assert 1 / float((s.double() @ y.double())) ** 2 > torch.finfo(F32).max
    got = H.clone()
    bfgs_update_(got, s, y, torch.tensor(True))
    want = H.double()
    reference.bfgs_direction(want, s.double(), y.double(), torch.zeros(n, dtype=F64), True)
    rs = s.double().abs() / abs(float(s.double() @ y.double()))
    u = H.double().abs() @ y.double().abs()
    T = (H.double().abs() + 2 * rs[:, None] * u[None] + float(y.double().abs() @ u)
         * rs[:, None] * rs[None] + rs[:, None] * s.double().abs()[None])
    assert torch.isfinite(got).all()
    assert ((got.double() - want).abs() <= (2 * n + 10) * torch.finfo(F32).eps * T).all()


def test_bfgs_update_that_is_not_finite_is_not_taken():
    """An update that overflows (here H's entries near float32's largest) leaves H as it was,
    as the authors' code keeps H when the new one has an inf."""
    H = torch.diag(torch.tensor([3e38, 1.0, 1.0]))
    e1 = torch.tensor([1.0, 0.0, 0.0])
    kept = H.clone()
    bfgs_update_(kept, e1, e1, torch.tensor(True))
    assert torch.equal(kept, H)


@pytest.mark.parametrize("pushes", [0, 1, 3, 7])
def test_lbfgs_matrix_product_is_the_two_loop_recursion(pushes):
    gen = torch.Generator().manual_seed(pushes)
    n, m = 6, 3
    history = LBFGSHistory(n, m, F64)
    B = spd(n, gen)
    for _ in range(pushes):
        s = torch.randn(n, dtype=F64, generator=gen)
        history.push(s, B @ s)
    M = torch.randn(n, 4, dtype=F64, generator=gen)
    got = lbfgs_matrix_product(history, M)
    for j in range(4):
        want = -reference.lbfgs_two_loop_textbook(history.S, history.Y, M[:, j], history.newest,
                                                  history.count)
        torch.testing.assert_close(got[:, j], want, rtol=0, atol=1e-12)
        # and the op's direction for one column (what Powell's damping uses)
        torch.testing.assert_close(-history.direction(M[:, j])[0], want, rtol=0, atol=1e-12)


def test_refresh_inverses_by_size_and_masked():
    """Two sizes (two op calls); nothing changes on a skipped step."""
    layers = [KFACLayer(str(i), torch.nn.Linear(k, 2).double(), i)
              for i, k in enumerate((3, 4, 3))]
    gen = torch.Generator().manual_seed(0)
    A = [spd(l.a_dim, gen) for l in layers]
    H = [torch.eye(l.a_dim, dtype=F64) for l in layers]
    refresh_inverses_(layers, A, H, 0.5, torch.tensor(False))
    assert all(torch.equal(h, torch.eye(len(h), dtype=F64)) for h in H)
    refresh_inverses_(layers, A, H, 0.5, None)
    for a, h in zip(A, H):
        torch.testing.assert_close(h, torch.linalg.inv(a + 0.5 * torch.eye(len(a), dtype=F64)),
                                   rtol=0, atol=1e-12)


def stage_rows(stats, layer, rows_a, rows_g, g_scale):
    """Stage captures as LayerCapture does: each pooled by rows."""
    total = 0
    for a, g in zip(rows_a, rows_g):
        n = len(a)
        stats.stage(layer, a, g, total / (total + n), 1 / (total + n), g_scale)
        total += n


def test_pass_statistics_pool_bfloat16_rows_in_float32():
    """Autocast's bfloat16 rows, two captures: the means (and mean(a a^T)) are those of the rows
    in float64 up to float32 summation (n eps32 |a|); a bfloat16 sum would miss by ~1e-2."""
    layer = KFACLayer("0", torch.nn.Linear(7, 5), 0)
    stats = PassStatistics([layer], torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    rows_a = [(torch.randn(n, 8, generator=gen) + 3).to(torch.bfloat16) for n in (40, 24)]
    rows_g = [(torch.randn(n, 5, generator=gen) - 3).to(torch.bfloat16) for n in (40, 24)]
    stage_rows(stats, layer, rows_a, rows_g, g_scale=4.0)
    A, G = torch.cat(rows_a).double(), torch.cat(rows_g).double()
    tol = 64 * 2.0 ** -24 * 5  # 64 rows of |a| < 5 summed in float32
    torch.testing.assert_close(stats.a[0][0].double(), A.mean(0), rtol=0, atol=tol)
    torch.testing.assert_close(stats.g[0][0].double(), 2 * G.mean(0), rtol=0, atol=2 * tol)
    torch.testing.assert_close(stats.AA[0].double(), A.T @ A / len(A), rtol=0, atol=5 * tol)
    in_bf16 = rows_a[0].sum(0).double() / len(rows_a[0])  # what a bfloat16 sum would give
    assert (in_bf16 - rows_a[0].double().mean(0)).abs().max() > 20 * tol


def test_pass_statistics_begin_drops_a_non_finite_pass():
    """A pass with inf rows (a skipped step), then the next step's first pass: its statistics
    are those of its own rows (pooling starts at weight 0, and 0 * inf would be NaN)."""
    layer = KFACLayer("0", torch.nn.Linear(3, 2).double(), 0)
    stats = PassStatistics([layer], F64, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    a, g = torch.randn(6, 4, dtype=F64, generator=gen), torch.randn(6, 2, dtype=F64, generator=gen)
    for second in (False, True):
        stats.begin(second)
        stage_rows(stats, layer, [a * float("inf")], [g * float("inf")], 1.0)
        assert not all(torch.isfinite(b).all() for b in stats.buffers)
        stats.begin(second)
        stage_rows(stats, layer, [a], [g], 1.0)
        p = int(second)
        torch.testing.assert_close(stats.a[p][0], a.mean(0), rtol=0, atol=1e-15)
        torch.testing.assert_close(stats.g[p][0], g.mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(stats.AA[0], a.T @ a / 6, rtol=0, atol=1e-14)


@pytest.mark.parametrize("m", [1, 3, 5])
def test_oldest_first_is_the_ring_order(m):
    ring = torch.arange(m * 2, dtype=torch.float64).view(m, 2)
    for newest in range(m):
        for count in range(m + 1):
            idx = torch.tensor(reference.ring_slots(newest, count, m), dtype=torch.long)
            assert torch.equal(oldest_first(ring, newest, count), ring[idx])


def test_batched_damping_and_bfgs_update_are_the_per_pair_ones():
    """A batch of 3 pairs (one masked) zero-padded from sizes 5, 4, 2 to 5: the per-pair
    results in the leading slices, and the padding stays 0."""
    gen = torch.Generator().manual_seed(3)
    sizes, n = (5, 4, 2), 5
    H = torch.zeros(3, n, n, dtype=F64)
    s, y = torch.zeros(3, n, dtype=F64), torch.zeros(3, n, dtype=F64)
    for j, m in enumerate(sizes):
        H[j, :m, :m] = spd(m, gen)
        s[j, :m] = torch.randn(m, dtype=F64, generator=gen)
        y[j, :m] = torch.randn(m, dtype=F64, generator=gen)
    take = torch.tensor([True, False, True])
    want = []
    for j, m in enumerate(sizes):
        Hj = H[j, :m, :m].clone()
        sj, yj = double_damping(s[j, :m], y[j, :m], Hj @ y[j, :m], 0.2, 0.5)
        bfgs_update_(Hj, sj, yj, take[j])
        want.append((sj, yj, Hj))
    Hy = (H @ y[..., None])[..., 0]
    s2, y2 = double_damping(s, y, Hy, 0.2, 0.5)
    bfgs_update_(H, s2, y2, take)
    for j, (m, (sj, yj, Hj)) in enumerate(zip(sizes, want)):
        torch.testing.assert_close(s2[j, :m], sj, rtol=0, atol=1e-14)
        torch.testing.assert_close(y2[j, :m], yj, rtol=0, atol=1e-14)
        torch.testing.assert_close(H[j, :m, :m], Hj, rtol=0, atol=1e-13)
        assert not s2[j, m:].any() and not y2[j, m:].any()
        assert not H[j, m:].any() and not H[j, :, m:].any()


def _layers(outs):
    return [KFACLayer(str(i), torch.nn.Linear(3, k).double(), i) for i, k in enumerate(outs)]


def test_size_groups_pad_at_most_twice_the_state():
    """Largest first; a layer joins while k n^p <= 2 * the unpadded size."""
    assert size_groups(_layers((25, 25, 25, 10)), 2) == [[0, 1, 2, 3]]  # the MNIST-1D CNN
    assert size_groups(_layers((100, 100, 10)), 2) == [[0, 1, 2]]  # the MNIST-1D MLP
    assert size_groups(_layers((10, 4096, 10)), 2) == [[1, 0], [2]]  # 3 * 4096^2: too many
    assert size_groups(_layers((16, 64, 16)), 2) == [[1, 0], [2]]  # 3 * 64^2 > 2 (64^2 + 2 16^2)
    assert size_groups(_layers((16, 64, 16)), 1) == [[1, 0, 2]]  # vectors: 3 * 64 <= 2 (64 + 32)


def test_pair_group_state_entries_are_slices_until_replaced():
    layers = _layers((4, 2))
    gen = torch.Generator().manual_seed(0)
    states = [dict(s=torch.randn(l.out, dtype=F64, generator=gen),
                   y=torch.randn(l.out, dtype=F64, generator=gen), H_g=spd(l.out, gen))
              for l in layers]
    saved = [{k: v.clone() for k, v in st.items()} for st in states]
    group = PairGroup(layers, states, bfgs=True)
    for st, old in zip(states, saved):  # the values carried over, now slices of the group's
        assert all(torch.equal(st[k], old[k]) for k in old)
    assert states[1]["H_g"].data_ptr() == group.H[1].data_ptr()
    assert not group.H[1, 2:].any() and not group.pairs[1, :, 2:].any()
    group.H[1, :2, :2] += 1
    assert torch.equal(states[1]["H_g"], saved[1]["H_g"] + 1) and group.current(states)
    states[0]["s"] = states[0]["s"].clone()  # as a loaded state dict does
    assert not group.current(states)
