"""Data parallelism over ``torch.distributed``: process groups, averaging, and the plan that
spreads batched decompositions (K-FAC's inverses, Shampoo's roots) over the ranks."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None

__all__ = ["SpreadPlan", "all_gather_padded", "all_reduce_mean_", "check_process_group",
           "is_dtensor", "spread_factors"]


def is_dtensor(t: Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def check_process_group(group):
    """``group`` if it is a ``torch.distributed`` process group or None, else ValueError; None
    also for a group of one rank (nothing to average)."""
    if group is None:
        return None
    dist = torch.distributed
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError(f"Invalid process_group: {group!r} (must be a "
                         "torch.distributed.ProcessGroup or None)")
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_mean_(t: Tensor, group) -> Tensor:
    """``t`` <- the mean of ``t`` over the ranks of ``group``, in place (a sum and a division:
    gloo has no averaging reduction)."""
    torch.distributed.all_reduce(t, group=group)
    return t.div_(torch.distributed.get_world_size(group))


def spread_factors(buckets: list[tuple[int, int]], world: int) -> list[list[list[int]]]:
    """Which rank decomposes which factor, for buckets given as ``(n, B)``: ``owned[b][r]`` lists
    the factors of bucket ``b`` that rank ``r`` takes.  The factors go one by one, largest
    buckets first, to the rank with the least work so far (``n^3`` a factor; ties to the lower
    rank), as KAISA assigns its layers, so that the ranks' shares of an update balance."""
    load = [0] * world
    owned = [[[] for _ in range(world)] for _ in buckets]
    for b in sorted(range(len(buckets)), key=lambda b: -buckets[b][0]):
        n, count = buckets[b]
        for i in range(count):
            r = min(range(world), key=lambda r: (load[r], r))
            owned[b][r].append(i)
            load[r] += n ** 3
    return owned


class SpreadPlan:
    """Data parallel decompositions of bucketed ``[B, n, n]`` factors (K-FAC's inverses,
    Shampoo's roots): which rank decomposes which factor (:func:`spread_factors`), and the
    all-gather that gives every rank every result.  Each rank packs the results of its factors,
    a row per factor (every output of the op for it, in the factors' dtype), bucket after
    bucket, into one vector; one all-gather of those vectors (padded to the longest), after all
    the decompositions (gathering bucket by bucket between them would make every bucket wait
    for the rank with the most of it), gives every rank every row."""

    def __init__(self, factors: dict[Any, Tensor], group) -> None:
        self.group = group
        self.world = world = torch.distributed.get_world_size(group)
        rank = torch.distributed.get_rank(group)
        owned = spread_factors([(F.shape[-1], F.shape[0]) for F in factors.values()], world)
        self._counts = {key: [len(o) for o in per_rank]  # factors per rank
                        for key, per_rank in zip(factors, owned)}
        device = next(iter(factors.values())).device
        self._mine, self._order = {}, {}
        for key, per_rank in zip(factors, owned):
            self._mine[key] = torch.tensor(per_rank[rank], dtype=torch.int64, device=device)
            arrival = [i for o in per_rank for i in o]  # rows come rank by rank
            self._order[key] = torch.tensor(sorted(range(len(arrival)), key=arrival.__getitem__),
                                            dtype=torch.int64, device=device)

    def decompose(self, factors: dict[Any, Tensor], op: Callable) -> dict[Any, tuple]:
        """``op(key, F)`` (the op's outputs for a batch ``F`` of bucket ``key``) of every factor
        of every bucket, each rank computing its own share."""
        mine = {key: op(key, F.index_select(0, self._mine[key])) for key, F in factors.items()}
        dtype = next(iter(factors.values())).dtype
        widths = {key: sum(math.prod(t.shape[1:]) for t in outs) for key, outs in mine.items()}
        lengths = [sum(c[r] * widths[key] for key, c in self._counts.items())
                   for r in range(self.world)]
        packed = torch.cat([torch.cat([t.reshape(t.shape[0], math.prod(t.shape[1:])).to(dtype)
                                       for t in outs], 1).reshape(-1) for outs in mine.values()])
        gathered = all_gather_padded(packed, max(lengths), self.group)
        self.gathered_numel = gathered.numel()  # what the last all-gather delivered
        offsets = [0] * self.world
        full = {}
        for key, outs in mine.items():
            w, rows = widths[key], []
            for r, m in enumerate(self._counts[key]):
                rows.append(gathered[r, offsets[r]:offsets[r] + m * w].view(m, w))
                offsets[r] += m * w
            table = torch.cat(rows)[self._order[key]]
            parts, start = [], 0
            for t in outs:
                cols = math.prod(t.shape[1:])
                parts.append(table[:, start:start + cols].reshape(-1, *t.shape[1:]).to(t.dtype))
                start += cols
            full[key] = tuple(parts)
        return full


def all_gather_padded(mine: Tensor, length: int, group) -> Tensor:
    """``[world, length]``: row ``r`` holds rank ``r``'s 1-D ``mine`` (at most ``length`` long)
    followed by zeros."""
    row = mine.new_zeros(length)
    row[:mine.numel()] = mine
    out = mine.new_empty(torch.distributed.get_world_size(group) * length)
    # all_gather_single replaces all_gather_into_tensor in newer torch (same arguments)
    gather = getattr(torch.distributed, "all_gather_single", None) \
        or torch.distributed.all_gather_into_tensor
    gather(out, row, group=group)
    return out.view(-1, length)
