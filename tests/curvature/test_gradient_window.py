"""The gradient window (ring + Gram matrix, pushed on the device) and the M-FAC and GGT
coefficients against dense float64 oracles: the n x n matrix formed and solved."""
import pytest
import torch

from soo_ext.curvature.gradient_window import (GradientWindow, MFACInverse, ggt_coefficients,
                                               replace_in_inverse_, window_state_bytes)

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


def mfac_oracle(W, x, damping):
    """F^{-1} x with F = damping I + W^T W / m formed (n x n) and solved, float64."""
    Wd = W.to(F64)
    F = damping * torch.eye(Wd.shape[1], dtype=F64) + Wd.T @ Wd / Wd.shape[0]
    return torch.linalg.solve(F, x.to(F64))


def mfac_direction(w, coef, base, base_coef):
    out = coef @ w.W.to(F64)
    return out if base is None else out + base_coef * base.to(F64)


@pytest.mark.parametrize("route", MFACInverse.ROUTES)
@pytest.mark.parametrize("filled", [1, 3, 6, 15])
def test_mfac_inverse_applies_the_inverse_damped_fisher(route, filled):
    """F = damping I + (1/m) sum_i g_i g_i^T with m the window size (empty slots are zero), to
    the gradient just pushed; 15 pushes into 6 slots: the kept inverse is refreshed at steps 0,
    6, 12 and carried across the other replacements."""
    torch.manual_seed(2)
    m, n, damping = 6, 11, 1e-3
    w = window_of(m, n)
    for step in range(filled):
        g = torch.randn(n, dtype=F64)
        D = w.push(g, TRUE)
        coef, base, base_coef = MFACInverse(w.state, w, damping, route).coefficients(
            g, D[:, 0], TRUE, step)
    assert base is None and ("gram_inverse" in w.state) == (route == "update")
    got, want = mfac_direction(w, coef, base, base_coef), mfac_oracle(w.W, g, damping)
    # F's condition number is below 1e4 here: the oracle and the routes agree to ~1e-12
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


@pytest.mark.parametrize("route", MFACInverse.ROUTES)
def test_mfac_inverse_with_a_narrower_window_applies_it_to_the_unrounded_gradient(route):
    """A bfloat16 window: F is of the stored rows, x the float32 gradient itself (g - g_r, off
    the rows' span, weighs 1 / damping)."""
    torch.manual_seed(4)
    m, n, damping = 4, 9, 1e-2
    w = window_of(m, n, torch.float32, torch.bfloat16)
    for step in range(7):
        g = torch.randn(n)
        D = w.push(g, TRUE)
        coef, base, base_coef = MFACInverse(w.state, w, damping, route).coefficients(
            g, D[:, 0], TRUE, step)
    assert base is not None and float(base_coef) == 1 / damping
    got, want = mfac_direction(w, coef, base, base_coef), mfac_oracle(w.W, g, damping)
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


def test_the_routes_agree_over_a_long_ill_conditioned_run():
    """damping 1e-5 and gradients of 1e-3..10 that share a direction (A's condition number
    ~1e7): the kept inverse, carried over 300 replacements with a refresh every 8, and its
    refined solution stay within float64 rounding of a factorisation each step."""
    torch.manual_seed(5)
    m, n, damping = 8, 200, 1e-5
    w, common = window_of(m, n), torch.randn(n, dtype=F64)
    kept = {}
    for step in range(300):
        g = (0.5 * common + torch.randn(n, dtype=F64)) * 10 ** (4 * torch.rand(()).item() - 3)
        D = w.push(g, TRUE)
        direct = mfac_direction(w, *MFACInverse(w.state, w, damping, "cholesky").coefficients(
            g, D[:, 0], TRUE, step))
        carried = mfac_direction(w, *MFACInverse(kept, w, damping, "update").coefficients(
            g, D[:, 0], TRUE, step))
        assert (carried - direct).abs().max() <= 1e-12 * direct.abs().max(), step


def test_replace_in_inverse_is_the_inverse_of_the_replaced_matrix():
    torch.manual_seed(6)
    m, shift = 7, 0.3
    X = torch.randn(m, 5, dtype=F64)
    K = X @ X.T
    B = torch.linalg.inv(K + shift * torch.eye(m, dtype=F64))
    for k in (0, 3, 6, 3):
        x = torch.randn(5, dtype=F64)
        X[k] = x
        K = X @ X.T
        kept = B.clone()
        replace_in_inverse_(B, K[k].clone(), torch.tensor([k]), shift, FALSE)
        assert torch.equal(B, kept)  # masked
        replace_in_inverse_(B, K[k].clone(), torch.tensor([k]), shift, TRUE)
        want = torch.linalg.inv(K + shift * torch.eye(m, dtype=F64))
        assert (B - want).abs().max() <= 1e-12 * want.abs().max()


def test_a_masked_push_keeps_the_kept_inverse():
    torch.manual_seed(7)
    w = window_of(4, 6)
    for step in range(3):
        g = torch.randn(6, dtype=F64)
        D = w.push(g, TRUE)
        MFACInverse(w.state, w, 1e-3, "update").coefficients(g, D[:, 0], TRUE, step)
    before = w.state["gram_inverse"].clone()
    g = torch.zeros(6, dtype=F64)
    D = w.push(g, FALSE)
    coef, _, _ = MFACInverse(w.state, w, 1e-3, "update").coefficients(g, D[:, 0], FALSE, 3)
    assert torch.equal(w.state["gram_inverse"], before) and coef.isfinite().all()


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
