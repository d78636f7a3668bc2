"""DRSOM's step from its model: the radius-free trust-region loop over the trials of a subspace
step (``soo::drsom_subproblem`` solves each, ``soo::drsom_update`` takes it), the backtracking
(Armijo) line search along ``-g`` that replaces it when the subspace has no second direction or
the model is not finite, and the bookkeeping of an accepted step (it becomes ``d_1``).

Both work on the state entries of DRSOM (``gamma``, ``directions``, ``order``, ``count``,
``ls_step``, ``last_length`` and the counters) and take the trial losses from a callable (the
closure evaluator's ``loss``); every decision is one host fetch per trial.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor

from .. import ops as _ops
from .. import reference as _reference

__all__ = ["GAMMA_MAX", "NOISE_ULPS", "TrustRegion", "grown_gamma", "noise_floor",
           "shrunk_gamma"]

# gamma grows at most to this: lambda ~ 1e16 lambda_max already gives steps below rounding (at the
# noise floor of the loss every trial is rejected; without a cap gamma would overflow to inf)
GAMMA_MAX = _reference.DRSOM_GAMMA_MAX
# A predicted decrease below this many ulps of |f| is below what the loss resolves: the ratio test
# is noise there, so the trust-region loop stops instead of shrinking the step ever further.
NOISE_ULPS = 16


def noise_floor(f: float, dtype: torch.dtype) -> float:
    """The predicted decrease below which the loss ``f`` cannot tell a step's effect."""
    return NOISE_ULPS * torch.finfo(dtype).eps * abs(f)


def grown_gamma(gamma: float, increase: float) -> float:
    """gamma after a rejected or poor trial: ``increase`` times larger, at most GAMMA_MAX."""
    return min(increase * gamma, GAMMA_MAX)


def shrunk_gamma(gamma: float, gamma_min: float) -> float:
    """gamma after a very successful trial: ``max(min(sqrt(gamma), log10(1 + gamma)),
    gamma_min)``."""
    return max(min(math.sqrt(gamma), math.log10(gamma + 1)), gamma_min)


class TrustRegion:
    """The trials of one DRSOM step from the params ``x``, a step written into the scratch row of
    ``state["directions"]`` and the base point kept in ``x0``.

    ``options``: DRSOM's ``max_trials``, ``gamma_increase``, ``gamma_min``, ``eta_accept``,
    ``eta_low``, ``eta_high``, ``max_step_growth``, ``rejection_shrink``, ``armijo``,
    ``random`` (the random variant keeps its row order) and ``lr``: the trial points are
    ``x0 + lr p`` for the model's step ``p``, judged by the model's decrease at ``lr p``; the
    step-length limits and memory stay on the model's steps.  ``trial_loss()``: the objective
    at the params, a device scalar.
    """

    def __init__(self, x: Tensor, x0: Tensor, state: dict, options: Mapping,
                 trial_loss: Callable[[], Tensor]) -> None:
        self.x, self.x0, self.st, self.o, self.trial_loss = x, x0, state, options, trial_loss
        order = state["order"]
        self.row = order[1] if options["random"] else order[-1]  # the scratch row

    def accept(self, length: float) -> None:
        """The step just written into the scratch row (``length`` long) becomes ``d_1``."""
        st = self.st
        st["last_length"] = length
        order = st["order"]
        if self.o["random"]:
            return
        order.remove(self.row)
        st["order"] = [self.row] + order
        st["count"] = min(st["count"] + 1, len(order))

    def subspace_step(self, V: list[Tensor], Q: Tensor, G: Tensor, c: Tensor, f: float) -> bool:
        """The radius-free trust-region loop on the model ``(Q, G, c)`` over ``span V``, ``x0``
        holding the base point of objective ``f``.  False if the model is not finite (x
        restored)."""
        o, st, x, x0 = self.o, self.st, self.x, self.x0
        k = len(V)
        p = st["directions"][self.row]
        noise = noise_floor(f, x.dtype)
        last = st["last_length"]
        max_length = o["max_step_growth"] * last if 0 < last < math.inf else math.inf
        lr = o["lr"]
        for trial in range(o["max_trials"]):
            # gamma climbs in the op until the step is at most max_length (no evaluation)
            step = _ops.drsom_subproblem(Q, G, c, st["gamma"], max_length, o["gamma_increase"])
            if trial:
                x.copy_(x0)
            a, rest = step[:k], step[k:]
            if lr != 1:  # the model's decrease at lr a: -(c.(lr a) + (lr a).Q.(lr a) / 2)
                a = a * lr
                a64, c64, Q64 = a.double(), c.double(), Q.double()
                pred = -(c64 @ a64 + a64 @ ((Q64 + Q64.T) / 2) @ a64 / 2)  # Q's symmetric part
                rest = torch.cat([pred.reshape(1).to(rest.dtype), rest[1:]])
            _ops.drsom_update(x, p, V, a)
            ft = self.trial_loss()
            st["func_evals"] += 1
            st["trials"] += 1
            ft_h, pred_h, ok, gamma, length = torch.cat([ft.reshape(1), rest]).tolist()
            if not ok:
                x.copy_(x0)
                return False
            st["gamma"] = gamma
            inc = grown_gamma(gamma, o["gamma_increase"])
            if 0 < pred_h <= noise:  # below the loss's resolution: rho is noise
                st["noise_stops"] += 1
                if math.isfinite(ft_h) and ft_h <= f:
                    self.accept(length)
                else:
                    x.copy_(x0)
                st["step"] += 1
                return True
            rho_h = (f - ft_h) / pred_h if pred_h > 0 else math.nan
            if not (math.isfinite(ft_h) and math.isfinite(rho_h) and rho_h > o["eta_accept"]):
                st["gamma"] = inc
                st["rejections"] += 1
                max_length = o["rejection_shrink"] * length
                continue
            if rho_h <= o["eta_low"]:
                st["gamma"] = inc
            elif rho_h >= o["eta_high"]:
                st["gamma"] = shrunk_gamma(gamma, o["gamma_min"])
            self.accept(length)
            st["step"] += 1
            return True
        x.copy_(x0)
        st["step"] += 1
        return True

    def line_search(self, g: Tensor, f: float, gg: float) -> None:
        """Backtracking (Armijo) along ``-g`` from x (``gg = ||g||^2``); x0 takes the base
        point."""
        o, st, x, x0 = self.o, self.st, self.x, self.x0
        p = st["directions"][self.row]
        x0.copy_(x)
        t = st["ls_step"] if st["ls_step"] is not None else min(1.0, 1.0 / math.sqrt(gg))
        st["line_searches"] += 1
        for trial in range(o["max_trials"]):
            if trial:
                x.copy_(x0)
            step = -t * o["lr"]
            _ops.drsom_update(x, p, [g], torch.full((1,), step, dtype=x.dtype, device=x.device))
            ft = self.trial_loss().item()
            st["func_evals"] += 1
            st["trials"] += 1
            if math.isfinite(ft) and ft <= f + o["armijo"] * step * gg:
                st["ls_step"] = 2 * t if trial == 0 else t
                self.accept(t * math.sqrt(gg))
                st["step"] += 1
                return
            st["rejections"] += 1
            t *= 0.5
        x.copy_(x0)
        st["ls_step"] = t
        st["step"] += 1
