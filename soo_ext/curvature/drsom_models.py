"""DRSOM's quadratic model ``m(a) = f + c^T a + a^T Q a / 2`` of the objective over ``x + span V``:
the subspace (``G = V^T V``, ``c = V^T g``, the directions kept, the random direction) and the
Hessian models that give ``Q = V^T H V``, one class per ``hvp`` mode, on the fused
``soo::drsom_perturb``, ``soo::drsom_reduce`` and ``soo::drsom_update`` ops.

A Hessian model is handed what it needs: the closure evaluator of the step
(:class:`soo_ext._support.closure.ClosureEvaluator`), the flat params ``x`` (each param a view of
it), a vector ``x0`` that takes the base point, the base gradient ``g`` and its scratch vectors.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import ops as _ops
from .._support.closure import ClosureEvaluator

__all__ = ["FD_STEP_FACTOR", "HESSIAN_MODELS", "AutogradProducts", "CentralDifferences",
           "ForwardDifferences", "HessianModel", "Interpolation", "fd_perturbation_length",
           "independent_directions", "interp_perturbation_length", "interpolated_model",
           "interpolation_values", "random_direction", "subspace_gram"]

# Finite-difference step: the perturbation t v_j has length
#   fd:      FD_STEP_FACTOR[dtype] sqrt(eps) (1 + mean|x_i|)
#   central: eps^(1/3) (1 + mean|x_i|)
#   interp:  eps^(1/4) (1 + mean|x_i|)  (second differences of f: rounding ~ eps |f| / t^2)
# mean|x_i| (not ||x||) keeps the per-coordinate change independent of the number of params.
# On ReLU-type nets a longer perturbation flips pre-activations (a gradient jump, not curvature,
# that spoils Q by O(1)); a shorter one loses digits to rounding.  Measured on the MNIST-1D MLP and
# CNN (bench drsom): in float32 the flips dominate already at 0.5 sqrt(eps), hence 0.25; in
# float64 rounding dominates (fd error ~ 1e-8 / factor), and flips start near 100 sqrt(eps).
FD_STEP_FACTOR = {torch.float32: 0.25, torch.float64: 1.0}


def _perturbation_scale(x: Tensor) -> Tensor:
    """``1 + mean_i |x_i|`` (a 0-dim device tensor)."""
    return 1 + torch.linalg.vector_norm(x, 1) / max(x.numel(), 1)


def fd_perturbation_length(x: Tensor, central: bool) -> Tensor:
    """``||t v_j||`` of DRSOM's finite differences at the point ``x`` (a 0-dim device tensor)."""
    eps = torch.finfo(x.dtype).eps
    factor = eps ** (1 / 3) if central else FD_STEP_FACTOR[x.dtype] * math.sqrt(eps)
    return factor * _perturbation_scale(x)


def interp_perturbation_length(x: Tensor) -> Tensor:
    """``||t v_j||`` of DRSOM's ``'interp'`` mode at ``x``: ``eps^(1/4) (1 + mean_i |x_i|)``."""
    return torch.finfo(x.dtype).eps ** 0.25 * _perturbation_scale(x)


def interpolation_values(x: Tensor, x0: Tensor, scratch: Tensor, V: list[Tensor], ts: Tensor,
                         evaluate: Callable[[], Tensor]) -> list[Tensor]:
    """The function values of ``'interp'``: ``evaluate()`` at ``x0 + t_i v_i + t_j v_j`` for the
    pairs ``i <= j`` in ``torch.triu_indices(k, k)`` order (``i == j``: ``x0 + t_i v_i``), the
    params ``x`` (equal to ``x0`` on entry) moved there by ``drsom_update`` (the step goes to
    ``scratch``); ``x`` ends at ``x0`` bit-exactly."""
    k = len(V)
    idx = torch.arange(k, device=x.device)
    values = []
    for i, j in [(i, j) for i in range(k) for j in range(i, k)]:
        if values:
            x.copy_(x0)
        _ops.drsom_update(x, scratch, V, torch.where((idx == i) | (idx == j), ts, 0.0))
        values.append(evaluate())
    x.copy_(x0)
    return values


