"""A sliding window of the last m flat gradients with its Gram matrix, pushed on the device, and
the two preconditioners built on it: M-FAC's inverse empirical Fisher (Frantar, Kurtic & Alistarh
2021) and GGT's inverse square root (Agarwal et al. 2019).  Both need per step one pass over the
window for its dot products (``ops.window_gram``), ``m x m`` float64 linear algebra on the device,
and one pass for the combination of its rows (``ops.window_combine``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._support.device import kept_scalar
from .._support.guard import select

__all__ = ["GradientWindow", "MFACInverse", "ggt_coefficients", "replace_in_inverse_",
           "window_state_bytes"]


def window_state_bytes(size: int, n: int, window_dtype: torch.dtype, squares: int = 1) -> int:
    """Bytes of a window of ``size`` gradients of length ``n`` and ``squares`` float64
    ``size x size`` matrices (its Gram matrix, M-FAC's kept inverse)."""
    return size * n * torch.empty((), dtype=window_dtype).element_size() + 8 * size * size * squares


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
        self._slots = torch.arange(size, device=device)
        # What the last push wrote: its slot ([1] int64), the Gram matrix's column there
        # ([size, 1]), and g as stored in the window's dtype (None when that is g's own).
        self.written: Tensor | None = None
        self._column: Tensor | None = None
        self.rounded: Tensor | None = None

    @property
    def W(self) -> Tensor:
        return self.state["window"]

    @property
    def K(self) -> Tensor:
        return self.state["gram"]

    def ages(self) -> Tensor:
        """Steps since each slot was written (0: the newest), float64 ``[size]``."""
        return torch.remainder(self.state["slot"] - 1 - self._slots, self.size).to(torch.float64)

    def push(self, g: Tensor, ok: Tensor, others: list[Tensor] = ()) -> Tensor:
        """Write ``g`` over the oldest row and update the Gram matrix's row and column, unless
        ``ok`` (0-dim bool) is False; returns ``D = W [g, *others]^T`` (float64 ``[size, k]``,
        after the write) from the one pass over the window that gives the new Gram row."""
        state = self.state
        slot = state["slot"].reshape(1)
        W, K = state["window"], state["gram"]
        narrow = W.dtype != g.dtype
        stored = g.to(W.dtype) if narrow else g
        W.index_copy_(0, slot, select(ok, stored[None], W.index_select(0, slot)))
        # The Gram matrix is of the stored rows: with a narrower window, of g as rounded.
        self.rounded = stored.to(g.dtype) if narrow else None
        _, D = ops.window_gram(W, [self.rounded, g, *others] if narrow else [g, *others],
                               self.size, False)
        # K is symmetric (row and column are written together): its column is its row
        self._column = select(ok, D[:, :1], K.index_select(1, slot))
        K.index_copy_(1, slot, self._column)
        K.index_copy_(0, slot, self._column.T)
        # A new slot tensor: the old one stays what this push wrote.
        self.written = slot
        state["slot"] = torch.remainder(state["slot"] + ok, self.size)
        return D[:, 1:] if narrow else D

    @property
    def row(self) -> Tensor:
        """The Gram matrix's row that the last push wrote (float64 ``[size]``)."""
        return self._column[:, 0]

    def combine(self, out: Tensor, coef: Tensor, base: Tensor | None = None,
                base_coef: Tensor | None = None) -> None:
        """``out <- base_coef base + sum_i coef[i] W[i]`` (one pass)."""
        ops.window_combine(out, self.W, coef, self.size, base, base_coef)


def replace_in_inverse_(B: Tensor, row: Tensor, k: Tensor, shift: float, ok: Tensor) -> None:
    """``B <- (A')^{-1}`` in place from ``B = A^{-1}`` (``A`` symmetric positive definite,
    ``m x m``), where ``A'`` is ``A`` with row and column ``k`` (a ``[1]`` index tensor) replaced
    by ``row``, plus ``shift`` on the diagonal; unchanged where ``ok`` (0-dim bool) is False.
    ``O(m^2)``, a few small ops, no host sync.

    Two Schur-complement steps: removing ``k`` gives ``B1 = B - b b^T / b_k`` (``b = B e_k``;
    row and column k of B1 are zero); adding the new row ``a`` (``row`` off the diagonal) with
    pivot ``s = row_k + shift - a^T B1 a`` gives ``B1 + v v^T / s`` with ``v = B1 a - e_k``.
    Both pivots are positive for a positive definite ``A'``, and ``s >= shift`` (A' >= shift I):
    the floor keeps rounding from ever making it smaller.  The two rank-one terms are one
    ``addmm``, their weights zero when masked (a ``where`` over ``B`` costs more than it).
    """
    b = B.index_select(0, k)[0]  # B e_k: B is symmetric, and a row is one contiguous read
    b_k = b.index_select(0, k)
    a = row.index_fill(0, k, 0.0)
    u = torch.addcmul(B @ a, b, (b @ a) / b_k, value=-1)  # B1 a
    s = ((row.index_select(0, k) + shift) - a @ u).clamp_min_(shift)
    v = u.index_fill_(0, k, -1.0)
    P = torch.stack([b, v], 1)
    weights = torch.cat([-b_k, s]).reciprocal_().mul_(ok)
    B.addmm_(P * weights, P.T)


class MFACInverse:
    """M-FAC's ``F^{-1}`` for ``F = damping I + W^T W / size`` on a :class:`GradientWindow`, after
    the push of the gradient it is applied to.

    Woodbury: ``F^{-1} x = x / damping - W^T A^{-1} W x / damping`` with the ``size x size``
    matrix ``A = K + size damping I``.  For ``x`` the pushed row ``W^T e_k`` that is
    ``size W^T A^{-1} e_k``, free of the ``1 / damping`` cancellation (and with a window
    narrower than g, ``(g - g_r)`` adds its own term).  ``A^{-1}`` is applied by one of two
    routes (results equal within rounding):

    * ``'cholesky'``: a Cholesky factorisation of ``A`` every step, ``O(m^3)``;
    * ``'update'``: ``A^{-1}`` kept in ``state['gram_inverse']`` and carried across the
      window's replacement of a gradient by :func:`replace_in_inverse_`, ``O(m^2)``; refreshed
      from a factorisation every ``size`` steps (amortised ``O(m^2)``; bounds the drift of the
      kept inverse), and the solution refined by one step against ``A``.
    """

    ROUTES = ("cholesky", "update")

    def __init__(self, state: dict, window: GradientWindow, damping: float, route: str) -> None:
        assert route in self.ROUTES, route
        self.state, self.window, self.damping, self.route = state, window, damping, route
        self.shift = window.size * damping

    def _factor(self) -> Tensor:
        A = self.window.K.clone()
        A.diagonal().add_(self.shift)
        return torch.linalg.cholesky_ex(A)[0]  # SPD (damping > 0): no status check needed

    def _inverse(self, ok: Tensor, step: int) -> Tensor:
        """The kept ``A^{-1}``, carried across the last push (or refreshed)."""
        st, w = self.state, self.window
        if ("gram_inverse" not in st or st["gram_inverse_damping"] != self.damping
                or step % w.size == 0):
            B = torch.cholesky_inverse(self._factor())
        else:
            B = st["gram_inverse"]
            replace_in_inverse_(B, w.row, w.written, self.shift, ok)
        st["gram_inverse"], st["gram_inverse_damping"] = B, self.damping
        return B

    def coefficients(self, g: Tensor, d: Tensor, ok: Tensor, step: int
                     ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(coef, base, base_coef)`` with ``F^{-1} g = base_coef base + W^T coef`` for the
        pushed ``g`` (``d = W g``, ``ok`` the push's mask, ``step`` the host step count); base
        is None unless the window is narrower than g."""
        w = self.window
        rhs = torch.zeros(w.size, dtype=torch.float64, device=d.device)
        rhs.index_fill_(0, w.written, float(w.size))
        base = base_coef = None
        if w.rounded is not None:  # F^{-1} (g - g_r), g_r the stored row
            base = g - w.rounded
            base_coef = torch.full((), 1.0 / self.damping, dtype=torch.float64, device=d.device)
            rhs.sub_(d - w.row, alpha=1.0 / self.damping)
        if self.route == "cholesky":
            for key in ("gram_inverse", "gram_inverse_damping"):  # not carried: stale now
                self.state.pop(key, None)
            return torch.cholesky_solve(rhs[:, None], self._factor())[:, 0], base, base_coef
        B = self._inverse(ok, step)
        coef = B @ rhs
        residual = torch.sub(rhs, self.window.K @ coef).sub_(coef, alpha=self.shift)
        return coef.add_(B @ residual), base, base_coef


def ggt_coefficients(K: Tensor, d: Tensor, weights: Tensor | None, eps: float
                     ) -> tuple[Tensor, Tensor]:
    """GGT's ``U diag(sigma + eps)^-1 U^T m + (m - U U^T m) / eps`` for ``G = W^T diag(w)``
    (the window, each gradient weighted by ``w``: beta2^age; None: all 1), ``U = G V
    diag(sigma)^-1`` from ``G^T G = V diag(sigma^2) V^T``, and ``d = W m``: returns
    ``(coef, 1 / eps)`` for :meth:`GradientWindow.combine`.

    The two terms fold into ``m / eps + G V diag(-1 / (eps sigma (sigma + eps))) V^T G^T m``.
    Directions with ``sigma^2 <= size * eps_float64 * max(sigma^2)`` are not resolved by the
    eigendecomposition and count as off the span (the reference truncates too); for them
    ``1 / (sigma + eps)`` and ``1 / eps`` agree to ``O(sigma / eps)`` anyway.
    """
    size = K.shape[0]
    if weights is not None:
        K = K * weights[:, None] * weights[None, :]
        d = weights * d
    lam, V = torch.linalg.eigh(K)
    # sigma (sigma + eps) = lam + eps sigma; an unresolved lam as inf makes its 1 / (...) zero
    lam = torch.where(lam > lam[-1:] * (size * torch.finfo(torch.float64).eps), lam, torch.inf)
    scale = torch.add(lam, lam.sqrt(), alpha=eps).reciprocal_()
    coef = (V @ (scale * (d @ V))).mul_(-1.0 / eps)  # d @ V: V^T d without a transpose op
    if weights is not None:
        coef = weights * coef
    return coef, kept_scalar(1.0 / eps, K)
