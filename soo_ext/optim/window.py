"""The recipe shared by the gradient-window optimizers (M-FAC, GGT): all params as one flat vector,
a window of its recent gradients, a direction from the window, SGD with momentum on it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._support.closure import call_closure
from .._support.guard import SkipGuard, SkipWarner
from .._support.options import Bool, Int, Number, OneOf, OptionChecks, OptionSpecs
from .._support.params import (add_param_group_checked, all_params, check_history_dtype,
                               check_params, load_state_dict_uncast)
from .._support.step_wrapper import OnDemandStepWrapper
from ..curvature.gradient_window import GradientWindow, window_state_bytes
from ..curvature.momentum_pairs import Block
from .flat_guard import gather_guarded

__all__ = ["WindowOptimizer"]

DEFAULT_MAX_STATE_BYTES = 2**30
# State entries that Optimizer.load_state_dict must not cast to the params' dtype.
_UNCAST = ("window", "gram", "slot", "gram_inverse", "nonfinite_steps")


class WindowOptimizer(OnDemandStepWrapper):
    """Base of :class:`soo_ext.MFAC` and :class:`soo_ext.GGT` (not public).

    A subclass sets ``NAME``, ``OPTIONS`` (these options plus its own) and implements
    :meth:`_direction`.  Every param of every group is one flat vector (the methods' full-matrix
    preconditioner spans all of them); ``lr``, ``momentum`` and ``weight_decay`` may differ
    between groups.  The window's state lives under the first param.
    """

    NAME = ""
    OPTIONS = OptionSpecs({
        "lr": Number(0, high_open=True), "momentum": Number(0, 1, high_open=True),
        "weight_decay": Number(0, high_open=True), "window": Int(1),
        "window_dtype": OneOf(None, torch.float32, torch.float64, torch.bfloat16),
        "max_state_bytes": Int(1), "on_nonfinite": OneOf("raise", "skip"), "maximize": Bool(),
    }, per_group=("lr", "momentum", "weight_decay"))

    def __init__(self, params, defaults: dict) -> None:
        self.OPTIONS.check(defaults)
        self._skips, self._checks = SkipWarner(self.NAME), OptionChecks(self.OPTIONS)
        self._run: tuple[Block, GradientWindow, Tensor, Tensor] | None = None
        super().__init__(params, defaults)
        self._check_params(all_params(self))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_skips", SkipWarner(self.NAME))
        self.__dict__.setdefault("_checks", OptionChecks(self.OPTIONS))
        self._run = None  # rebuilt from the state at the next step

    def add_param_group(self, param_group: dict) -> None:
        if self.state:
            raise RuntimeError(f"{self.NAME}: cannot add a param group after the first step (the "
                               "window holds gradients of the params it started with)")
        add_param_group_checked(self, param_group, lambda: (
            self.OPTIONS.check_groups(self.param_groups), self._check_params(all_params(self))))
        self._run = None

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, _UNCAST).items():
            self.state[p].update(entries)
        self._run = None

    def _window_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.param_groups[0]["window_dtype"] or dtype

    def _check_params(self, params: list[Tensor]) -> None:
        """Dtypes, devices, and the window's memory against ``max_state_bytes``."""
        check_params(params, self.NAME)
        if not params:
            return
        group = self.param_groups[0]
        try:
            check_history_dtype(params[0].dtype, group["window_dtype"])
        except ValueError as exc:
            raise ValueError(str(exc).replace("history_dtype", "window_dtype")) from None
        n = sum(p.numel() for p in params)
        needed = window_state_bytes(group["window"], n, self._window_dtype(params[0].dtype),
                                    self._square_matrices(group))
        if needed > group["max_state_bytes"]:
            raise ValueError(
                f"Invalid window: {self.NAME}'s window of {group['window']} gradients of "
                f"{n} entries needs {needed / 2**20:.1f} MiB, more than max_state_bytes = "
                f"{group['max_state_bytes'] / 2**20:.1f} MiB; use a smaller window, or raise "
                "max_state_bytes if the memory is there")

    def _square_matrices(self, group: dict) -> int:
        """The ``window x window`` float64 matrices kept besides the window (its Gram matrix)."""
        return 1

    def _layout(self, params: list[Tensor]) -> tuple[Block, GradientWindow, Tensor, Tensor, dict]:
        """The flat block, the window, a 0-dim zero and the direction's buffer (built at the
        first step and after a load)."""
        group = self.param_groups[0]
        state = self.state[params[0]]
        if self._run is None:
            self._check_params(params)
            p0, n = params[0], sum(p.numel() for p in params)
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros(n, dtype=p0.dtype, device=p0.device)
                state["step"] = 0
                state["nonfinite_steps"] = torch.zeros((), dtype=torch.int64, device=p0.device)
            elif state["momentum_buffer"].shape != (n,):
                raise ValueError(f"{self.NAME}: the saved state is for {state['momentum_buffer'].numel()} "
                                 f"entries, the params have {n}")
            group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
            window = GradientWindow(state, group["window"], n, p0.dtype, p0.device,
                                    self._window_dtype(p0.dtype))
            zero = torch.zeros((), dtype=p0.dtype, device=p0.device)
            block = Block(params, group_of, state, None)
            self._run = (block, window, zero, torch.empty_like(block.grad))
        elif self._run[1].size != group["window"]:
            raise ValueError("Invalid window: it cannot change after the first step")
        return (*self._run, state)

    def _direction(self, g: Tensor, window: GradientWindow, state: dict, group: dict,
                   guard: SkipGuard, okf: Tensor, out: Tensor) -> None:
        """The step's direction from the flat gradient ``g`` (``g + wd p``) into ``out``; pushes
        ``g``."""
        raise NotImplementedError

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional: zeroes the gradients, calls backward, returns the
        loss) is called once, with grad enabled.  Returns what it returned, or None."""
        loss = call_closure(closure)
        params = all_params(self)
        if not any(p.grad is not None for p in params):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        self._checks(self.param_groups)  # skipped while no option changed
        block, window, zero, direction, state = self._layout(params)
        groups, group = self.param_groups, self.param_groups[0]
        decays = [g["weight_decay"] for g in groups]
        guard, okf = gather_guarded([block], group, state, self._skips, self.NAME,
                                    f"{self.NAME}: the gradient is not finite", params=any(decays))
        block.add_weight_decay(decays)  # (the params are gathered for it only)
        self._direction(block.grad, window, state, group, guard, okf, direction)
        momenta = {m: guard.unless_skipped(m, okf) for m in {g["momentum"] for g in groups}}
        block.momentum_step(direction, okf, [momenta[g["momentum"]] for g in groups],
                            [g["lr"] for g in groups], guard.ok, zero)
        state["step"] += 1
        return loss
