"""soo_ext.curvature.kbfgs: the double damping's guarantees, the masked BFGS update against the
op's, the L-BFGS matrix product against the textbook two-loop recursion, and the H_a refresh."""
import math

import pytest
import torch

from soo_ext import LBFGSHistory, reference
from soo_ext.curvature.kbfgs import (bfgs_update_, double_damping, lbfgs_matrix_product,
                                     refresh_inverses_)
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
