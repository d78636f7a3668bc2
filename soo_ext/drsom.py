"""DRSOM: the dimension-reduced second-order method (Zhang, Ge, He, Jiang, Jiang, Ye, 2022) on the
fused ``soo::drsom_perturb``, ``soo::drsom_reduce`` and ``soo::drsom_update`` ops."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import ops as _ops
from . import reference as _reference
from ._common import all_reduce_mean_, check_params, check_process_group, load_state_dict_uncast
from ._support.errors import NonFiniteError

__all__ = ["DRSOM", "NonFiniteError", "same_randomness"]

# Number options: (accepts the value, what is required).  NaN fails every test.
_NUMBERS = {
    "gamma": (lambda v: 0 < v < math.inf, "a number > 0"),
    "gamma_increase": (lambda v: 1 < v < math.inf, "a number > 1"),
    "gamma_min": (lambda v: 0 < v < math.inf, "a number > 0"),
    "eta_accept": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eta_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eta_high": (lambda v: 0 < v < 1, "in (0, 1)"),
    "collinearity": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "armijo": (lambda v: 0 < v < 1, "in (0, 1)"),
    "max_step_growth": (lambda v: v >= 1, "a number >= 1 (inf: no limit)"),
    "rejection_shrink": (lambda v: 0 < v < 1, "in (0, 1)"),
}
_MAX_DIRECTIONS = 8  # the fused ops take 1 to 8 directions
_HVPS = ("fd", "central", "autograd", "interp")
# gamma grows at most to this: lambda ~ 1e16 lambda_max already gives steps below rounding (at the
# noise floor of the loss every trial is rejected; without a cap gamma would overflow to inf)
_GAMMA_MAX = _reference.DRSOM_GAMMA_MAX
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
# A predicted decrease below this many ulps of |f| is below what the loss resolves: the ratio test
# is noise there, so the trust-region loop stops instead of shrinking the step ever further.
_NOISE_ULPS = 16
# State entries that Optimizer.load_state_dict must not cast to the params' dtype/device.
_UNCAST = ("generator",)


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


def _check_options(o: dict) -> None:
    """ValueError naming the offending option."""
    for key, (accepts, required) in _NUMBERS.items():
        v = o[key]
        if not isinstance(v, Real) or isinstance(v, bool) or not accepts(v):
            raise ValueError(f"Invalid {key}: {v!r} (must be {required})")
    if not o["eta_accept"] <= o["eta_low"] < o["eta_high"]:
        raise ValueError(f"Invalid eta_low: need eta_accept <= eta_low < eta_high, got "
                         f"{o['eta_accept']}, {o['eta_low']}, {o['eta_high']}")
    if o["hvp"] not in _HVPS:
        raise ValueError(f"Invalid hvp: {o['hvp']!r} (must be one of {', '.join(_HVPS)})")
    for key, low, high in (("directions", 2, _MAX_DIRECTIONS), ("max_trials", 1, None)):
        v = o[key]
        if (not isinstance(v, Integral) or isinstance(v, bool) or v < low
                or (high is not None and v > high)):
            raise ValueError(f"Invalid {key}: {v!r} (must be an int >= {low}"
                             + (f" and <= {high})" if high else ")"))
    if not isinstance(o["random"], bool):
        raise ValueError(f"Invalid random: {o['random']!r} (must be a bool)")
    if o["random"] and o["directions"] != 2:
        raise ValueError(f"Invalid directions: {o['directions']!r} with random=True (the random "
                         "variant uses span{g, u}: directions must be 2)")
    if not isinstance(o["seed"], Integral) or isinstance(o["seed"], bool):
        raise ValueError(f"Invalid seed: {o['seed']!r} (must be an int)")
    if o["on_nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"Invalid on_nonfinite: {o['on_nonfinite']!r} (must be 'raise' or 'skip')")
    if not isinstance(o["maximize"], bool):
        raise ValueError(f"Invalid maximize: {o['maximize']!r} (must be a bool)")


def _check_params(params: list[Tensor]) -> None:
    for p in params:
        if not isinstance(p, Tensor):
            raise ValueError(f"Invalid params: {type(p).__name__} is not a Tensor")
    check_params(params, "DRSOM")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("Invalid params: a param appears twice")


# --------------------------------------------------------------------------------------------- #
# Same batch, same randomness for the extra evaluations of a step

def _capture_rng() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _restore_rng(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class same_randomness:
    """Context manager making repeated evaluations of ``model`` see the same randomness.

    Inside the block, BatchNorm layers of ``model`` that are in training mode still normalise with
    the batch statistics but do not update their running statistics (nor
    ``num_batches_tracked``): ``track_running_stats`` is switched off and restored on exit.
    ``replay()`` restores the torch (CPU) and CUDA RNG states captured on entry (or the
    ``rng_state`` given), so that dropout draws the same masks again::

        with same_randomness(model) as ctx:
            l1 = loss_fn(model(x), y)
            ctx.replay()
            l2 = loss_fn(model(x), y)   # == l1, running stats unchanged

    :class:`DRSOM` given ``model=`` uses it for every extra evaluation of a step (finite-difference
    gradients, trial points): each replays the RNG state from before the step's base evaluation,
    and the RNG state after the base evaluation is put back at the end of the step, so the random
    stream advances as if the closure had been evaluated once.
    """

    def __init__(self, model: nn.Module | None = None, rng_state=None) -> None:
        self.model = model
        self.rng_state = rng_state
        self._frozen: list[nn.Module] = []

    def __enter__(self) -> "same_randomness":
        if self.rng_state is None:
            self.rng_state = _capture_rng()
        if self.model is not None:
            for m in self.model.modules():
                if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                        and m.track_running_stats):
                    m.track_running_stats = False
                    self._frozen.append(m)
        return self

    def replay(self) -> None:
        """Put back the RNG state of the start (dropout masks repeat)."""
        _restore_rng(self.rng_state)

    def __exit__(self, *exc) -> None:
        for m in self._frozen:
            m.track_running_stats = True
        self._frozen = []


# --------------------------------------------------------------------------------------------- #

class _Workspace:
    """Scratch vectors of a run (not state): base point, gradients at the base and perturbed
    points, and device constants.  Data parallel: each gradient vector is the head of a buffer
    one longer, whose last entry takes the loss, so that one all-reduce averages both."""

    def __init__(self, x: Tensor, central: bool, distributed: bool = False) -> None:
        n = x.numel()
        self.with_loss: dict[int, Tensor] = {}  # data_ptr of a gradient vector -> its buffer

        def gradient_vector() -> Tensor:
            buf = torch.empty(n + distributed, dtype=x.dtype, device=x.device)
            self.with_loss[buf.data_ptr()] = buf
            return buf[:n]

        self.x0 = torch.empty_like(x)
        self.g = gradient_vector()
        self.gp = gradient_vector()
        self.gm = gradient_vector() if central else None
        self.one = torch.ones((), dtype=x.dtype, device=x.device)


class DRSOM(Optimizer):
    """DRSOM, the dimension-reduced second-order method (Zhang et al., arXiv 2208.00208).

    Each step minimises a quadratic model of the objective over a ``k``-dimensional subspace
    ``span V`` with a trust region in the metric of the subspace, on the fused
    ``soo::drsom_*`` ops.  Usage (the closure returns the loss and does not call backward)::

        opt = soo_ext.DRSOM(model.parameters(), hvp="fd", model=model)
        for x, y in loader:
            loss = opt.step(lambda: loss_fn(model(x), y))

    **Directions.**  ``V = [g, d_1, ..., d_{k-1}]`` where ``g`` is the gradient and ``d_j`` are the
    last accepted steps, newest first (``directions=k``; ``span{g, x_k - x_{k-1}, x_k - x_{k-2},
    ...}`` is the same subspace).  The step is ``p = V a``; with ``k = 2`` this is the paper's
    ``p = -alpha_1 g + alpha_2 d`` with ``a = (-alpha_1, alpha_2)`` (the model is the same, only
    the sign of the first coordinate differs).  A stored ``d_j`` is left out of a step when
    ``|cos(g, d_j)|`` or its ``|cos|`` with a direction already kept is ``>= collinearity``.
    ``random=True``: ``V = [g, u]`` with ``u ~ N(0, I - g_bar g_bar^T)`` (``g_bar = g/||g||``),
    drawn from a ``torch.Generator`` seeded with ``seed`` and kept in the state.

    **Model.**  ``m(a) = f + c^T a + a^T Q a / 2`` with ``c = V^T g``, ``Q = V^T H V``
    (symmetrised), ``G = V^T V``.  Solved on the device without a radius, in float64 by one
    small kernel per trial (``soo::drsom_subproblem``): the generalized eigenvalues of ``(Q, G)``
    (directions scaled to unit length, ``G`` regularised by ``sqrt(eps) I``, Cholesky of G and
    the extreme eigenvalues of ``L^-1 Q L^-T``) give ``lb = max(1e-8, -lambda_min)`` and
    ``top = max(lb, lambda_max) + max|lambda|``; ``lambda = gamma top + (1 - gamma) lb``;
    ``a = -(Q + lambda G)^-1 c``.

    **Step length.**  The radius-free step can be absurdly long: with gamma near its floor and
    an indefinite model, ``Q + lambda G`` is nearly singular (on the MNIST-1D MLP in float32, a
    finite-difference Q spoilt by ReLU kinks gave a first trial 1e13 long, then 20 rejections
    of the gamma ladder, 6 gradient-units of forwards in one step), and with a convex model many
    rungs of the ladder hardly change the step.  So gamma also climbs (``gamma_increase`` per
    rung, in the op, without evaluations) until the step ``||V a||`` is at most
    ``max_step_growth`` times the last accepted step for the first trial, and at most
    ``rejection_shrink`` times the rejected step for the next ones.

    **Trust-region decision.**  The trial ``x0 + p`` is evaluated (loss only, under no_grad);
    ``rho = (f - f_trial) / (-c^T a - a^T Q a / 2)``.  Rejected (``gamma <- gamma_increase *
    gamma``, capped at 1e16; retry from ``x0``, at most ``max_trials`` trials) if the trial loss
    is not finite, the predicted decrease is not positive, or ``rho <= eta_accept`` (so also
    when the loss rose).  Accepted otherwise; then ``gamma`` grows the same way if
    ``rho <= eta_low`` and shrinks to ``max(min(sqrt(gamma), log10(1 + gamma)), gamma_min)`` if
    ``rho >= eta_high`` (gamma: the one the trial used).  The accepted ``p`` becomes ``d_1``.
    If every trial is rejected, the params are restored exactly and the step changes only
    ``gamma`` and the counters.  A trial whose predicted decrease is positive but at most
    ``16 eps |f|`` (below what the loss resolves, where ``rho`` is rounding noise) ends the
    step: kept if the loss did not rise, else undone; ``gamma`` stays the trial's (counted in
    ``noise_stops``).

    **Line search.**  When no stored direction is usable (the first step, or collinear
    directions), or the model ``Q`` is not finite, the step is a backtracking (Armijo,
    ``f(x - t g) <= f - armijo t ||g||^2``) line search along ``-g`` from ``t = min(1, 1/||g||)``
    (then from the last accepted ``t``, doubled if it was accepted at once), halving ``t`` at
    most ``max_trials`` times.

    **Hessian-vector products** (``hvp``):

    * ``'fd'`` (default): one extra gradient per direction,
      ``Q[:, j] = V^T (grad f(x + t v_j) - g) / t`` with
      ``t = c sqrt(eps) (1 + mean_i |x_i|) / ||v_j||`` (eps of the dtype, ``c`` = 0.25 for float32
      and 1 for float64: :data:`FD_STEP_FACTOR`; about ``sqrt(eps)`` relative accuracy on smooth
      models).  The params are moved by ``drsom_perturb`` and restored bit-exactly.
    * ``'central'``: two gradients per direction, ``(grad f(x + t v) - grad f(x - t v)) / 2t``
      with ``t = eps^(1/3) (1 + mean_i |x_i|) / ||v||`` (about ``eps^(2/3)`` relative on smooth
      models).

    On piecewise-linear models (ReLU) a perturbation that flips pre-activations makes the
    difference quotient see a gradient jump, not curvature.  The fd step is chosen short enough
    that this stays rare on the MNIST-1D MLP/CNN in float32 (median Q error ~1e-2 against
    autograd, see ``python -m bench drsom``), but central differences (longer steps, two of them)
    gain nothing there in float32: use ``'autograd'`` when Q must be exact.
    * ``'autograd'``: exact products by double backward through the base gradient (computed
      with ``create_graph=True``).  Finite differences also work where double backward does not
      (fused attention kernels, cuDNN RNNs, ...).
    * ``'interp'``: Q interpolated from function values, no extra gradient: with
      ``t_i = eps^(1/4) (1 + mean_i |x_i|) / ||v_i||``, ``f_i = f(x + t_i v_i)`` and
      ``f_ij = f(x + t_i v_i + t_j v_j)``, ``Q_ii = 2 (f_i - f - t_i c_i) / t_i^2`` and
      ``Q_ij = (f_ij - f_i - f_j + f) / (t_i t_j)``: ``k (k + 1) / 2`` forwards (3 for k = 2,
      about one gradient's cost), first-order accurate (about 5e-3 relative in float32, 3e-5
      in float64 on a smooth MLP).

    Every norm, step size and reduction stays on the device.

    **Closure.**  Required.  It must recompute the loss on the same batch and return it, and must
    NOT call ``backward``: DRSOM differentiates it itself (``torch.autograd.grad``; ``.grad`` of
    the params is not touched).  It is called under ``torch.enable_grad()`` at the base point
    and at finite-difference points, and under ``torch.no_grad()`` at trial and interpolation
    points.  It must be re-evaluable with the same randomness: pass ``model=`` to have dropout
    replayed and BatchNorm running statistics frozen during the extra evaluations (see
    :class:`same_randomness`).

    **Flat params.**  At construction the params are copied into one contiguous buffer and each
    ``p.data`` is re-pointed to a view of it (all params must share one device and one float
    dtype).  In-place changes of the params (``copy_``, ``model.load_state_dict``) are seen by
    the optimizer; replacing ``p.data`` (e.g. ``model.to(...)`` after construction) breaks the
    link and makes ``step`` raise.  One param group.

    **Host synchronisation.**  One host fetch at the base point (loss and the Gram matrix of the
    candidate directions, whose ``||g||^2`` tells whether the gradient is finite) plus one per
    trial (trust-region decision: trial loss, predicted decrease and the finiteness of the model
    fetched together; the ratio is formed on the host) or per line-search trial.  A step
    accepted at its first trial synchronises twice.

    **Cost per step.**  1 gradient + ``k`` gradients ('fd', ``2k`` 'central'), ``k``
    Hessian-vector products ('autograd') or ``k (k + 1) / 2`` forwards ('interp') + one forward
    per trial.

    **Non-finite values.**  A non-finite trial loss is a rejected trial.  A non-finite loss or
    gradient at the base point raises :class:`soo_ext.quasi_newton.NonFiniteError`
    (``on_nonfinite='raise'``, default) or skips the step (``'skip'``); either way params and
    state are left untouched.  The gradient is judged by ``||g||^2`` (summed in float64, rounded
    to the params' dtype): a finite gradient whose squared norm overflows counts as non-finite.
    A non-finite model (e.g. a non-finite gradient at a finite-difference point) is seen at the
    first trust-region decision (its trial evaluation is wasted) and the step falls back to the
    line search along ``-g``.

    **Data parallel** (``torch.distributed``).  Give each rank the bare model (not wrapped in
    ``DistributedDataParallel``: DRSOM takes its gradients with ``torch.autograd.grad``, which
    DDP's reducer does not see) and ``process_group=``: every gradient is averaged over the
    group together with its loss (one all-reduce of ``n + 1`` values), every trial loss and the
    products of ``hvp='autograd'`` likewise, so each rank takes the same decisions and the
    same steps as one process on the concatenated batch would with ranks' batches of equal
    size (the mean of the ranks' means).  The loss ``step`` returns is the rank's own.

    **State** (under the first param): ``step`` (int, steps taken), ``gamma`` (float),
    ``directions`` (a ``k x n`` buffer: ``k - 1`` directions and one scratch row), ``order``
    (row of ``d_1, d_2, ...`` in it), ``count`` (stored directions), ``ls_step`` (float or None),
    ``last_length`` (float: the last accepted step's length, inf before the first),
    ``generator`` (the state of the random-direction generator), and counters ``func_evals``,
    ``grad_evals``, ``trials``, ``rejections``, ``line_searches``, ``noise_stops``.
    ``load_state_dict`` keeps ``generator`` out of Optimizer's casting; a resumed run is
    bit-identical.

    Args:
        params: iterable of params (float32 or float64, one dtype, one device), one group.
        hvp: ``'fd'`` (default), ``'central'``, ``'autograd'`` or ``'interp'``.
        directions: k, the subspace dimension, 2 to 8 (default 2: ``span{g, d}``).
        random: use ``span{g, u}`` with a random ``u`` (requires ``directions=2``).
        gamma: initial gamma (default 1e-6).
        gamma_increase: factor on rejection (default 5).
        gamma_min: floor of gamma when it shrinks (default 1e-16).
        eta_accept, eta_low, eta_high: ratio thresholds (0.05, 0.1, 0.5).
        max_trials: trials per step (default 20).
        collinearity: ``|cos|`` above which a direction is left out (default 0.97).
        armijo: sufficient-decrease constant of the line search (default 1e-4).
        max_step_growth: a step's first trial is at most this many times as long as the last
            accepted step (default 10; ``math.inf``: no limit).
        rejection_shrink: a trial after a rejection is at most this fraction of the rejected
            one's length (default 0.5).
        seed: seed of the random-direction generator (default 0).
        model: a module whose dropout/BatchNorm randomness is replayed (default None).
        on_nonfinite: ``'raise'`` (default) or ``'skip'``.
        maximize: maximise the objective (default False).
        process_group: a ``torch.distributed`` process group whose ranks run DRSOM on their own
            shards of each batch: gradients and losses are averaged over it (default None).
    """

    def __init__(self, params, hvp: str = "fd", directions: int = 2, random: bool = False, *,
                 gamma: float = 1e-6, gamma_increase: float = 5.0, gamma_min: float = 1e-16,
                 eta_accept: float = 0.05, eta_low: float = 0.1, eta_high: float = 0.5,
                 max_trials: int = 20, collinearity: float = 0.97, armijo: float = 1e-4,
                 max_step_growth: float = 10.0, rejection_shrink: float = 0.5,
                 seed: int = 0, model: nn.Module | None = None, on_nonfinite: str = "raise",
                 maximize: bool = False, process_group=None) -> None:
        defaults = {"hvp": hvp, "directions": directions, "random": random, "gamma": gamma,
                    "gamma_increase": gamma_increase, "gamma_min": gamma_min,
                    "eta_accept": eta_accept, "eta_low": eta_low, "eta_high": eta_high,
                    "max_trials": max_trials, "collinearity": collinearity, "armijo": armijo,
                    "max_step_growth": max_step_growth, "rejection_shrink": rejection_shrink,
                    "seed": seed, "on_nonfinite": on_nonfinite, "maximize": maximize}
        _check_options(defaults)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} "
                             "(must be an nn.Module or None)")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("Invalid model: DRSOM takes its gradients with torch.autograd.grad, "
                             "which DistributedDataParallel does not reduce; give the bare "
                             "module and process_group= (DRSOM averages over it)")
        self._model = model
        self._process_group = check_process_group(process_group)
        self._ws: _Workspace | None = None
        super().__init__(params, defaults)
        self._flatten()

    # ---- layout ---------------------------------------------------------------------------- #

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("Invalid params: DRSOM supports one param group")
        super().add_param_group(param_group)

    def _flatten(self) -> None:
        params = self.param_groups[0]["params"]
        if not params:
            raise ValueError("Invalid params: empty parameter list")
        _check_params(params)
        numels = [p.numel() for p in params]
        p0 = params[0]
        self._x = torch.empty(sum(numels), dtype=p0.dtype, device=p0.device)
        self._views = [v.view_as(p) for v, p in zip(self._x.split(numels), params)]
        torch._foreach_copy_(self._views, [p.detach() for p in params])
        for p, v in zip(params, self._views):
            p.data = v
        self._ptrs = [v.data_ptr() for v in self._views]
        self._numels = numels

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_model": self._model}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_model", None)
        self._process_group = None  # a process group is not copied
        self._ws = None
        self._flatten()

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, _UNCAST).items():
            self.state[p].update({key: v.clone() for key, v in entries.items()})
        _check_options(self.param_groups[0])

    def _state(self) -> dict:
        group = self.param_groups[0]
        p0 = group["params"][0]
        st = self.state[p0]
        if "step" not in st:
            k = group["directions"]
            gen = torch.Generator(device=self._x.device)
            gen.manual_seed(group["seed"])
            st.update({"step": 0, "gamma": float(group["gamma"]),
                       "directions": torch.zeros((k, self._x.numel()), dtype=self._x.dtype,
                                                 device=self._x.device),
                       "order": list(range(k)), "count": 0, "ls_step": None,
                       "last_length": math.inf,
                       "generator": gen.get_state(), "func_evals": 0, "grad_evals": 0,
                       "trials": 0, "rejections": 0, "line_searches": 0, "noise_stops": 0})
        elif st["directions"].shape[0] != group["directions"]:
            raise ValueError("Invalid directions: it cannot change after the first step")
        return st

    # ---- evaluations ----------------------------------------------------------------------- #

    def _objective(self, closure: Callable, maximize: bool):
        loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise RuntimeError("DRSOM: the closure must return the loss as a one-element tensor")
        obj = -loss if maximize else loss
        return loss, obj.reshape(())

    def _gradient(self, closure: Callable, out: Tensor, create_graph: bool = False):
        """Evaluate the closure with grad, write the flat gradient into ``out``; returns
        ``(loss, objective as a device scalar of the params' dtype, gradient list or None)``."""
        params = self.param_groups[0]["params"]
        maximize = self.param_groups[0]["maximize"]
        with torch.enable_grad():
            loss, obj = self._objective(closure, maximize)
            if not obj.requires_grad:
                raise RuntimeError("DRSOM: the loss does not require grad (the closure must "
                                   "return the loss without calling backward, under grad mode)")
            grads = torch.autograd.grad(obj, params, allow_unused=True, create_graph=create_graph)
        self._gather(grads, out)
        obj = obj.detach().to(self._x.dtype)
        if self._process_group is not None:
            buf = self._ws.with_loss[out.data_ptr()]
            buf[-1:].copy_(obj.reshape(1))
            obj = all_reduce_mean_(buf, self._process_group)[-1]
        return loss, obj, (grads if create_graph else None)

    def _split(self, flat: Tensor) -> list[Tensor]:
        """Per-param views of a flat vector (cached for the workspace buffers)."""
        key = flat.data_ptr()
        cache = self.__dict__.setdefault("_split_cache", {})
        views = cache.get(key)
        if views is None or views[0] is not flat:
            views = (flat, [v.view_as(p) for v, p in zip(flat.split(self._numels), self._views)])
            cache[key] = views
        return views[1]

    def _gather(self, grads, out: Tensor) -> None:
        views = self._split(out)
        dst, src, missing = [], [], []
        for v, gr in zip(views, grads):
            if gr is None:
                missing.append(v)
            elif gr.layout != torch.strided:
                raise RuntimeError(f"DRSOM does not support sparse gradients ({gr.layout})")
            elif gr.is_complex():
                raise RuntimeError("DRSOM does not support complex gradients")
            else:
                dst.append(v)
                src.append(gr.detach())
        if dst:
            torch._foreach_copy_(dst, src)
        if missing:
            torch._foreach_zero_(missing)

    def _loss_at_trial(self, closure: Callable, replay) -> Tensor:
        replay()
        with torch.no_grad():
            _, obj = self._objective(closure, self.param_groups[0]["maximize"])
        if self._process_group is not None:  # a copy: the closure's loss stays the rank's own
            return all_reduce_mean_(obj.to(self._x.dtype, copy=True).reshape(1),
                                    self._process_group)[0]
        return obj.detach().to(self._x.dtype)

    def _hessian(self, closure: Callable, V: list[Tensor], G: Tensor, grads, replay,
                 f: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """``Q = V^T H V`` (not symmetrised), from finite differences, double backward or
        ('interp': needs the base objective ``f`` and ``c = V^T g``) function values.  Leaves x
        at the base point (bit-exactly) and ``x0`` holding it."""
        group = self.param_groups[0]
        if group["hvp"] == "interp":
            return self._interpolated_hessian(closure, V, G, f, c, replay)
        ws, x, st = self._ws, self._x, self.state[group["params"][0]]
        cols = []
        if group["hvp"] == "autograd":
            ws.x0.copy_(x)
            params = group["params"]
            used = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
            for v in V:
                vs = [w.view_as(p) for w, p in zip(v.split(self._numels), self._views)]
                hv = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                         grad_outputs=[vs[i] for i in used], retain_graph=True,
                                         allow_unused=True) if used else []
                full = [None] * len(params)
                for i, h in zip(used, hv):
                    full[i] = h
                self._gather(full, ws.gp)
                if self._process_group is not None:
                    all_reduce_mean_(ws.gp, self._process_group)
                cols.append(torch.stack([torch.dot(w, ws.gp) for w in V]))
        else:
            central = group["hvp"] == "central"
            ts = fd_perturbation_length(x, central) / torch.sqrt(torch.diagonal(G))
            for j, v in enumerate(V):
                t = ts[j]
                _ops.drsom_perturb(x, ws.x0, v, t, j == 0)
                replay()
                self._gradient(closure, ws.gp)
                if central:
                    _ops.drsom_perturb(x, ws.x0, v, -t, False)
                    replay()
                    self._gradient(closure, ws.gm)
                    q, _, _ = _ops.drsom_reduce(ws.gp, ws.gm, V, 2 * t, False)
                else:
                    q, _, _ = _ops.drsom_reduce(ws.gp, ws.g, V, t, False)
                cols.append(q)
            x.copy_(ws.x0)
            st["grad_evals"] += len(V) * (2 if central else 1)
            st["func_evals"] += len(V) * (2 if central else 1)
        return torch.stack(cols, 1)  # drsom_subproblem symmetrises it

    def _interpolated_hessian(self, closure, V, G, f, c, replay) -> Tensor:
        """Q from k (k + 1) / 2 function values (no gradient): :func:`interpolated_model` at
        ``t_i ||v_i|| = interp_perturbation_length(x)``."""
        ws, x = self._ws, self._x
        st = self.state[self.param_groups[0]["params"][0]]
        ts = interp_perturbation_length(x) / torch.sqrt(torch.diagonal(G))
        ws.x0.copy_(x)
        values = interpolation_values(x, ws.x0, ws.gp, V, ts,
                                      lambda: self._loss_at_trial(closure, replay))
        st["func_evals"] += len(values)
        return interpolated_model(f, values, ts, c)

    # ---- the step -------------------------------------------------------------------------- #

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One DRSOM step.  Returns the loss the closure returned at the base point."""
        if closure is None:
            raise RuntimeError("DRSOM requires a closure (returning the loss, without backward)")
        group = self.param_groups[0]
        _check_options(group)
        if [v.data_ptr() for v in self._views] != self._ptrs or any(
                p.data_ptr() != ptr for p, ptr in zip(group["params"], self._ptrs)):
            raise RuntimeError("DRSOM: a param's storage was replaced after construction (e.g. "
                               "model.to()); construct the optimizer after moving the model")
        st = self._state()
        if self._ws is None:
            self._ws = _Workspace(self._x, group["hvp"] == "central",
                                  self._process_group is not None)
        ws, x = self._ws, self._x
        model = self._model
        rng0 = _capture_rng() if model is not None else None

        loss, f, grads = self._gradient(closure, ws.g, create_graph=group["hvp"] == "autograd")
        rng1 = _capture_rng() if model is not None else None
        bufs, order = st["directions"], st["order"]
        stored = [] if group["random"] else [bufs[order[i]] for i in range(st["count"])]
        cand = [ws.g] + stored
        _, G, c = _ops.drsom_reduce(ws.g, ws.g, cand, ws.one, True)
        vals = torch.cat([f.reshape(1), G.reshape(-1)]).tolist()
        f_host = vals[0]
        n = len(cand)
        Gh = [vals[1 + i * n: 1 + (i + 1) * n] for i in range(n)]
        gg = Gh[0][0]  # ||g||^2 (float64 sums): finite iff every entry of g is, or it overflows
        if not (math.isfinite(f_host) and math.isfinite(gg)):  # nothing has changed yet
            if group["on_nonfinite"] == "raise":
                raise NonFiniteError("DRSOM: the loss or gradient at the base point is not "
                                     "finite (or ||g||^2 overflows the dtype); nothing changed "
                                     "(on_nonfinite='skip' skips instead)")
            return loss
        st["func_evals"] += 1
        st["grad_evals"] += 1
        if gg == 0:  # stationary point
            st["step"] += 1
            return loss
        kept = [0]
        for j in range(1, n):
            if not Gh[j][j] > 0:
                continue
            if all(abs(Gh[i][j]) < group["collinearity"] * math.sqrt(Gh[i][i] * Gh[j][j])
                   for i in kept):
                kept.append(j)

        ctx = same_randomness(model, rng0) if model is not None else None
        replay = ctx.replay if ctx is not None else (lambda: None)
        try:
            if ctx is not None:
                ctx.__enter__()
            if group["random"]:
                u = bufs[order[0]]
                gen = torch.Generator(device=x.device)
                gen.set_state(st["generator"])
                torch.randn(u.shape, generator=gen, out=u)
                u.add_(ws.g * (-(torch.dot(ws.g, u) / gg)))
                st["generator"] = gen.get_state()
                V = [ws.g, u]
                _, G, c = _ops.drsom_reduce(ws.g, ws.g, V, ws.one, True)
                scratch = order[1]
            elif len(kept) == 1:
                self._line_search(closure, st, f_host, gg, replay)
                return loss
            else:
                V = [cand[j] for j in kept]
                if len(kept) != n:
                    idx = torch.tensor(kept, device=x.device)
                    G, c = G[idx][:, idx], c[idx]
                scratch = order[-1]
            Q = self._hessian(closure, V, G, grads, replay, f, c)
            grads = None
            if not self._trust_region(closure, st, V, Q, G, c, f_host, scratch, replay):
                self._line_search(closure, st, f_host, gg, replay)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
                _restore_rng(rng1)
        return loss

    def _accept(self, st: dict, scratch_row: int, length: float) -> None:
        """The step just written into ``scratch_row`` (``length`` long) becomes ``d_1``."""
        st["last_length"] = length
        order = st["order"]
        if self.param_groups[0]["random"]:
            return
        order.remove(scratch_row)
        st["order"] = [scratch_row] + order
        st["count"] = min(st["count"] + 1, len(order))

    def _trust_region(self, closure, st, V, Q, G, c, f_host, scratch_row, replay) -> bool:
        """The radius-free trust-region loop, the step written into row ``scratch_row`` of the
        directions.  False if the model is not finite (x restored)."""
        group = self.param_groups[0]
        x, x0 = self._x, self._ws.x0
        k = len(V)
        p = st["directions"][scratch_row]
        noise = _NOISE_ULPS * torch.finfo(x.dtype).eps * abs(f_host)
        last = st["last_length"]
        max_length = group["max_step_growth"] * last if 0 < last < math.inf else math.inf
        for trial in range(group["max_trials"]):
            # gamma climbs in the op until the step is at most max_length (no evaluation)
            step = _ops.drsom_subproblem(Q, G, c, st["gamma"], max_length,
                                         group["gamma_increase"])
            if trial:
                x.copy_(x0)
            _ops.drsom_update(x, p, V, step[:k])
            ft = self._loss_at_trial(closure, replay)
            st["func_evals"] += 1
            st["trials"] += 1
            ft_h, pred_h, ok, gamma, length = torch.cat([ft.reshape(1), step[k:]]).tolist()
            if not ok:
                x.copy_(x0)
                return False
            st["gamma"] = gamma
            inc = min(group["gamma_increase"] * gamma, _GAMMA_MAX)
            if 0 < pred_h <= noise:  # below the loss's resolution: rho is noise
                st["noise_stops"] += 1
                if math.isfinite(ft_h) and ft_h <= f_host:
                    self._accept(st, scratch_row, length)
                else:
                    x.copy_(x0)
                st["step"] += 1
                return True
            rho_h = (f_host - ft_h) / pred_h if pred_h > 0 else math.nan
            accept = math.isfinite(ft_h) and math.isfinite(rho_h) and rho_h > group["eta_accept"]
            if not accept:
                st["gamma"] = inc
                st["rejections"] += 1
                max_length = group["rejection_shrink"] * length
                continue
            if rho_h <= group["eta_low"]:
                st["gamma"] = inc
            elif rho_h >= group["eta_high"]:
                st["gamma"] = max(min(math.sqrt(gamma), math.log10(gamma + 1)), group["gamma_min"])
            self._accept(st, scratch_row, length)
            st["step"] += 1
            return True
        x.copy_(x0)
        st["step"] += 1
        return True

    def _line_search(self, closure, st, f, gg, replay) -> None:
        """Backtracking (Armijo) along -g from x; x0 takes the base point."""
        group = self.param_groups[0]
        ws, x = self._ws, self._x
        bufs, order = st["directions"], st["order"]
        scratch_row = order[-1] if not group["random"] else order[1]
        p = bufs[scratch_row]
        ws.x0.copy_(x)
        t = st["ls_step"] if st["ls_step"] is not None else min(1.0, 1.0 / math.sqrt(gg))
        st["line_searches"] += 1
        for trial in range(group["max_trials"]):
            if trial:
                x.copy_(ws.x0)
            _ops.drsom_update(x, p, [ws.g], torch.full((1,), -t, dtype=x.dtype, device=x.device))
            ft = self._loss_at_trial(closure, replay).item()
            st["func_evals"] += 1
            st["trials"] += 1
            if math.isfinite(ft) and ft <= f - group["armijo"] * t * gg:
                st["ls_step"] = 2 * t if trial == 0 else t
                self._accept(st, scratch_row, t * math.sqrt(gg))
                st["step"] += 1
                return
            st["rejections"] += 1
            t *= 0.5
        x.copy_(ws.x0)
        st["ls_step"] = t
        st["step"] += 1
