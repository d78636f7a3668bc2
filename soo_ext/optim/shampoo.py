"""Shampoo with grafting: soo_ext.curvature's blocking, roots and grafting, and momentum."""
from __future__ import annotations

from numbers import Real
from typing import Callable

import torch
from torch import Tensor

from .._support.closure import call_closure
from .._support.distributed import check_process_group
from .._support.guard import SkipGuard, fill_if_
from .._support.options import Bool, Int, Number, OneOf, OptionChecks, OptionSpecs, Spec
from .._support.params import all_params
from ..curvature.grafting import SGDGrafting, make_grafting
from ..curvature.refresh_schedule import RefreshSchedule
from ..curvature.shampoo_blocks import ShampooBlocking
from ..curvature.shampoo_roots import ShampooRoots
from .laid_out import LaidOutOptimizer

__all__ = ["Shampoo"]


class _Betas(Spec):
    requirement = "(beta1, beta2) with beta1 in [0, 1) and beta2 in (0, 1]"

    def accepts(self, b) -> bool:
        return (isinstance(b, (tuple, list)) and len(b) == 2
                and all(isinstance(v, Real) and not isinstance(v, bool) for v in b)
                and 0 <= b[0] < 1 and 0 < b[1] <= 1)


# lr, betas and weight_decay may differ between param groups (read at every step: LR schedulers
# work); every other option is one setting for the run (the buckets span all groups).
OPTIONS = OptionSpecs({
    "lr": Number(0, high_open=True), "betas": _Betas(),
    "epsilon": Number(0, low_open=True, high_open=True),
    "relative_epsilon": Number(0, high_open=True), "weight_decay": Number(0, high_open=True),
    "decoupled_weight_decay": Bool(), "max_preconditioner_dim": Int(1), "merge_dims": Bool(),
    "precondition_1d": Bool(), "precondition_frequency": Int(1, none=True),
    "refresh_budget": Number(0, 1, low_open=True, high_open=True, none=True),
    "start_preconditioning_step": Int(1), "grafting": OneOf("sgd", "adagrad", "adam", None),
    "grafting_epsilon": Number(0, low_open=True, high_open=True),
    "grafting_beta2": Number(0, 1, low_open=True, high_open=True),
    "root_method": OneOf("newton", "eigh"), "factor_dtype": OneOf(torch.float32, torch.float64),
    "max_root_failures": Int(1), "on_nonfinite": OneOf("raise", "skip"),
}, per_group=("lr", "betas", "weight_decay"))
# Options that shape the buckets or the state: changing one rebuilds them (a layout that no
# longer matches the saved factors raises ValueError).
_LAYOUT_OPTIONS = ("max_preconditioner_dim", "merge_dims", "precondition_1d", "factor_dtype",
                   "grafting")
# State entries that Optimizer.load_state_dict must not cast to the params' dtype (factors may be
# float64 with float32 params; counters are integers).
_UNCAST = ("factors", "roots", "root_failures", "nonfinite_steps", "failed_roots")


