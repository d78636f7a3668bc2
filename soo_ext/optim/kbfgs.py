"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou 2020): the Kronecker-factored quasi-Newton
preconditioner of soo_ext.curvature.kbfgs on K-FAC's layers, with gradient momentum, in one
``step(closure)``."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .._support.closure import call_closure
from .._support.distributed import check_process_group
from .._support.guard import MaskedSteps, SkipGuard, SkipWarner, all_finite, fill_if_
from .._support.options import Bool, Int, Number, OneOf, OptionSpecs
from .._support.params import (add_param_group_checked, all_params, check_dense_grads,
                               check_params, group_index, load_state_dict_uncast)
from .._support.step_wrapper import OnDemandStepWrapper
from ..curvature.kbfgs import (LazyStatistics, bfgs_update_, layer_matrix, lbfgs_matrix_product,
                               PairGroup, refresh_inverses_, size_groups)
from ..curvature.kfac_layers import LayerCapture, compiled_inner, find_layers, skip_patterns
from ..curvature.lbfgs_history import LBFGSHistory

__all__ = ["KBFGS"]


class _HistorySize(Int):
    """None (BFGS on the pre-activations) or the number of L-BFGS pairs."""

    requirement = "None or an int >= 1"

    def accepts(self, value) -> bool:
        return value is None or super().accepts(value)


OPTIONS = OptionSpecs({
    "lr": Number(0, high_open=True), "momentum": Number(0, 1, high_open=True),
    "weight_decay": Number(0, high_open=True),
    "damping": Number(0, 1, low_open=True, high_open=True), "factor_decay": Number(0, 1),
    "pair_decay": Number(0, 1, high_open=True),
    "powell": Number(0, 1, low_open=True, high_open=True), "inv_update_steps": Int(1),
    "history_size": _HistorySize(1), "on_nonfinite": OneOf("raise", "skip"),
    "batch_averaged": Bool(), "accumulation_steps": Int(1),
}, per_group=("lr", "momentum", "weight_decay"))
NEEDS_CLOSURE = (
    "KBFGS.step() requires a closure: K-BFGS evaluates the loss and gradients twice per step "
    "(after the update, a second forward-backward pass on the same minibatch gives the (s, y) "
    "pairs of its pre-activation factors). Call opt.step(closure) with a closure that calls "
    "opt.zero_grad(), computes the loss on the minibatch, calls loss.backward() and returns "
    "the loss")
NO_CAPTURE = (
    "KBFGS.step(): the closure ran no backward pass of the model's layers (call "
    "loss.backward() in the closure, with the model in training mode and grad enabled)")
SCALER_UNSCALED = (
    "KBFGS.step(): the grad_scaler had unscaled this optimizer's gradients already. KBFGS "
    "unscales the closure's gradients itself: call opt.step(closure) and then "
    "scaler.update(), not scaler.step(opt, closure), and do not call scaler.unscale_(opt)")
_UNCAST = ("nonfinite_steps", "history")


