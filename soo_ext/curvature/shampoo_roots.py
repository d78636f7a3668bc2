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
    state's per-param lists are views of them (:meth:`views`)."""

    def __init__(self, blocking: ShampooBlocking, dtype: torch.dtype, factor_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.blocking = blocking
        self.dtype, self.fdtype, self.device = dtype, factor_dtype, device
        buckets = blocking.buckets
        self.factors = buckets.stacks(factor_dtype, device, identity=False)
        self.roots = buckets.stacks(factor_dtype, device, identity=True)
        self.fails = buckets.vectors(torch.int32, device)
        self._decay_key: tuple | None = None
        self._decay: dict[tuple[int, int], Tensor] | float = 1.0

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

    def update(self, grads: list[Tensor], guard: SkipGuard, betas2: tuple[float, ...],
               present: list[bool]) -> list[Tensor]:
        """``L_i <- beta2 L_i + G_(i) G_(i)^T`` for every block (``beta2`` of its param's group;
        unchanged on a skipped step, where ``grads`` are zero, and for the params without a
        gradient (``present[i]`` False), whose ``grads`` are zero); returns the stacked blocks
        ``[B, *shape]`` (factor dtype) of each shape group."""
        decay = self._decay_of(betas2)
        if not all(present):  # 1 for the factors of the params without a gradient
            decay = {key: device_tensor([betas2[self.blocking.params[i].group] if present[i]
                                         else 1.0 for i, _, _ in owners],
                                        self.device, self.fdtype)
                     for key, owners in self.blocking.owner.items()}
        if isinstance(decay, float):
            if decay != 1.0:
                scale = None
                for F in self.factors.values():
                    if scale is None:
                        scale = torch.where(guard.ok, F.new_full((), decay), 1.0)
                    F.mul_(scale)
        else:
            for key, F in self.factors.items():
                F.mul_(torch.where(guard.ok, decay[key], 1.0)[:, None, None])
        stacked = []
        params = self.blocking.params
        for sg in self.blocking.shape_groups:
            G = torch.stack([params[i].block(grads[i], j) for i, j in sg.members])
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

    def precondition(self, stacked: list[Tensor], graft: list[Tensor],
                     rescale: bool) -> list[Tensor]:
        """The final directions: ``S = G x_1 P_1 ... x_k P_k`` per block (with ``rescale``:
        times ``||A_block|| / ||S||``, ``A`` the grafting direction) for preconditioned
        params, the grafting direction for the others."""
        params = self.blocking.params
        dirs: list[Tensor] = list(graft)
        bufs: dict[int, Tensor] = {}
        for i, P in enumerate(params):
            if P.merged is not None:
                bufs[i] = torch.empty(P.merged, dtype=self.dtype, device=self.device)
                dirs[i] = bufs[i].view(P.p.shape)
        dst, src = [], []
        for sg, G in zip(self.blocking.shape_groups, stacked):
            B = G.shape[0]
            T = G
            for mode, (key, start) in enumerate(sg.slots):
                R = self.roots[key][start:start + B]
                # Contract the leading block dim with the root; it moves to the end, so after
                # all modes the dims are back in order.  (X^T R^T)^T = R X: R x_i G.
                T = T.reshape(B, sg.shape[mode], -1).transpose(1, 2) @ R.transpose(1, 2)
            S = T.reshape(G.shape)
            if rescale:
                A = torch.stack([params[i].block(graft[i], j) for i, j in sg.members])
                a = torch.linalg.vector_norm(A.flatten(1), dim=1).to(self.fdtype)
                s = torch.linalg.vector_norm(S.flatten(1), dim=1)
                scale = torch.where(s > 0, a / s, 0.0)
                S = S * scale.view((B,) + (1,) * len(sg.shape))
            S = S.to(self.dtype)
            for (i, j), block in zip(sg.members, S.unbind(0)):
                dst.append(bufs[i][params[i].blocks[j]])
                src.append(block)
        if dst:
            torch._foreach_copy_(dst, src)
        return dirs
