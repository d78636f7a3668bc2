"""Random inputs of the ops, shared by the op tests (tests/ops), the component tests
(tests/curvature), the emulated CUDA kernels' tests (tests/ops/test_cuda_emu.py) and test_build's
instruction-set check: ``from op_inputs import ...`` (tests/ is on sys.path through conftest.py).

* L-BFGS: ``random_history`` (a filled, possibly wrapped LBFGSHistory and a gradient);
* BFGS: ``random_problem`` (H, s, y, g) and ``textbook_update``;
* DRSOM: ``vectors`` and ``subproblem_inputs``;
* Kronecker factors: ``spd``, ``ill_conditioned``, ``rank_deficient``.
"""
import functools

import torch

from soo_ext import LBFGSHistory


# ---------------------------------------------------------------------------------------------
# L-BFGS

def random_history(m, n, count, newest, dtype, hist_dtype, device, seed=0):
    """A ring with `count` pairs of positive curvature ending at slot `newest`, Gram blocks
    filled by pushing the pairs one by one (so wrapped rings are exercised too)."""
    gen = torch.Generator().manual_seed(seed)
    hist = LBFGSHistory(n, m, dtype=dtype, device=device, history_dtype=hist_dtype)
    # Push enough pairs that the ring wraps and ends with `newest` as the newest slot.
    pushes = count + ((newest - (count - 1)) % m if count else 0)
    curvature = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    for _ in range(pushes):
        s = torch.randn(n, generator=gen, dtype=torch.float64)
        y = s * curvature + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        hist.push(s.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype))
        hist.direction(torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
    if count:
        assert hist.newest == newest
    hist.count = count  # keep only the newest `count` pairs (partially filled history)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return hist, g


# ---------------------------------------------------------------------------------------------
# BFGS

def random_problem(n, seed=0):
    """A symmetric positive-definite H, a pair with y.s > 0, and a gradient (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, generator=gen)
    H = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    H = (H + H.T) / 2
    s = torch.randn(n, dtype=torch.float64, generator=gen)
    y = 0.8 * s + 0.1 * torch.randn(n, dtype=torch.float64, generator=gen)
    if y.dot(s) <= 0:
        y = -y
    g = torch.randn(n, dtype=torch.float64, generator=gen)
    return H, s, y, g


def textbook_update(H, s, y):
    """(I - rho s y^T) H (I - rho y s^T) + rho s s^T, as matrices."""
    rho = 1.0 / y.dot(s)
    V = torch.eye(len(s), dtype=H.dtype) - rho * torch.outer(y, s)
    return V.T @ H @ V + rho * torch.outer(s, s)


# ---------------------------------------------------------------------------------------------
# DRSOM

@functools.lru_cache(maxsize=8)
def _fp64_vectors(n, count, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, n, dtype=torch.float64, generator=gen)


def vectors(n, count, dtype, device, seed=0):
    """``count`` fresh random vectors of length n (separate contiguous tensors)."""
    rows = _fp64_vectors(n, count, seed)
    return [rows[i].to(dtype=dtype, device=device, copy=True) for i in range(count)]


def subproblem_inputs(k, dtype, device, seed, n=40):
    """A symmetric indefinite Q, the Gram matrix G of k random directions of length n (with
    different lengths), and c."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(k, n, dtype=torch.float64, generator=gen) * torch.logspace(-2, 2, k,
                                                                               dtype=torch.float64)[:, None]
    H = torch.randn(n, n, dtype=torch.float64, generator=gen)
    Q = V @ (H + H.T) @ V.T / 2
    c = V @ torch.randn(n, dtype=torch.float64, generator=gen)
    to = lambda a: a.to(dtype=dtype, device=device)  # noqa: E731
    return to(Q), to(V @ V.T), to(c)


# ---------------------------------------------------------------------------------------------
# Kronecker factors

def spd(batch, n, dtype, device, seed=0, shift=0.1):
    """Well-conditioned SPD factors X^T X / N + shift I (N = 2n)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, 2 * n, n, generator=gen, dtype=torch.float64)
    A = X.mT @ X / (2 * n) + shift * torch.eye(n, dtype=torch.float64)
    return A.to(dtype=dtype, device=device)


def ill_conditioned(batch, n, dtype, device, seed=0):
    """Q diag(logspace(-8, 0)) Q^T: eigenvalues spread 1e-8..1."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen, dtype=torch.float64))
    lam = torch.logspace(-8, 0, n, dtype=torch.float64)
    A = (Q * lam) @ Q.mT
    return ((A + A.mT) / 2).to(dtype=dtype, device=device)


def rank_deficient(batch, n, dtype, device, seed=0):
    """X^T X with N = n // 4 + 1 < n rows: rank N."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n // 4 + 1, n, generator=gen, dtype=torch.float64)
    return (X.mT @ X).to(dtype=dtype, device=device)
