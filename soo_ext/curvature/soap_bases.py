"""SOAP's preconditioner: per param, the Shampoo factors of its (merged) dims and their
eigenbases, with Adam's moments kept in the rotated space.  Params of one (merged) shape and one
pattern of rotated dims form a shape group whose gradients, moments and bases are handled as
stacks (batched matmuls); the factors and bases of one size share a bucket
(:class:`~soo_ext.curvature.kron_buckets.KronBuckets`), so that the initial eigendecomposition
and every power-iteration + QR refresh is one call per bucket.

A step is a fixed sequence of batched and multi-tensor ops on buffers kept across steps: the
gradients, moments, rotated gradients and updates of all params are views of one flat buffer
each (rotated shape groups first), every product with the bases is a ``bmm`` between views made
once (:class:`_ModeProducts`), and the coefficients of a step (its betas and weight decay, masked
by the skip guard) are one ``where`` into a kept table whose views the updates read.  So the
Python dispatch of a step does not grow with the number of params beyond a few multi-tensor ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._support.device import device_tensor
from .._support.guard import fill_if_, where_into_
from .kron_buckets import KronBuckets
from .shampoo_blocks import BlockShapeGroup, merge_dims

__all__ = ["SOAPBases", "soap_shape"]


def soap_shape(shape, max_dim: int, merge: bool, precondition_1d: bool, one_sided: bool = False
               ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The shape a param is preconditioned as and which of its dims are rotated: dims merged
    (``merge``, from the first dim as SOAP's reference merges them, not from the last as
    Shampoo does) or size-1 dims dropped; a dim above ``max_dim`` is left
    unrotated, and so are 1-D params unless ``precondition_1d`` (they take Adam's update).
    ``one_sided``: of two or more rotated dims the largest (the first of equal ones) is left
    unrotated too (for a matrix the paper's one-sided SOAP: the smaller side's basis only)."""
    merged = (merge_dims(shape, max_dim, from_last=False) if merge
              else tuple(d for d in shape if d > 1))
    merged = merged or (1,)
    if len(shape) <= 1 and not precondition_1d:
        return merged, (False,) * len(merged)
    rotated = [1 < d <= max_dim for d in merged]
    if one_sided and sum(rotated) > 1:  # it sets most of the rotations' and statistics' cost
        # a dim the size of the largest rotated one is rotated too: index() finds the first
        rotated[merged.index(max(d for d, r in zip(merged, rotated) if r))] = False
    return merged, tuple(rotated)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _ModeProducts:
    """Products of every rotated shape group's stack with a matrix per dim, as a fixed list of
    ``bmm`` calls between views of kept buffers (made once: a step allocates nothing): each dim
    in turn is moved last (``[B, rest, n]``) and multiplied from the right by its ``A_k``
    (``A_k^T`` with ``back``), so that after all dims they are in order again; a dim without a
    matrix is only moved (a copy where the next view needs one).  With the bases, ``Q^T G Q``
    for a matrix (into them) and ``Q U Q^T`` (``back``).  ``src``/``dst``: the caller's flat
    buffers of the rotated groups; where their dtype is not the matrices', they are cast into
    and out of ``work`` (a pair of buffers of the matrices' dtype)."""

    def __init__(self, groups: list[tuple], mats: dict, back: bool, src: Tensor, dst: Tensor,
                 work: tuple[Tensor, Tensor], scratch: tuple[Tensor, Tensor]) -> None:
        self.src, self.dst = src, dst
        self.src_f = src if src.dtype == work[0].dtype else work[0]
        self.dst_f = dst if dst.dtype == work[1].dtype else work[1]
        self.steps: list[tuple[Tensor, Tensor | None, Tensor]] = []
        for shape, B, offset, slots in groups:
            size = B * _numel(shape)
            T, held = self.src_f[offset:offset + size].view((B,) + shape), None
            out_final = self.dst_f[offset:offset + size]
            for k, (n, slot) in enumerate(zip(shape, slots)):
                rest = _numel(shape) // n
                try:
                    X = T.view(B, n, rest).transpose(1, 2)
                except RuntimeError:  # a moved dim left T strided: copy it first
                    held = 0 if held is None else 1 - held
                    buf = scratch[held][:size].view(T.shape)
                    self.steps.append((T, None, buf))
                    X = buf.view(B, n, rest).transpose(1, 2)
                last = k == len(shape) - 1
                if slot is None and not last:
                    T = X  # moved, not multiplied
                    continue
                if last:
                    out = out_final.view(B, rest, n)
                else:
                    held = 0 if held is None else 1 - held
                    out = scratch[held][:size].view(B, rest, n)
                A = None if slot is None else mats[slot[0]][slot[1]:slot[1] + B]
                self.steps.append((X, None if A is None else (A.transpose(1, 2) if back else A),
                                   out))
                T = out

    def run(self) -> None:
        if self.src_f is not self.src:
            self.src_f.copy_(self.src)
        for X, A, out in self.steps:
            if A is None:
                out.copy_(X)
            else:
                torch.bmm(X, A, out=out)
        if self.dst_f is not self.dst:
            self.dst.copy_(self.dst_f)


