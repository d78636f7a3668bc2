"""SOAP's preconditioner: per param, the Shampoo factors of its (merged) dims and their
eigenbases, with Adam's moments kept in the rotated space.  Params of one (merged) shape and one
pattern of rotated dims form a shape group whose gradients, moments and bases are handled as
stacks (batched matmuls); the factors and bases of one size share a bucket
(:class:`~soo_ext.curvature.kron_buckets.KronBuckets`), so that the initial eigendecomposition
and every power-iteration + QR refresh is one call per bucket."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .kron_buckets import KronBuckets, keep_where
from .shampoo_blocks import BlockShapeGroup, merge_dims

__all__ = ["SOAPBases", "soap_shape"]


def soap_shape(shape, max_dim: int, merge: bool, precondition_1d: bool
               ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The shape a param is preconditioned as and which of its dims are rotated: dims merged
    (``merge``, from the first dim as SOAP's reference merges them, not from the last as
    Shampoo does) or size-1 dims dropped; a dim above ``max_dim`` is left
    unrotated, and so are 1-D params unless ``precondition_1d`` (they take Adam's update)."""
    merged = (merge_dims(shape, max_dim, from_last=False) if merge
              else tuple(d for d in shape if d > 1))
    merged = merged or (1,)
    if len(shape) <= 1 and not precondition_1d:
        return merged, (False,) * len(merged)
    return merged, tuple(1 < d <= max_dim for d in merged)


def _rotate(T: Tensor, shape: tuple[int, ...], bases: list[Tensor | None], back: bool) -> Tensor:
    """``T [B, *shape]`` times the basis of every rotated dim: ``Q^T`` along the dim (into the
    eigenbasis), or ``Q`` with ``back``.  Each product moves its dim last, so after all dims
    they are back in order."""
    B = T.shape[0]
    for n, Q in zip(shape, bases):
        T = T.reshape(B, n, -1).transpose(1, 2)
        if Q is not None:
            T = T @ (Q.transpose(1, 2) if back else Q)
    return T.reshape((B,) + shape)