def interpolated_model(f: Tensor, values: list[Tensor], ts: Tensor, c: Tensor) -> Tensor:
    """``'interp'`` Q from function values, on the device: ``values`` are ``f(x + t_i v_i + t_j
    v_j)`` for the pairs ``i <= j`` in ``torch.triu_indices(k, k)`` order (``i == j``: the point
    ``x + t_i v_i``), ``f = f(x)``, ``c = V^T g``.  ``Q_ii = 2 (f_i - f - t_i c_i) / t_i^2``,
    ``Q_ij = (f_ij - f_i - f_j + f) / (t_i t_j)``."""
    k = ts.shape[0]
    iu = torch.triu_indices(k, k, device=ts.device)
    F = torch.zeros((k, k), dtype=ts.dtype, device=ts.device)
    F[iu[0], iu[1]] = torch.stack(values)
    F = F + F.triu(1).T  # symmetric
    d = F.diagonal()
    Q = (F - d[:, None] - d[None, :] + f) / (ts[:, None] * ts[None, :])
    Q.diagonal().copy_(2 * (d - f - ts * c) / ts ** 2)
    return Q


# --------------------------------------------------------------------------------------------- #
# The subspace

def subspace_gram(g: Tensor, V: list[Tensor], one: Tensor) -> tuple[Tensor, Tensor]:
    """``(G = V^T V, c = V^T g)`` in one pass (``one``: a 0-dim 1 of g's dtype and device)."""
    _, G, c = _ops.drsom_reduce(g, g, V, one, True)
    return G, c


def independent_directions(G: list[list[float]], collinearity: float) -> list[int]:
    """The directions a step keeps, from the host Gram matrix of ``[g, d_1, ...]``: ``g`` (0),
    then each ``d_j`` of positive length whose ``|cos|`` with every direction kept before it is
    below ``collinearity``."""
    kept = [0]
    for j in range(1, len(G)):
        if not G[j][j] > 0:
            continue
        if all(abs(G[i][j]) < collinearity * math.sqrt(G[i][i] * G[j][j]) for i in kept):
            kept.append(j)
    return kept


def random_direction(u: Tensor, g: Tensor, gg: float, generator_state: Tensor) -> Tensor:
    """``u ~ N(0, I - g g^T / gg)`` drawn in place (``gg = ||g||^2``) from a generator in
    ``generator_state``; returns the generator's state after the draw."""
    gen = torch.Generator(device=u.device)
    gen.set_state(generator_state)
    torch.randn(u.shape, generator=gen, out=u)
    u.add_(g * (-(torch.dot(g, u) / gg)))
    return gen.get_state()


# --------------------------------------------------------------------------------------------- #
# Hessian models: Q = V^T H V

class HessianModel:
    """``Q = V^T H V`` (not symmetrised: ``drsom_subproblem`` symmetrises it) at the base point
    ``x``, from the evaluator's closure.  ``products`` leaves ``x`` at the base point
    (bit-exactly) and ``x0`` holding it.

    Class attributes: ``hvp`` (the option value), ``create_graph`` (the base gradient must be
    taken with its graph), ``scratch_vectors`` (how many gradient vectors of the evaluator
    ``scratch`` must hold).
    """

    hvp = ""
    create_graph = False
    scratch_vectors = 1

    def __init__(self, evaluator: ClosureEvaluator, x: Tensor, x0: Tensor, g: Tensor,
                 scratch: list[Tensor]) -> None:
        self.evaluator, self.x, self.x0, self.g = evaluator, x, x0, g
        self.scratch = scratch

    def products(self, V: list[Tensor], G: Tensor, c: Tensor, f: Tensor,
                 grads: tuple | None = None) -> Tensor:
        """Q for the directions ``V`` with ``G = V^T V``, ``c = V^T g``, the base objective
        ``f`` (a device scalar) and the base gradient's per-param tensors with their graph
        (``create_graph`` models only)."""
        raise NotImplementedError

    def evaluations(self, k: int) -> tuple[int, int]:
        """``(function evaluations, gradient evaluations)`` of one :meth:`products` of k
        directions."""
        raise NotImplementedError