class KBFGS(OnDemandStepWrapper):
    r"""K-BFGS / K-BFGS(L), Kronecker-factored block-diagonal BFGS (Goldfarb, Ren & Bahamou,
    "Practical Quasi-Newton Methods for Training Deep Neural Networks", NeurIPS 2020).

    Every layer K-FAC would precondition (the others, listed in a warning, take the plain
    step) moves along ``-H_g m H_a``: ``m`` the momentum of its gradient, ``H_a`` the damped
    inverse of the running activation factor (as K-FAC, refreshed every ``inv_update_steps``),
    ``H_g`` a BFGS (``history_size=None``) or L-BFGS (``history_size=m``: K-BFGS(L)) matrix on
    the layer's pre-activations.  After the update a second forward-backward pass on the same
    minibatch gives each layer's pair ``s = mean(h+ - h)``, ``y = mean(g+ - g)``,
    double-damped (Powell on H, then Levenberg-Marquardt) before it enters ``H_g``.  So
    ``step(closure)`` requires a closure (torch's: ``zero_grad()``, loss, ``backward()``,
    return the loss) and calls it twice; it returns the first loss.  A non-finite first pass
    is skipped or raises, a non-finite second pass drops the pairs.  See docs/kbfgs.md.

    Args:
        model: the nn.Module whose layers are hooked (or its ``torch.compile`` wrapper).
        lr, momentum, weight_decay: per group (1; the authors' lr 0.3: docs/kbfgs.md),
            0.9, 0.
        damping: lambda in (0, 1) (default 0.3): ``H_a = (A + sqrt(lambda) I)^-1``, mu2.
        factor_decay, pair_decay: running-average decays of A and of the pairs (0.9, 0.9).
        powell, inv_update_steps: mu1 of Powell's damping, steps between ``H_a`` refreshes
            (default 0.2, 20).
        history_size: None (default: BFGS) or the L-BFGS pairs kept per layer.
        skip_layers, on_nonfinite (``'skip'``, ``'raise'``), params, process_group: as KFAC.
        batch_averaged, accumulation_steps: the loss is a batch mean (default True); backward
            passes per closure call (default 1).
        grad_scaler: a ``torch.amp.GradScaler``: ``step`` unscales the closure's gradients.

    Example::

        opt = soo_ext.KBFGS(model)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    """

    def __init__(self, model: nn.Module, lr: float = 1.0, history_size: int | None = None, *,
                 momentum: float = 0.9, weight_decay: float = 0.0, damping: float = 0.3,
                 factor_decay: float = 0.9, pair_decay: float = 0.9, powell: float = 0.2,
                 inv_update_steps: int = 20, skip_layers=None, on_nonfinite: str = "skip",
                 batch_averaged: bool = True, accumulation_steps: int = 1, grad_scaler=None,
                 params=None, process_group=None) -> None:
        model = compiled_inner(model)
        if process_group is None and isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = getattr(model, "process_group", None)
        self._process_group = check_process_group(process_group)
        args = locals()
        defaults = {name: args[name] for name in OPTIONS.specs}
        OPTIONS.check(defaults)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"Invalid grad_scaler: {grad_scaler!r} (must be a "
                             "torch.amp.GradScaler or None: KBFGS unscales with it)")
        self._grad_scaler = grad_scaler
        patterns = skip_patterns(skip_layers)
        super().__init__(model.parameters() if params is None else params, defaults)
        self._layers = _find_layers(model, group_index(self), patterns)
        self._stats = LazyStatistics(self._layers)
        self._capture = LayerCapture(self._layers, self._stats, grad_scaler, "KBFGS")
        self._capture.configure(False, True, 1)  # captures only inside step()
        self._histories: dict[int, LBFGSHistory] = {}
        self._pair_groups: tuple[tuple, list] = ((), [])  # (active layers, [(rows, group)])
        self._masked = MaskedSteps()  # the gradients and steps, zeroed on a skipped step
        self._skips = SkipWarner("KBFGS")

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs that K-BFGS preconditions."""
        return [(l.name, l.module) for l in self._layers]

    def add_param_group(self, param_group: dict) -> None:
        add_param_group_checked(self, param_group, lambda: (
            OPTIONS.check(self.param_groups[-1]), check_params(all_params(self), "KBFGS")))

    def remove_hooks(self) -> None:
        """Detach from the model: later steps take the plain momentum step."""
        self._capture.remove()

    def __getstate__(self) -> dict:
        raise TypeError("KBFGS holds hooks on its model and cannot be pickled or copied; save "
                        "state_dict() instead")

    def load_state_dict(self, state_dict: dict) -> None:
        kept = load_state_dict_uncast(self, state_dict, _UNCAST)
        try:
            OPTIONS.check_groups(self.param_groups)
        except ValueError as exc:
            raise ValueError(f"KBFGS.load_state_dict: {exc}") from None
        for p, entries in kept.items():
            if "nonfinite_steps" in entries:
                entries["nonfinite_steps"] = entries["nonfinite_steps"].to(
                    device=p.device, dtype=torch.int64).clone()
            self.state[p].update(entries)
        self._histories = {}  # rebuilt from the state at the next step (and the pair groups)

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step: ``closure`` (required) is evaluated twice, its first loss returned."""
        if closure is None:
            raise RuntimeError(NEEDS_CLOSURE)
        OPTIONS.check_groups(self.param_groups)
        loss = self._evaluate(closure, second=False)
        params = all_params(self)
        if not any(p.grad is not None for p in params) or _scaler_skips(self, params):
            return loss  # nothing to step on, or the grad_scaler's skip of an inf/NaN gradient
        check_dense_grads(params, "KBFGS")
        self._capture.check(True, False)  # warns once if not a multiple of accumulation_steps
        o, group_of, glob = self.param_groups[0], group_index(self), _global_state(self)
        self._skips.watch(glob["nonfinite_steps"])
        active = [l for l in self._layers if l.has_grads() and l.captures]
        if self._capture.active and not active and any(l.has_grads() for l in self._layers):
            raise RuntimeError(NO_CAPTURE)
        states = [_layer_state(self.state[l.weight], l, o["history_size"]) for l in active]
        stats, with_grad = self._stats.stats, [p for p in params if p.grad is not None]
        guard = _guard(self, [p.grad for p in with_grad] + _first_pass(stats, active), glob)
        ok = guard.ok if guard else None
        if ok is not None and stats is not None:
            fill_if_(stats.buffers[0], guard.bad, 0)  # finite (unused) on a skipped step
        bufs = _momentum_(self, with_grad, group_of, guard)
        _factors_([st["A"] for st in states], [stats.AA[l.index] for l in active],
                  o["factor_decay"], ok)
        if glob["step"] % o["inv_update_steps"] == 0:
            refresh_inverses_(active, [st["A"] for st in states], [st["H_a"] for st in states],
                              math.sqrt(o["damping"]), ok)
        groups = _pair_groups(self, active, states)
        for group in groups:
            group.record_preactivations(stats.a[0])
        directions = dict(bufs)
        for l, st in zip(active, states):
            M = layer_matrix(l, [bufs[id(p)] for p in l.params()])
            V = (st["H_g"] @ M if o["history_size"] is None
                 else lbfgs_matrix_product(self._history(l, st), M)) @ st["H_a"]
            directions.update(_split(l, V))
        _apply_steps_(self, with_grad, directions, group_of, guard)
        self._evaluate(closure, second=True)  # the pairs of the layers captured again
        self._update_pairs(groups, ok)
        glob["step"] += 1
        return loss

    def _evaluate(self, closure: Callable, second: bool):
        """One closure call with the layers' capture on (into the first or second pass)."""
        self._capture.reset()
        if self._stats.stats is not None:
            self._stats.stats.begin(second)
        o = self.param_groups[0]
        options = (o["batch_averaged"], o["accumulation_steps"])  # kept for the step's check
        self._capture.configure(self._capture.active, *options)
        try:
            loss = call_closure(closure)
        finally:
            self._capture.configure(False, *options)
        if self._process_group is not None and self._stats.stats is not None:
            self._stats.stats.average_(self._process_group)
        return loss

    def _update_pairs(self, groups: list[PairGroup], ok: Tensor | None) -> None:
        """Each group's pairs after the second pass (its layers captured again: each run of
        them), into ``H_g`` (BFGS) or the L-BFGS histories (one host read for all pushes)."""
        o, pushes = self.param_groups[0], []
        for g in groups:
            for rows in _captured_runs(g.layers):
                if g.H is not None:
                    s, y, take = g.update_pairs_(
                        rows, self._stats.stats, lambda y, H=g.H[rows]: (H @ y[..., None])[..., 0],
                        o["pair_decay"], o["powell"], math.sqrt(o["damping"]), ok)
                    bfgs_update_(g.H[rows], s, y, take)
                    continue
                layers = g.layers[rows]
                s, y, take = g.update_pairs_(rows, self._stats.stats, lambda y: _lbfgs_hy(
                    self, layers, y), o["pair_decay"], o["powell"], math.sqrt(o["damping"]), ok)
                pushes += [(l, s[j, :l.out], y[j, :l.out], take[j]) for j, l in enumerate(layers)]
        takes = torch.stack([t for *_, t in pushes]).tolist() if pushes else []
        for (l, s, y, _), take in zip(pushes, takes):
            if take:  # pushing is a host decision (the ring's slot): one sync per step
                st = self.state[l.weight]
                self._history(l, st).push(s, y)
                st["history"] = self._histories[l.index].state_dict()

    def _history(self, l, st: dict) -> LBFGSHistory:
        h = self._histories.get(l.index)
        if h is None:
            p = l.weight
            h = LBFGSHistory(l.out, self.param_groups[0]["history_size"], p.dtype, p.device)
            if "history" in st:
                h.load_state_dict(st["history"])
            self._histories[l.index] = h
            st["history"] = h.state_dict()
        return h