class SOAPBases:
    """The factors (zero), bases (identities) of every rotated dim and the moments of every param
    of ``groups`` (lists of params): factors and bases ``[B, n, n]`` per bucket (of
    ``factor_dtype``), moments ``[B, *shape]`` per shape group (views of one flat buffer of the
    params' dtype); the state's entries are views of them (:meth:`views`).

    A step: :meth:`set_hyper` (when the groups' values changed), :meth:`load_grads`,
    :meth:`mask` (the skip guard's flag and the params without a gradient),
    :meth:`update_factors`, then :meth:`adam_step_` (its update overwrites the gradients), and
    :meth:`init_bases` or :meth:`refresh`.
    """

    def __init__(self, groups: list[list[Tensor]], max_dim: int, merge: bool,
                 precondition_1d: bool, factor_dtype: torch.dtype, one_sided: bool = False
                 ) -> None:
        params = [(p, gi) for gi, ps in enumerate(groups) for p in ps]
        self.params = [p for p, _ in params]
        self.group_of = [gi for _, gi in params]
        self.fdtype = factor_dtype
        by_key: dict[tuple, BlockShapeGroup] = {}
        for i, p in enumerate(self.params):
            shape, rotated = soap_shape(p.shape, max_dim, merge, precondition_1d, one_sided)
            sg = by_key.get((shape, rotated))
            if sg is None:
                sg = by_key[(shape, rotated)] = BlockShapeGroup(shape)
                sg.rotated = rotated
            sg.members.append((i, 0))
        # rotated groups first: the rotations read and write one leading range of each buffer
        self.shape_groups = sorted(by_key.values(), key=lambda sg: not any(sg.rotated))
        self._n_rot_groups = sum(any(sg.rotated) for sg in self.shape_groups)
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
        device = self.params[0].device
        self.factors = self.buckets.stacks(factor_dtype, device, identity=False)
        self.bases = self.buckets.stacks(factor_dtype, device, identity=True)
        self._orders = {key: torch.zeros(F.shape[:2], dtype=torch.int64, device=device)
                        for key, F in self.factors.items()}  # a refresh's column orders
        self._estimates = {key: torch.zeros(F.shape[:2], dtype=factor_dtype, device=device)
                           for key, F in self.factors.items()}  # diag(Q^T GG Q), sorted
        self._order_cols = {key: o[:, None, :].expand_as(self.factors[key])
                            for key, o in self._orders.items()}
        self._lay_out()
        self._plan()
        self._tables()

    def _lay_out(self) -> None:
        """The flat buffers (members in shape group order: a row each) and their views."""
        p0 = self.params[0]
        self._where = {i: (g, m) for g, sg in enumerate(self.shape_groups)
                       for m, (i, _) in enumerate(sg.members)}
        self._row_param = [i for sg in self.shape_groups for i, _ in sg.members]
        self._row = {i: r for r, i in enumerate(self._row_param)}
        self._ranges: list[tuple[int, int, int]] = []  # per group: (first row, offset, size)
        offset = 0
        for sg in self.shape_groups:
            B = len(sg.members)
            self._ranges.append((self._row[sg.members[0][0]], offset, B * _numel(sg.shape)))
            offset += self._ranges[-1][2]
        self._n_rot = sum(size for _, _, size in self._ranges[:self._n_rot_groups])
        flat = lambda: torch.zeros(offset, dtype=p0.dtype, device=p0.device)  # noqa: E731
        # the gradients, then the update (out of the bases: the statistics have read them);
        # their rotation, then Adam's direction (M / (sqrt(V) + eps), into the bases)
        self.grad, self.work = flat(), flat()
        self.update = self.grad
        self._exp_avg, self._exp_avg_sq = flat(), flat()
        self.grad_stacks, self.work_stacks, self.update_stacks, self.exp_avg, self.exp_avg_sq = (
            [buffer[off:off + size].view((len(sg.members),) + sg.shape)
             for sg, (_, off, size) in zip(self.shape_groups, self._ranges)]
            for buffer in (self.grad, self.work, self.update, self._exp_avg, self._exp_avg_sq))
        self._param_views: dict[str, list[Tensor]] = {}
        for name, t in (("grad", self.grad), ("update", self.update),
                        ("exp_avg", self._exp_avg), ("exp_avg_sq", self._exp_avg_sq)):
            views: list = [None] * len(self.params)
            for sg, (_, off, _) in zip(self.shape_groups, self._ranges):
                numel = _numel(sg.shape)
                for m, (i, _) in enumerate(sg.members):
                    views[i] = t[off + m * numel:off + (m + 1) * numel].view(self.params[i].shape)
            self._param_views[name] = views

    def _plan(self) -> None:
        """The rotations and the factor statistics' operands, in the factor dtype (copies of the
        rotated range where the params' dtype differs), with two scratch buffers."""
        fdtype, n_rot, device = self.fdtype, self._n_rot, self.grad.device
        self._cast = fdtype != self.grad.dtype
        self._grad_f = (torch.zeros(n_rot, dtype=fdtype, device=device) if self._cast
                        else self.grad[:n_rot])
        pair = tuple(torch.zeros(n_rot if self._cast else 0, dtype=fdtype, device=device)
                     for _ in range(2))
        rotated = list(zip(self.shape_groups, self._ranges))[:self._n_rot_groups]
        largest = max([size for _, (_, _, size) in rotated], default=0)
        scratch = tuple(torch.zeros(largest, dtype=fdtype, device=device) for _ in range(2))
        plan = [(sg.shape, len(sg.members), off, sg.slots) for sg, (_, off, _) in rotated]
        # gradient -> work (into the bases), work -> update (back); at a refresh exp_avg ->
        # update (out of the old bases), update -> work (into the new ones)
        self.rotate_in = _ModeProducts(plan, self.bases, False, self._grad_f,
                                       self.work[:n_rot], pair, scratch)
        self.rotate_back = _ModeProducts(plan, self.bases, True, self.work[:n_rot],
                                         self.update[:n_rot], pair, scratch)
        self._exp_avg_out = _ModeProducts(plan, self.bases, True, self._exp_avg[:n_rot],
                                          self.update[:n_rot], pair, scratch)
        self._exp_avg_in = _ModeProducts(plan, self.bases, False, self.update[:n_rot],
                                         self.work[:n_rot], pair, scratch)
        # per rotated group, per rotated dim: (the dim of V, a refresh's order along it)
        self._v_orders = []
        for sg, V in zip(self.shape_groups[:self._n_rot_groups], self.exp_avg_sq):
            B, orders = V.shape[0], []
            for mode, slot in enumerate(sg.slots):
                if slot is not None:
                    view = [B] + [1] * len(sg.shape)
                    view[1 + mode] = sg.shape[mode]
                    order = self._orders[slot[0]][slot[1]:slot[1] + B].view(view)
                    orders.append((1 + mode, order.expand_as(V)))
            self._v_orders.append(orders)
        # per rotated (group, dim): ((strided source, its copy) or None, X, F, first row)
        self._statistics: list[tuple] = []
        for sg, (row, off, size) in rotated:
            B = len(sg.members)
            G = self._grad_f[off:off + size].view((B,) + sg.shape)
            for mode, slot in enumerate(sg.slots):
                if slot is None:
                    continue
                moved, n = G.movedim(1 + mode, -1), sg.shape[mode]
                try:
                    source, X = None, moved.view(B, -1, n)
                except RuntimeError:  # a middle dim: copied out at each step
                    source = (moved, scratch[0][:size].view(moved.shape))
                    X = source[1].view(B, -1, n)
                F = self.factors[slot[0]][slot[1]:slot[1] + B]
                self._statistics.append((source, X, F, row))

    def _tables(self) -> None:
        """The coefficient tables (rows: the members, then the factor slots) and their views."""
        self._slot_rows: dict[int, int] = {}
        for key, owners in self.owner.items():
            self._slot_rows[key] = len(self._row_param)
            self._row_param.extend(owners)
        R, P = len(self._row_param), len(self.params)
        dtype, fdtype, device = self.grad.dtype, self.fdtype, self.grad.device
        # columns: beta1, beta2, 1 - lr wd (the three masked: 1 where nothing may change),
        # 1 - beta1, 1 - beta2, lr; a slot's row holds its factor decay in column 0
        self._hyper = torch.zeros(R, 6, dtype=dtype, device=device)
        self._coef = torch.ones(R, 3, dtype=dtype, device=device)
        self._one = torch.ones((), dtype=dtype, device=device)
        self._hyper_f = self._decay = self._one_f = None
        if self._cast:  # factors of another dtype: the slots' decays, and masked, in theirs
            self._hyper_f = torch.zeros(R, dtype=fdtype, device=device)
            self._decay = torch.ones(R, dtype=fdtype, device=device)
            self._one_f = torch.ones((), dtype=fdtype, device=device)
        self._step = torch.zeros(P, dtype=dtype, device=device)  # the step sizes
        self._hyper_key: list | None = None
        self._decays: list | None = None
        self._scales: list = []
        self._shrinks = False
        cols = lambda t, c: [t[r:r + len(sg.members), c].view(  # noqa: E731
            (-1,) + (1,) * len(sg.shape)) for sg, (r, _, _) in zip(self.shape_groups,
                                                                    self._ranges)]
        self._omb1, self._omb2 = cols(self._hyper, 3), cols(self._hyper, 4)
        self._lr, self._betas = self._hyper[:P, 5], self._hyper[:P, :2]
        self._bias = torch.zeros(P, 2, dtype=dtype, device=device)  # 1 - beta1^t, 1 - beta2^t
        self._bias_cols = self._bias[:, 0], self._bias[:, 1]
        self._work_rot = self.work[:self._n_rot]
        self._adam_parts = self.update[self._n_rot:], self.work[self._n_rot:]
        self._b1m, self._b2m = cols(self._coef, 0), cols(self._coef, 1)
        # Adam's rotated gradients: those of Adam's groups are the gradients
        self._gr = self.work_stacks[:self._n_rot_groups] + self.grad_stacks[self._n_rot_groups:]
        self._step_views = [self._step[self._row[i]] for i in range(P)]
        self._shrink_views = [self._coef[self._row[i], 2] for i in range(P)]
        self._factor_list = list(self.factors.values())
        # the masked factor decays: the coefficient table's first column, or its cast copy
        decay = self._decay if self._cast else self._coef[:, 0]
        self._decay_cols = [decay[self._slot_rows[key]:self._slot_rows[key] + B].view(-1, 1, 1)
                            for key, B in self.buckets.counts.items()]
        self._present: list[bool] = []
        self._live: Tensor = self._one.bool()
        self._bad: Tensor = ~self._live

    def views(self, i: int) -> dict[str, Tensor | list[Tensor]]:
        """The state entries of param ``i``: ``exp_avg``, ``exp_avg_sq`` (the param's shape, in
        the rotated space), ``GG`` and ``Q`` (one factor and basis per rotated dim)."""
        g, m = self._where[i]
        slots = [s for s in self.shape_groups[g].slots if s is not None]
        return {"exp_avg": self._param_views["exp_avg"][i],
                "exp_avg_sq": self._param_views["exp_avg_sq"][i],
                "GG": [self.factors[key][start + m] for key, start in slots],
                "Q": [self.bases[key][start + m] for key, start in slots]}

    def set_hyper(self, values: list[tuple[float, float, float, float, float]]) -> None:
        """Each param's ``(lr, beta1, beta2, 1 - lr weight_decay, factor decay)`` into the kept
        tables (nothing to do when they did not change)."""
        if values == self._hyper_key:
            return
        rows = []
        for r, i in enumerate(self._row_param):
            lr, b1, b2, shrink, decay = values[i]
            rows.append((b1, b2, shrink, 1 - b1, 1 - b2, lr) if r < len(self.params)
                        else (decay, 1.0, 1.0, 0.0, 0.0, 0.0))
        device = self._hyper.device
        self._hyper.copy_(device_tensor(rows, device, self._hyper.dtype))
        decays = [r[0] for r in rows[len(self.params):]]
        if decays != self._decays:  # the slots' decays, and 1 - decay as scalars of the op:
            self._decays = decays   # one call per run of equal decays
            if self._cast:
                self._hyper_f[len(self.params):].copy_(device_tensor(decays, device,
                                                                     self.fdtype))
            self._scales = []
            for source, X, F, row in self._statistics:
                scales = [1 - values[self._row_param[row + b]][4] for b in range(X.shape[0])]
                cuts = [b for b in range(1, len(scales)) if scales[b] != scales[b - 1]]
                bounds = [0, *cuts, len(scales)]
                self._scales.append([(F[a:b], X[a:b].mT, X[a:b], scales[a])
                                     for a, b in zip(bounds, bounds[1:])])
        self._shrinks = any(v[3] != 1 for v in values)
        self._hyper_key = values

    def load_grads(self, grads: list[Tensor | None]) -> Tensor:
        """The params' gradients into the flat gradient buffer (None: -0, which adds nothing
        where it is added), returned."""
        views = self._param_views["grad"]
        present = [g is not None for g in grads]
        if all(present):
            torch._foreach_copy_(views, grads)
        else:
            torch._foreach_copy_([v for v, g in zip(views, grads) if g is not None],
                                 [g for g in grads if g is not None])
            for v in (v for v, g in zip(views, grads) if g is None):
                v.fill_(-0.0)  # adding -0 changes nothing, not even a -0
        self._present = present
        return self.grad

    def mask(self, ok: Tensor, bad: Tensor) -> None:
        """The step's masks: the gradient zeroed where ``bad`` (a non-finite step: nothing may
        change), and the coefficients of the params that may change (``ok`` and a gradient)
        into the kept table; the others get the ones that change nothing."""
        fill_if_(self.grad, bad, -0.0)  # NaN * 0 is NaN; adding -0 changes nothing
        if self._cast:
            self._grad_f.copy_(self.grad[:self._n_rot])
        if all(self._present):
            live = ok
        else:
            live = ok & device_tensor([self._present[i] for i in self._row_param], ok.device)
        self._live, self._bad = live, bad
        row = live if live.dim() == 0 else live[:, None]
        torch.where(row, self._hyper[:, :3], self._one, out=self._coef)
        if self._cast:
            torch.where(live, self._hyper_f, self._one_f, out=self._decay)

    def _live_rows(self, row: int, count: int, dims: int) -> Tensor:
        """The live mask of ``count`` rows from ``row``, as a column against ``dims`` more dims."""
        if self._live.dim() == 0:
            return self._live
        return self._live[row:row + count].view((-1,) + (1,) * dims)

    def _fill_dead(self, flat: Tensor, stacks: list[Tensor], value: float) -> None:
        """``value`` into the entries of ``flat`` (``stacks``: its shape groups' views, from the
        first) of the params that may not change."""
        if self._live.dim() == 0:
            fill_if_(flat, self._bad, value)
        else:
            for U, (row, _, _) in zip(stacks, self._ranges):
                U.masked_fill_(~self._live_rows(row, U.shape[0], U.dim() - 1), value)

    def adam_step_(self, adam_steps: Tensor, eps: float, correct_bias: bool,
                   normalize: bool) -> None:
        """Adam in the eigenbases for every param that may change (the moments live in the
        rotated space), then ``p <- (p - step_size U) (1 - lr weight_decay)``: step sizes
        ``lr sqrt(1 - beta2^t) / (1 - beta1^t)`` (``t = adam_steps``; ``lr`` without
        ``correct_bias``); ``normalize``: each update divided by ``1e-30 + its RMS``."""
        if correct_bias:  # into kept buffers: 1 - beta^t for both betas at once
            torch.sub(self._one, torch.pow(self._betas, adam_steps, out=self._bias),
                      out=self._bias)
            first, second = self._bias_cols
            torch.div(second.sqrt_().mul_(self._lr), first, out=self._step)
        else:
            self._step.copy_(self._lr)
        self.rotate_in.run()
        self._fill_dead(self._work_rot, self.work_stacks[:self._n_rot_groups], -0.0)
        M, V = self.exp_avg, self.exp_avg_sq
        torch._foreach_mul_(M, self._b1m)
        torch._foreach_addcmul_(M, self._gr, self._omb1)
        torch._foreach_mul_(V, self._b2m)
        torch._foreach_addcmul_(V, self._gr, torch._foreach_mul(self._gr, self._omb2))
        torch.sqrt(self._exp_avg_sq, out=self.work).add_(eps)
        torch.div(self._exp_avg, self.work, out=self.work)
        self.rotate_back.run()
        if self._adam_parts[0].numel():  # Adam's groups: the update is D itself
            self._adam_parts[0].copy_(self._adam_parts[1])
        if normalize:
            for U in self.update_stacks:
                dims = tuple(range(1, U.dim()))
                U.div_(U.square().mean(dim=dims, keepdim=True).sqrt_().add_(1e-30))
        self._fill_dead(self.update, self.update_stacks, 0.0)  # p - step (+0) is p
        torch._foreach_addcmul_(self.params, self._param_views["update"], self._step_views,
                                value=-1)
        if self._shrinks:
            torch._foreach_mul_(self.params, self._shrink_views)

    def update_factors(self) -> None:
        """``GG <- d GG + (1 - d) G_(k) G_(k)^T`` per rotated dim, ``d`` the slot's decay (1
        where nothing may change: the gradient is zero there)."""
        if self._factor_list:
            torch._foreach_mul_(self._factor_list, self._decay_cols)
        for (source, X, _, _), runs in zip(self._statistics, self._scales):
            if source is not None:
                source[1].copy_(source[0])
            for F, XT, Xr, scale in runs:  # one GEMM (ops.kron_factor_update_ would also
                F.baddbmm_(XT, Xr, alpha=scale)  # symmetrise, which nothing here needs)

    def init_bases(self) -> None:
        """The eigenbases of the factors, eigenvalues descending (one ``kron_eigh`` per
        bucket), for the slots that may change."""
        for key, F in self.factors.items():
            _, Q, _ = ops.kron_eigh(F)
            Qs = self.bases[key]
            torch.where(self._live_rows(self._slot_rows[key], F.shape[0], 2), Q.flip(-1), Qs,
                        out=Qs)

    def refresh(self) -> None:
        """One power-iteration step warm-started from the bases: ``Q <- qr(GG Q)`` with the
        columns ordered by the estimated eigenvalues ``diag(Q^T GG Q)`` (one QR per bucket); the
        second moments follow the new column order, the first moments are rotated out of the old
        bases and into the new ones (for an ``m x n`` matrix ``2 m n (m + n)`` multiply-adds,
        never more than turning them by ``Q_old^T Q_new``: ``m^3 + n^3 + m n (m + n)``).  Only
        for the slots and params that may change."""
        self._exp_avg_out.run()
        for key, F in self.factors.items():
            Q = self.bases[key]
            P = torch.bmm(F, Q)
            torch.sort(torch.linalg.vecdot(Q, P, dim=-2), dim=-1, descending=True, stable=True,
                       out=(self._estimates[key], self._orders[key]))
            torch.where(self._live_rows(self._slot_rows[key], F.shape[0], 2),
                        torch.linalg.qr(P.gather(-1, self._order_cols[key])).Q, Q, out=Q)
        for V, orders, (row, _, _) in zip(self.exp_avg_sq, self._v_orders, self._ranges):
            moved = V
            for dim, order in orders:
                moved = moved.gather(dim, order)
            torch.where(self._live_rows(row, V.shape[0], V.dim() - 1), moved, V, out=V)
        self._exp_avg_in.run()
        n = self._n_rot
        if self._live.dim() == 0:
            where_into_(self._live, self.work[:n], self._exp_avg[:n], self._exp_avg[:n])
        else:
            for sg, M, D, (row, _, _) in zip(self.shape_groups, self.exp_avg, self.work_stacks,
                                             self._ranges):
                if any(sg.rotated):
                    torch.where(self._live_rows(row, M.shape[0], M.dim() - 1), D, M, out=M)