class Shampoo(LaidOutOptimizer):
    r"""Shampoo (Gupta, Koren & Singer, ICML 2018) with grafting and the blocking of Distributed
    Shampoo (Anil et al. 2020; Shi et al. 2023).

    Each param is a tensor of merged dims (``merge_dims``), cut into blocks of at most
    ``max_preconditioner_dim``; every block ``G`` keeps a factor per dim,
    ``L_i <- beta2 L_i + G_(i) G_(i)^T``, whose inverse root ``(L_i + e_i I)^{-1/(2k)}``
    (``e_i = epsilon + relative_epsilon ||L_i||_F``) is recomputed every
    ``precondition_frequency`` steps (one op call per bucket).  The direction
    ``G x_1 P_1 ... x_k P_k`` takes the step size of the grafting method per block; momentum
    (bias-corrected) on the final direction; 1-D params take the grafting direction.  Non-finite
    steps are skipped on the device; ``process_group=`` spreads the roots over data-parallel
    ranks.  Details, state layout and host syncs: docs/shampoo.md.

    Args:
        params: iterable of params or of param-group dicts (lr, betas, weight_decay per group).
        lr: learning rate (default: 1e-3; with ``grafting='adam'`` an Adam learning rate).
        betas: momentum and factor decay (default: (0.9, 0.999)).
        epsilon, relative_epsilon: (default: 1e-12, 1e-4: above the factors' rounding).
        weight_decay, decoupled_weight_decay: (default: 0, True: AdamW style; False: L2).
        max_preconditioner_dim: merging bound and block size (default: 1024).
        merge_dims, precondition_1d: (default: True, False).
        precondition_frequency, start_preconditioning_step: (default: None: automatic, 10).
        refresh_budget: the most the automatic root updates may take of the training time
            (default 0.1; None: every 10 steps). ``refresh_timer``: its clock.
        grafting: ``'adam'`` (default), ``'adagrad'``, ``'sgd'`` or None.
        grafting_epsilon, grafting_beta2: (default: 1e-8, 0.999).
        root_method: ``'eigh'`` (default) or ``'newton'``.
        factor_dtype: ``torch.float32`` (default) or ``torch.float64``.
        max_root_failures: consecutive failed roots of a factor that raise (default: 5).
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.
        process_group: data parallel: the ranks the roots are spread over (default: None).

    Example::

        opt = soo_ext.Shampoo(model.parameters(), lr=1e-3)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """

    OPTIONS, UNCAST = OPTIONS, _UNCAST

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, *,
                 relative_epsilon: float = 1e-4,
                 decoupled_weight_decay: bool = True, max_preconditioner_dim: int = 1024,
                 merge_dims: bool = True, precondition_1d: bool = False,
                 precondition_frequency: int | None = None,
                 start_preconditioning_step: int = 10, refresh_budget: float | None = 0.1,
                 grafting: str | None = "adam", grafting_epsilon: float = 1e-8,
                 grafting_beta2: float = 0.999, root_method: str = "eigh",
                 factor_dtype: torch.dtype = torch.float32, max_root_failures: int = 5,
                 on_nonfinite: str = "skip", process_group=None, refresh_timer=None) -> None:
        defaults = {"lr": lr, "betas": betas, "epsilon": epsilon,
                    "relative_epsilon": relative_epsilon, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay,
                    "max_preconditioner_dim": max_preconditioner_dim, "merge_dims": merge_dims,
                    "precondition_1d": precondition_1d,
                    "precondition_frequency": precondition_frequency,
                    "refresh_budget": refresh_budget,
                    "start_preconditioning_step": start_preconditioning_step,
                    "grafting": grafting, "grafting_epsilon": grafting_epsilon,
                    "grafting_beta2": grafting_beta2, "root_method": root_method,
                    "factor_dtype": factor_dtype, "max_root_failures": max_root_failures,
                    "on_nonfinite": on_nonfinite}
        self._process_group = check_process_group(process_group)
        self._schedule = RefreshSchedule("Shampoo roots", timer=refresh_timer)
        # self._run: (layout options, blocking, roots, grafting)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # load_state_dict comes here too: it keeps the group; a copy or unpickling has none
        self.__dict__.setdefault("_process_group", None)
        self.__dict__.setdefault("_schedule", RefreshSchedule("Shampoo roots"))
        for group in self.param_groups:  # saved before relative_epsilon: continue without it
            group.setdefault("relative_epsilon", 0.0)

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional) runs forward and backward and returns the loss."""
        loss = call_closure(closure)
        if not any(p.grad is not None for p in all_params(self)):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        _check_options(self)
        blocking, roots, grafting, graft_state, momentum = self._prepare()
        groups, o = self.param_groups, self.param_groups[0]
        gstate = self.state[blocking.params[0].p]
        k = gstate["step"] + 1
        self._skips.watch(gstate["nonfinite_steps"])
        grad = roots.load_grads([_dense_grad(P.p) for P in blocking.params])
        present = roots.present
        guard = SkipGuard.check([grad], o["on_nonfinite"], gstate["nonfinite_steps"],
                                "Shampoo: the gradient is not finite")
        # From here every update is masked: on a skipped step the gradient is zero (NaN * 0 is
        # NaN, so it is replaced, not scaled) and every decay is 1.
        okf = guard.ok.to(roots.dtype)
        fill_if_(grad, guard.bad, 0.0)
        if not o["decoupled_weight_decay"]:
            for P, g, has_grad in zip(blocking.params, roots.grad_views, present):
                if has_grad and groups[P.group]["weight_decay"] != 0:
                    g.addcmul_(P.p, okf, value=groups[P.group]["weight_decay"])
        # Steps taken, this one included (>= 1 for the bias corrections of a skipped step).
        taken = (k - gstate["nonfinite_steps"]).clamp_min(1).to(torch.float64)
        stacked = roots.update(guard, tuple(g["betas"][1] for g in groups))
        gstate["step"] = k
        start = o["start_preconditioning_step"]
        record = _refresh_record(self, gstate, max(k - start, 0))
        if k >= start and _roots_due(o, k - start, record):
            roots.update_roots(guard, o["epsilon"], o["relative_epsilon"], o["root_method"],
                               o["max_root_failures"], gstate, k, self._process_group)
        if graft_state is None:
            dirs, dir_views = grad, roots.grad_views
        else:
            if all(present):
                grafting.update([graft_state], [grad], guard)
            else:
                have = [i for i, has_grad in enumerate(present) if has_grad]
                views = [self.state[blocking.params[i].p][grafting.state_key] for i in have]
                grafting.update(views, [roots.grad_views[i] for i in have], guard)
            dirs, dir_views = roots.direction, roots.direction_views
            grafting.precondition([graft_state], [grad], taken, out=[dirs])
        if k >= start:
            roots.precondition(stacked, dirs, rescale=o["grafting"] is not None)
        _momentum_steps_(self, blocking, present, momentum, dirs, dir_views, guard, okf, taken)
        if record is not None and k >= start:
            self._schedule.after_step(record, k - start, blocking.params[0].p.device,
                                      self._process_group)
        return loss

    def _prepare(self) -> tuple[ShampooBlocking, ShampooRoots, SGDGrafting, Tensor | None,
                                Tensor]:
        """The blocking, roots, grafting, flat grafting state (None without one) and flat
        momentum of the run, built at the first step and whenever a layout option changed; the
        state entries are views of the roots' buckets and of the flat buffers."""
        o = self.param_groups[0]
        key = tuple(o[k] for k in _LAYOUT_OPTIONS)
        if self._run is not None and self._run[0] == key:
            return self._run[1:]
        blocking = ShampooBlocking([g["params"] for g in self.param_groups],
                                   o["max_preconditioner_dim"], o["merge_dims"],
                                   o["precondition_1d"])
        p0 = blocking.params[0].p
        roots = ShampooRoots(blocking, p0.dtype, o["factor_dtype"], p0.device)
        grafting = make_grafting(o["grafting"], o["grafting_epsilon"], o["grafting_beta2"])
        graft_state, momentum = _attach_state(self.state, blocking, roots, grafting)
        gstate = self.state[p0]
        gstate.setdefault("step", 0)
        gstate.setdefault("root_updates", 0)
        for name in ("nonfinite_steps", "failed_roots"):
            counter = gstate.get(name)
            gstate[name] = (torch.zeros((), dtype=torch.int64, device=p0.device) if counter is None
                            else counter.to(p0.device))
        record = gstate.get("refresh_schedule")  # the automatic schedule's: new sizes, measure
        sizes = [d for P in blocking.params for d in (*P.p.shape, -1)] + [int(o[k]) for k in (
            "max_preconditioner_dim", "merge_dims", "precondition_1d")]
        if record is not None and record.get("sizes") != sizes:
            record["sizes"] = sizes
            self._schedule.restart(record, max(gstate["step"] - o["start_preconditioning_step"], 0))
        self._sizes = sizes
        self._run = (key, blocking, roots, grafting, graft_state, momentum)
        return blocking, roots, grafting, graft_state, momentum