def _pair_groups(opt: KBFGS, active: list, states: list[dict]) -> list[PairGroup]:
    """The active layers' pair groups (``size_groups``), kept while the state holds them."""
    key, kept = opt._pair_groups
    if key != tuple(l.index for l in active) or not all(
            g.current([states[i] for i in rows]) for rows, g in kept):
        bfgs = "H_g" in states[0] if states else True
        kept = [(rows, PairGroup([active[i] for i in rows], [states[i] for i in rows], bfgs))
                for rows in size_groups(active, 2 if bfgs else 1)]
        opt._pair_groups = tuple(l.index for l in active), kept
    return [g for _, g in kept]


def _global_state(opt: KBFGS) -> dict:
    """The global state (under the first param): ``step`` and ``nonfinite_steps``."""
    p0 = opt.param_groups[0]["params"][0]
    glob = opt.state[p0]
    glob.setdefault("step", 0)
    if not isinstance(glob.get("nonfinite_steps"), Tensor):
        glob["nonfinite_steps"] = torch.zeros((), dtype=torch.int64, device=p0.device)
    return glob


def _guard(opt: KBFGS, checked: list[Tensor], glob: dict) -> SkipGuard | None:
    """The step's skip guard (None unless ``on_nonfinite='skip'``), or NonFiniteError."""
    policy = opt.param_groups[0]["on_nonfinite"]
    guard = SkipGuard.check(checked, policy, glob["nonfinite_steps"], "KBFGS: the loss's "
                            "gradient (or a captured activation / output gradient) is not finite")
    return guard if policy == "skip" else None


