"""The gradient window (ring + Gram matrix, pushed on the device) and the M-FAC and GGT
coefficients against dense float64 oracles: the n x n matrix formed and solved."""
import pytest
import torch

from soo_ext.curvature.gradient_window import (GradientWindow, ggt_coefficients,
                                               mfac_coefficients, window_state_bytes)

F64 = torch.float64
TRUE, FALSE = torch.tensor(True), torch.tensor(False)


def window_of(size, n, dtype=F64, window_dtype=F64):
    return GradientWindow({}, size, n, dtype, torch.device("cpu"), window_dtype)


@pytest.mark.parametrize("window_dtype", [F64, torch.float32, torch.bfloat16])
def test_push_writes_the_oldest_row_and_keeps_the_gram_matrix(window_dtype):
    torch.manual_seed(0)
    dtype = F64 if window_dtype == F64 else torch.float32
    w = window_of(3, 7, dtype, window_dtype)
    grads = [torch.randn(7, dtype=dtype) for _ in range(5)]
    for t, g in enumerate(grads):
        extra = torch.randn(7, dtype=dtype)
        D = w.push(g, TRUE, [extra])
        assert int(w.state["slot"]) == (t + 1) % 3
        assert torch.equal(w.W[t % 3], g.to(window_dtype))
        Wd = w.W.to(F64)
        # the stored (rounded) rows' products, summed in float64: exact up to float64 rounding
        torch.testing.assert_close(w.K, Wd @ Wd.T, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(D[:, 1], Wd @ extra.to(F64), rtol=1e-14, atol=1e-14)
        assert torch.equal(w.K, w.K.T)
    ages = w.ages()  # 5 pushes into 3 slots: slot 1 is the newest, then 0, then 2
    assert ages.tolist() == [1.0, 0.0, 2.0]


def test_a_masked_push_changes_nothing():
    torch.manual_seed(1)
    w = window_of(4, 6)
    for _ in range(3):
        w.push(torch.randn(6, dtype=F64), TRUE)
    before = {k: v.clone() for k, v in w.state.items()}
    w.push(torch.full((6,), float("nan"), dtype=F64).nan_to_num(0), FALSE)
    for k, v in w.state.items():
        assert torch.equal(v, before[k]), k


def test_a_fresh_window_is_zero_and_a_wrong_saved_one_is_refused():
    w = window_of(5, 3)
    assert not w.W.any() and not w.K.any() and int(w.state["slot"]) == 0
    with pytest.raises(ValueError, match="window options differ"):
        GradientWindow(w.state, 4, 3, F64, torch.device("cpu"), F64)
    assert window_state_bytes(5, 3, torch.bfloat16) == 5 * 3 * 2 + 8 * 25


@pytest.mark.parametrize("filled", [1, 3, 6])
def test_mfac_coefficients_apply_the_inverse_damped_fisher(filled):
    """F = damping I + (1/m) sum_i g_i g_i^T with m the window size (empty slots are zero)."""
    torch.manual_seed(2)
    m, n, damping = 6, 11, 1e-3
    w = window_of(m, n)
    for _ in range(filled):
        w.push(torch.randn(n, dtype=F64), TRUE)
    x = torch.randn(n, dtype=F64)
    coef, base_coef = mfac_coefficients(w.K, w.W @ x, damping, m)
    got = base_coef * x + coef @ w.W
    F = damping * torch.eye(n, dtype=F64) + w.W.T @ w.W / m
    want = torch.linalg.solve(F, x)
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


@pytest.mark.parametrize("beta2", [1.0, 0.7])
def test_ggt_coefficients_apply_the_regularised_inverse_root(beta2):
    """(M^(1/2) + eps I)^-1 m with M = G G^T, G = W^T diag(beta2^age): 1 / (sigma + eps) on the
    window's span, 1 / eps off it."""
    torch.manual_seed(3)
    r, n, eps = 4, 9, 1e-2
    w = window_of(r, n)
    for _ in range(6):  # wrapped
        w.push(torch.randn(n, dtype=F64), TRUE)
    m = torch.randn(n, dtype=F64)
    weights = beta2 ** w.ages()
    coef, base_coef = ggt_coefficients(w.K, w.W @ m, weights, eps)
    got = base_coef * m + coef @ w.W
    G = w.W.T * weights
    lam, Q = torch.linalg.eigh(G @ G.T)
    lam = torch.where(lam > 1e-12 * lam[-1], lam, 0.0)  # rank r: the rest is rounding
    want = Q @ ((Q.T @ m) / (lam.sqrt() + eps))
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


def test_ggt_of_an_empty_window_is_m_over_eps():
    w = window_of(3, 4)
    m = torch.randn(4, dtype=F64)
    coef, base_coef = ggt_coefficients(w.K, w.W @ m, torch.ones(3, dtype=F64), 1e-4)
    assert not coef.any() and float(base_coef) == 1e4