def _attach_state(states: dict, blocking: ShampooBlocking, roots: ShampooRoots,
                  grafting: SGDGrafting) -> tuple[Tensor | None, Tensor]:
    """Each param's state for a new layout, as views of the new buffers: its momentum and
    grafting state and its blocks' factors, roots and failure counts (the saved ones copied in,
    or zero; ValueError if they do not fit, before any of them is attached).  Returns the flat
    grafting state (None without one) and the flat momentum."""
    graft_state = roots.flat() if grafting.state_key else None
    graft_views = roots.flat_views(graft_state) if grafting.state_key else None
    momentum = roots.flat()
    momentum_views = roots.flat_views(momentum)
    assign = []
    for i, P in enumerate(blocking.params):
        state = states[P.p]
        for name in ("momentum_buffer",) + ((grafting.state_key,) if grafting.state_key
                                            else ()):
            if name in state and state[name].shape != P.p.shape:
                raise ValueError(f"Shampoo state {name!r} has shape "
                                 f"{tuple(state[name].shape)}, expected {tuple(P.p.shape)}")
        if "momentum_buffer" in state:
            momentum_views[i].copy_(state["momentum_buffer"])
        assign.append((state, "momentum_buffer", momentum_views[i]))
        if graft_views is not None:
            saved = state.get(grafting.state_key)
            if saved is not None:
                graft_views[i].copy_(saved)
            assign.append((state, grafting.state_key, graft_views[i]))
        if P.merged is None:
            stale = [name for name in ("factors", "roots", "root_failures") if name in state]
            if stale:
                raise ValueError(f"Shampoo state {stale[0]!r} of a param of shape "
                                 f"{tuple(P.p.shape)} that is not preconditioned with these "
                                 "options (max_preconditioner_dim, merge_dims, "
                                 "precondition_1d differ from the saved run's)")
            continue
        for name, views in roots.views(i).items():
            saved = state.get(name)
            if saved is not None:
                if len(saved) != len(views) or any(a.shape != b.shape
                                                   for a, b in zip(saved, views)):
                    raise ValueError(
                        f"Shampoo state {name!r} of a param of shape {tuple(P.p.shape)} "
                        "does not match its blocks (max_preconditioner_dim, merge_dims "
                        "or precondition_1d differ from the saved run's)")
                for v, s in zip(views, saved):
                    v.copy_(s)
            assign.append((state, name, views))
    for state, name, views in assign:  # only once every param's state fits
        state[name] = views
    return graft_state, momentum


