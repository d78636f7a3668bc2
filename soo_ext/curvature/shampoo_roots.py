"""Shampoo's preconditioner: the factors ``L_i`` of every block and their inverse roots
``(L_i + epsilon I)^{-1/(2k)}``, bucketed by size and order; the batched factor update, the root
update with its failure policy, and the preconditioned (grafted) directions."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .._support.device import device_tensor
from .._support.errors import RootFailureError
from .._support.guard import SkipGuard
from .shampoo_blocks import ShampooBlocking

__all__ = ["ShampooRoots"]

_FAILED = 2  # status of ops.kron_inverse_root: failed, zero output


def _ridged(F: Tensor, relative: float) -> Tensor:
    """``F + relative ||F||_F I`` for each matrix of the stack ``F`` (``F`` itself if 0).  A
    factor's rounding errors (its sum of products, the decomposition's) are of order
    ``n u ||F||``, so its eigenvalues below that are noise; a shift well above it makes the
    root of those directions a function of the shift, not of the noise."""
    if relative == 0:
        return F
    norm = torch.linalg.matrix_norm(F, dtype=torch.float64)  # no float32 overflow of the squares
    ridged = F.clone()
    ridged.diagonal(dim1=-2, dim2=-1).add_((relative * norm).to(F.dtype).unsqueeze(-1))
    return ridged


class ShampooRoots:
    """The factors (zero at the start), roots (identities) and consecutive-failure counters of
    every factor slot of a blocking, as ``[B, n, n]`` stacks per bucket (``factor_dtype``); the
    state's per-param lists are views of them (:meth:`views`).

    A step works on flat buffers of the params' dtype kept across steps (:meth:`flat`: the
    gradients, the grafting state and directions), laid out by shape group: the params that
    are one block come first, those of one shape group one after another, so that the stack of
    a shape group's blocks is a view of the buffer; a group with blocks of larger params is
    gathered (one ``stack``).  So a step's dispatch grows with the shape groups, not the
    params."""

    def __init__(self, blocking: ShampooBlocking, dtype: torch.dtype, factor_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.blocking = blocking
        self.dtype, self.fdtype, self.device = dtype, factor_dtype, device
        buckets = blocking.buckets
        self.factors = buckets.stacks(factor_dtype, device, identity=False)
        self.roots = buckets.stacks(factor_dtype, device, identity=True)
        self.fails = buckets.vectors(torch.int32, device)
        self._factor_list = list(self.factors.values())
        self._decay_key: tuple | None = None
        self._decay: dict[tuple[int, int], Tensor] | float = 1.0
        params = blocking.params
        whole = [i for sg in blocking.shape_groups for i, _ in sg.members
                 if len(params[i].blocks) == 1]
        order = whole + sorted(set(range(len(params))) - set(whole))
        self._offsets = [0] * len(params)
        numel = 0
        for i in order:
            self._offsets[i], numel = numel, numel + params[i].p.numel()
        self.numel = numel
        # a shape group's blocks are a view where they are whole params, one after another
        self._contiguous = [all(len(params[i].blocks) == 1 for i, _ in sg.members)
                            for sg in blocking.shape_groups]
        # the transposed roots of each shape group's blocks, per mode (views: the roots are
        # updated in place)
        self._roots_t = [[self.roots[key][start:start + len(sg.members)].transpose(1, 2)
                          for key, start in sg.slots] for sg in blocking.shape_groups]
        self.grad = self.flat()
        self.grad_views = self.flat_views(self.grad)
        self.direction = self.flat()  # the grafting directions, then the final ones
        self.direction_views = self.flat_views(self.direction)
        # the kept buffers' stacks (views where a group is contiguous) and block views
        self._grad_layout = self._layout(self.grad)
        self._direction_layout = self._layout(self.direction)
        self._kept = [_KeptViews(sg, G, self.factors, roots_t, factor_dtype)
                      for sg, G, roots_t in zip(blocking.shape_groups, self._grad_layout[0],
                                                self._roots_t)]
        self._decay_one: Tensor | None = None  # beta2 as a 0-dim tensor (one for all factors)
        self.present: list[bool] = []  # which params the loaded gradients came from

    def flat(self) -> Tensor:
        """A zeroed flat buffer of this layout (params' dtype)."""
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def flat_views(self, flat: Tensor) -> list[Tensor]:
        """Each param's view of ``flat`` (of this layout), in the param's shape."""
        return [flat[o:o + P.p.numel()].view(P.p.shape)
                for o, P in zip(self._offsets, self.blocking.params)]

    def _layout(self, flat: Tensor) -> tuple[list[Tensor | None], list[list[Tensor]]]:
        """Of every shape group, the ``[B, *shape]`` stack of its blocks in ``flat`` (a view;
        None where the group is not contiguous) and the views of its blocks."""
        stacks, blocks = [], []
        views = self.flat_views(flat)
        for sg, contiguous in zip(self.blocking.shape_groups, self._contiguous):
            if contiguous:
                o = self._offsets[sg.members[0][0]]
                stack = flat[o:o + len(sg.members) * _numel(sg.shape)].view((-1,) + sg.shape)
                stacks.append(stack)
                blocks.append(list(stack.unbind(0)))
            else:
                stacks.append(None)
                blocks.append([self.blocking.params[i].block(views[i], j) for i, j in sg.members])
        return stacks, blocks

    def _kept_layout(self, flat: Tensor) -> tuple[list[Tensor | None], list[list[Tensor]]]:
        """:meth:`_layout` of ``flat``: kept for the kept buffers."""
        if flat is self.direction:
            return self._direction_layout
        if flat is self.grad:
            return self._grad_layout
        return self._layout(flat)

    def views(self, i: int) -> dict[str, list[Tensor]]:
        """The state entries of param ``i``: ``factors``, ``roots``, ``root_failures``."""
        slots = self.blocking.slots(i)
        return {key: [stacks[k][s] for k, s in slots] for key, stacks in
                (("factors", self.factors), ("roots", self.roots), ("root_failures", self.fails))}

    def _decay_of(self, betas2: tuple[float, ...]) -> dict[tuple[int, int], Tensor] | float:
        """beta2 per factor slot (a float if one for all); cached while the groups' stay."""
        if betas2 != self._decay_key:
            self._decay_key = betas2
            if len(set(betas2)) == 1:
                self._decay = float(betas2[0])
                self._decay_one = device_tensor(self._decay, self.device, self.fdtype)
            else:
                self._decay = {key: device_tensor([betas2[gi] for gi in gs], self.device,
                                                  self.fdtype)
                               for key, gs in self.blocking.slot_group.items()}
        return self._decay

    def load_grads(self, grads: list[Tensor | None]) -> Tensor:
        """The params' gradients into the flat gradient buffer (None: zero), returned."""
        present = [g is not None for g in grads]
        if all(present):
            torch._foreach_copy_(self.grad_views, grads)
        else:
            torch._foreach_copy_([v for v, g in zip(self.grad_views, grads) if g is not None],
                                 [g for g in grads if g is not None])
            for v, g in zip(self.grad_views, grads):
                if g is None:
                    v.zero_()
        self.present = present
        return self.grad

    def update(self, guard: SkipGuard, betas2: tuple[float, ...]) -> list[Tensor]:
        """``L_i <- beta2 L_i + G_(i) G_(i)^T`` for every block of the loaded gradients
        (:meth:`load_grads`; ``beta2`` of its param's group; unchanged on a skipped step, where
        they are zero, and for the params without a gradient, whose gradients are zero);
        returns the stacked blocks ``[B, *shape]`` (factor dtype) of each shape group."""
        decay = self._decay_of(betas2)
        present = self.present
        if not all(present):  # 1 for the factors of the params without a gradient
            decay = {key: device_tensor([betas2[self.blocking.params[i].group] if present[i]
                                         else 1.0 for i, _, _ in owners],
                                        self.device, self.fdtype)
                     for key, owners in self.blocking.owner.items()}
        if isinstance(decay, float):
            if decay != 1.0 and self._factor_list:
                torch._foreach_mul_(self._factor_list, torch.where(guard.ok, self._decay_one, 1.0))
        else:
            for key, F in self.factors.items():
                F.mul_(torch.where(guard.ok, decay[key], 1.0)[:, None, None])
        stacked = []
        for kept, blocks in zip(self._kept, self._grad_layout[1]):
            G, unfolded = kept.G, kept.unfolded
            if unfolded is None:
                G = (torch.stack(blocks) if G is None else G).to(self.fdtype)
                unfolded = _unfoldings(G, kept.shape)
            stacked.append(G)
            for F, X in zip(kept.factors, unfolded):
                ops.kron_factor_update_(F, X, 1.0, 1.0)
        return stacked

    def update_roots(self, guard: SkipGuard, epsilon: float, relative_epsilon: float, method: str,
                     max_failures: int, state: dict, step: int, process_group=None) -> None:
        """New inverse roots ``(L + (epsilon + relative_epsilon ||L||_F) I)^{-1/(2k)}`` for every
        bucket (spread over the ranks of ``process_group``); a failed one keeps the previous
        root.  One host sync (the skip flag and the failure counts).  Counts ``root_updates``
        and ``failed_roots`` in ``state``; raises :class:`RootFailureError` when a factor failed
        ``max_failures`` consecutive times."""
        if not self.factors:
            return
        results = self.blocking.buckets.decompose(
            self.factors, lambda key, F: ops.kron_inverse_root(
                _ridged(F, relative_epsilon), 2 * key[1], epsilon, method), process_group)
        new = {}
        checks = [guard.ok.to(torch.int64)]
        for key, (X, status) in results.items():
            failed = status == _FAILED
            roots = torch.where(failed[:, None, None], self.roots[key], X)
            fails = torch.where(failed, self.fails[key] + 1, 0).to(torch.int32)
            new[key] = (roots, fails)
            checks += [fails.max().to(torch.int64), failed.sum(dtype=torch.int64)]
        values = torch.stack(checks).tolist()
        if not values[0]:
            return  # a skipped step: nothing changes
        state["root_updates"] += 1
        for key, (roots, fails) in new.items():
            self.roots[key].copy_(roots)
            self.fails[key].copy_(fails)
        state["failed_roots"].add_(sum(values[2::2]))
        worst = max(values[1::2], default=0)
        if worst >= max_failures:
            self._raise_failure(new, worst, max_failures, step)

    def _raise_failure(self, new: dict, worst: int, limit: int, step: int) -> None:
        key, slot = next((key, s) for key, (_, fails) in new.items()
                         for s, f in enumerate(fails.tolist()) if f >= limit)
        i, j, mode = self.blocking.owner[key][slot]
        P = self.blocking.params[i]
        raise RootFailureError(
            f"Shampoo: the inverse root of the {key[0]}x{key[0]} factor of dim {mode} of "
            f"block {j} of param {i} (shape {tuple(P.p.shape)}, merged {P.merged}) failed "
            f"{worst} consecutive times (max_root_failures={limit}), at step {step}; its factor "
            "is probably not finite or badly conditioned (try root_method='eigh', a larger "
            "epsilon or factor_dtype=torch.float64)")

    def precondition(self, stacked: list[Tensor], graft: Tensor, rescale: bool) -> Tensor:
        """The final directions, into ``graft`` (a flat buffer of this layout holding the
        grafting directions ``A``), returned: ``S = G x_1 P_1 ... x_k P_k`` per block (with
        ``rescale``: times ``||A_block|| / ||S||``) for the preconditioned params; the others
        keep ``A``.  A contiguous group of the factors' dtype gets ``S`` written in place."""
        dst_stacks, dst_blocks = self._kept_layout(graft)
        if rescale:  # every norm of A before any S is written over it (of contiguous blocks:
            # a strided block's norm sums in another order)
            a = torch._foreach_norm([b for dst, blocks in zip(dst_stacks, dst_blocks) for b in (
                blocks if dst is not None else torch.stack(blocks).unbind(0))])
        S_blocks, copies = [], []
        for kept, G, dst, blocks in zip(self._kept, stacked, dst_stacks, dst_blocks):
            B, shape = G.shape[0], kept.shape
            if dst is not None and (dst.dtype != G.dtype
                                    or (len(shape) == 1 and graft is self.grad)):
                dst = None  # not in place: another dtype, or the one product reads dst
            # Contract the leading block dim with the root; it moves to the end, so after all
            # modes the dims are back in order.  (X^T R^T)^T = R X: R x_i G.
            X = kept.X0 if G is kept.G else G.reshape(B, shape[0], -1).transpose(1, 2)
            for R_t, out, X_next, product in zip(kept.roots_t, kept.products, kept.X_next,
                                                  kept.product):
                product(X, R_t, out=out)
                X = X_next
            out = dst.view(B, -1, shape[-1]) if dst is not None else kept.S
            kept.product[-1](X, kept.roots_t[-1], out=out)
            if dst is not None:
                S_blocks += blocks
            else:
                S_blocks += kept.S_blocks
                copies += zip(blocks, kept.S_blocks)
        if rescale and S_blocks:
            s = torch.stack(torch._foreach_norm(S_blocks))
            a = torch.stack(a).to(s.dtype)
            torch._foreach_mul_(S_blocks, torch.where(s > 0, a / s, 0.0).unbind(0))
        if copies:
            torch._foreach_copy_([d for d, _ in copies], [S for _, S in copies])
        return graft


class _KeptViews:
    """A shape group's tensors and views kept across steps: the factors it updates, its
    gradient stack (None: gathered at every step) and, where they are views of it, its
    unfoldings; the roots and the products of its preconditioning (all but the last mode's
    into kept tensors, whose next unfoldings are views), and a kept ``S`` for when the last
    one is not written in place."""

    def __init__(self, sg, G: Tensor | None, factors: dict, roots_t: list[Tensor],
                 fdtype: torch.dtype) -> None:
        self.shape = sg.shape
        B = len(sg.members)
        self.factors = [factors[key][start:start + B] for key, start in sg.slots]
        self.G = G if G is not None and G.dtype == fdtype else None
        self.unfolded = None
        if self.G is not None:
            unfolded = _unfoldings(self.G, self.shape)
            if all(X._base is not None for X in unfolded):  # views, not copies
                self.unfolded = unfolded
        self.X0 = (self.G.reshape(B, self.shape[0], -1).transpose(1, 2)
                   if self.G is not None else None)
        self.roots_t = roots_t
        numel = _numel(self.shape)
        # bmm, but matmul where it folds (one row: [B, 1, n] products), whose bits differ
        self.product = [torch.bmm if numel > n else torch.matmul for n in self.shape]
        self.products, self.X_next = [], []
        for n, n_next in zip(self.shape, self.shape[1:]):
            out = torch.empty(B, numel // n, n, dtype=fdtype, device=roots_t[0].device)
            self.products.append(out)
            self.X_next.append(out.view(B, n_next, -1).transpose(1, 2))
        self.S = torch.empty(B, numel // self.shape[-1], self.shape[-1], dtype=fdtype,
                             device=roots_t[0].device)
        self.S_blocks = list(self.S.view((B,) + self.shape).unbind(0))


def _unfoldings(G: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    """``G_(i)^T`` of every mode ``i`` of the ``[B, *shape]`` stack ``G``."""
    return [G.movedim(1 + mode, -1).reshape(G.shape[0], -1, n) for mode, n in enumerate(shape)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
