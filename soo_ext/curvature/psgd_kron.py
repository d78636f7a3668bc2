"""PSGD-Kron's preconditioner (Li 2015, 2022): per param a Kronecker product of factors ``Q_i``,
upper triangular or diagonal, fitted on the Lie group by random probes; ``P = Q^T Q``.

Params of one merged shape (and one triangular/diagonal pattern) form a shape group whose
gradients, momenta and factors are stacked along a leading batch dim, so that every operation of
the fit and of the preconditioning is one batched torch call per shape group; the factors
themselves live in :class:`~soo_ext.curvature.kron_buckets.KronBuckets` stacks by size and kind,
and the normalised triangular update is one batched call per bucket.
"""
from __future__ import annotations

import math
from typing import Hashable

import torch
from torch import Tensor

from .._support.device import device_tensor
from .._support.guard import fill_if_
from .kron_buckets import KronBuckets, keep_where
from .shampoo_blocks import BlockShapeGroup, merge_dims

__all__ = ["PSGDKronLayout", "PSGDKronFactors", "psgd_merged_shape", "factor_kinds", "FLAT_START",
           "MIN_PROB", "START_INTERVAL", "start_precond_lr", "update_probability", "draw_probes",
           "norm_lower_bound"]

TRI, DIAG = "tri", "diag"


FLAT_START, MIN_PROB = 500, 0.03  # the reference's schedule: its flat start and its floor
# The default's flat start (a deviation, docs/psgd_kron.md "The start"): a fit every
# START_INTERVAL-th step, of START_GAIN times precond_lr: half the fits, twice the progress a step.
START_INTERVAL, START_GAIN, START_MAX_LR = 2, 4, 0.5


def start_precond_lr(precond_lr: float) -> float:
    """The step of a fit in the default's flat start: ``START_GAIN precond_lr``, at most
    ``START_MAX_LR`` (well below 1, where the normalised step could make ``Q`` singular) unless
    ``precond_lr`` itself is larger."""
    return max(precond_lr, min(START_GAIN * precond_lr, START_MAX_LR))
MERGE_MAX_DIM = 1024  # the squarer merge's bound (Shampoo's default max_preconditioner_dim)


def update_probability(n: int, max_prob: float = 1.0, min_prob: float = MIN_PROB,
                       decay: float = 0.001, flat_start: int = FLAT_START) -> float:
    """The reference's schedule (kron-torch): 1 for the first ``flat_start`` steps, then
    ``exp(-decay (n - flat_start))`` down to ``min_prob`` (reached near step 4000); ``n``
    counts the steps before this one."""
    return min(max_prob, max(min_prob, max_prob * math.exp(-decay * (n - flat_start))))


def psgd_merged_shape(shape, merge) -> tuple[int, ...]:
    """The shape a param is preconditioned as; a 0-dim param is ``(1,)``.  A tensor of order
    > 2 with ``merge`` True keeps its first dim (a layer's outputs) and merges the others from
    the last while their product stays <= ``MERGE_MAX_DIM`` (``merge_dims``, as Shampoo):
    ``(25, 25, 1, 3) -> (25, 75)``, ``(64, 3, 3, 3) -> (64, 27)``, ``(512, 512, 3, 3) -> (512,
    512, 9)``.  ``merge='reference'``: the reference's matrix ``(prod(shape[:-1]), shape[-1])``
    or ``(shape[0], prod(shape[1:]))``, whichever has the smaller signed difference of its two
    sizes (``(625, 3)``, ``(576, 3)``: a large triangular factor, an O(n^3) fit)."""
    shape = tuple(shape)
    if not shape:
        return (1,)
    if len(shape) <= 2 or not merge:
        return shape
    if merge == "reference":
        first = (math.prod(shape[:-1]), shape[-1])
        second = (shape[0], math.prod(shape[1:]))
        return first if first[1] - first[0] <= second[1] - second[0] else second
    return (shape[0],) + (merge_dims(shape[1:], MERGE_MAX_DIM) or (1,))