def _check_options(opt: Shampoo) -> None:
    """The groups' options checked (ValueError naming a bad one), when they changed since the
    last check (a step's options are usually the last step's)."""
    checks = opt.__dict__.get("_checks")
    if checks is None:
        checks = opt._checks = OptionChecks(OPTIONS)
    checks(opt.param_groups)


def _refresh_record(opt: Shampoo, gstate: dict, n: int) -> dict | None:
    """The automatic schedule's record (in the state), None when it is off; a new one's first
    window starts at step ``n`` (the schedule may be turned on mid-run)."""
    o = opt.param_groups[0]
    if o["precondition_frequency"] is not None or o["refresh_budget"] is None:
        return None
    opt._schedule.budget = o["refresh_budget"]
    return gstate.setdefault("refresh_schedule",
                             {**RefreshSchedule.new_record(), "anchor": n, "sizes": opt._sizes})


def _roots_due(o: dict, n: int, record: dict | None) -> bool:
    """Whether the roots are updated ``n`` steps after ``start_preconditioning_step`` (options
    ``o``): every ``precondition_frequency`` steps, or automatic (``record``: the schedule's)."""
    if record is not None:
        return RefreshSchedule.due(record, n)
    every = o["precondition_frequency"]
    return n % (10 if every is None else every) == 0


def _momentum_steps_(opt: Shampoo, blocking: ShampooBlocking, present: list[bool],
                     momentum: Tensor, dirs: Tensor, dir_views: list[Tensor], guard: SkipGuard,
                     okf: Tensor, taken: Tensor) -> None:
    """``m <- beta1 m + (1 - beta1) d``, ``p <- p - lr m / (1 - beta1^t)`` with each group's
    options (decoupled weight decay ``p <- p - lr wd p`` first) for the params with a gradient;
    nothing changes on a skipped step.  The momentum is one op on the flat buffers when every
    param has a gradient and one ``beta1`` holds for all."""
    groups = opt.param_groups
    decoupled = groups[0]["decoupled_weight_decay"]
    state = opt.state
    flat = all(present) and len({g["betas"][0] for g in groups}) == 1
    if flat and groups[0]["betas"][0] > 0:
        beta1 = groups[0]["betas"][0]
        momentum.mul_(guard.unless_skipped(beta1, okf))
        momentum.add_(dirs, alpha=1 - beta1)
    for gi, group in enumerate(groups):
        members = [i for i in blocking.by_group[gi] if present[i]]  # the others stay
        if not members:
            continue
        params = [blocking.params[i].p for i in members]
        lr, wd, beta1 = group["lr"], group["weight_decay"], group["betas"][0]
        if decoupled and wd != 0:
            torch._foreach_mul_(params, guard.unless_skipped(1 - lr * wd, okf))
        if beta1 > 0:
            bufs = [state[p]["momentum_buffer"] for p in params]
            if not flat:
                torch._foreach_mul_(bufs, guard.unless_skipped(beta1, okf))
                torch._foreach_add_(bufs, [dir_views[i] for i in members], alpha=1 - beta1)
            correction = (1 - torch.pow(beta1, taken)).to(okf.dtype)
            coef = torch.where(guard.ok, -lr / correction, 0.0)
            updates = bufs
        else:
            coef = torch.where(guard.ok, okf.new_full((), -lr), 0.0)
            updates = [dir_views[i] for i in members]
        torch._foreach_addcmul_(params, updates, [coef] * len(params))


def _dense_grad(p: Tensor) -> Tensor | None:
    """``p.grad`` (None if None); RuntimeError if sparse or complex."""
    g = p.grad
    if g is None:
        return None
    if g.layout != torch.strided:
        raise RuntimeError(f"Shampoo does not support sparse gradients (got {g.layout})")
    if g.is_complex():
        raise RuntimeError("Shampoo does not support complex gradients")
    return g
