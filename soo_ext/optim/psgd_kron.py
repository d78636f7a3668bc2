"""PSGD-Kron: momentum preconditioned by Kronecker-factored Lie-group factors fitted on random
probes (soo_ext.curvature.psgd_kron), with update-RMS clipping and decoupled weight decay."""
from __future__ import annotations

import functools
import random
from numbers import Real
from typing import Callable

import torch
from torch import Tensor

from .._support.closure import call_closure
from .._support.device import device_tensor
from .._support.distributed import check_process_group
from .._support.guard import SkipGuard, select
from .._support.options import Bool, Int, Number, OneOf, OptionChecks, OptionSpecs, Spec
from .._support.params import all_params, check_dense_grads
from ..curvature.psgd_kron import (FLAT_START, MIN_PROB, START_INTERVAL, TRI, PSGDKronFactors,
                                   PSGDKronLayout, draw_probes, start_precond_lr,
                                   update_probability)
from ..curvature.refresh_schedule import RefreshSchedule
from .laid_out import LaidOutOptimizer

__all__ = ["PSGDKron"]


class _Probability(Spec):
    requirement = "None (the annealing schedule), a number in (0, 1] or a callable of the step"

    def accepts(self, v) -> bool:
        return v is None or callable(v) or (isinstance(v, Real) and not isinstance(v, bool)
                                            and 0 < v <= 1)


# lr, momentum and weight_decay may differ between param groups; the rest is one setting.
OPTIONS = OptionSpecs({
    "lr": Number(0, high_open=True), "momentum": Number(0, 1, high_open=True),
    "weight_decay": Number(0, high_open=True), "precond_lr": Number(0, low_open=True,
                                                                    high_open=True),
    "update_probability": _Probability(),
    "refresh_budget": Number(0, 1, low_open=True, high_open=True, none=True),
    "max_size_triangular": Int(1),
    "min_ndim_triangular": Int(0), "memory_save_mode": OneOf(None, "one_diag", "smart_one_diag",
                                                             "all_diag"),
    "momentum_into_precond_update": Bool(), "precond_init_scale": Number(0, low_open=True,
                                                                          high_open=True),
    "merge_dims": OneOf(True, False, "reference"),
    "precond_dtype": OneOf(torch.float32, torch.float64),
    "max_update_rms": Number(0, low_open=True, none=True), "seed": Int(0),
    "on_nonfinite": OneOf("raise", "skip"),
}, per_group=("lr", "momentum", "weight_decay"))
# Options that shape the factors: changing one rebuilds them (saved factors must still fit).
_LAYOUT_OPTIONS = ("merge_dims", "max_size_triangular", "min_ndim_triangular",
                   "memory_save_mode", "precond_dtype", "precond_init_scale")
_UNCAST = ("Q", "momentum_steps", "nonfinite_steps")  # not cast to the params' dtype on load


