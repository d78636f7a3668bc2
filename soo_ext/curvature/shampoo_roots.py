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
        self._present: list[bool] = []

    def flat(self) -> Tensor:
        """A zeroed flat buffer of this layout (params' dtype)."""
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def flat_views(self, flat: Tensor) -> list[Tensor]:
        """Each param's view of ``flat`` (of this layout), in the param's shape."""
        return [flat[o:o + P.p.numel()].view(P.p.shape)
                for o, P in zip(self._offsets, self.blocking.params)]

    def _stacks(self, flat: Tensor) -> list[Tensor]:
        """The ``[B, *shape]`` stack of every shape group's blocks of ``flat``: a view, or a
        gathered copy."""
        out = []
        for sg, contiguous in zip(self.blocking.shape_groups, self._contiguous):
            i0, numel = sg.members[0][0], _numel(sg.shape)
            if contiguous:
                o = self._offsets[i0]
                out.append(flat[o:o + len(sg.members) * numel].view((-1,) + sg.shape))
            else:
                params = self.blocking.params
                views = self.flat_views(flat)
                out.append(torch.stack([params[i].block(views[i], j) for i, j in sg.members]))
        return out

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
        self._present = present
        return self.grad

    def update(self, guard: SkipGuard, betas2: tuple[float, ...]) -> list[Tensor]:
        """``L_i <- beta2 L_i + G_(i) G_(i)^T`` for every block of the loaded gradients
        (:meth:`load_grads`; ``beta2`` of its param's group; unchanged on a skipped step, where
        they are zero, and for the params without a gradient, whose gradients are zero);
        returns the stacked blocks ``[B, *shape]`` (factor dtype) of each shape group."""
        decay = self._decay_of(betas2)
        present = self._present
        if not all(present):  # 1 for the factors of the params without a gradient
            decay = {key: device_tensor([betas2[self.blocking.params[i].group] if present[i]
                                         else 1.0 for i, _, _ in owners],
                                        self.device, self.fdtype)
                     for key, owners in self.blocking.owner.items()}
        if isinstance(decay, float):
            if decay != 1.0 and self._factor_list:
                scale = torch.where(guard.ok, self._factor_list[0].new_full((), decay), 1.0)
                torch._foreach_mul_(self._factor_list, scale)
        else:
            for key, F in self.factors.items():
                F.mul_(torch.where(guard.ok, decay[key], 1.0)[:, None, None])
        stacked = []
        for sg, G in zip(self.blocking.shape_groups, self._stacks(self.grad)):
            G = G.to(self.fdtype)
            stacked.append(G)
            B = G.shape[0]
            for mode, (key, start) in enumerate(sg.slots):
                X = G.movedim(1 + mode, -1).reshape(B, -1, sg.shape[mode])  # G_(i)^T
                ops.kron_factor_update_(self.factors[key][start:start + B], X, 1.0, 1.0)
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
        keep ``A``."""
        params = self.blocking.params
        A_stacks = self._stacks(graft) if rescale else [None] * len(stacked)
        out = []
        for sg, G, A, roots_t in zip(self.blocking.shape_groups, stacked, A_stacks,
                                     self._roots_t):
            B = G.shape[0]
            T = G
            for n, R_t in zip(sg.shape, roots_t):
                # Contract the leading block dim with the root; it moves to the end, so after
                # all modes the dims are back in order.  (X^T R^T)^T = R X: R x_i G.
                T = T.reshape(B, n, -1).transpose(1, 2) @ R_t
            S = T.reshape(G.shape)
            if rescale:  # every norm before any S is written over A
                a = torch.linalg.vector_norm(A.flatten(1), dim=1).to(self.fdtype)
                s = torch.linalg.vector_norm(S.flatten(1), dim=1)
                S = S * torch.where(s > 0, a / s, 0.0).view((B,) + (1,) * len(sg.shape))
            out.append(S)
        dst, src = [], []
        views = None
        for sg, contiguous, S in zip(self.blocking.shape_groups, self._contiguous, out):
            if contiguous:
                o = self._offsets[sg.members[0][0]]
                dst.append(graft[o:o + S.numel()].view(S.shape))
                src.append(S)
            else:
                views = self.flat_views(graft) if views is None else views
                for (i, j), block in zip(sg.members, S.unbind(0)):
                    dst.append(params[i].block(views[i], j))
                    src.append(block)
        if dst:
            torch._foreach_copy_(dst, src)
        return graft


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
