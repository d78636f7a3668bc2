"""K-BFGS's curvature (Goldfarb, Ren & Bahamou 2020): per K-FAC layer the inverse-Hessian block
``H_g ⊗ H_a``, with ``H_a`` the damped inverse of the running activation factor (K-FAC's, one
``kron_damped_inverse`` call per size) and ``H_g`` a BFGS (or L-BFGS) matrix on the layer's
pre-activations, updated from the (s, y) pairs of two forward-backward passes on one minibatch
with the paper's double damping.  The statistics of both passes come from K-FAC's
:class:`LayerCapture`, staged into :class:`PassStatistics` instead of K-FAC's factors."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from .._support.distributed import all_reduce_mean_
from .kfac_layers import KFACLayer
from .lbfgs_history import LBFGSHistory

__all__ = ["LazyStatistics", "PassStatistics", "bfgs_update_", "double_damping",
           "lbfgs_matrix_product", "layer_matrix", "PairGroup", "refresh_inverses_",
           "size_groups"]


class PassStatistics:
    """What one capture gives per layer (the sink of :class:`LayerCapture`): in the first pass
    ``mean(a a^T)`` (``AA``), and in both passes the mean activation row ``a`` and the mean
    output-gradient row ``g`` scaled to a per-sample gradient (the capture undoes the loss's
    batch mean and the accumulation's division, ``batch_averaged``), means over the rows of
    the pass's backward passes (the batch, a conv's output positions).  The mean
    pre-activation is ``W a`` (the layer is linear in its activation rows), so it is not
    captured.  Sums run in the statistics' dtype (bfloat16 / float16 rows under autocast)."""

    def __init__(self, layers: list[KFACLayer], dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        # per pass one flat buffer (one all-reduce averages a pass over data-parallel ranks)
        sizes = [[l.a_dim ** 2 for l in layers] + [l.a_dim for l in layers]
                 + [l.out for l in layers], [l.a_dim for l in layers] + [l.out for l in layers]]
        self.buffers = [torch.zeros(sum(s), dtype=dtype, device=device) for s in sizes]
        views = [list(b.split(s)) for b, s in zip(self.buffers, sizes)]
        n = len(layers)
        self.AA = [v.view(l.a_dim, l.a_dim) for v, l in zip(views[0][:n], layers)]
        self.a = [views[0][n:2 * n], views[1][:n]]
        self.g = [views[0][2 * n:], views[1][n:]]
        self.second = False  # which pass the captures belong to

    def begin(self, second: bool) -> None:
        """Start the first or the second pass of a step: its buffer is zeroed (the first capture
        of a pass pools with weight 0, and ``0 * inf`` would carry a skipped pass's non-finite
        values into every later step)."""
        self.second = second
        self.buffers[int(second)].zero_()

    def average_(self, process_group) -> None:
        """Data parallel: the current pass's statistics averaged over the ranks (every rank
        then takes the same pairs and factors)."""
        all_reduce_mean_(self.buffers[int(self.second)], process_group)

    def stage(self, layer: KFACLayer, a: Tensor, g: Tensor, decay: float, w: float,
              g_scale: float, samples: int | None = None) -> None:
        """Pool one backward pass's rows (``decay``: the earlier rows' weight, ``w`` each new
        row's; ``g_scale``: the squared per-sample scale of the output gradients; ``samples``,
        the batch size, is not needed here)."""
        i, p = layer.index, int(self.second)
        if not self.second:
            ops.kron_factor_update_(self.AA[i], a, decay, w)
        self.a[p][i].mul_(decay).add_(a.sum(0, dtype=self.dtype), alpha=w)
        self.g[p][i].mul_(decay).add_(g.sum(0, dtype=self.dtype), alpha=w * math.sqrt(g_scale))


class LazyStatistics:
    """Makes the :class:`PassStatistics` of ``layers`` at the first capture (on the layers'
    device, in their dtype); the capture holds this, not the optimizer."""

    def __init__(self, layers: list[KFACLayer]) -> None:
        self.layers = layers
        self.stats: PassStatistics | None = None

    def __call__(self) -> PassStatistics:
        if self.stats is None:
            w = self.layers[0].weight
            self.stats = PassStatistics(self.layers, w.dtype, w.device)
        return self.stats


def layer_matrix(layer: KFACLayer, tensors: list[Tensor]) -> Tensor:
    """The layer's ``[out, a_dim]`` matrix of weight (flattened) and bias column, from
    ``tensors`` (the params, their gradients or their momentum buffers)."""
    w = tensors[0].reshape(layer.out, layer.fan_in)
    return w if len(tensors) == 1 else torch.cat([w, tensors[1].reshape(layer.out, 1)], 1)


def refresh_inverses_(layers: list[KFACLayer], A: list[Tensor], H_a: list[Tensor],
                      damping: float, ok: Tensor | None) -> None:
    """``H_a <- (A + damping I)^{-1}``, one ``kron_damped_inverse`` call per size; a factor
    whose inversion failed, or every factor on a skipped step (``ok`` False), keeps its
    inverse."""
    by_size: dict[int, list[int]] = {}
    for i, l in enumerate(layers):
        by_size.setdefault(l.a_dim, []).append(i)
    for rows in by_size.values():
        X, status = ops.kron_damped_inverse(torch.stack([A[i] for i in rows]), damping)
        take = status != 2
        if ok is not None:
            take = take & ok
        for r, i in enumerate(rows):
            H_a[i].copy_(torch.where(take[r], X[r], H_a[i]))


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """``u^T v`` over the last dim, kept as a dim of size 1 (so that it scales the vectors)."""
    return (u * v).sum(-1, keepdim=True)


def double_damping(s: Tensor, y: Tensor, Hy: Tensor, mu1: float,
                   mu2: float) -> tuple[Tensor, Tensor]:
    """The paper's double damping of the pairs ``(s, y)`` (the last dim; leading dims: a batch
    of pairs) given ``H y`` (on the device): Powell's damping on H,
    ``s~ = t1 s + (1 - t1) H y`` with t1 such that ``s~^T y >= mu1 y^T H y``, then the
    Levenberg-Marquardt-like damping (Powell's with ``B = I``), ``y~ = t2 y + (1 - t2) s~``
    such that ``s~^T y~ >= mu2 s~^T s~``."""
    sy, yHy = _dot(s, y), _dot(y, Hy)
    t1 = torch.where(sy < mu1 * yHy, (1 - mu1) * yHy / (yHy - sy), 1.0)
    s = t1 * s + (1 - t1) * Hy
    sy, ss = _dot(s, y), _dot(s, s)
    t2 = torch.where(sy < mu2 * ss, (1 - mu2) * ss / (ss - sy), 1.0)
    return s, t2 * y + (1 - t2) * s


def bfgs_update_(H: Tensor, s: Tensor, y: Tensor, take: Tensor) -> None:
    """``H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` (rho = 1 / s^T y) where
    ``take`` (bool, ``s``'s leading dims: the pair is finite, s^T y > 0 and the step was not
    skipped); ``H`` ``[..., n, n]``, a batch of matrices with a batch of pairs ``[..., n]``.
    ``soo::bfgs_direction``'s update, written with torch ops so that it can be masked, as
    ``H - (r u^T + u r^T) + (y^T u r + s) r^T`` with ``u = H y``, ``r = rho s``: a pair at the
    rounding level of the statistics (the batch mean of the output gradient of a layer that
    feeds a BatchNorm is 0) has rho ~ 1e20, whose square, in the textbook
    ``(rho^2 y^T u + rho) s s^T``, overflows float32.  A matrix that still comes out
    non-finite (its sum is: a finite one whose entries sum past the dtype's range too) is
    not taken, as in the authors' code."""
    take = take[..., None]
    rho = torch.where(take, 1 / torch.where(take, _dot(s, y), 1.0), 0.0)
    u = (H @ y[..., None])[..., 0]
    r = rho * s
    ru = r[..., :, None] * u[..., None, :]
    new = H - (ru + ru.mT) + (_dot(y, u) * r + s)[..., :, None] * r[..., None, :]
    take = take[..., None] & torch.isfinite(new.sum((-2, -1), keepdim=True))
    H.copy_(torch.where(take, new, H))


def oldest_first(ring: Tensor, newest: int, count: int) -> Tensor:
    """The ``count`` valid rows of a ring buffer, oldest first: at most two slices (an index
    tensor would be copied to the device from pageable memory: a host sync on CUDA)."""
    start = (newest - count + 1) % ring.shape[0]
    if start + count <= ring.shape[0]:
        return ring[start:start + count]
    return torch.cat([ring[start:], ring[:start + count - ring.shape[0]]])


def lbfgs_matrix_product(history: LBFGSHistory, M: Tensor) -> Tensor:
    """``H M`` for the L-BFGS matrix of ``history`` (its pairs, the initial scaling
    ``gamma = s^T y / y^T y`` of the newest pair as ``soo::lbfgs_direction``) and an
    ``[n, k]`` matrix ``M``, in the compact form of Byrd, Nocedal & Schnabel (1994):
    ``H M = gamma M + S R^-T ((D + gamma Y^T Y) R^-1 S^T M - gamma Y^T M) - gamma Y R^-1 S^T M``
    with ``R`` the upper triangle of ``S^T Y`` and ``D`` its diagonal (pairs oldest first)."""
    if history.count == 0:
        return M.clone()
    S = oldest_first(history.S, history.newest, history.count).to(M.dtype)  # [c, n]
    Y = oldest_first(history.Y, history.newest, history.count).to(M.dtype)
    SY = S @ Y.T
    R = SY.triu()
    gamma = SY[-1, -1] / torch.dot(Y[-1], Y[-1])
    SM, YM = S @ M, Y @ M
    X = torch.linalg.solve_triangular(R, SM, upper=True)  # R^-1 S^T M
    inner = (torch.diag(SY.diagonal()) + gamma * (Y @ Y.T)) @ X - gamma * YM
    Z = torch.linalg.solve_triangular(R.T, inner, upper=False)  # R^-T (...)
    return gamma * M + S.T @ Z - gamma * (Y.T @ X)


def size_groups(layers: list[KFACLayer], power: int) -> list[list[int]]:
    """Positions of ``layers`` in groups that are updated as one batch, padded to their largest
    out size ``n``: largest first, a layer joins the group while the padded size
    ``k n^power`` (``H_g`` ``[n, n]``: power 2; pairs only: 1) stays within twice the
    unpadded one."""
    groups: list[list[int]] = []
    sizes: list[int] = []  # the unpadded size of each group
    for i in sorted(range(len(layers)), key=lambda i: -layers[i].out):
        size = layers[i].out ** power
        if groups:
            n = layers[groups[-1][0]].out
            if (len(groups[-1]) + 1) * n ** power <= 2 * (sizes[-1] + size):
                groups[-1].append(i)
                sizes[-1] += size
                continue
        groups.append([i])
        sizes.append(size)
    return groups


class PairGroup:
    """Layers whose pairs (and BFGS ``H_g``) are updated as one batch: their running pairs
    ``pairs`` ``[k, 2, n]`` and ``H`` ``[k, n, n]`` zero-padded to the largest out size ``n``.
    Each layer's state entries ``s``, ``y`` and ``H_g`` are the leading slices of these (so a
    batched op updates every layer's state); the padding stays 0 (s, y and ``H y`` are 0
    there).  :meth:`current`: whether the state still holds those slices (not after a load)."""

    def __init__(self, layers: list[KFACLayer], states: list[dict], bfgs: bool) -> None:
        self.layers = layers
        n, k, like = max(l.out for l in layers), len(layers), states[0]["s"]
        self.pairs = like.new_zeros(k, 2, n)
        self.H = like.new_zeros(k, n, n) if bfgs else None
        self.h = like.new_zeros(k, n)  # the mean pre-activations of the first pass
        self.new = like.new_zeros(k, 2, n)  # the step's pairs
        self.views = []
        for j, (l, st) in enumerate(zip(layers, states)):
            row = {"s": self.pairs[j, 0, :l.out], "y": self.pairs[j, 1, :l.out]}
            if bfgs:
                row["H_g"] = self.H[j, :l.out, :l.out]
            for key, view in row.items():
                view.copy_(st[key])
                st[key] = view
            self.views.append(row)

    def current(self, states: list[dict]) -> bool:
        return all(st[key] is view for st, row in zip(states, self.views)
                   for key, view in row.items())

    def record_preactivations(self, a: list[Tensor]) -> None:
        """``mean(h) = W mean(a)`` of the first pass, before the update."""
        for j, l in enumerate(self.layers):
            torch.mv(layer_matrix(l, l.params()), a[l.index], out=self.h[j, :l.out])

    def update_pairs_(self, rows: slice, stats: PassStatistics, hy: Callable[[Tensor], Tensor],
                      decay: float, mu1: float, mu2: float,
                      ok: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The step's pairs of the layers ``rows`` (after the second pass), batched:
        ``s = mean(h+) - mean(h)``, ``y = mean(g+) - mean(g)`` (per-sample output gradients),
        folded into the running pairs (decay ``decay``), double-damped with ``hy`` (``[k, n]``
        to ``H_g y``).  Returns ``(s~, y~, take)``: ``take`` (``[k]`` bool) is False where a
        pair must not enter ``H_g`` (non-finite, ``s~^T y~ <= 0``, or a skipped step); a layer
        whose new pair is not finite keeps its running pair."""
        for j in range(rows.start, rows.stop):
            l, i = self.layers[j], self.layers[j].index
            torch.mv(layer_matrix(l, l.params()), stats.a[1][i], out=self.new[j, 0, :l.out])
            torch.sub(stats.g[1][i], stats.g[0][i], out=self.new[j, 1, :l.out])
        new, pairs = self.new[rows], self.pairs[rows]
        new[:, 0].sub_(self.h[rows])
        fresh = torch.isfinite((new * new).sum(-1)).all(-1)
        if ok is not None:
            fresh = fresh & ok
        pairs.copy_(torch.where(fresh[:, None, None], pairs * decay + new * (1 - decay), pairs))
        s, y = double_damping(pairs[:, 0], pairs[:, 1], hy(pairs[:, 1]), mu1, mu2)
        sy = (s * y).sum(-1)
        return s, y, fresh & (sy > 0) & torch.isfinite(sy)
