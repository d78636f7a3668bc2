"""K-FAC (Martens & Grosse 2015; KAISA's defaults): the preconditioner of soo_ext.curvature's
K-FAC layers and factors, and SGD with momentum, in one ``step()``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._support.closure import call_closure
from .._support.distributed import check_process_group
from .._support.errors import NonFiniteError
from .._support.guard import MaskedSteps, SkipGuard, SkipWarner, fill_if_, select
from .._support.options import Bool, Int, Number, OneOf, OptionChecks, OptionSpecs
from .._support.params import (add_param_group_checked, all_params, check_dense_grads,
                               check_params, group_index, load_state_dict_uncast)
from .._support.step_wrapper import OnDemandStepWrapper
from ..curvature.kfac_factors import (COUNTER_KEYS, EigenFactors, FactorStore, InverseFactors,
                                      KFACFactors, KFACLayout, LayerGradients, load_views,
                                      preconditioned_directions)
from ..curvature.first_order_fallback import (OPTIONS as FALLBACK, PER_GROUP as FALLBACK_GROUP,
                                              UNCAST as FALLBACK_UNCAST, adamw_fallback_,
                                              fallback_params, restore_uncast, sgd_lr)
from ..curvature.kfac_layers import (KFACLayer, LayerCapture, compiled_inner, find_layers,
                                     skip_patterns)
from ..curvature.refresh_schedule import RefreshSchedule
from .hooked import ModelHooks

__all__ = ["KFAC"]

OPTIONS = OptionSpecs({
    "lr": Number(0, high_open=True), "momentum": Number(0, 1, high_open=True),
    "weight_decay": Number(0, high_open=True),
    "damping": Number(0, low_open=True, high_open=True), "factor_decay": Number(0, 1),
    "kl_clip": Number(0, low_open=True, high_open=True, none=True),
    "kl_clip_lr": OneOf("current", "peak"),
    "factor_update_steps": Int(1, none=True), "inv_update_steps": Int(1, none=True),
    "refresh_budget": Number(0, 1, low_open=True, high_open=True, none=True),
    "accumulation_steps": Int(1),
    "mode": OneOf("eigen", "inverse"), "factor_dtype": OneOf(torch.float32, torch.float64),
    "on_nonfinite": OneOf("raise", "skip"), "batch_averaged": Bool(), "spread_inverses": Bool(),
    **FALLBACK}, per_group=("lr", "momentum", "weight_decay") + FALLBACK_GROUP)
# Per-layer state entries that are views of the factors: Optimizer.load_state_dict must not cast
# them (float64 factors with float32 params), they are copied into the buckets instead.
_VIEW_KEYS = ("A", "G") + EigenFactors.KEYS + InverseFactors.KEYS + COUNTER_KEYS
_UNCAST = _VIEW_KEYS + ("nonfinite_steps",) + FALLBACK_UNCAST


class KFAC(ModelHooks, OnDemandStepWrapper):
    r"""K-FAC, Kronecker-factored approximate curvature (Martens & Grosse, ICML 2015), with
    KAISA's defaults (Pauloski et al. 2021; not its refresh intervals, clip under a decaying lr
    and fallback), as one optimizer: the preconditioner and SGD with momentum in one ``step()``.

    Every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of ``model`` (compiled or not) whose
    params are optimised here (in one group, not tied) is preconditioned by
    ``(A ⊗ G + damping)^{-1}`` from running averages of its activation and output-gradient
    statistics, captured by hooks; the direction is KL-clipped and taken by SGD with momentum;
    the other params take the ``fallback`` step, AdamW's or SGD's (a warning names them).
    Factors of one size share one bucket (one op call per size). Gradient accumulation, AMP
    (``grad_scaler=``), data parallelism (DDP: statistics averaged, decompositions spread over
    the ranks), non-finite steps skipped on the device: see docs/kfac.md for all of it.

    Args:
        model: the nn.Module whose layers are hooked (or its ``torch.compile`` wrapper).
        lr, momentum, weight_decay: of the SGD step (0.1, 0.9, 0; per group).
        damping: lambda (default 1e-3).
        factor_decay: running-average decay of the factors, per update (default 0.95).
        kl_clip, kl_clip_lr: kappa of the KL clip, or None (default 1e-3); its lr, ``'peak'``
            (default: the largest so far) or ``'current'`` (KAISA's).
        factor_update_steps, inv_update_steps: steps between factor updates and between
            decompositions; None (default): automatic, ``refresh_budget``/``refresh_timer``.
        mode, on_nonfinite: ``'eigen'`` (default) or ``'inverse'``, ``'skip'`` or ``'raise'``.
        skip_layers: module or class names (regexes, full match) not to precondition.
        factor_dtype: ``torch.float32`` (default) or ``torch.float64``.
        accumulation_steps: backward passes per step (default 1).
        batch_averaged: the loss is a mean over the batch (default True).
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale.
        params: the params to optimise (default: all of ``model``'s).
        process_group: data-parallel ranks (default: a DDP ``model``'s group).
        spread_inverses: spread the decompositions over the ranks (default True).
        fallback: the others' step, ``'adamw'`` (default) or ``'sgd'``; ``fallback_lr`` etc.: docs.

    Example::

        opt = soo_ext.KFAC(model, lr=0.1)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """

    _OPTIONS, _UNCAST = OPTIONS, _UNCAST  # a subclass's options and uncast state entries

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3, factor_decay: float = 0.95,
                 kl_clip: float | None = 1e-3, factor_update_steps: int | None = None,
                 inv_update_steps: int | None = None, mode: str = "eigen", *,
                 kl_clip_lr: str = "peak", skip_layers=None,
                 on_nonfinite: str = "skip", factor_dtype: torch.dtype = torch.float32,
                 accumulation_steps: int = 1, batch_averaged: bool = True, grad_scaler=None,
                 params=None, process_group=None, spread_inverses: bool = True,
                 refresh_budget: float | None = 0.25, refresh_timer=None, fallback: str = "adamw",
                 fallback_lr=None, fallback_betas=(0.9, 0.999), fallback_eps=1e-8) -> None:
        kfac_init(self, locals())

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs that K-FAC preconditions."""
        return [(l.name, l.module) for l in self._layers]

    def add_param_group(self, param_group: dict) -> None:
        add_param_group_checked(self, param_group, lambda: (
            self._OPTIONS.check(self.param_groups[-1]),
            check_params(all_params(self), type(self).__name__)))

    def load_state_dict(self, state_dict: dict) -> None:
        restore_uncast(kept := load_state_dict_uncast(self, state_dict, self._UNCAST), self.state)
        self._store.factors = None  # fresh factors with the loaded options
        try:
            self._OPTIONS.check_groups(self.param_groups)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {exc}") from None
        self._between_steps()
        load_views(self._factors(), self._layers, kept, self.state, type(self).__name__)

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional) runs forward and backward and returns the loss."""
        loss = call_closure(closure)
        params = all_params(self)
        if not any(p.grad is not None for p in params):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        self._checks(self.param_groups)
        o, group_of = self.param_groups[0], group_index(self)
        self._store.configure(self._mode(o), o["factor_dtype"], o["damping"])
        check_dense_grads(params, type(self).__name__)
        factors, glob = self._factors(), self._global_state()
        k = glob["step"]
        self._skips.watch(glob["nonfinite_steps"])
        captured = self._capture.active and self._statistics_due(k)
        factor_step = captured and _refresh_due(self, "factor_update_steps", k)
        with_grads = [l for l in self._layers if l.has_grads()] if factors else []
        self._capture.check(captured, bool(with_grads))
        layers = [l for l in with_grads
                  if self.state[l.weight]["factor_updates"] > 0 or (factor_step and l.captures)]
        grads = factors.gradients(layers, [self.param_groups[group_of[id(l.weight)]][
            "weight_decay"] for l in layers]) if factors else LayerGradients([], None)
        grads.gather()
        plain = [p for p in params if p.grad is not None and id(p) not in grads.param_ids]
        staged = factors.staged_statistics(self._process_group) if captured and factors else []
        guard = self._guard([p.grad for p in plain] + staged + grads.tensors(), glob)
        grads.add_weight_decay_()
        if guard:
            grads.zero_where_(guard.bad)
        ok = guard.ok if guard else None
        if factors is not None:
            if factor_step:
                factors.commit(o["factor_decay"], ok)
            if _refresh_due(self, "inv_update_steps", k):
                spread = self._process_group if o["spread_inverses"] else None
                factors.refresh(o["damping"], ok, spread)
            if captured:
                self._statistics_captured(factors, k, ok)
        directions = preconditioned_directions(
            factors, grads, o["damping"], o["kl_clip"],
            lambda l: _clip_lr(self, l, group_of)) if grads.active else []
        _momentum_and_fallback_(self, directions, plain, group_of, guard, ok)
        _refresh_timed(self, glob, k, params[0].device)
        glob["step"] = k + 1
        for l in self._layers if factor_step else []:
            if l.captures:
                self.state[l.weight]["factor_updates"] += 1
        self._between_steps()
        return loss

    def _mode(self, o: dict) -> str:
        """The factors' mode (``FactorStore.configure``) under the options ``o``."""
        return o["mode"]

    def _statistics_due(self, k: int) -> bool:
        """Whether the layers' statistics are captured for step ``k``."""
        return _refresh_due(self, "factor_update_steps", k)

    def _statistics_captured(self, factors: KFACFactors, k: int, ok: Tensor | None) -> None:
        """After the factors' commit and refresh at a step ``k`` with captured statistics: K-FAC
        has nothing more to update (EKFAC its scaling)."""

    def _factors(self) -> KFACFactors | None:
        """The factors (made at the first use); the state holds views of them."""
        if not self._layers:
            return None
        factors = self._store.get()
        if self._in_state is not factors:
            for layer in self._layers:
                self.state[layer.weight].update(factors.views(layer))
                self.state[layer.weight].setdefault("factor_updates", 0)
            self._in_state = factors
        return factors

    def _global_state(self) -> dict:
        """The global state (under the first param): ``step`` and ``nonfinite_steps``."""
        glob = self.state[self.param_groups[0]["params"][0]]
        glob.setdefault("step", 0)
        if not isinstance(glob.get("nonfinite_steps"), Tensor):
            glob["nonfinite_steps"] = torch.zeros((), dtype=torch.int64,
                                                  device=self.param_groups[0]["params"][0].device)
        return glob

    def _guard(self, checked: list[Tensor], glob: dict) -> SkipGuard | None:
        """The step's skip guard (None: nothing to mask), or NonFiniteError ('raise')."""
        policy = self.param_groups[0]["on_nonfinite"]
        try:
            guard = SkipGuard.check(checked, policy, glob["nonfinite_steps"],
                                    f"{type(self).__name__}: the gradient (or a captured "
                                    "activation / output gradient) is not finite") \
                if checked else None
        except NonFiniteError:
            self._between_steps()
            raise
        return guard if policy == "skip" else None

    def _between_steps(self) -> None:
        """Drop what was captured since the last step; hand the current options to the
        components (the capture runs between steps)."""
        self._capture.reset()
        if self._store.factors is not None:
            self._store.factors.reset_staged()
        o = self.param_groups[0]
        if self._store.factors is None:
            self._store.configure(self._mode(o), o["factor_dtype"], o["damping"])
        glob = self.state.get(o["params"][0], {}) if o["params"] else {}
        self._capture.configure(self._statistics_due(glob.get("step", 0)),
                                o["batch_averaged"], o["accumulation_steps"])


def kfac_init(opt: KFAC, args: dict) -> None:
    """``opt.__init__`` (KFAC's or a subclass's), from its arguments (``args``: the options'
    and the others)."""
    model = compiled_inner(args["model"])  # torch.compile(model): its module
    process_group = args["process_group"]
    if process_group is None and isinstance(model, nn.parallel.DistributedDataParallel):
        process_group = getattr(model, "process_group", None)
    opt._process_group = check_process_group(process_group)
    defaults = {name: args[name] for name in opt._OPTIONS.specs}  # the options' arguments
    opt._OPTIONS.check(defaults)
    patterns = skip_patterns(args["skip_layers"])
    params = args["params"]
    Optimizer.__init__(opt, model.parameters() if params is None else params, defaults)
    opt._layers = find_layers(model, group_index(opt), patterns, owner=type(opt).__name__,
                              stacklevel=5,  # the caller of KFAC.__init__ (or a subclass's)
                              step=f"fallback step ({args['fallback']})")
    opt._store = FactorStore(KFACLayout(opt._layers), type(opt).__name__)
    opt._capture = LayerCapture(opt._layers, opt._store.get, args["grad_scaler"],
                                type(opt).__name__)
    opt._in_state = None  # the KFACFactors whose views the state holds
    opt._skips = SkipWarner(type(opt).__name__)
    opt._checks = OptionChecks(opt._OPTIONS)  # skipped while no option changed
    opt._masked_steps = MaskedSteps()  # the preconditioned params' steps, masked
    opt._schedule = RefreshSchedule(f"{type(opt).__name__} factors and decompositions",
                                    timer=args["refresh_timer"])
    opt._between_steps()


def _clip_lr(opt: KFAC, layer: KFACLayer, group_of: dict[int, int]) -> float:
    """The lr at which the KL clip measures ``layer``'s step: its group's lr, or with
    ``kl_clip_lr='peak'`` the largest so far (``peak_lr`` in the weight's state, updated)."""
    lr = opt.param_groups[group_of[id(layer.weight)]]["lr"]
    if opt.param_groups[0]["kl_clip_lr"] == "current":
        return lr
    st = opt.state[layer.weight]
    st["peak_lr"] = peak = max(st.get("peak_lr", lr), lr)
    return peak


def _refresh_due(opt: KFAC, option: str, k: int) -> bool:
    """Whether step ``k`` updates the factors (``option='factor_update_steps'``) or decomposes
    them (``'inv_update_steps'``): every ``option`` steps, or automatic when it is None
    (:class:`~soo_ext.curvature.refresh_schedule.RefreshSchedule`)."""
    every = opt.param_groups[0][option]
    if every is not None:
        return k % every == 0
    first = opt.param_groups[0]["params"]
    record = _refresh_record(opt, opt.state.get(first[0], {}) if first else {}, create=False)
    return record is None or RefreshSchedule.due(record, k)


def _refresh_record(opt: KFAC, glob: dict, create: bool = True) -> dict | None:
    """The automatic schedule's record in the global state ``glob`` (a fresh one if there is
    none; ``create``: stored there), None when the schedule is off."""
    o = opt.param_groups[0]
    if o["refresh_budget"] is None or (o["factor_update_steps"] is not None
                                       and o["inv_update_steps"] is not None):
        return None
    opt._schedule.budget = o["refresh_budget"]
    record = glob.get("refresh_schedule")
    if record is None:  # its first window starts now (the schedule may be turned on mid-run)
        record = {**RefreshSchedule.new_record(), "anchor": glob.get("step", 0)}
        if create:
            glob["refresh_schedule"] = record
    return record


def _refresh_timed(opt: KFAC, glob: dict, k: int, device: torch.device) -> None:
    """At the end of step ``k``: the automatic schedule's clock reading (if it is on)."""
    record = _refresh_record(opt, glob)
    if record is not None:
        opt._schedule.after_step(record, k, device, opt._process_group)


def _sgd_directions(params: list[Tensor], weight_decays: list[float],
                    guard: SkipGuard | None) -> list[tuple[Tensor, Tensor]]:
    """``(param, g + wd p)`` as torch.optim.SGD (zero on a skipped step), by weight decay in one
    foreach op each."""
    by_wd: dict[float, list[Tensor]] = {}
    for p, wd in zip(params, weight_decays):
        by_wd.setdefault(wd, []).append(p)
    out = []
    for wd, ps in by_wd.items():
        grads = [p.grad for p in ps]
        if wd != 0:
            ds = torch._foreach_add(grads, ps, alpha=wd)
            if guard:
                for d in ds:
                    fill_if_(d, guard.bad, 0)
        elif guard:
            ds = [select(guard.ok, g, 0.0) for g in grads]
        else:
            ds = grads
        out += zip(ps, ds)
    return out


def _momentum_and_fallback_(opt: Optimizer, directions: list[tuple[Tensor, Tensor]],
                            plain: list[Tensor], group_of: dict[int, int],
                            guard: SkipGuard | None, ok: Tensor | None) -> None:
    """SGD with momentum along the preconditioned ``directions``; the fallback step of the
    left-out params ``plain`` (``fallback``: SGD with momentum at ``fallback_lr`` or AdamW).
    ``opt``: KFAC, EKFAC or NaturalGradient (the fallback options, ``_masked_steps``)."""
    groups = opt.param_groups
    masks = guard if ok is not None else None
    if directions:
        _sgd_momentum_(groups, opt.state, group_of, directions, masks, masked=opt._masked_steps)
    if plain:
        sgd, adamw = fallback_params(plain, groups[0])
        if sgd:
            _sgd_momentum_(groups, opt.state, group_of, _sgd_directions(
                sgd, [groups[group_of[id(p)]]["weight_decay"] for p in sgd], guard), masks,
                sgd_lr)
        if adamw:
            adamw_fallback_(groups, opt.state, group_of, adamw, ok)


def _sgd_momentum_(groups: list[dict], state: dict, group_of: dict[int, int],
                   directions: list[tuple[Tensor, Tensor]], guard: SkipGuard | None,
                   lr_of: Callable[[dict], float] = lambda g: g["lr"],
                   masked: MaskedSteps | None = None) -> None:
    """``buf <- m buf + d``, ``p <- p - lr buf`` per param group, as torch.optim.SGD's foreach
    path; masked by ``guard`` (nothing changes on a skipped step; None: no masking): the steps
    by ``masked`` (kept buffers: one copy and one fill), or by a select per param."""
    by_group: dict[int, tuple[list, list]] = {}
    for p, d in directions:
        ps, ds = by_group.setdefault(group_of[id(p)], ([], []))
        ps.append(p)
        ds.append(d)
    for gi, (ps, ds) in by_group.items():
        m, lr = groups[gi]["momentum"], lr_of(groups[gi])
        if m != 0:
            bufs = []
            for p in ps:
                st = state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            if guard is None:
                torch._foreach_mul_(bufs, m)
            else:
                torch._foreach_mul_(bufs, guard.unless_skipped(m, bufs[0]))
            torch._foreach_add_(bufs, ds)
            if guard is None:
                steps = bufs
            elif masked is not None:
                steps = masked(gi, bufs, guard.bad)
            else:  # +0 where skipped (see MaskedSteps)
                steps = [select(guard.ok, b, 0.0) for b in bufs]
        else:
            steps = ds  # already zero on a skipped step
        torch._foreach_add_(ps, steps, alpha=-lr)
