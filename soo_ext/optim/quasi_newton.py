"""The machinery shared by :class:`soo_ext.LBFGS` and :class:`soo_ext.BFGS`: torch.optim.LBFGS's
iteration (closure evaluations, stopping rules, strong-Wolfe line search, curvature pairs) over
one flat vector of all params, with a pluggable curvature model (limited-memory or dense)."""
from __future__ import annotations

import math
from numbers import Integral
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .._support.distributed import all_reduce_mean_, check_process_group
from .._support.errors import NonFiniteError
from .._support.flat import FlatLayout
from .._support.guard import SkipWarner, max_abs
from .._support.options import Bool, Int, Number, OneOf, OptionSpecs
from .._support.params import all_params, check_params, load_state_dict_uncast
from .._support.step_wrapper import OnDemandStepWrapper
from .line_search import LinePoint, strong_wolfe

__all__ = ["QuasiNewton"]

_MIN_CURVATURE = 1e-10  # a pair (s, y) is stored only if y.s exceeds this, as in torch
_C1, _C2 = 1e-4, 0.9  # the strong-Wolfe constants of strong_wolfe (and torch)


class _NonFinite(Exception):
    """Internal: an evaluation was not finite; ``loss`` is what the closure returned."""

    def __init__(self, what: str, loss: Any = None) -> None:
        super().__init__(what)
        self.what = what
        self.loss = loss


class _Eval(NamedTuple):
    """Host scalars of one closure evaluation (fetched together) and its flat gradient."""
    loss: Any           # what the closure returned
    f: float            # the loss as a float, negated when maximising
    g: Tensor           # flat gradient, negated when maximising
    gmax: float         # max|g|
    gsum: float | None  # sum|g|, for the first step length
    gtd: float | None   # g.d along the current direction (line-search trials)
    yd: float | None    # (g - g_prev).d: the pending pair's curvature is y.s = t * yd
    gd_prev: float | None = None  # g_prev.d, with yd when the optimizer asks (PAIR_SLOPE)


# Only lr may differ between param groups: there is one run over one flat vector.
OPTIONS = OptionSpecs({
    "lr": Number(0, tensor=True),
    "max_iter": Int(1), "max_eval": Int(1),
    "tolerance_grad": Number(0), "tolerance_change": Number(0),
    "line_search_fn": OneOf(None, "strong_wolfe"),
    "on_nonfinite": OneOf("raise", "skip"),
    "maximize": Bool(),
}, per_group=("lr",))


