"""A sliding window of the last m flat gradients with its Gram matrix, pushed on the device, and
the two preconditioners built on it: M-FAC's inverse empirical Fisher (Frantar, Kurtic & Alistarh
2021) and GGT's inverse square root (Agarwal et al. 2019).  Both need per step one pass over the
window for its dot products (``ops.window_gram``), an ``m x m`` factorisation in float64 on the
device, and one pass for the combination of its rows (``ops.window_combine``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops

__all__ = ["GradientWindow", "ggt_coefficients", "mfac_coefficients", "window_state_bytes"]


def window_state_bytes(size: int, n: int, window_dtype: torch.dtype) -> int:
    """Bytes of a window of ``size`` gradients of length ``n`` and its float64 Gram matrix."""
    return size * n * torch.empty((), dtype=window_dtype).element_size() + 8 * size * size


class GradientWindow:
    """The ring ``W`` (``[size, n]``, oldest gradient overwritten first) and its Gram matrix
    ``K = W W^T`` (float64, ``[size, size]``), in the state dict ``state`` (keys ``window``,
    ``gram``, ``slot``: the next row written, a 0-dim int64 tensor on the device).

    Slots not yet written are zero, so the window always has ``size`` rows (as the M-FAC
    reference's zero-initialised buffer): no host sync is needed to know how full it is.  A
    push masked by ``ok`` False changes nothing (the skip guard's contract).
    """

    KEYS = ("window", "gram", "slot")

    def __init__(self, state: dict, size: int, n: int, dtype: torch.dtype, device: torch.device,
                 window_dtype: torch.dtype) -> None:
        if "window" not in state:
            state["window"] = torch.zeros((size, n), dtype=window_dtype, device=device)
            state["gram"] = torch.zeros((size, size), dtype=torch.float64, device=device)
            state["slot"] = torch.zeros((), dtype=torch.int64, device=device)
        elif state["window"].shape != (size, n) or state["window"].dtype != window_dtype:
            raise ValueError(f"the saved window is {tuple(state['window'].shape)} "
                             f"{state['window'].dtype}, expected ({size}, {n}) {window_dtype}: "
                             "the params or the window options differ from the saved run's")
        self.state, self.size, self.dtype = state, size, dtype

    @property
    def W(self) -> Tensor:
        return self.state["window"]

    @property
    def K(self) -> Tensor:
        return self.state["gram"]

    def ages(self) -> Tensor:
        """Steps since each slot was written (0: the newest), float64 ``[size]``."""
        slots = torch.arange(self.size, device=self.W.device)
        return torch.remainder(self.state["slot"] - 1 - slots, self.size).to(torch.float64)

    def push(self, g: Tensor, ok: Tensor, others: list[Tensor] = ()) -> Tensor:
        """Write ``g`` over the oldest row and update the Gram matrix's row and column, unless
        ``ok`` (0-dim bool) is False; returns ``D = W [g, *others]^T`` (float64 ``[size, k]``,
        after the write) from the one pass over the window that gives the new Gram row."""
        slot = self.state["slot"].reshape(1)
        W, K = self.W, self.K
        stored = g.to(W.dtype)
        W.index_copy_(0, slot, torch.where(ok, stored, W.index_select(0, slot)))
        # The Gram matrix is of the stored rows: with a narrower window, of g as rounded.
        rounded = [stored.to(g.dtype)] if W.dtype != g.dtype else []
        _, D = ops.window_gram(W, rounded + [g] + list(others), self.size, False)
        row = torch.where(ok, D[:, 0], K.index_select(0, slot)[0])
        D = D[:, len(rounded):]
        K.index_copy_(0, slot, row[None])
        K.index_copy_(1, slot, row[:, None])
        self.state["slot"].copy_(torch.remainder(self.state["slot"] + ok.to(torch.int64),
                                                 self.size))
        return D

    def combine(self, out: Tensor, coef: Tensor, base: Tensor, base_coef: Tensor) -> None:
        """``out <- base_coef base + sum_i coef[i] W[i]`` (one pass)."""
        ops.window_combine(out, self.W, coef, self.size, base, base_coef)


def mfac_coefficients(K: Tensor, d: Tensor, damping: float, size: int) -> tuple[Tensor, Tensor]:
    """``F^{-1} x = x / damping - sum_i c_i W[i]`` with ``F = damping I + W^T W / size`` and
    ``d = W x``: returns ``(-c, 1 / damping)`` for :meth:`GradientWindow.combine`.

    Woodbury: ``c = (size damping I + K)^{-1} d / damping``, by one Cholesky factorisation of the
    ``size x size`` matrix (SPD: damping > 0), in float64, no host sync.  The same inverse as
    the reference's LU without pivoting of ``K / damping + size I`` and its O(size^2)
    recursion, computed by one factorisation instead of the recursion.
    """
    A = K + (size * damping) * torch.eye(size, dtype=K.dtype, device=K.device)
    L, _ = torch.linalg.cholesky_ex(A)
    c = torch.cholesky_solve(d[:, None], L)[:, 0] / damping
    return -c, torch.full((), 1.0 / damping, dtype=torch.float64, device=K.device)


def ggt_coefficients(K: Tensor, d: Tensor, weights: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """GGT's ``U diag(sigma + eps)^-1 U^T m + (m - U U^T m) / eps`` for ``G = W^T diag(w)``
    (the window, each gradient weighted by ``w``: beta2^age), ``U = G V diag(sigma)^-1`` from
    ``G^T G = V diag(sigma^2) V^T``, and ``d = W m``: returns ``(coef, 1 / eps)`` for
    :meth:`GradientWindow.combine`.

    The two terms fold into ``m / eps + G V diag(-1 / (eps sigma (sigma + eps))) V^T G^T m``.
    Directions with ``sigma^2 <= size * eps_float64 * max(sigma^2)`` are not resolved by the
    eigendecomposition and count as off the span (the reference truncates too); for them
    ``1 / (sigma + eps)`` and ``1 / eps`` agree to ``O(sigma / eps)`` anyway.
    """
    size = K.shape[0]
    Kw = K * weights[:, None] * weights[None, :]
    lam, V = torch.linalg.eigh(Kw)
    resolved = lam > size * torch.finfo(torch.float64).eps * lam[-1]
    sigma = torch.where(resolved, lam, 1.0).sqrt()
    scale = torch.where(resolved, -1.0 / (eps * sigma * (sigma + eps)), 0.0)
    coef = weights * (V @ (scale * (V.T @ (weights * d))))
    return coef, torch.full((), 1.0 / eps, dtype=torch.float64, device=K.device)
