"""Dense BFGS for small models and classical problems, on the fused ``soo::bfgs_direction`` op."""
from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

from . import ops
from .quasi_newton import NonFiniteError, QuasiNewton

__all__ = ["BFGS", "DenseInverseHessian", "NonFiniteError"]

DEFAULT_MAX_STATE_BYTES = 1 << 30  # H of 16384 float32 or 11585 float64 params


class DenseInverseHessian:
    """The ``n x n`` inverse-Hessian approximation of BFGS, with the same interface as
    :class:`soo_ext.LBFGSHistory`.

    ``push`` stores a pair; the BFGS update it implies is applied by the next ``direction`` call,
    fused with the product ``H g`` (H is read once and written once).  Before the first update
    H is rescaled to ``(y.s / y.y) I`` (Nocedal & Wright, eq. 6.20), so that the first quasi-Newton
    step has the right length; until then ``H = I``.  Nothing here synchronises with the host.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.H = torch.eye(n, dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.y = torch.zeros_like(self.s)
        self._pending = False  # s, y hold a pair whose update is not applied yet
        self._scaled = False   # H has been rescaled by the first pair

    def push(self, s: Tensor, y: Tensor, s_scale: float | Tensor = 1.0) -> None:
        """Store the pair (s_scale·s, y); the caller has checked that y.s > 0."""
        if self._pending:  # two pushes in a row: apply the first update now
            self.direction(torch.zeros_like(self.s))
        torch.mul(s, s_scale, out=self.s)
        self.y.copy_(y)
        if not self._scaled:
            gamma = torch.dot(self.y, self.s) / torch.dot(self.y, self.y)
            self.H.zero_()
            self.H.diagonal().copy_(gamma.expand(self.s.shape[0]))
            self._scaled = True
        self._pending = True

    def direction(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, stats)``: ``d = -H g`` and ``stats = [g.d, max|d|]`` (device tensors)."""
        out = ops.bfgs_direction(self.H, self.s, self.y, g, self._pending)
        self._pending = False
        return out

    def state_dict(self) -> dict:
        return {"H": self.H, "s": self.s, "y": self.y, "pending": self._pending,
                "scaled": self._scaled}

    def load_state_dict(self, state: dict) -> None:
        for key in ("H", "s", "y"):
            src = state[key]
            if src.shape != getattr(self, key).shape:
                raise ValueError(f"inverse Hessian {key} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(getattr(self, key).shape)}")
            getattr(self, key).copy_(src)
        self._pending = bool(state["pending"])
        self._scaled = bool(state["scaled"])


class BFGS(QuasiNewton):
    r"""Dense BFGS with the closure interface, stopping rules and line search of
    :class:`torch.optim.LBFGS` / :class:`soo_ext.LBFGS`.

    The inverse-Hessian approximation ``H`` (``n x n`` over the flat vector of all params) gets the
    rank-2 BFGS update ``H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` for every accepted
    pair with ``y.s > 1e-10``; the update and the direction ``-H g`` are one fused op
    (``soo_ext.ops.bfgs_direction``, CPU and CUDA).  Iteration, stopping tests, the strong-Wolfe
    line search, param groups (per-group lr), ``on_nonfinite``, state-dict resume and the data
    parallel ``process_group`` are exactly those of :class:`soo_ext.LBFGS` (see there); the
    first step is steepest descent with length ``min(1, 1/|g|_1) lr``, and H is rescaled to
    ``(y.s / y.y) I`` before the first update.

    ``H`` costs ``n^2`` elements of the params' dtype (plus one ``n^2`` read and write per
    iteration): models whose ``H`` would exceed ``max_state_bytes`` are refused with a
    ValueError when the optimizer is built (use :class:`soo_ext.LBFGS` for those).

    Args:
        params: iterable of params or of param-group dicts.
        lr: learning rate (default: 1).
        max_iter: maximal number of iterations per ``step`` (default: 20).
        max_eval: maximal number of closure evaluations per ``step``
            (default: ``max_iter * 5 // 4``).
        tolerance_grad: stop when ``max|g| <= tolerance_grad`` (default: 1e-7).
        tolerance_change: stop on a smaller change of loss or params (default: 1e-9).
        line_search_fn: ``None`` (fixed step) or ``'strong_wolfe'``.
        maximize: maximise the objective instead of minimising it (default: False).
        on_nonfinite: ``'raise'`` (default) or ``'skip'``.
        max_state_bytes: largest allowed size of ``H`` in bytes (default: 1 GiB).
        process_group: the data-parallel ranks whose losses are averaged (default None).
    """

    STATE_KEY = "inverse_hessian"
    CURVATURE_OPTIONS = ("max_state_bytes",)

    def __init__(self, params, lr: float | Tensor = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, line_search_fn: str | None = None, *,
                 maximize: bool = False, on_nonfinite: str = "raise",
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES, process_group=None) -> None:
        super().__init__(params, {
            "lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change, "line_search_fn": line_search_fn,
            "maximize": maximize, "on_nonfinite": on_nonfinite,
            "max_state_bytes": max_state_bytes}, process_group)

    @classmethod
    def _check_curvature_options(cls, options: dict) -> None:
        v = options["max_state_bytes"]
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Invalid max_state_bytes: {v!r} (must be an int >= 1)")

    def _check_curvature_params(self, params: list[Tensor], group: dict) -> None:
        n = sum(p.numel() for p in params)
        needed = n * n * params[0].element_size()
        if needed > group["max_state_bytes"]:
            raise ValueError(
                f"BFGS: the inverse Hessian of these {n} parameters needs {needed / 2**20:.1f} MiB "
                f"(n^2 x {params[0].element_size()} bytes), more than max_state_bytes = "
                f"{group['max_state_bytes'] / 2**20:.1f} MiB; use soo_ext.LBFGS, or raise "
                "max_state_bytes if the memory is there")

    def _new_curvature(self, n: int, dtype: torch.dtype, device: torch.device,
                       group: dict) -> DenseInverseHessian:
        return DenseInverseHessian(n, dtype, device)
