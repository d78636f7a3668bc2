"""Strong-Wolfe line search on host scalars: the functional core under :class:`soo_ext.LBFGS`.

It makes the same decisions as the line search of ``torch.optim.LBFGS`` (bracketing, then zoom
by safeguarded cubic interpolation), so that iterates match.  Everything here works on Python
floats: the caller evaluates the objective along the search direction and hands back ``f`` and
the directional derivative ``g.d`` (one host fetch per evaluation); vectors such as the gradient
travel as an opaque payload that the line search only carries around.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

__all__ = ["LinePoint", "cubic_interpolate", "strong_wolfe"]


class LinePoint(NamedTuple):
    """One evaluation along the search direction: step ``t``, value ``f``, slope ``g(t).d``."""
    t: float
    f: float
    gtd: float
    data: Any = None  # caller's payload (e.g. the gradient at this point)


def _div(a: float, b: float) -> float:
    """``a / b`` with IEEE semantics (±inf or nan instead of ZeroDivisionError), like tensors."""
    if b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def cubic_interpolate(t1: float, f1: float, g1: float, t2: float, f2: float, g2: float,
                      bounds: tuple[float, float] | None = None) -> float:
    """Minimiser of the cubic through ``(t1, f1)`` and ``(t2, f2)`` with slopes ``g1``, ``g2``.

    The result is clamped to ``bounds`` (default: the interval between ``t1`` and ``t2``); when the
    cubic has no local minimiser the midpoint of the bounds is returned.
    """
    lo, hi = bounds if bounds is not None else (min(t1, t2), max(t1, t2))
    d1 = g1 + g2 - _div(3 * (f1 - f2), t1 - t2)
    disc = d1 * d1 - g1 * g2
    if not disc >= 0:
        return (lo + hi) / 2.0
    d2 = math.sqrt(disc)
    # Written from the point farther along the line so that both cases share one formula.
    if t1 <= t2:
        t_min = t2 - (t2 - t1) * _div(g2 + d2 - d1, g2 - g1 + 2 * d2)
    else:
        t_min = t1 - (t1 - t2) * _div(g1 + d2 - d1, g1 - g2 + 2 * d2)
    return min(max(t_min, lo), hi)


def strong_wolfe(evaluate: Callable[[float, tuple], LinePoint], start: LinePoint, t: float,
                 d_norm: float, c1: float = 1e-4, c2: float = 0.9,
                 tolerance_change: float = 1e-9, max_ls: int = 25) -> tuple[LinePoint, int]:
    """Find a step satisfying the strong Wolfe conditions along a descent direction ``d``.

    Args:
        evaluate: ``evaluate(t, keep) -> LinePoint`` evaluates the objective at step ``t``.
            ``keep`` holds the payloads of the points the search still needs (besides
            ``start.data``); the new evaluation must not overwrite them, anything else may be
            recycled.
        start: the point at ``t = 0`` (``start.gtd < 0``).
        t: first trial step.
        d_norm: ``max|d|``; the zoom stops when the bracket times ``d_norm`` is below
            ``tolerance_change``.
        c1, c2: sufficient-decrease and curvature constants.
        max_ls: evaluations allowed after the first one.

    Returns:
        The accepted point (possibly ``start`` when nothing better was found) and the number of
        evaluations made.
    """
    f0, gtd0 = start.f, start.gtd

    def armijo_fails(p: LinePoint) -> bool:
        return p.f > f0 + c1 * p.t * gtd0

    def curvature_holds(p: LinePoint) -> bool:
        return abs(p.gtd) <= -c2 * gtd0

    new = evaluate(t, ())
    evals, ls_iter = 1, 0
    prev = start
    bracket: list[LinePoint] = []
    done = False
    # Bracketing: grow the step until an interval containing an acceptable step is known.
    while ls_iter < max_ls:
        if armijo_fails(new) or (ls_iter > 1 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if curvature_holds(new):
            bracket = [new]
            done = True
            break
        if new.gtd >= 0:
            bracket = [prev, new]
            break
        t = cubic_interpolate(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd,
                              bounds=(new.t + 0.01 * (new.t - prev.t), new.t * 10))
        prev = new
        new = evaluate(t, (prev.data,))
        evals += 1
        ls_iter += 1
    if ls_iter == max_ls:  # budget spent while still growing: fall back on [0, last step]
        bracket = [start, new]

    # Zoom: shrink the bracket around the acceptable step.
    insufficient_progress = False
    low, high = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
    while not done and ls_iter < max_ls:
        a, b = bracket
        if abs(b.t - a.t) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(a.t, a.f, a.gtd, b.t, b.f, b.gtd)
        t_hi, t_lo = max(a.t, b.t), min(a.t, b.t)
        eps = 0.1 * (t_hi - t_lo)
        if min(t_hi - t, t - t_lo) < eps:
            # Close to an end: accept once, but on a second time (or when outside) move the
            # trial a tenth of the bracket inside so that the bracket keeps shrinking.
            if insufficient_progress or t >= t_hi or t <= t_lo:
                t = t_hi - eps if abs(t - t_hi) < abs(t - t_lo) else t_lo + eps
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False

        new = evaluate(t, (a.data, b.data))
        evals += 1
        ls_iter += 1

        if armijo_fails(new) or new.f >= bracket[low].f:
            bracket[high] = new
            low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        else:
            if curvature_holds(new):
                done = True
            elif new.gtd * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new

    return bracket[low], evals
