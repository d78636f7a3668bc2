"""Shampoo's blocking: each param viewed as a tensor of merged dims, cut into blocks of at most
``max_preconditioner_dim`` per dim; blocks of one shape are batched, and every factor gets a slot
in a size bucket (:class:`~soo_ext.curvature.kron_buckets.KronBuckets`)."""
from __future__ import annotations

import itertools

from torch import Tensor

from .kron_buckets import KronBuckets

__all__ = ["BlockedParam", "BlockShapeGroup", "MERGE_COST_RATIO", "ShampooBlocking", "merge_dims",
           "merge_dims_by_cost"]

# A merge may make the merged dim's factor cost (its root: n^3) at most this many times the
# factors of the dims it replaces (see merge_dims_by_cost).
MERGE_COST_RATIO = 256


def merge_dims(shape, max_dim: int, from_last: bool = True) -> tuple[int, ...]:
    """Merge adjacent dims while their product stays ``<= max_dim``; size-1 dims disappear.

    As distributed Shampoo (facebookresearch/optimizers, ``merge_small_dims`` in
    ``distributed_shampoo/utils/shampoo_utils.py`` since it merges in reverse order) the dims are
    merged from the last one, where a conv kernel keeps its small spatial dims:
    ``merge_dims((25, 25, 1, 3), 1024) == (25, 75)``, ``merge_dims((64, 3, 3, 3), 1024) ==
    (64, 27)``, ``merge_dims((8, 2, 8), 16) == (8, 16)``.  ``from_last=False`` merges from the
    first dim (the reference's earlier versions, and SOAP's reference):
    ``(625, 3)``, ``(576, 3)`` and ``(16, 8)`` for those shapes.  A dim larger than ``max_dim``
    stays as it is (it is blocked later): ``merge_dims((3, 2000), 1024) == (3, 2000)``.  Unlike
    the reference, which keeps ``(1,)``, a shape of size-1 dims merges to ``()``:
    ``merge_dims((10, 1, 1), 8) == (10,)``, ``merge_dims((1, 1), 8) == ()``.
    """
    dims = [d for d in (reversed(tuple(shape)) if from_last else shape) if d != 1]
    out: list[int] = []
    for d in dims:
        if out and out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out)) if from_last else tuple(out)


def merge_dims_by_cost(shape, max_dim: int, max_ratio: float = MERGE_COST_RATIO
                       ) -> tuple[int, ...]:
    """:func:`merge_dims` (from the last dim) that also refuses a merge whose factor would cost
    more than ``max_ratio`` times the separate factors of the dims it replaces, a root costing
    ``n^3``.  With the default 256 small kernel dims still merge as the reference merges them:
    ``(25, 25, 1, 3) -> (25, 75)`` (75^3 is 27 times 25^3 + 3^3), ``(25, 1, 1, 5) -> (125,)``
    (124 times), ``(64, 3, 3, 3) -> (64, 27)`` (243 times); but two matrix-sized dims do not:
    ``(10, 100)`` stays (one 1000-long dim would cost 1000 times: a full-matrix factor whose
    root costs hundreds of plain steps of a small model), and so does ``(64, 64, 3, 3) ->
    (64, 64, 9)`` (the reference's ``(64, 576)``: 727 times).  ``max_ratio=inf`` is
    :func:`merge_dims`."""
    out: list[tuple[int, int]] = []  # (merged size, sum of the cubes of its original dims)
    for d in reversed([d for d in shape if d != 1]):
        if out and out[-1][0] * d <= max_dim and (out[-1][0] * d) ** 3 <= max_ratio * (
                out[-1][1] + d ** 3):
            out[-1] = (out[-1][0] * d, out[-1][1] + d ** 3)
        else:
            out.append((d, d ** 3))
    return tuple(n for n, _ in reversed(out))


class BlockedParam:
    """Layout of one param: its merged shape and blocks (slices of the merged tensor), or
    ``merged`` None for a param that takes the grafting (diagonal) direction."""

    def __init__(self, p: Tensor, group: int, max_dim: int, merge: bool,
                 precondition_1d: bool) -> None:
        self.p, self.group = p, group
        merged = (merge_dims_by_cost(p.shape, max_dim, MERGE_COST_RATIO) if merge
                  else tuple(d for d in p.shape if d > 1))
        wanted = p.dim() >= 2 or (p.dim() == 1 and precondition_1d)
        self.merged = merged if wanted and merged else None
        self.blocks: list[tuple[slice, ...]] = []
        self.block_shapes: list[tuple[int, ...]] = []
        if self.merged is not None:
            chunks = [[(a, min(a + max_dim, d)) for a in range(0, d, max_dim)] for d in merged]
            for combo in itertools.product(*chunks):
                self.blocks.append(tuple(slice(a, b) for a, b in combo))
                self.block_shapes.append(tuple(b - a for a, b in combo))

    def block(self, x: Tensor, j: int) -> Tensor:
        return x.reshape(self.merged)[self.blocks[j]]


class BlockShapeGroup:
    """All blocks (of any param) of one shape, batched through the factor update and the
    preconditioning.  ``slots[i] = (bucket key, start)``: the factors of mode ``i`` of the ``B``
    blocks are ``bucket[start:start + B]``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.members: list[tuple[int, int]] = []  # (param position, block index)
        self.slots: list[tuple[tuple[int, int], int]] = []


class ShampooBlocking:
    """The blocks of every param of every group, their shape groups and the slots of their
    factors: bucket key ``(n, order)`` (the root's exponent depends on the order)."""

    def __init__(self, groups: list[list[Tensor]], max_dim: int, merge: bool,
                 precondition_1d: bool) -> None:
        self.params = [BlockedParam(p, gi, max_dim, merge, precondition_1d)
                       for gi, ps in enumerate(groups) for p in ps]
        self.by_group = [[i for i, P in enumerate(self.params) if P.group == gi]
                         for gi in range(len(groups))]
        shape_groups: dict[tuple[int, ...], BlockShapeGroup] = {}
        for i, P in enumerate(self.params):
            for j, shape in enumerate(P.block_shapes):
                shape_groups.setdefault(shape, BlockShapeGroup(shape)).members.append((i, j))
        self.shape_groups = list(shape_groups.values())
        self.buckets = KronBuckets()
        self.owner: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # slot -> (i, j, mode)
        self._slot_of: dict[tuple[int, int, int], tuple[tuple[int, int], int]] = {}
        for sg in self.shape_groups:
            for mode, n in enumerate(sg.shape):
                key = (n, len(sg.shape))
                start = self.buckets.reserve(key, n, len(sg.members))
                sg.slots.append((key, start))
                for m, (i, j) in enumerate(sg.members):
                    self.owner.setdefault(key, []).append((i, j, mode))
                    self._slot_of[(i, j, mode)] = (key, start + m)
        self.slot_group = {key: [self.params[i].group for i, _, _ in own]
                           for key, own in self.owner.items()}

    def slots(self, i: int) -> list[tuple[tuple[int, int], int]]:
        """The factor slots of param ``i``, over (block, dim) in block-major order."""
        P = self.params[i]
        return [self._slot_of[(i, j, mode)] for j in range(len(P.blocks))
                for mode in range(len(P.merged))]
