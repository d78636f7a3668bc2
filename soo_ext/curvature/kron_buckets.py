"""Size-bucketed Kronecker factors, shared by K-FAC and Shampoo: every ``n x n`` factor of one
bucket is a slice of one ``[B, n, n]`` tensor, so that an update or a decomposition of all of them
is one batched op call per bucket (spread over the data-parallel ranks when asked)."""
from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch import Tensor

from .._support.distributed import SpreadPlan

__all__ = ["KronBuckets", "keep_where"]


class KronBuckets:
    """The slots of the factors, bucket by bucket, and the batched decompositions of a run.

    Slots are reserved first (:meth:`reserve`: a contiguous range of a bucket, so that the
    factors of one shape group of blocks or layers are one slice), then tensors are allocated for
    all buckets at once (:meth:`stacks`, :meth:`vectors`, :meth:`flat_stacks`).  A bucket's key
    says what its factors share: their size ``n`` (K-FAC), or the size and the tensor order
    (Shampoo, whose root exponent depends on the order).
    """

    def __init__(self) -> None:
        self.sizes: dict[Hashable, int] = {}   # key -> n
        self.counts: dict[Hashable, int] = {}  # key -> B
        self._plan: SpreadPlan | None = None

    def reserve(self, key: Hashable, n: int, count: int = 1) -> int:
        """``count`` more slots in bucket ``key`` (of ``n x n`` factors); returns the first."""
        assert self.sizes.setdefault(key, n) == n
        start = self.counts.get(key, 0)
        self.counts[key] = start + count
        return start

    def stacks(self, dtype: torch.dtype, device: torch.device, *,
               identity: bool, divisor: float = 1.0) -> dict[Hashable, Tensor]:
        """A ``[B, n, n]`` tensor per bucket: identities (divided by ``divisor``), or zeros."""
        out = {}
        for key, n in self.sizes.items():
            B = self.counts[key]
            if identity:
                eye = torch.eye(n, dtype=dtype, device=device).repeat(B, 1, 1)
                out[key] = eye if divisor == 1 else eye / divisor
            else:
                out[key] = torch.zeros(B, n, n, dtype=dtype, device=device)
        return out

    def vectors(self, dtype: torch.dtype, device: torch.device, *, fill: float = 0,
                per_row: bool = False) -> dict[Hashable, Tensor]:
        """A ``[B]`` tensor (``per_row``: ``[B, n]``) per bucket, filled with ``fill``."""
        return {key: torch.full((self.counts[key],) + ((n,) if per_row else ()), fill,
                                dtype=dtype, device=device) for key, n in self.sizes.items()}

    def flat_stacks(self, dtype: torch.dtype, device: torch.device
                    ) -> tuple[Tensor, dict[Hashable, Tensor]]:
        """Zeroed ``[B, n, n]`` stacks that are views of one flat buffer (one all-reduce or one
        fill covers all of them): ``(buffer, stacks)``."""
        sizes = {key: self.counts[key] * n * n for key, n in self.sizes.items()}
        buffer = torch.zeros(sum(sizes.values()), dtype=dtype, device=device)
        stacks, offset = {}, 0
        for key, size in sizes.items():
            n = self.sizes[key]
            stacks[key] = buffer[offset:offset + size].view(self.counts[key], n, n)
            offset += size
        return buffer, stacks

    def decompose(self, factors: dict[Hashable, Tensor],
                  op: Callable[[Hashable, Tensor], tuple], group=None) -> dict[Hashable, tuple]:
        """``op(key, F)`` for the stack ``F`` of every bucket; with a process ``group`` each rank
        computes its share and one all-gather gives every rank all results
        (:class:`soo_ext._support.distributed.SpreadPlan`, made at the first call)."""
        if group is None:
            return {key: op(key, F) for key, F in factors.items()}
        if self._plan is None:
            self._plan = SpreadPlan(factors, group)
        return self._plan.decompose(factors, op)

    @property
    def plan(self) -> SpreadPlan | None:
        """The spread plan of the data-parallel decompositions (None before the first)."""
        return self._plan


def keep_where(take: Tensor, old: Tensor, new: Tensor) -> None:
    """``old[i] <- new[i]`` for the factors ``i`` where ``take[i]`` (a ``[B]`` bool tensor)."""
    mask = take.view(-1, *([1] * (old.dim() - 1)))
    old.copy_(torch.where(mask, new.to(old.dtype), old))
