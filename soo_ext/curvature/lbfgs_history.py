"""Curvature-pair history for L-BFGS-type methods (L-BFGS, mL-BFGS): ring buffers of (s, y) pairs
and their Gram blocks, and the direction by the fused ``soo::lbfgs_direction`` op."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..reference import accumulation_dtype

__all__ = ["LBFGSHistory"]


class LBFGSHistory:
    """Preallocated ``[m, n]`` ring buffers of pairs (s, y) plus their Gram blocks SᵀY and YᵀY.

    ``push`` writes a pair into the next slot (dropping the oldest when full); the Gram row and
    column of the new pair are filled by the next ``direction`` call, in the same pass over the
    history that computes [S Y]ᵀg.  Nothing here synchronises with the host.

    Args:
        n: length of the flat parameter vector.
        history_size: number of pairs kept (m).
        dtype: dtype of gradients and directions (float32 or float64).
        device: device of the buffers.
        history_dtype: storage dtype of S and Y: ``dtype`` (default) or ``torch.bfloat16``
            (float32 only; products are still accumulated in float32).
    """

    def __init__(self, n: int, history_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None,
                 history_dtype: torch.dtype | None = None) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        history_dtype = dtype if history_dtype is None else history_dtype
        if history_dtype not in (dtype, torch.bfloat16) or (
                history_dtype == torch.bfloat16 and dtype != torch.float32):
            raise ValueError(f"history_dtype must be {dtype}"
                             + (" or torch.bfloat16" if dtype == torch.float32 else "")
                             + f", got {history_dtype}")
        acc = accumulation_dtype(dtype)
        self.dtype = dtype
        self.S = torch.zeros(history_size, n, dtype=history_dtype, device=device)
        self.Y = torch.zeros_like(self.S)
        self.SY = torch.zeros(history_size, history_size, dtype=acc, device=device)
        self.YY = torch.zeros_like(self.SY)
        self.newest = history_size - 1
        self.count = 0
        self._gram_pending = False

    @property
    def history_size(self) -> int:
        return self.S.shape[0]

    def __len__(self) -> int:
        return self.count

    def push(self, s: Tensor, y: Tensor, s_scale: float | Tensor = 1.0) -> None:
        """Store the pair (s_scale·s, y) as the newest; the caller has checked its curvature."""
        if self._gram_pending:  # two pushes in a row: complete the first one's Gram entries
            self.direction(torch.zeros(self.S.shape[1], dtype=self.dtype, device=self.S.device))
        slot = (self.newest + 1) % self.history_size
        torch.mul(s, s_scale, out=self.S[slot])
        self.Y[slot].copy_(y)
        self.newest = slot
        self.count = min(self.count + 1, self.history_size)
        self._gram_pending = True

    def direction(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, stats)``: ``d = -H g`` and ``stats = [g.d, max|d|]`` (device tensors)."""
        out = ops.lbfgs_direction(self.S, self.Y, self.SY, self.YY, g, self.newest, self.count,
                                  self._gram_pending)
        self._gram_pending = False
        return out

    def reset(self) -> None:
        """Forget all pairs (buffers are kept)."""
        self.newest = self.history_size - 1
        self.count = 0
        self._gram_pending = False

    def state_dict(self) -> dict:
        return {"S": self.S, "Y": self.Y, "SY": self.SY, "YY": self.YY, "newest": self.newest,
                "count": self.count, "gram_pending": self._gram_pending}

    def load_state_dict(self, state: dict) -> None:
        for key in ("S", "Y", "SY", "YY"):
            src = state[key]
            if src.shape != getattr(self, key).shape:
                raise ValueError(f"history {key} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(getattr(self, key).shape)}")
            getattr(self, key).copy_(src)
        self.newest = int(state["newest"])
        self.count = int(state["count"])
        self._gram_pending = bool(state["gram_pending"])