class PSGDKron(LaidOutOptimizer):
    r"""PSGD with Kronecker-factored preconditioners fitted on a Lie group (Li, "Preconditioned
    Stochastic Gradient Descent", 2015; "Black Box Lie Group Preconditioners for SGD", 2022),
    the "Kron" variant of psgd_torch and kron-torch.

    Each param (of order > 2: merged, see ``merge_dims``) has ``P = Q^T Q``, ``Q`` a Kronecker
    product of one factor per dim: upper triangular, or diagonal (dims of size 1 or above
    ``max_size_triangular``, params of fewer than ``min_ndim_triangular`` dims).  With
    probability ``update_probability`` (default: every 2nd of the first 500 steps with
    ``4 precond_lr``, then annealed from 1/2 to a floor set by measured costs) the factors take
    one Lie-group step on a random probe ``V``:
    ``Q_i <- Q_i - precond_lr triu(A_i A_i^T - B_i B_i^T) Q_i / ||A_i A_i^T + B_i B_i^T||``,
    ``A = Q m``, ``B = Q^{-T} V``.  The update is ``P m`` (``m`` the bias-corrected momentum),
    clipped to an RMS of ``max_update_rms``, plus decoupled weight decay (params of >= 2 dims),
    times ``lr``.  Non-finite steps are skipped on the device.  Details: docs/psgd_kron.md.

    Args:
        params: iterable of params or of param-group dicts (lr, momentum, weight_decay per group).
        lr, momentum, weight_decay: (default: 3e-3, 0.9, 0; the reference's lr is 3e-4).
        precond_lr: the factors' step size (default: 0.1).
        update_probability: None (the schedule), a number, or ``f(steps before this one)``.
        refresh_budget: the floor keeps the fits to this fraction of the time (default 0.25;
            None: the reference's schedule: every step fits for 500, the floor 0.03).
            ``refresh_timer``: its clock; ``process_group``: the ranks whose timings it averages.
        max_size_triangular, min_ndim_triangular: (default: 8192, 2).
        memory_save_mode: None, ``'one_diag'``, ``'smart_one_diag'`` or ``'all_diag'``.
        momentum_into_precond_update: fit on the momentum, else on the gradient (default: True).
        precond_init_scale: (default: 1.0).  merge_dims: True (default): the first dim kept,
            the others merged up to 1024 (``(25, 25, 1, 3) -> (25, 75)``); 'reference'; False.
        precond_dtype: ``torch.float32`` (default) or ``torch.float64``.
        max_update_rms: None: no clipping (default: 1.1).
        seed: of the probes and of the update decisions (default: 0).
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.

    Example::

        opt = soo_ext.PSGDKron(model.parameters(), lr=3e-3)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """

    OPTIONS, UNCAST = OPTIONS, _UNCAST

    def __init__(self, params, lr: float = 3e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, precond_lr: float = 0.1,
                 update_probability=None, max_size_triangular: int = 8192,
                 min_ndim_triangular: int = 2, memory_save_mode: str | None = None,
                 momentum_into_precond_update: bool = True, precond_init_scale: float = 1.0,
                 merge_dims: bool | str = True, precond_dtype: torch.dtype = torch.float32,
                 max_update_rms: float | None = 1.1, seed: int = 0,
                 on_nonfinite: str = "skip", refresh_budget: float | None = 0.25,
                 refresh_timer=None, process_group=None) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "precond_lr": precond_lr, "update_probability": update_probability,
                    "refresh_budget": refresh_budget,
                    "max_size_triangular": max_size_triangular,
                    "min_ndim_triangular": min_ndim_triangular,
                    "memory_save_mode": memory_save_mode,
                    "momentum_into_precond_update": momentum_into_precond_update,
                    "precond_init_scale": precond_init_scale, "merge_dims": merge_dims,
                    "precond_dtype": precond_dtype, "max_update_rms": max_update_rms,
                    "seed": seed, "on_nonfinite": on_nonfinite}
        self._process_group = check_process_group(process_group)
        self._schedule = RefreshSchedule(_SCHEDULED, timer=refresh_timer)
        self._checks = OptionChecks(OPTIONS)  # skipped while the options are unchanged
        super().__init__(params, defaults)  # self._run: (layout options, layout, factors, sizes)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # load_state_dict comes here too: it keeps these; a copy or unpickling has none
        self.__dict__.setdefault("_process_group", None)
        self.__dict__.setdefault("_schedule", RefreshSchedule(_SCHEDULED))
        self.__dict__.setdefault("_checks", OptionChecks(OPTIONS))

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional) runs forward and backward and returns the loss."""
        loss = call_closure(closure)
        if not any(p.grad is not None for p in all_params(self)):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        self._checks(self.param_groups)
        check_dense_grads(all_params(self), "PSGDKron")
        layout, factors, sizes = self._prepare()
        o, params = self.param_groups[0], layout.params
        gstate = self.state[params[0]]
        k = gstate["step"] + 1
        self._skips.watch(gstate["nonfinite_steps"])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        G = torch.cat([grads[i].reshape(-1) for i in factors.order])  # flat, shape-group order
        guard = SkipGuard.check([G], o["on_nonfinite"], gstate["nonfinite_steps"],
                                "PSGDKron: the gradient is not finite")
        gstate["step"] = k
        # The step's randomness is a function of (seed, step): resume and replicas agree.
        decisions = random.Random(gstate["seed"] * 1_000_003 + k)
        record = self._refresh_record(gstate, sizes, k - 1)
        update = _fit_due(o["update_probability"], k - 1, decisions.random(), record)
        balance = decisions.random() < 0.01 and update
        self._generator.manual_seed((gstate["seed"] * 1_000_003 + k) % (2 ** 63))
        order = factors.order
        G = select(guard.ok, G, 0.0)  # NaN * 0 is NaN: replaced
        present = tuple(params[i].grad is not None for i in order)
        take = guard.ok if all(present) else guard.ok & _on_device(present, G.device)
        momentum = {id(p): gr["momentum"] for gr in self.param_groups for p in gr["params"]}
        betas = tuple(momentum[id(params[i])] for i in order)
        beta = betas[0] if len(set(betas)) == 1 else _on_device(betas, G.device, torch.float64)
        M = factors.momentum_(G, take, beta)  # the fit jitters it in place, as the reference
        if update:
            stacks = factors.stacks(M if o["momentum_into_precond_update"]
                                    else G.to(factors.dtype))
            probes = [draw_probes(self._generator, S.shape, factors.dtype, G.device)
                      for S in stacks]
            if balance:
                factors.balance_(take)
            in_start = record is not None and k - 1 < FLAT_START  # the default's start
            factors.update_(stacks, probes, take, start_precond_lr(o["precond_lr"]) if in_start
                            else o["precond_lr"])
            gstate["precond_updates"] += 1
        factors.direction(M, o["max_update_rms"], guard.bad)
        updates = {params[i]: u for i, u in factors.update_views.items()}
        for group in self.param_groups:
            _apply_(group, [p for p in group["params"] if p.grad is not None], updates, guard)
        if record is not None:
            self._schedule.after_step(record, k - 1, params[0].device, self._process_group)
        return loss

    def _refresh_record(self, gstate: dict, sizes: list[int], n: int) -> dict | None:
        """The automatic floor's record (in the state; its first window at the end of the flat
        start), None when it is off."""
        o = self.param_groups[0]
        if o["update_probability"] is not None or o["refresh_budget"] is None:
            return None
        self._schedule.budget = o["refresh_budget"]
        return self._schedule.record_in(gstate, sizes, n, start=FLAT_START)

    def _prepare(self) -> tuple[PSGDKronLayout, PSGDKronFactors]:
        """The layout and factors of the run, built at the first step and whenever a layout
        option changed; the state entries are views of the factors' stacks."""
        o = self.param_groups[0]
        key = tuple(o[k] for k in _LAYOUT_OPTIONS)
        if self._run is not None and self._run[0] == key:
            return self._run[1:]
        params = all_params(self)
        layout = PSGDKronLayout(params, o["merge_dims"], o["max_size_triangular"],
                                o["min_ndim_triangular"], o["memory_save_mode"])
        p0 = params[0]
        factors = PSGDKronFactors(layout, o["precond_dtype"], p0.dtype, p0.device,
                                  o["precond_init_scale"])
        assign = []
        for i, p in enumerate(params):
            state = self.state[p]
            views = factors.views(i)
            for name, view in views.items():
                saved = state.get(name)
                if saved is None:
                    continue
                pairs = list(zip(saved, view)) if name == "Q" else [(saved, view)]
                if (name == "Q" and len(saved) != len(view)) or any(
                        s.shape != v.shape for s, v in pairs):
                    raise ValueError(f"PSGDKron state {name!r} of a param of shape "
                                     f"{tuple(p.shape)} does not fit its factors "
                                     f"({', '.join(_LAYOUT_OPTIONS)} differ from the saved run's)")
                for s, v in pairs:
                    v.copy_(s)
            assign.append((state, views))
        for state, views in assign:  # only once every param's state fits
            state.update(views)
        gstate = self.state[p0]
        gstate.setdefault("step", 0)
        gstate.setdefault("seed", o["seed"])
        gstate.setdefault("precond_updates", 0)
        counter = gstate.get("nonfinite_steps")
        gstate["nonfinite_steps"] = (torch.zeros((), dtype=torch.int64, device=p0.device)
                                     if counter is None else counter.to(p0.device))
        self._generator = torch.Generator(device=p0.device)
        sizes = [v for sg in layout.shape_groups for v in (
            len(sg.members), *sg.shape, *(int(kind == TRI) for kind in sg.kinds), -1)]
        sizes.append(int(o["precond_dtype"] == torch.float64))
        self._run = (key, layout, factors, sizes)
        return layout, factors, sizes