class SOAPBases:
    """The factors (zero), bases (identities) of every rotated dim and the moments of every param
    of ``groups`` (lists of params), as stacks: factors and bases ``[B, n, n]`` per bucket (of
    ``factor_dtype``), moments ``[B, *shape]`` per shape group (of the params' dtype); the
    state's entries are views of them (:meth:`views`)."""

    def __init__(self, groups: list[list[Tensor]], max_dim: int, merge: bool,
                 precondition_1d: bool, factor_dtype: torch.dtype) -> None:
        params = [(p, gi) for gi, ps in enumerate(groups) for p in ps]
        self.params = [p for p, _ in params]
        self.group_of = [gi for _, gi in params]
        self.fdtype = factor_dtype
        self.shape_groups: list[BlockShapeGroup] = []
        by_key: dict[tuple, BlockShapeGroup] = {}
        for i, p in enumerate(self.params):
            shape, rotated = soap_shape(p.shape, max_dim, merge, precondition_1d)
            sg = by_key.get((shape, rotated))
            if sg is None:
                sg = by_key[(shape, rotated)] = BlockShapeGroup(shape)
                sg.rotated = rotated
                self.shape_groups.append(sg)
            sg.members.append((i, 0))
        self.buckets = KronBuckets()
        self.owner: dict[int, list[int]] = {}  # bucket -> the param of each slot
        for sg in self.shape_groups:
            for n, rotated in zip(sg.shape, sg.rotated):
                if not rotated:
                    sg.slots.append(None)
                    continue
                start = self.buckets.reserve(n, n, len(sg.members))
                sg.slots.append((n, start))
                self.owner.setdefault(n, []).extend(i for i, _ in sg.members)
        p0 = self.params[0]
        self.factors = self.buckets.stacks(factor_dtype, p0.device, identity=False)
        self.bases = self.buckets.stacks(factor_dtype, p0.device, identity=True)
        self.exp_avg = [torch.zeros((len(sg.members),) + sg.shape, dtype=p0.dtype,
                                    device=p0.device) for sg in self.shape_groups]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.exp_avg]
        self._where: dict[int, tuple[int, int]] = {i: (g, m) for g, sg in enumerate(
            self.shape_groups) for m, (i, _) in enumerate(sg.members)}

    def views(self, i: int) -> dict[str, Tensor | list[Tensor]]:
        """The state entries of param ``i``: ``exp_avg``, ``exp_avg_sq`` (the param's shape, in
        the rotated space), ``GG`` and ``Q`` (one factor and basis per rotated dim)."""
        g, m = self._where[i]
        sg, p = self.shape_groups[g], self.params[i]
        slots = [s for s in sg.slots if s is not None]
        return {"exp_avg": self.exp_avg[g][m].view(p.shape),
                "exp_avg_sq": self.exp_avg_sq[g][m].view(p.shape),
                "GG": [self.factors[key][start + m] for key, start in slots],
                "Q": [self.bases[key][start + m] for key, start in slots]}

    def _bases(self, sg: BlockShapeGroup) -> list[Tensor | None]:
        B = len(sg.members)
        return [None if s is None else self.bases[s[0]][s[1]:s[1] + B] for s in sg.slots]

    def stack(self, grads: list[Tensor], g: int) -> Tensor:
        sg = self.shape_groups[g]
        if len(sg.members) == 1:  # a view, no copy
            return grads[sg.members[0][0]].reshape((1,) + sg.shape)
        return torch.stack([grads[i].reshape(sg.shape) for i, _ in sg.members])

    def update_factors(self, stacked: list[Tensor], decay: dict[int, Tensor],
                       scale: dict[int, Tensor]) -> None:
        """``GG <- d GG + (1 - d) G_(k) G_(k)^T`` per rotated dim, ``d`` the slot's entry of
        ``decay`` (1 where nothing may change: the gradient is zero there) and ``scale`` its
        ``sqrt(1 - d)`` (``[B]`` per bucket)."""
        scale = {key: s.view(-1, 1, 1) for key, s in scale.items()}
        for key, F in self.factors.items():
            F.mul_(decay[key][:, None, None])
        for sg, G in zip(self.shape_groups, stacked):
            B = G.shape[0]
            G = G.to(self.fdtype)
            for mode, slot in enumerate(sg.slots):
                if slot is None:
                    continue
                key, start = slot
                X = G.movedim(1 + mode, -1).reshape(B, -1, sg.shape[mode])
                X = X * scale[key][start:start + B]
                ops.kron_factor_update_(self.factors[key][start:start + B], X, 1.0, 1.0)

    def init_bases(self, take: dict[int, Tensor]) -> None:
        """The eigenbases of the factors, eigenvalues descending (one ``kron_eigh`` per
        bucket), for the slots where ``take``."""
        for key, F in self.factors.items():
            _, Q, _ = ops.kron_eigh(F)
            keep_where(take[key], self.bases[key], Q.flip(-1))

    def rotate(self, G: Tensor, g: int, back: bool = False) -> Tensor:
        """``G [B, *shape]`` of shape group ``g`` into the bases (out of them with ``back``),
        computed in the factor dtype, returned in ``G``'s."""
        sg = self.shape_groups[g]
        if all(s is None for s in sg.slots):
            return G  # nothing rotated: Adam
        return _rotate(G.to(self.fdtype), sg.shape, self._bases(sg), back).to(G.dtype)

    def refresh(self, take: dict[int, Tensor], member_take: list[Tensor]) -> None:
        """One power-iteration step warm-started from the bases: ``Q <- qr(GG Q)`` with the
        columns ordered by the estimated eigenvalues ``diag(Q^T GG Q)`` (one QR per bucket); the
        second moments follow the new column order, the first moments are rotated into the new
        bases.  Only for the slots (``take``) and members (``member_take``) allowed."""
        order: dict[int, Tensor] = {}
        new: dict[int, Tensor] = {}
        for key, F in self.factors.items():
            Q = self.bases[key]
            P = F @ Q
            estimate = (Q * P).sum(-2)
            order[key] = torch.argsort(estimate, dim=-1, descending=True, stable=True)
            P = P.gather(-1, order[key][:, None, :].expand_as(P))
            new[key] = torch.where(take[key].view(-1, 1, 1), torch.linalg.qr(P).Q, Q)
        for g, sg in enumerate(self.shape_groups):
            if all(s is None for s in sg.slots):
                continue
            B = len(sg.members)
            V = self.exp_avg_sq[g]
            for mode, slot in enumerate(sg.slots):
                if slot is not None:
                    idx = order[slot[0]][slot[1]:slot[1] + B]
                    view = [B] + [1] * len(sg.shape)
                    view[1 + mode] = sg.shape[mode]
                    V = V.gather(1 + mode, idx.view(view).expand_as(V))
            fresh = [None if s is None else new[s[0]][s[1]:s[1] + B] for s in sg.slots]
            M = _rotate(_rotate(self.exp_avg[g].to(self.fdtype), sg.shape, self._bases(sg), True),
                        sg.shape, fresh, False)
            keep_where(member_take[g], self.exp_avg_sq[g], V)
            keep_where(member_take[g], self.exp_avg[g], M)
        for key, Q in new.items():
            self.bases[key].copy_(Q)