class _Run:
    """Everything derived from the params for a run: the flat layout, gradient buffers, the
    snapshot of the iterate being searched from, the per-group lr metric and the curvature
    model."""

    def __init__(self, params: list[Tensor], curvature: Any, name: str) -> None:
        self.params = params
        self.layout = FlatLayout(params)
        self.curvature = curvature  # LBFGSHistory or DenseInverseHessian
        self.name = name
        self._pool: list[tuple[Tensor, list[Tensor]]] = []  # gradient buffers and their views
        self.y = self.layout.empty()
        self.y_of: tuple[Tensor, Tensor] | None = None  # (g, g_prev) when y holds g - g_prev
        self.x0: tuple[Tensor, list[Tensor]] | None = None
        self.x0_t: float | None = None  # params == x0 + x0_t * d; None: no snapshot in use
        self.metric: tuple[Tensor, Tensor] | None = None  # (sqrt(P), 1/sqrt(P)); None if P = I
        self._metric_key: tuple[float, ...] | None = None

    def views(self, flat: Tensor) -> list[Tensor]:
        return self.layout.views(flat)

    def take(self, avoid: tuple) -> tuple[Tensor, list[Tensor]]:
        """A gradient buffer that is none of ``avoid`` (at most 4 are ever needed)."""
        for buf, views in self._pool:
            if not any(buf is a for a in avoid):
                return buf, views
        buf = self.layout.empty()
        self._pool.append((buf, self.views(buf)))
        return self._pool[-1]

    def gather(self, buf: tuple[Tensor, list[Tensor]], maximize: bool) -> None:
        """Copy the params' gradients into ``buf`` (from :meth:`take`); None counts as zero."""
        self.layout.gather_grads(*buf, self.name, maximize)

    def set_metric(self, ratios: list[float]) -> None:
        """Per-param ``lr / lr_ref``: P = diag of these ratios over the flat vector."""
        key = tuple(ratios)
        if key == self._metric_key:
            return
        self._metric_key = key
        if all(r == 1.0 for r in ratios):
            self.metric = None
            return
        kw = {"dtype": self.layout.dtype, "device": self.layout.device}
        sqrt_p = torch.cat([torch.full((n,), math.sqrt(r), **kw)
                            for n, r in zip(self.layout.numels, ratios)])
        inv = torch.cat([torch.full((n,), 1.0 / math.sqrt(r) if r > 0 else 0.0, **kw)
                         for n, r in zip(self.layout.numels, ratios)])
        self.metric = (sqrt_p, inv)

    def push(self, d: Tensor, g: Tensor, g_prev: Tensor, t: float, **options: Any) -> None:
        """Store the pair s = t d, y = g - g_prev (mapped to the metric's variables);
        ``options`` go to the curvature model's ``push``."""
        if self.y_of is None or self.y_of[0] is not g or self.y_of[1] is not g_prev:
            torch.sub(g, g_prev, out=self.y)
        self.y_of = None
        if self.metric is None:
            self.curvature.push(d, self.y, t, **options)
        else:
            sqrt_p, inv_sqrt_p = self.metric
            self.curvature.push(d * inv_sqrt_p, self.y.mul_(sqrt_p), t, **options)

    def direction(self, g: Tensor) -> tuple[Tensor, float, float]:
        """``d = -H g`` and the host scalars ``g.d``, ``max|d|`` (one host sync)."""
        if self.metric is None:
            d, stats = self.curvature.direction(g)
        else:
            sqrt_p, _ = self.metric
            d, stats = self.curvature.direction(g * sqrt_p)
            d.mul_(sqrt_p)
            stats = torch.stack([stats[0], max_abs(d).to(stats.dtype)])
        gtd, dmax = stats.tolist()
        return d, gtd, dmax

    # Moving the params along d.  Every trial is x0 + t d computed from the snapshot x0 (as torch
    # does), so the accepted point is bit-identical to the trial that was evaluated there.

    def snapshot(self) -> None:
        if self.x0 is None:
            buf = self.layout.empty()
            self.x0 = (buf, self.views(buf))
        torch._foreach_copy_(self.x0[1], self.params)
        self.x0_t = 0.0

    def move_to(self, t: float, d_views: list[Tensor]) -> None:
        if t == self.x0_t:
            return
        if self.x0_t != 0.0:
            torch._foreach_copy_(self.params, self.x0[1])
        if t != 0.0:
            torch._foreach_add_(self.params, d_views, alpha=t)
        self.x0_t = t

    def restore(self) -> None:
        """Back to the snapshot (if the params left it), then forget it."""
        if self.x0_t:
            torch._foreach_copy_(self.params, self.x0[1])
        self.x0_t = None

    def commit(self) -> None:
        """The current params are the new iterate: the snapshot is no longer a fallback."""
        self.x0_t = None


