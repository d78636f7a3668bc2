"""Pure-PyTorch references of every soo_ext op.

They are the test oracle for the compiled kernels and the fallback used when the compiled
module ``soo_ext._C`` is missing.  Each function has exactly the semantics of the op of the same
name in :mod:`soo_ext.ops`.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "ring_slots", "lbfgs_direction", "lbfgs_two_loop_textbook",
           "bfgs_direction", "drsom_perturb", "drsom_reduce", "drsom_update"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which dot products and coefficients are accumulated for a gradient of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_slots(newest: int, count: int, m: int) -> list[int]:
    """Physical slots of the ``count`` valid pairs of an ``m``-slot ring, oldest first."""
    return [(newest - count + 1 + i) % m for i in range(count)]


def lbfgs_direction(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, g: Tensor,
                    newest: int, count: int, update_gram: bool) -> tuple[Tensor, Tensor]:
    """L-BFGS direction ``d = -H g`` in compact form (reference of ``soo::lbfgs_direction``).

    ``S``, ``Y``: ``[m, n]`` ring buffers of the pairs (rows are physical slots), dtype ``g.dtype``
    or bfloat16 when ``g`` is float32.  ``SY[i, j] = s_i . y_j`` and ``YY[i, j] = y_i . y_j`` over
    physical slots, in the accumulation dtype.  The ``count`` valid pairs occupy the slots
    ``newest - count + 1 .. newest`` (mod m).  With ``update_gram`` the row and column ``newest``
    of SY and YY are first recomputed from S and Y (in place): that is how a push is completed.
    The initial scaling is ``gamma = s.y / y.y`` of the newest pair.

    Returns ``(d, stats)``: ``d`` has g's dtype, ``stats = [g.d, max|d|]`` in the accumulation dtype.
    """
    acc = accumulation_dtype(g.dtype)
    m = S.shape[0]
    slots = ring_slots(newest, count, m)
    ga = g.to(acc)
    if count == 0:
        d = -ga
    else:
        idx = torch.tensor(slots, device=g.device, dtype=torch.long)
        Sv = S.index_select(0, idx).to(acc)
        Yv = Y.index_select(0, idx).to(acc)
        if update_gram:
            s_new, y_new = S[newest].to(acc), Y[newest].to(acc)
            SY[idx, newest] = (Sv @ y_new).to(SY.dtype)
            SY[newest, idx] = (Yv @ s_new).to(SY.dtype)
            yy_new = (Yv @ y_new).to(YY.dtype)
            YY[idx, newest] = yy_new
            YY[newest, idx] = yy_new
        sy = SY.to(acc)[idx][:, idx]
        yy = YY.to(acc)[idx][:, idx]
        sg, yg = Sv @ ga, Yv @ ga
        alpha, coef_s = _two_loop_coefficients(sy, yy, sg, yg)
        gamma = sy[-1, -1] / yy[-1, -1]
        d = -(gamma * ga - gamma * (alpha @ Yv) + coef_s @ Sv)
    stats = torch.stack([torch.dot(ga, d), d.abs().max() if d.numel() else d.new_zeros(())])
    return d.to(g.dtype), stats


def _two_loop_coefficients(sy: Tensor, yy: Tensor, sg: Tensor, yg: Tensor) -> tuple[Tensor, Tensor]:
    """Both loops of the recursion on scalars only; pairs in logical order, oldest first.

    Returns ``alpha`` (first loop) and ``alpha - beta`` (the weights of the s_i in the result).
    """
    k = sg.shape[0]
    rho = 1.0 / torch.diagonal(sy)
    gamma = sy[-1, -1] / yy[-1, -1]
    alpha = [None] * k
    for i in range(k - 1, -1, -1):  # s_i . q with q = g - sum_{j>i} alpha_j y_j
        acc = sg[i]
        for j in range(i + 1, k):
            acc = acc - alpha[j] * sy[i, j]
        alpha[i] = rho[i] * acc
    alpha_t = torch.stack(alpha)
    coef_s = [None] * k
    for i in range(k):  # y_i . r with r = gamma q + sum_{l<i} (alpha_l - beta_l) s_l
        acc = gamma * (yg[i] - torch.dot(alpha_t, yy[i]))
        for j in range(i):
            acc = acc + coef_s[j] * sy[j, i]
        coef_s[i] = alpha[i] - rho[i] * acc
    return alpha_t, torch.stack(coef_s)


def lbfgs_two_loop_textbook(S: Tensor, Y: Tensor, g: Tensor, newest: int, count: int) -> Tensor:
    """The textbook two-loop recursion (Nocedal & Wright, Alg. 7.4) over the valid ring slots.

    Independent of the Gram blocks: the oracle against which the compact form is checked.
    Returns ``d = -H g``.
    """
    m = S.shape[0]
    slots = ring_slots(newest, count, m)
    q = -g.clone()
    if count == 0:
        return q
    s = [S[j].to(g.dtype) for j in slots]
    y = [Y[j].to(g.dtype) for j in slots]
    rho = [1.0 / torch.dot(y[i], s[i]) for i in range(count)]
    alpha = [None] * count
    for i in range(count - 1, -1, -1):
        alpha[i] = rho[i] * torch.dot(s[i], q)
        q = q - alpha[i] * y[i]
    r = q * (torch.dot(s[-1], y[-1]) / torch.dot(y[-1], y[-1]))
    for i in range(count):
        beta = rho[i] * torch.dot(y[i], r)
        r = r + (alpha[i] - beta) * s[i]
    return r


def bfgs_direction(H: Tensor, s: Tensor, y: Tensor, g: Tensor,
                   update: bool) -> tuple[Tensor, Tensor]:
    """Dense BFGS direction (reference of ``soo::bfgs_direction``).

    ``H``: ``[n, n]`` symmetric inverse-Hessian approximation, dtype ``g.dtype``.  With ``update``
    it is first replaced, in place, by the BFGS update with the pair ``(s, y)`` (the caller
    guarantees ``y.s > 0``)::

        H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T,   rho = 1 / y.s
          =  H - rho (s u^T + u s^T) + (rho^2 y.u + rho) s s^T,   u = H y

    Returns ``(d, stats)``: ``d = -H g`` with the (updated) H, ``stats = [g.d, max|d|]``.
    """
    if update:
        u = H @ y
        rho = 1.0 / torch.dot(y, s)
        c = rho * rho * torch.dot(y, u) + rho
        H.sub_(rho * (torch.outer(s, u) + torch.outer(u, s))).add_(c * torch.outer(s, s))
    d = -(H @ g)
    stats = torch.stack([torch.dot(g, d), d.abs().max() if d.numel() else d.new_zeros(())])
    return d, stats


# --------------------------------------------------------------------------------------------- #
# DRSOM (dimension-reduced second-order method): the three fused vector ops.

def drsom_perturb(x: Tensor, x0: Tensor, v: Tensor, t: Tensor, save: bool) -> None:
    """Move to a perturbed point (reference of ``soo::drsom_perturb``), in place.

    With ``save``: ``x0 <- x`` then ``x <- x0 + t v``; without: ``x <- x0 + t v`` (``x0`` already
    holds the base point).  ``t`` is a 0-dim device tensor of the vectors' dtype.
    ``x.copy_(x0)`` restores the base point exactly.
    """
    if save:
        x0.copy_(x)
    x.copy_(x0 + t.reshape(()) * v)


def drsom_reduce(g_pert: Tensor, g: Tensor, V: list[Tensor], t: Tensor,
                 with_gram: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Reductions of one DRSOM step (reference of ``soo::drsom_reduce``).

    ``q[j] = (g_pert - g) . V[j] / t`` (finite-difference Hessian-vector products projected on the
    directions; central differences: ``g_pert = grad(x + t v)``, ``g = grad(x - t v)``, ``2t``).
    With ``with_gram`` also ``G[i, j] = V[i] . V[j]`` and ``c[j] = g . V[j]``; without, ``G`` and
    ``c`` are empty tensors of shapes ``[0, 0]`` and ``[0]``.  All in the vectors' dtype.  (The
    compiled kernels accumulate in float64 also for float32 vectors; this reference uses the
    vectors' dtype.)
    """
    k = len(V)
    dt = g.dtype
    if k == 0:
        Vm = g.new_zeros((0, g.numel()))
    else:
        Vm = torch.stack([vj.reshape(-1) for vj in V])
    q = (Vm @ (g_pert - g)) / t.reshape(())
    if with_gram:
        G = Vm @ Vm.T
        c = Vm @ g
    else:
        G = g.new_zeros((0, 0))
        c = g.new_zeros((0,))
    return q.to(dt), G.to(dt), c.to(dt)


def drsom_update(x: Tensor, p: Tensor, V: list[Tensor], alpha: Tensor) -> None:
    """Take the step (reference of ``soo::drsom_update``), in place.

    ``p <- sum_j alpha[j] V[j]`` then ``x <- x + p``.  ``p`` may alias one of ``V`` (every
    ``V[j]`` is read before ``p`` is written).
    """
    step = torch.zeros_like(x)
    for j, vj in enumerate(V):
        step = step + alpha[j] * vj
    p.copy_(step)
    x.add_(step)