class ForwardDifferences(HessianModel):
    """``'fd'``: ``Q[:, j] = V^T (grad f(x + t v_j) - g) / t``, ``t ||v_j||`` the
    :func:`fd_perturbation_length`; the params moved by ``drsom_perturb``."""

    hvp = "fd"
    central = False

    def products(self, V, G, c=None, f=None, grads=None) -> Tensor:
        x = self.x
        ts = fd_perturbation_length(x, self.central) / torch.sqrt(torch.diagonal(G))
        cols = [self._column(V, j, ts[j]) for j in range(len(V))]
        x.copy_(self.x0)
        return torch.stack(cols, 1)

    def _column(self, V: list[Tensor], j: int, t: Tensor) -> Tensor:
        gp = self.scratch[0]
        _ops.drsom_perturb(self.x, self.x0, V[j], t, j == 0)
        self.evaluator.gradient(gp)
        q, _, _ = _ops.drsom_reduce(gp, self.g, V, t, False)
        return q

    def evaluations(self, k: int) -> tuple[int, int]:
        n = k * (2 if self.central else 1)
        return n, n


class CentralDifferences(ForwardDifferences):
    """``'central'``: ``Q[:, j] = V^T (grad f(x + t v_j) - grad f(x - t v_j)) / 2t``."""

    hvp = "central"
    central = True
    scratch_vectors = 2

    def _column(self, V: list[Tensor], j: int, t: Tensor) -> Tensor:
        gp, gm = self.scratch
        _ops.drsom_perturb(self.x, self.x0, V[j], t, j == 0)
        self.evaluator.gradient(gp)
        _ops.drsom_perturb(self.x, self.x0, V[j], -t, False)
        self.evaluator.gradient(gm)
        q, _, _ = _ops.drsom_reduce(gp, gm, V, 2 * t, False)
        return q


class AutogradProducts(HessianModel):
    """``'autograd'``: exact products ``H v_j`` by double backward through the base gradient
    (taken with ``create_graph=True``), averaged over the evaluator's process group."""

    hvp = "autograd"
    create_graph = True

    def products(self, V, G, c, f, grads=None) -> Tensor:
        ev, out = self.evaluator, self.scratch[0]
        self.x0.copy_(self.x)
        params = ev.params
        used = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
        cols = []
        for v in V:
            vs = ev.layout.views(v)
            hv = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                     grad_outputs=[vs[i] for i in used], retain_graph=True,
                                     allow_unused=True) if used else []
            full = [None] * len(params)
            for i, h in zip(used, hv):
                full[i] = h
            ev.gather(full, out)
            ev.average_(out)
            cols.append(torch.stack([torch.dot(w, out) for w in V]))
        return torch.stack(cols, 1)

    def evaluations(self, k: int) -> tuple[int, int]:
        return 0, 0


class Interpolation(HessianModel):
    """``'interp'``: Q from ``k (k + 1) / 2`` function values (no gradient):
    :func:`interpolated_model` at ``t_i ||v_i|| = interp_perturbation_length(x)``."""

    hvp = "interp"

    def products(self, V, G, c, f, grads=None) -> Tensor:
        ts = interp_perturbation_length(self.x) / torch.sqrt(torch.diagonal(G))
        self.x0.copy_(self.x)
        values = interpolation_values(self.x, self.x0, self.scratch[0], V, ts,
                                      self.evaluator.loss)
        return interpolated_model(f, values, ts, c)

    def evaluations(self, k: int) -> tuple[int, int]:
        return k * (k + 1) // 2, 0


HESSIAN_MODELS: dict[str, type[HessianModel]] = {
    cls.hvp: cls for cls in (ForwardDifferences, CentralDifferences, AutogradProducts,
                             Interpolation)}