class QuasiNewton(OnDemandStepWrapper):
    """Base of :class:`soo_ext.LBFGS` and :class:`soo_ext.BFGS`: everything but the curvature model.

    A subclass names the state entry of its curvature model (``STATE_KEY``), extends
    ``OPTIONS`` with the options of that model (they must agree between groups), and builds the
    model: an object with ``push(s, y, s_scale, **options)``, ``direction(g) -> (d, [g.d,
    max|d|])``, ``state_dict()`` and ``load_state_dict()``.  Hooks let it depart from
    torch.optim.LBFGS's iteration (the defaults are torch's): which pairs are stored and with
    which ``options`` (``_pair_options``), the first trial step (``_trial_step``), the
    evaluations a line search may make (``_line_search_budget``), and the class attributes
    below.
    """

    STATE_KEY = "curvature"
    OPTIONS = OPTIONS
    # Fetch g_prev.d with (g - g_prev).d when a pair completes (for _pair_options' gd_prev).
    PAIR_SLOPE = False
    # End the step when the line search returns a point that fails the strong Wolfe conditions.
    STOP_ON_FAILED_SEARCH = False

    def _pair_options(self, run: _Run, group: dict, t: float, yd: float,
                      gd_prev: float | None) -> dict | None:
        """Whether the pair ``s = t d``, ``y = g - g_prev`` is stored (None: skipped) and the
        options of the curvature model's ``push``.  ``yd = y.d``, ``gd_prev = g_prev.d`` (only
        with ``PAIR_SLOPE``).  torch's rule: ``y.s > 1e-10``."""
        return {} if t * yd > _MIN_CURVATURE else None

    def _line_search_budget(self, run: _Run, loss: float, gtd: float, left: int) -> int:
        """The evaluations the line search may make after its first one: torch's, what is left
        of ``max_eval`` (``left``)."""
        return left

    def _trial_step(self, state: dict, group: dict, ev: _Eval, loss: float,
                    prev_loss: float | None, gtd: float) -> float:
        """The first trial step along the new direction (before the lr factor): torch's
        ``min(1, 1/|g|_1)`` at the very first iteration, 1 after it.  ``loss``, ``gtd``: at the
        current point; ``prev_loss``: at the previous iterate (None at the first iteration)."""
        return min(1.0, 1.0 / ev.gsum) if state["n_iter"] == 1 else 1.0

    def _check_curvature_params(self, params: list[Tensor], group: dict) -> None:
        """ValueError if the params do not suit the curvature options."""

    def _new_curvature(self, n: int, dtype: torch.dtype, device: torch.device, group: dict) -> Any:
        raise NotImplementedError

    def _check_curvature_unchanged(self, curvature: Any, group: dict) -> None:
        """ValueError if an option the curvature model was built with has changed."""

    def __init__(self, params, defaults: dict, process_group=None) -> None:
        if defaults["max_eval"] is None and isinstance(defaults["max_iter"], Integral):
            defaults["max_eval"] = defaults["max_iter"] * 5 // 4
        self.OPTIONS.check(defaults)
        self._process_group = check_process_group(process_group)
        self._run: _Run | None = None
        self._skips = SkipWarner(type(self).__name__, counted=False)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # load_state_dict comes here too: it keeps the group; a copy or unpickling has none
        self.__dict__.setdefault("_process_group", None)
        self.__dict__.setdefault("_skips", SkipWarner(type(self).__name__, counted=False))
        self._run = None  # rebuilt from the state at the next step

    def add_param_group(self, param_group: dict) -> None:
        if self.state:
            raise RuntimeError(f"{type(self).__name__}: cannot add a param group after the first "
                               "step (the curvature model spans the flat vector of all params)")
        super().add_param_group(param_group)
        try:
            self._check_groups()
        except ValueError:
            self.param_groups.pop()
            raise
        self._run = None

    def _check_groups(self) -> None:
        self.OPTIONS.check_groups(self.param_groups)
        params = all_params(self)
        check_params(params, type(self).__name__)
        if params:
            self._check_curvature_params(params, self.param_groups[0])

    def load_state_dict(self, state_dict: dict) -> None:
        # The curvature model (possibly bfloat16) is copied in at the next step.
        for p, entries in load_state_dict_uncast(self, state_dict, (self.STATE_KEY,)).items():
            self.state[p].update(entries)

    def _prepare_run(self, state: dict) -> _Run:
        if self._run is None:
            params, group = all_params(self), self.param_groups[0]
            curvature = self._new_curvature(sum(p.numel() for p in params), params[0].dtype,
                                            params[0].device, group)
            if self.STATE_KEY in state:
                curvature.load_state_dict(state[self.STATE_KEY])
            state[self.STATE_KEY] = curvature.state_dict()
            self._run = _Run(params, curvature, type(self).__name__)
        else:
            self._check_curvature_unchanged(self._run.curvature, self.param_groups[0])
        return self._run

    def _evaluate(self, closure: Callable, run: _Run, buf: tuple[Tensor, list[Tensor]],
                  maximize: bool, *, gsum: bool = False, along: Tensor | None = None,
                  pair: tuple[Tensor, Tensor] | None = None) -> _Eval:
        """Run the closure, gather its gradient into ``buf`` and fetch, in one host sync, the
        loss, ``max|g|`` and optionally ``sum|g|``, ``g.along`` and ``(g - g_prev).d`` for
        ``pair = (g_prev, d)``.  Raises _NonFinite if any of them is not finite."""
        run.y_of = None  # buf may be one of the vectors y was computed from
        loss = closure()
        run.gather(buf, maximize)
        g = buf[0]
        scalars = [max_abs(g)]
        if gsum:
            scalars.append(torch.linalg.vector_norm(g, 1))
        if along is not None:
            scalars.append(torch.dot(g, along))
        if pair is not None:
            g_prev, d = pair
            scalars.append(torch.dot(torch.sub(g, g_prev, out=run.y), d))
            run.y_of = (g, g_prev)
            if self.PAIR_SLOPE:
                scalars.append(torch.dot(g_prev, d))
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape "
                             f"{tuple(loss.shape)}")
        f_dev = loss.detach().reshape(()).to(g.device) if isinstance(loss, Tensor) else None
        if self._process_group is not None:  # the mean of the ranks' losses (in a copy)
            f_dev = (torch.tensor(float(loss), dtype=torch.float64, device=g.device)
                     if f_dev is None else f_dev)
            f_dev = all_reduce_mean_(f_dev.to(torch.float64, copy=True).reshape(1),
                                     self._process_group)[0]
        if f_dev is not None:
            scalars.insert(0, f_dev)
            values = torch.stack([s.to(torch.float64) for s in scalars]).tolist()
        else:
            values = [float(loss)] + torch.stack([s.to(torch.float64) for s in scalars]).tolist()
        f, gmax = values[0], values[1]
        if not math.isfinite(f):
            raise _NonFinite(f"the closure returned a non-finite loss ({f})", loss)
        if not all(math.isfinite(v) for v in values):
            raise _NonFinite("the closure produced a non-finite gradient" if not math.isfinite(gmax)
                             else "products with the gradient overflowed", loss)
        rest = iter(values[2:])
        return _Eval(loss, -f if maximize else f, g, gmax,
                     next(rest) if gsum else None,
                     next(rest) if along is not None else None,
                     next(rest) if pair is not None else None,
                     next(rest) if pair is not None and self.PAIR_SLOPE else None)

    def _nonfinite(self, bad: _NonFinite, loss: Any) -> Any:
        if self.param_groups[0]["on_nonfinite"] == "raise":
            raise NonFiniteError(f"{type(self).__name__}: {bad.what}; nothing from it was stored and the params "
                                 "are at the last finite iterate (on_nonfinite='skip' skips "
                                 "such steps instead of raising)") from None
        self._skips.skipped()
        return loss

    @torch.compiler.disable  # host decisions at every iteration (see docs/architecture.md)
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """Perform one optimisation step (up to ``max_iter`` quasi-Newton iterations).

        Args:
            closure: reevaluates the model (zeroing the gradients, calling backward) and returns
                the loss; it is always called with grad enabled.

        Returns:
            The loss of the first closure evaluation, like ``torch.optim.LBFGS``.
        """
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() requires a closure that reevaluates "
                               "the model and returns the loss")
        closure = torch.enable_grad()(closure)
        params = all_params(self)
        if not params:  # nothing to optimise, but the caller still gets a loss
            return closure()
        self._check_groups()
        group = self.param_groups[0]
        state = self.state[params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        run = self._prepare_run(state)

        lrs = [float(g["lr"]) for g in self.param_groups]
        lr_ref = max(lrs)
        # A pair is pending if a step was taken along d since prev_flat_grad was evaluated.
        pending = state["n_iter"] > 0 and state["t"] != 0.0
        try:
            first = self._evaluate(
                closure, run, run.take((state.get("prev_flat_grad"),)), group["maximize"],
                gsum=state["n_iter"] == 0,
                pair=(state["prev_flat_grad"], state["d"]) if pending else None)
        except _NonFinite as bad:
            return self._nonfinite(bad, bad.loss)
        state["func_evals"] += 1
        if first.gmax <= group["tolerance_grad"]:
            return first.loss
        # Per-param lr / lr_ref as a diagonal metric; 0 for a param without a gradient, which
        # no iteration of this step moves (as torch.optim leaves such params alone).
        run.set_metric([(lr / lr_ref if lr_ref > 0 else 1.0) if p.grad is not None else 0.0
                        for g, lr in zip(self.param_groups, lrs) for p in g["params"]])
        try:
            self._iterate(closure, state, run, group, lr_ref, first)
        except BaseException as exc:
            # Leave the params at the last accepted iterate; the state already describes it.
            run.restore()
            if state["n_iter"] == 1:  # the very first iteration failed: start afresh next time
                state["n_iter"] = 0
            if isinstance(exc, _NonFinite):
                return self._nonfinite(exc, first.loss)
            raise
        return first.loss

    def _iterate(self, closure: Callable, state: dict, run: _Run, group: dict,
                 lr_ref: float, ev: _Eval) -> None:
        """The L-BFGS iterations of one step, from the step's first evaluation ``ev``."""
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        maximize = group["maximize"]
        evals, n_iter = 1, 0
        loss, g, gmax, yd = ev.f, ev.g, ev.gmax, ev.yd
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # Curvature pair completed by the current gradient, then the new direction.
            t_prev = state.get("t", 0.0)
            if yd is not None:
                options = self._pair_options(run, group, t_prev, yd, ev.gd_prev)
                if options is not None:
                    run.push(state["d"], g, state["prev_flat_grad"], t_prev, **options)
            d, gtd, dmax = run.direction(g)
            # the loss at the previous iterate (if the last iteration moved the params)
            last_loss = state.get("prev_loss") if t_prev != 0.0 else None
            state.update(d=d, t=0.0, prev_flat_grad=g, prev_loss=loss,
                         **{self.STATE_KEY: run.curvature.state_dict()})
            if not (math.isfinite(gtd) and math.isfinite(dmax)):
                raise _NonFinite("the search direction is not finite")
            prev_loss = loss
            t = self._trial_step(state, group, ev, loss, last_loss, gtd) * lr_ref
            if gtd > -tolerance_change:  # not a descent direction (to tolerance)
                break

            d_views = run.views(d)
            if group["line_search_fn"] == "strong_wolfe":
                run.snapshot()
                g_start = g

                def trial(t_trial: float, keep: tuple) -> LinePoint:
                    buf = run.take((g_start,) + tuple(e.g for e in keep))
                    run.move_to(t_trial, d_views)
                    e = self._evaluate(closure, run, buf, maximize, along=d, pair=(g_start, d))
                    state["func_evals"] += 1
                    return LinePoint(t_trial, e.f, e.gtd, e)

                start = LinePoint(0.0, loss, gtd, _Eval(None, loss, g, gmax, None, gtd, 0.0))
                max_ls = self._line_search_budget(run, loss, gtd, max_eval - evals)
                point, ls_evals = strong_wolfe(trial, start, t, dmax,
                                               tolerance_change=tolerance_change, max_ls=max_ls)
                run.move_to(point.t, d_views)
                evals += ls_evals
                failed = not (point.f <= loss + _C1 * point.t * gtd
                              and abs(point.gtd) <= -_C2 * gtd)
                t, ev = point.t, point.data
                loss, g, gmax, yd = ev.f, ev.g, ev.gmax, ev.yd
                if failed and self.STOP_ON_FAILED_SEARCH:
                    state["t"] = t
                    run.commit()
                    break
            elif n_iter != max_iter:
                run.snapshot()
                run.move_to(t, d_views)
                ev = self._evaluate(closure, run, run.take((g,)), maximize, pair=(g, d))
                state["func_evals"] += 1
                evals += 1
                loss, g, gmax, yd = ev.f, ev.g, ev.gmax, ev.yd
            else:  # last iteration: step without reevaluating, as torch does
                torch._foreach_add_(run.params, d_views, alpha=t)
            state["t"] = t
            run.commit()

            if (n_iter == max_iter or evals >= max_eval or gmax <= tolerance_grad
                    or t * dmax <= tolerance_change or abs(loss - prev_loss) < tolerance_change):
                break