def _scaler_skips(opt: KBFGS, params: list[Tensor]) -> bool:
    """Under an enabled ``grad_scaler``: the first pass's gradients unscaled by
    ``scaler.unscale_`` (which records the inf check that ``scaler.update()`` reads); True if
    one is not finite, after one host read (as ``GradScaler.step``'s): the step is not taken."""
    scaler = opt._grad_scaler
    if scaler is None or not scaler.is_enabled():
        return False
    try:
        scaler.unscale_(opt)
    except RuntimeError as exc:
        raise RuntimeError(f"{SCALER_UNSCALED} ({exc})") from None
    return not bool(all_finite([p.grad for p in params if p.grad is not None]))


def _first_pass(stats, active: list) -> list[Tensor]:
    """The first pass's statistics that the guard checks: the whole buffer (one tensor) when
    every layer takes the step, else those of the layers that do."""
    if stats is None or not active:
        return []
    if len(active) == len(stats.AA):
        return [stats.buffers[0]]
    return [t for l in active for t in (stats.AA[l.index], stats.a[0][l.index],
                                        stats.g[0][l.index])]


def _by_group(params: list[Tensor], tensors: list[Tensor], group_of: dict) -> dict:
    """``{group index: (params, tensors)}``, in the params' order."""
    out: dict[int, tuple[list, list]] = {}
    for p, t in zip(params, tensors):
        ps, ts = out.setdefault(group_of[id(p)], ([], []))
        ps.append(p)
        ts.append(t)
    return out