def factor_kinds(shape: tuple[int, ...], max_size_triangular: int, min_ndim_triangular: int,
                 memory_save_mode: str | None) -> tuple[str, ...]:
    """Triangular or diagonal, per dim: diagonal for size-1 dims, dims above
    ``max_size_triangular``, tensors of fewer than ``min_ndim_triangular`` dims and the dims
    ``memory_save_mode`` names (``'one_diag'``: the largest; ``'smart_one_diag'``: the largest
    if strictly larger than the second; ``'all_diag'``: all)."""
    diag = [False] * len(shape)
    if len(shape) > 0 and memory_save_mode in ("one_diag", "smart_one_diag"):
        largest = max(range(len(shape)), key=lambda i: (shape[i], i))  # ties: the last
        ordered = sorted(shape)
        if memory_save_mode == "one_diag" or (len(shape) > 1 and ordered[-1] > ordered[-2]):
            diag[largest] = True
    elif memory_save_mode == "all_diag":
        diag = [True] * len(shape)
    return tuple(DIAG if (d or n == 1 or n > max_size_triangular
                          or len(shape) < min_ndim_triangular) else TRI
                 for n, d in zip(shape, diag))


def draw_probes(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """The random probes ``V ~ N(0, I)`` of one shape group, ``[B, *shape]``."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def norm_lower_bound(S: Tensor) -> Tensor:
    """``[B]`` cheap lower bounds of the spectral norms of a ``[B, n, n]`` stack of symmetric
    matrices (the reference's: the largest column, one multiplication with ``S^T`` and one with
    ``S``, on ``S`` scaled by its largest entry; 0 for a zero matrix)."""
    scale = S.abs().amax(dim=(1, 2))
    positive = scale > 0
    safe = torch.where(positive, scale, 1.0)
    A = S / safe.view(-1, 1, 1)
    column = (A * A).sum(dim=1).argmax(dim=1)  # [B]
    x = torch.gather(A, 2, column.view(-1, 1, 1).expand(-1, A.shape[1], 1))  # [B, n, 1]
    x = torch.bmm(x.mT, A)  # [B, 1, n]
    x = x / torch.linalg.vector_norm(x, dim=2, keepdim=True)
    y = torch.linalg.vector_norm(torch.bmm(A, x.mT), dim=(1, 2))
    return torch.where(positive, y * safe, scale)


def _apply_mode(X: Tensor, mode: int, M: Tensor) -> Tensor:
    """``M`` (``[B, n, n]``) applied to the mode-``mode`` fibres of ``X`` (``[B, ...]``, batch
    first); a diagonal factor ``M`` is ``[B, n]``."""
    axis = mode + 1
    if M.dim() == 2:
        shape = [M.shape[0]] + [1] * (X.dim() - 1)
        shape[axis] = M.shape[1]
        return X * M.view(shape)
    Mt = M.transpose(1, 2)  # X_last @ M^T applies M
    if X.dim() == 3 and axis == 2:
        return torch.bmm(X, Mt)
    if X.dim() == 3 and axis == 1:
        if X.shape[1] <= 16 * X.shape[2]:
            return torch.bmm(M, X)
        # Many rows, few columns ((625, 3)): the mode as the rows' last dim, ~4x faster on a CPU.
        return torch.bmm(X.transpose(1, 2).contiguous(), Mt).transpose(1, 2)
    moved = X.movedim(axis, -1)
    return torch.matmul(moved.reshape(X.shape[0], -1, M.shape[1]), Mt).reshape(
        moved.shape).movedim(-1, axis)


def _solve_mode(X: Tensor, mode: int, M: Tensor) -> Tensor:
    """``M^{-T}`` applied to the mode-``mode`` fibres of ``X`` (a triangular solve; a diagonal
    factor divides)."""
    axis = mode + 1
    if M.dim() == 2:
        shape = [M.shape[0]] + [1] * (X.dim() - 1)
        shape[axis] = M.shape[1]
        return X / M.view(shape)
    if X.dim() == 3:  # X M^{-1} on the rows (axis 2) or on the columns (axis 1, transposed)
        return (torch.linalg.solve_triangular(M, X, upper=True, left=False) if axis == 2 else
                torch.linalg.solve_triangular(M, X.mT, upper=True, left=False).mT)
    moved = X.movedim(axis, -1)
    solved = torch.linalg.solve_triangular(M, moved.reshape(X.shape[0], -1, M.shape[1]),
                                           upper=True, left=False)  # X M^{-1}
    return solved.reshape(moved.shape).movedim(-1, axis)


def _gram(X: Tensor, mode: int, diagonal: bool) -> Tensor:
    """``X_(i) X_(i)^T``: the mode-``mode`` Gram matrix, the other dims contracted (its diagonal
    ``[B, n]`` for a diagonal factor)."""
    axis = mode + 1
    if diagonal:
        dims = [d for d in range(1, X.dim()) if d != axis]
        return (X * X).sum(dim=dims) if dims else X * X
    if X.dim() == 3:  # a matrix: X X^T (axis 1) or X^T X (axis 2)
        return torch.bmm(X, X.mT) if axis == 1 else torch.bmm(X.mT, X)
    moved = X.movedim(axis, -1)
    flat = moved.reshape(X.shape[0], -1, moved.shape[-1])
    return torch.bmm(flat.transpose(1, 2), flat)


class PSGDKronLayout:
    """The shape groups of the params (merged shape and factor kinds) and the bucket slots of
    their factors: bucket key ``(kind, n)``."""

    def __init__(self, params: list[Tensor], merge: bool, max_size_triangular: int,
                 min_ndim_triangular: int, memory_save_mode: str | None) -> None:
        self.params = params
        self.merged = [psgd_merged_shape(p.shape, merge) for p in params]
        self.kinds = [factor_kinds(s, max_size_triangular, min_ndim_triangular, memory_save_mode)
                      for s in self.merged]
        groups: dict[tuple, BlockShapeGroup] = {}
        for i, (shape, kinds) in enumerate(zip(self.merged, self.kinds)):
            sg = groups.setdefault((shape, kinds), BlockShapeGroup(shape))
            sg.kinds = kinds
            sg.members.append((i, 0))
        self.shape_groups = list(groups.values())
        self.buckets = KronBuckets()
        self.place: dict[int, tuple[int, int]] = {}  # param -> (shape group, member)
        for g, sg in enumerate(self.shape_groups):
            for mode, (n, kind) in enumerate(zip(sg.shape, sg.kinds)):
                key = (kind, n)
                sg.slots.append((key, self.buckets.reserve(key, n, len(sg.members))))
            for m, (i, _) in enumerate(sg.members):
                self.place[i] = (g, m)


class PSGDKronFactors:
    """The factors (``Q``, identities times ``init_scale^(1/order)``), the momenta and the
    per-param momentum step counts of a :class:`PSGDKronLayout`; all per-param state entries are
    views of these stacks.  The momenta (and the gradients and directions of a step) are flat
    vectors, the params in shape-group order (``order``): the element-wise work of a step is one
    call for all params, and a shape group's part is a view ``[B, *shape]``."""

    def __init__(self, layout: PSGDKronLayout, precond_dtype: torch.dtype,
                 momentum_dtype: torch.dtype, device: torch.device, init_scale: float) -> None:
        self.layout, self.dtype, self.device = layout, precond_dtype, device
        buckets = layout.buckets
        tri = {k: n for k, n in buckets.sizes.items() if k[0] == TRI}
        self.Q: dict[Hashable, Tensor] = {}
        for key, n in buckets.sizes.items():
            B = buckets.counts[key]
            self.Q[key] = (torch.eye(n, dtype=precond_dtype, device=device).repeat(B, 1, 1)
                           if key in tri else
                           torch.ones(B, n, dtype=precond_dtype, device=device))
        for sg in layout.shape_groups:  # the scale, spread over the factors
            for key, start in sg.slots:
                self.Q[key][start:start + len(sg.members)].mul_(
                    init_scale ** (1 / len(sg.shape)))
        # P = Q^T Q per factor (q^2 for a diagonal one): what a step applies, made again only
        # after the factors changed (a fit, a balancing), not at every step.
        self.P = {key: torch.empty_like(Q) for key, Q in self.Q.items()}
        self.stale = True
        self.order = [i for sg in layout.shape_groups for i, _ in sg.members]
        numels = [layout.params[i].numel() for i in self.order]
        self.total = sum(numels)
        self.numels = device_tensor(numels, device)
        self.root_numels = self.numels.to(precond_dtype).sqrt()
        self.momentum = torch.zeros(self.total, dtype=momentum_dtype, device=device)
        self.counts = torch.zeros(len(self.order), dtype=torch.int64, device=device)
        # each element's member: a per-member value spread over the flat vector by one gather
        self.member_of = torch.arange(len(numels), device=device).repeat_interleave(self.numels)
        self.direction_buffer = torch.empty(self.total, dtype=precond_dtype, device=device)
        self._members = self._split(self.direction_buffer)  # flat per member, for the norms
        self._directions = self.stacks(self.direction_buffer)
        self.update_views = self.param_views(self.direction_buffer)  # what direction() returns
        # Per shape group, views made once (the stacks change in place only): its factors and
        # their P; the fit's scratch Gram terms by bucket and their per-mode views.
        self._factors = [self.factors(g) for g in range(len(layout.shape_groups))]
        self._P = [[self.P[key][start:start + len(sg.members)] for key, start in sg.slots]
                   for sg in layout.shape_groups]
        self._diff = {key: torch.empty_like(Q) for key, Q in self.Q.items()}
        self._total = {key: torch.empty_like(Q) for key, Q in self.Q.items()}
        self._grams = [[(self._diff[key][start:start + len(sg.members)],
                         self._total[key][start:start + len(sg.members)])
                        for key, start in sg.slots] for sg in layout.shape_groups]

    def _split(self, flat: Tensor) -> list[Tensor]:
        """``flat``'s pieces, one per member in ``order`` (flat views)."""
        return list(flat.split([self.layout.params[i].numel() for i in self.order]))

    def stacks(self, flat: Tensor) -> list[Tensor]:
        """The shape groups' parts of a flat vector in ``order``: views ``[B, *shape]``."""
        shapes = [(len(sg.members),) + sg.shape for sg in self.layout.shape_groups]
        return [part.view(shape) for part, shape in zip(
            flat.split([math.prod(shape) for shape in shapes]), shapes)]

    def group_parts(self, member: Tensor) -> list[Tensor]:
        """A ``[P]`` vector in ``order`` split by shape group (a 0-dim value expanded)."""
        sizes = [len(sg.members) for sg in self.layout.shape_groups]
        if member.dim() == 0:
            return [member.expand(n) for n in sizes]
        return list(member.split(sizes))

    def param_views(self, flat: Tensor) -> dict[int, Tensor]:
        """Param index -> its part of a flat vector in ``order``, shaped like the param."""
        return {i: piece.view(self.layout.params[i].shape)
                for i, piece in zip(self.order, self._split(flat))}

    def factors(self, g: int) -> list[Tensor]:
        """Shape group ``g``'s factor stacks, one per mode (views of the buckets)."""
        sg = self.layout.shape_groups[g]
        return [self.Q[key][start:start + len(sg.members)] for key, start in sg.slots]

    def views(self, i: int) -> dict[str, object]:
        """Param ``i``'s state entries: views of the stacks."""
        g, m = self.layout.place[i]
        at = self.order.index(i)
        return {"momentum_buffer": self.param_views(self.momentum)[i],
                "momentum_steps": self.counts[at],
                "Q": [F[m] for F in self.factors(g)]}

    def momentum_(self, G: Tensor, take: Tensor, beta) -> Tensor:
        """``m <- beta m + (1 - beta) G`` for the members that ``take`` (``[P]`` bool in
        ``order``, or a 0-dim bool for all); ``G`` and the returned bias-corrected momentum (in
        the preconditioner's dtype) are flat in ``order``.  ``beta``: a float, or ``[P]``
        float64 (each member's own)."""
        M, counts = self.momentum, self.counts
        weight = (take.to(M.dtype) * (1 - beta)).to(M.dtype)
        if weight.dim():
            weight = weight.index_select(0, self.member_of)
        M.lerp_(G, weight)
        counts.add_(take)
        correction = 1 - torch.pow(beta, counts.clamp_min(1).to(torch.float64))
        return (M / correction.to(M.dtype).index_select(0, self.member_of)).to(self.dtype)

    def update_(self, stacks: list[Tensor], probes: list[Tensor], take: Tensor,
                lr: float) -> None:
        """One fit of every factor from ``stacks[g]`` (the shape groups' gradients or momenta,
        ``[B, *shape]``, perturbed in place by ``sqrt(eps) mean|G| V`` as the reference does)
        and the probes ``V``: ``A = Q G``, ``B = Q^{-T} V``, per factor
        ``Q_i <- Q_i - lr triu(A_i A_i^T - B_i B_i^T) Q_i / ||A_i A_i^T + B_i B_i^T||`` (a lower
        bound of the spectral norm; max-norm for a diagonal factor).  Members where ``take``
        (``[P]`` bool in ``order``, or a 0-dim bool for all) is False keep their factors bit for
        bit."""
        takes = self._bucket_masks(take) if take.dim() else None
        eps = math.sqrt(torch.finfo(torch.float32).eps)
        for sg, Qs, grams, G, V in zip(self.layout.shape_groups, self._factors, self._grams,
                                       stacks, probes):
            G.add_(V * (eps * G.abs().mean(dim=tuple(range(1, G.dim())), keepdim=True)))
            A, Bc = G, V
            for mode, Q in enumerate(Qs):
                A = _apply_mode(A, mode, Q)
                Bc = _solve_mode(Bc, mode, Q)
            for mode, (kind, (diff, total)) in enumerate(zip(sg.kinds, grams)):
                T1, T2 = _gram(A, mode, kind == DIAG), _gram(Bc, mode, kind == DIAG)
                torch.sub(T1, T2, out=diff)
                torch.add(T1, T2, out=total)
        for key, Q in self.Q.items():
            step, total = self._diff[key].mul_(lr), self._total[key]
            tiny = torch.finfo(Q.dtype).tiny
            if key[0] == DIAG:
                norm = total.abs().amax(dim=1, keepdim=True)
                new = Q - step * (Q / norm.clamp_min(tiny))
            else:
                norm = norm_lower_bound(total).clamp_min(tiny)
                new = Q - torch.bmm(torch.triu(step) / norm.view(-1, 1, 1), Q)
            # an overflow never enters Q: max|new| < inf, False for a NaN too (amax keeps it);
            # on a CPU several times faster than isfinite(new).all
            keep = new.flatten(1).abs().amax(dim=1) < math.inf
            keep &= take if takes is None else takes[key]
            torch.where(keep.view(-1, *([1] * (Q.dim() - 1))), new, Q, out=Q)
        self.stale = True

    def _bucket_masks(self, take: Tensor) -> dict[Hashable, Tensor]:
        """A ``[P]`` bool vector in ``order`` as one ``[B]`` mask per bucket (its factors')."""
        masks = {key: torch.zeros(n, dtype=torch.bool, device=self.device)
                 for key, n in self.layout.buckets.counts.items()}
        for sg, ok in zip(self.layout.shape_groups, self.group_parts(take)):
            for key, start in sg.slots:
                masks[key][start:start + len(sg.members)] = ok
        return masks

    def balance_(self, take: Tensor) -> None:
        """Rescale the factors of every param of order >= 2 to one max-norm (the geometric mean
        of theirs): ``P`` is unchanged, the factors' ranges stay balanced (members where
        ``take``, as in :meth:`update_`)."""
        for g, (sg, ok) in enumerate(zip(self.layout.shape_groups, self.group_parts(take))):
            if len(sg.shape) < 2:
                continue
            Qs = self.factors(g)
            norms = torch.stack([Q.abs().flatten(1).amax(dim=1) for Q in Qs])  # [k, B]
            scales = norms.log().mean(dim=0).exp() / norms
            for Q, s in zip(Qs, scales):
                keep_where(ok, Q, Q * s.view((-1,) + (1,) * (Q.dim() - 1)))
        self.stale = True

    def precondition(self, g: int, M: Tensor) -> Tensor:
        """``Q^T Q M`` for shape group ``g``'s stack ``M``: ``P_i = Q_i^T Q_i`` per mode."""
        if self.stale:
            for key, Q in self.Q.items():
                if key[0] == DIAG:
                    torch.mul(Q, Q, out=self.P[key])
                else:
                    torch.bmm(Q.transpose(1, 2), Q, out=self.P[key])
            self.stale = False
        for mode, P in enumerate(self._P[g]):
            M = _apply_mode(M, mode, P)
        return M

    def direction(self, M: Tensor, max_rms: float | None, skipped: Tensor) -> Tensor:
        """The update of every member (flat, in ``order``; a kept buffer, per param as
        ``update_views``): ``Q^T Q M`` of the flat momentum ``M``, each member scaled down to
        an RMS of at most ``max_rms`` (None: no clip), all +0 where ``skipped`` (0-dim bool)."""
        U = self.direction_buffer
        for g, (stack, out) in enumerate(zip(self.stacks(M), self._directions)):
            out.copy_(self.precondition(g, stack))
        if max_rms is not None:
            rms = torch.stack(torch._foreach_norm(self._members)) / self.root_numels
            scale = torch.clamp(max_rms / (rms + 1e-12), max=1.0)
            U.mul_(scale.index_select(0, self.member_of))
        return fill_if_(U, skipped, 0)
