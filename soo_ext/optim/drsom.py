"""DRSOM: the dimension-reduced second-order method (Zhang, Ge, He, Jiang, Jiang, Ye, 2022) on the
fused ``soo::drsom_*`` ops: a quadratic model over a few directions (soo_ext.curvature.drsom_models)
and a radius-free trust region (soo_ext.curvature.trust_region)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .._support.closure import ClosureEvaluator
from .._support.distributed import check_process_group
from .._support.errors import NonFiniteError
from .._support.flat import FlatParams
from .._support.guard import SkipWarner
from .._support.options import Bool, Int, Number, OneOf, OptionSpecs
from .._support.params import check_params, load_state_dict_uncast
from .._support.step_wrapper import OnDemandStepWrapper
from ..curvature.drsom_models import (HESSIAN_MODELS, HessianModel, independent_directions,
                                      random_direction, subspace_gram)
from ..curvature.trust_region import TrustRegion

__all__ = ["DRSOM"]

_MAX_DIRECTIONS = 8  # the fused ops take 1 to 8 directions
_UNCAST = ("generator",)  # state entries Optimizer.load_state_dict must not cast


def _eta_order(o: dict) -> None:
    if not o["eta_accept"] <= o["eta_low"] < o["eta_high"]:
        raise ValueError(f"Invalid eta_low: need eta_accept <= eta_low < eta_high, got "
                         f"{o['eta_accept']}, {o['eta_low']}, {o['eta_high']}")


def _random_directions(o: dict) -> None:
    if o["random"] and o["directions"] != 2:
        raise ValueError(f"Invalid directions: {o['directions']!r} with random=True (the random "
                         "variant uses span{g, u}: directions must be 2)")


def _positive() -> Number:
    return Number(0, math.inf, low_open=True, high_open=True)


def _fraction() -> Number:  # in (0, 1)
    return Number(0, 1, low_open=True, high_open=True)


class _StepScratch:
    """Scratch vectors of a step (not state): the base point ``x0``, the gradient ``g`` there and
    the gradient vectors of the Hessian models (from the evaluator: with a loss slot when
    averaging), and a device 1."""

    def __init__(self, evaluator: ClosureEvaluator, x: Tensor) -> None:
        self.evaluator, self.x = evaluator, x
        self.x0 = torch.empty_like(x)
        self.g = evaluator.gradient_vector()
        self.perturbed: list[Tensor] = []
        self.one = torch.ones((), dtype=x.dtype, device=x.device)

    def hessian_model(self, hvp: str) -> HessianModel:
        cls = HESSIAN_MODELS[hvp]
        while len(self.perturbed) < cls.scratch_vectors:
            self.perturbed.append(self.evaluator.gradient_vector())
        return cls(self.evaluator, self.x, self.x0, self.g, self.perturbed[:cls.scratch_vectors])


class DRSOM(OnDemandStepWrapper):
    """DRSOM, the dimension-reduced second-order method (Zhang, Ge, He, Jiang, Jiang, Ye 2022,
    arXiv 2208.00208): each step minimises a quadratic model of the objective over ``span V``,
    ``V = [g, d_1, ..., d_{k-1}]`` (the gradient and the last accepted steps), with a radius-free
    trust region, solved on the device by the fused ``soo::drsom_*`` ops.

    The closure returns the loss, re-evaluable on the same batch; best without calling backward
    (DRSOM differentiates it; a torch closure that calls backward works too, except with
    ``hvp='autograd'``, at the cost of a backward at every trial).  The params are copied into
    one flat buffer (each ``p.data`` a view of it; one param group).  Algorithm, ``hvp`` modes,
    host syncs, cost, non-finite values, data parallelism, state: docs/drsom.md.

    Args:
        params: iterable of params (float32 or float64, one dtype, one device), one group.
        hvp: ``Q = V^T H V`` from ``'fd'`` (default: forward differences of the gradient),
            ``'central'`` differences, ``'autograd'`` (double backward) or ``'interp'``
            (interpolated from function values).
        directions: k, the subspace dimension, 2 to 8 (default 2: ``span{g, d}``).
        random: use ``span{g, u}`` with a random ``u`` (requires ``directions=2``).
        gamma, gamma_increase, gamma_min: initial gamma, its factor on rejection, its floor
            (1e-6, 5, 1e-16).
        eta_accept, eta_low, eta_high: ratio thresholds (0.05, 0.1, 0.5).
        max_trials: trials per step (default 20).
        collinearity: ``|cos|`` above which a direction is left out (default 0.97).
        armijo: sufficient decrease of the line search along ``-g`` (default 1e-4).
        max_step_growth: a first trial is at most this times the last step (10; inf: no limit).
        rejection_shrink: a retry is at most this fraction of the rejected trial (default 0.5).
        seed: seed of the random-direction generator (default 0).
        model: a module whose dropout/BatchNorm randomness is replayed (default None).
        on_nonfinite: ``'raise'`` (default: :class:`soo_ext.NonFiniteError`) or ``'skip'``.
        maximize: maximise the objective (default False).
        process_group: data parallel: gradients and losses are averaged over it (default None).
        lr: a scale of every step, which LR schedulers drive (default 1: the method's steps).

    Example::

        opt = soo_ext.DRSOM(model.parameters(), hvp="fd", model=model)
        for x, y in loader:
            loss = opt.step(lambda: loss_fn(model(x), y))
    """

    OPTIONS = OptionSpecs({
        "hvp": OneOf(*HESSIAN_MODELS), "directions": Int(2, _MAX_DIRECTIONS), "random": Bool(),
        "gamma": _positive(), "gamma_increase": Number(1, math.inf, low_open=True, high_open=True),
        "gamma_min": _positive(), "eta_accept": Number(0, 1, high_open=True),
        "eta_low": Number(0, 1, high_open=True), "eta_high": _fraction(),
        "max_trials": Int(1), "collinearity": Number(0, 1, low_open=True), "armijo": _fraction(),
        "max_step_growth": Number(1, note="inf: no limit"), "rejection_shrink": _fraction(),
        "seed": Int(-2 ** 63, 2 ** 64 - 1), "on_nonfinite": OneOf("raise", "skip"),
        "maximize": Bool(), "lr": Number(0, high_open=True),
    }, relations=(_eta_order, _random_directions))

    def __init__(self, params, hvp: str = "fd", directions: int = 2, random: bool = False, *,
                 gamma: float = 1e-6, gamma_increase: float = 5.0, gamma_min: float = 1e-16,
                 eta_accept: float = 0.05, eta_low: float = 0.1, eta_high: float = 0.5,
                 max_trials: int = 20, collinearity: float = 0.97, armijo: float = 1e-4,
                 max_step_growth: float = 10.0, rejection_shrink: float = 0.5,
                 seed: int = 0, model: nn.Module | None = None, on_nonfinite: str = "raise",
                 maximize: bool = False, process_group=None, lr: float = 1.0) -> None:
        defaults = {"hvp": hvp, "directions": directions, "random": random, "gamma": gamma,
                    "gamma_increase": gamma_increase, "gamma_min": gamma_min,
                    "eta_accept": eta_accept, "eta_low": eta_low, "eta_high": eta_high,
                    "max_trials": max_trials, "collinearity": collinearity, "armijo": armijo,
                    "max_step_growth": max_step_growth, "rejection_shrink": rejection_shrink,
                    "seed": seed, "on_nonfinite": on_nonfinite, "maximize": maximize, "lr": lr}
        self.OPTIONS.check(defaults)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} "
                             "(must be an nn.Module or None)")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("Invalid model: DRSOM takes its gradients with torch.autograd.grad, "
                             "which DistributedDataParallel does not reduce; give the bare "
                             "module and process_group= (DRSOM averages over it)")
        self._model = model
        self._skips = SkipWarner("DRSOM", counted=False)
        self._process_group = check_process_group(process_group)
        super().__init__(params, defaults)
        self._flatten()

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("Invalid params: DRSOM supports one param group")
        super().add_param_group(param_group)

    def _flatten(self) -> None:
        """One flat buffer ``_x`` of the params, each ``p.data`` re-pointed to a view of it."""
        params = self.param_groups[0]["params"]
        if not params:
            raise ValueError("Invalid params: empty parameter list")
        for p in params:
            if not isinstance(p, Tensor):
                raise ValueError(f"Invalid params: {type(p).__name__} is not a Tensor")
        check_params(params, "DRSOM")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("Invalid params: a param appears twice")
        self._flat = FlatParams(params)
        self._x = self._flat.x
        self._evaluator = ClosureEvaluator(params, "DRSOM", process_group=self._process_group,
                                           model=self._model)
        self._scratch: _StepScratch | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_model": self._model}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state dict saved before 'lr' existed
            group.setdefault("lr", 1.0)
        # load_state_dict comes here too: it keeps the group and the flat params; a copy or
        # unpickling has neither
        self.__dict__.setdefault("_model", None)
        self.__dict__.setdefault("_skips", SkipWarner("DRSOM", counted=False))
        self.__dict__.setdefault("_process_group", None)
        if "_x" not in self.__dict__:
            self._flatten()

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, _UNCAST).items():
            self.state[p].update({key: v.clone() for key, v in entries.items()})
        self.OPTIONS.check(self.param_groups[0])

    def _state(self) -> dict:
        group = self.param_groups[0]
        st = self.state[group["params"][0]]
        if "step" not in st:
            k, x = group["directions"], self._x
            gen = torch.Generator(device=x.device)
            gen.manual_seed(group["seed"])
            st.update({"step": 0, "gamma": float(group["gamma"]),
                       "directions": torch.zeros((k, x.numel()), dtype=x.dtype, device=x.device),
                       "order": list(range(k)), "count": 0, "ls_step": None,
                       "last_length": math.inf,
                       "generator": gen.get_state(), "func_evals": 0, "grad_evals": 0,
                       "trials": 0, "rejections": 0, "line_searches": 0, "noise_stops": 0})
        elif st["directions"].shape[0] != group["directions"]:
            raise ValueError("Invalid directions: it cannot change after the first step")
        return st

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One DRSOM step.  Returns the loss the closure returned at the base point."""
        if closure is None:
            raise RuntimeError("DRSOM requires a closure (returning the loss, without backward)")
        group = self.param_groups[0]
        self.OPTIONS.check(group)
        self._flat.check("DRSOM")
        st = self._state()
        if self._scratch is None:
            self._scratch = _StepScratch(self._evaluator, self._x)
        ws, ev = self._scratch, self._evaluator
        hessian = ws.hessian_model(group["hvp"])
        ev.begin(closure, group["maximize"])
        loss, f, grads = ev.gradient(ws.g, create_graph=hessian.create_graph)
        bufs, order = st["directions"], st["order"]
        cand = [ws.g] + ([] if group["random"] else [bufs[order[i]] for i in range(st["count"])])
        ev.zero_absent_(cand[1:])  # params without a gradient (frozen, unused) are left alone
        G, c = subspace_gram(ws.g, cand, ws.one)
        vals = torch.cat([f.reshape(1), G.reshape(-1)]).tolist()  # the base point's host fetch
        f_host, n = vals[0], len(cand)
        Gh = [vals[1 + i * n: 1 + (i + 1) * n] for i in range(n)]
        gg = Gh[0][0]  # ||g||^2 (float64 sums): finite iff every entry of g is, or it overflows
        if not (math.isfinite(f_host) and math.isfinite(gg)):  # nothing has changed yet
            if group["on_nonfinite"] == "raise":
                raise NonFiniteError("DRSOM: the loss or gradient at the base point is not "
                                     "finite (or ||g||^2 overflows the dtype); nothing changed "
                                     "(on_nonfinite='skip' skips instead)")
            self._skips.skipped()
            return loss
        st["func_evals"], st["grad_evals"] = st["func_evals"] + 1, st["grad_evals"] + 1
        if gg == 0 or group["lr"] == 0:  # a stationary point, or no step asked for
            st["step"] += 1
            return loss
        kept = independent_directions(Gh, group["collinearity"])
        region = TrustRegion(self._x, ws.x0, st, group, ev.loss)
        with ev.extra_evaluations():
            if group["random"]:
                u = bufs[order[0]]
                st["generator"] = random_direction(u, ws.g, gg, st["generator"])
                ev.zero_absent_([u])
                V = [ws.g, u]
                G, c = subspace_gram(ws.g, V, ws.one)
            elif len(kept) == 1:
                region.line_search(ws.g, f_host, gg)
                return loss
            else:
                V = [cand[j] for j in kept]
                if len(kept) != n:
                    idx = torch.tensor(kept, device=self._x.device)
                    G, c = G[idx][:, idx], c[idx]
            Q = hessian.products(V, G, c, f, grads)
            func_evals, grad_evals = hessian.evaluations(len(V))
            st["func_evals"] += func_evals
            st["grad_evals"] += grad_evals
            grads = None  # the graph of 'autograd' is not needed any more
            if not region.subspace_step(V, Q, G, c, f_host):
                region.line_search(ws.g, f_host, gg)
        return loss