_SCHEDULED = "PSGDKron fits (the floor of their probability: 1 / interval)"


def _fit_due(option, n: int, draw: float, record: dict | None) -> bool:
    """Whether the step after ``n`` steps fits the factors: ``draw`` (uniform in [0, 1)) below
    the chance that ``option`` (``update_probability``) gives, None: the annealed schedule whose
    floor is ``1 / interval`` of the automatic schedule (``record``; 0.03 while it has none or
    when it is off); in the schedule's measurement windows by the window's pattern; with the
    automatic schedule, every ``START_INTERVAL``-th step of the flat start and then the
    annealing from the start's rate ``1 / START_INTERVAL`` (not from 1: no jump at its end)."""
    if record is not None and record["measuring"] and n >= record["anchor"]:
        return RefreshSchedule.due(record, n)
    if option is None and record is not None and n < FLAT_START:
        return n % START_INTERVAL == 0
    if option is None:
        floor = 1 / record["interval"] if record and record["interval"] else MIN_PROB
        start_rate = 1 / START_INTERVAL if record is not None else 1.0
        return draw < max(floor, update_probability(n, max_prob=start_rate, min_prob=floor))
    return draw < (option(n) if callable(option) else option)


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``values`` as a tensor on ``device``, made once per pattern (a host-to-device copy every
    step would sync)."""
    return device_tensor(list(values), device, dtype)


def _apply_(group: dict, params: list[Tensor], updates: dict, guard: SkipGuard) -> None:
    """``p <- p - lr (u + weight_decay p)`` for the ``params`` of ``group`` (weight decay on
    params of >= 2 dims, as the reference); the updates are +0 on a skipped step."""
    if not params:
        return
    lr, wd = group["lr"], group["weight_decay"]
    decayed = [p for p in params if p.dim() >= 2]
    if wd != 0 and decayed:
        torch._foreach_mul_(decayed, guard.unless_skipped(1 - lr * wd, params[0]))
    torch._foreach_add_(params, [u if (u := updates[p]).dtype == p.dtype else u.to(p.dtype)
                                 for p in params], alpha=-lr)