def _momentum_(opt: KBFGS, params: list[Tensor], group_of: dict,
               guard: SkipGuard | None) -> dict[int, Tensor]:
    """``m <- momentum m + (1 - momentum)(grad + weight_decay p)`` per param, as the authors'
    code (a lerp per param group; on a skipped step the gradients are zeroed and the weight is
    0, so ``m`` is left bit for bit); returns the buffers by param id."""
    grads = [p.grad for p in params]
    if guard is not None:
        grads = opt._masked("grads", grads, guard.bad)
    out = {}
    for gi, (ps, ds) in _by_group(params, grads, group_of).items():
        g, bufs = opt.param_groups[gi], []
        for p in ps:
            st = opt.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
            out[id(p)] = st["momentum_buffer"]
        if g["weight_decay"] != 0:
            ds = torch._foreach_add(ds, ps, alpha=g["weight_decay"])
        w = 1 - g["momentum"]
        torch._foreach_lerp_(bufs, ds, w if guard is None else torch.where(
            guard.ok, bufs[0].new_full((), w), 0.0))
    return out


def _factors_(A: list[Tensor], AA: list[Tensor], decay: float, ok: Tensor | None) -> None:
    """``A <- decay A + (1 - decay) mean(a a^T)`` (a lerp; weight 0 on a skipped step, whose
    statistics were zeroed: A is left bit for bit)."""
    if A:
        w = 1 - decay
        torch._foreach_lerp_(A, AA, w if ok is None else torch.where(ok, A[0].new_full((), w),
                                                                      0.0))


def _apply_steps_(opt: KBFGS, params: list[Tensor], directions: dict, group_of: dict,
                  guard: SkipGuard | None) -> None:
    """``p <- p - lr d`` per param group (the steps zeroed on a skipped step)."""
    steps = [directions[id(p)] for p in params]
    if guard is not None:
        steps = opt._masked("steps", steps, guard.bad)
    for gi, (ps, ds) in _by_group(params, steps, group_of).items():
        torch._foreach_add_(ps, ds, alpha=-opt.param_groups[gi]["lr"])


def _captured_runs(layers: list) -> list[slice]:
    """The runs of ``layers`` captured in the second pass (all of them, usually)."""
    runs, start = [], None
    for j, l in enumerate(layers + [None]):
        if l is not None and l.captures:
            start = j if start is None else start
        elif start is not None:
            runs.append(slice(start, j))
            start = None
    return runs


def _lbfgs_hy(opt: KBFGS, layers: list, y: Tensor) -> Tensor:
    """``H_g y`` of each layer's L-BFGS matrix, for the rows of ``y`` (zero-padded)."""
    out = torch.zeros_like(y)
    for j, l in enumerate(layers):
        out[j, :l.out] = lbfgs_matrix_product(opt._history(l, opt.state[l.weight]),
                                              y[j, :l.out, None])[:, 0]
    return out


def _layer_state(st: dict, l, history_size: int | None) -> dict:
    """A layer's state (under its weight), made at its first step: ``A`` and ``H_a``
    (identities), the running pair ``s``, ``y`` (zeros) and ``H_g`` (identity; BFGS only)."""
    if "A" in st and ("H_g" in st) != (history_size is None):
        raise ValueError(f"Invalid history_size: {history_size!r} (it cannot change between "
                         "None and a number after the first step)")
    if "A" not in st:
        p = l.weight
        eye = lambda k: torch.eye(k, dtype=p.dtype, device=p.device)  # noqa: E731
        st.update(A=eye(l.a_dim), H_a=eye(l.a_dim), s=p.new_zeros(l.out), y=p.new_zeros(l.out))
        if history_size is None:
            st["H_g"] = eye(l.out)
    return st


def _split(l, V: Tensor) -> dict[int, Tensor]:
    """A layer's ``[out, a_dim]`` direction as the directions of its weight and bias."""
    out = {id(l.weight): V[:, :l.fan_in].reshape(l.weight.shape)}
    if l.bias is not None:
        out[id(l.bias)] = V[:, l.fan_in]
    return out


def _find_layers(model: nn.Module, group_of: dict, patterns) -> list:
    """K-FAC's layers of ``model``; K-FAC's warning listing the modules left out is re-issued
    in K-BFGS's words (they take the plain momentum step)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = find_layers(model, group_of, patterns)
    for w in caught:
        warnings.warn(str(w.message).replace("KFAC", "KBFGS").replace("docs/kfac.md",
                      "docs/kbfgs.md").replace("plain SGD step", "plain momentum step").replace(
                      "K-FAC preconditions", "K-BFGS preconditions"),
                      w.category, stacklevel=4)
    return layers
