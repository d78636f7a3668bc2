"""The dense inverse-Hessian approximation of BFGS, on the fused ``soo::bfgs_direction`` op."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops

__all__ = ["DenseInverseHessian"]


class DenseInverseHessian:
    """The ``n x n`` inverse-Hessian approximation of BFGS, with the same interface as
    :class:`soo_ext.LBFGSHistory`.

    ``push`` stores a pair; the BFGS update it implies is applied by the next ``direction`` call,
    fused with the product ``H g`` (H is read once and written once).  ``H = I`` until the first
    pair.  Two optional treatments of the matrix the update is applied to, chosen per push:

    * ``rescale_first`` (default): before the first update H is rescaled to ``(y.s / y.y) I``
      (Nocedal & Wright, eq. 6.20), so that the first quasi-Newton step has the length of a
      secant step along ``s``;
    * ``h_scale``: H is multiplied by this factor (``>= 1``) before the update: the restricted
      self-scaling :class:`soo_ext.BFGS` uses with its line search (see docs/bfgs.md).  It costs
      one extra pass over H (read and write) when the factor is not 1.

    Nothing here synchronises with the host.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.H = torch.eye(n, dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.y = torch.zeros_like(self.s)
        self._pending = False  # s, y hold a pair whose update is not applied yet
        self._scaled = False   # a pair has been pushed (H no longer the initial identity)

    def push(self, s: Tensor, y: Tensor, s_scale: float | Tensor = 1.0, *,
             rescale_first: bool = True, h_scale: float = 1.0) -> None:
        """Store the pair (s_scale·s, y); the caller has checked that y.s > 0.

        Before its update is applied, H becomes ``(y.s / y.y) I`` if this is the first pair and
        ``rescale_first``; otherwise H is multiplied by ``h_scale`` (a host float ``>= 1``)."""
        if self._pending:  # two pushes in a row: apply the first update now
            self.direction(torch.zeros_like(self.s))
        torch.mul(s, s_scale, out=self.s)
        self.y.copy_(y)
        if not self._scaled and rescale_first:
            gamma = torch.dot(self.y, self.s) / torch.dot(self.y, self.y)
            self.H.zero_()
            self.H.diagonal().copy_(gamma.expand(self.s.shape[0]))
        elif h_scale != 1.0:
            self.H.mul_(h_scale)
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
