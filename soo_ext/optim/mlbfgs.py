"""mL-BFGS: momentum L-BFGS (Niu et al., TMLR 2023) on the fused history kernels."""
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
from ..curvature.momentum_pairs import BlockLayout, block_partition, directions, update_pairs
from .flat_guard import gather_guarded

__all__ = ["MLBFGS"]

_NONFINITE = "MLBFGS: the gradient is not finite"
# State entries that Optimizer.load_state_dict must not cast to the params' dtype.
_UNCAST = ("history", "nonfinite_steps")


class MLBFGS(OnDemandStepWrapper):
    r"""mL-BFGS, momentum L-BFGS (Niu et al., TMLR 2023): stochastic block-wise L-BFGS whose
    curvature pairs are built from momentum averages of params and gradients.

    Used like SGD: one gradient per step, no closure needed, LR schedulers work.  Each step
    accumulates the averages; every ``update_freq`` steps one damped pair per block is formed from
    them (one host sync); the direction ``H (g + wd p)`` of each block (one fused kernel call) is
    clipped over all blocks and taken by SGD with momentum; plain SGD until the first pair.
    Steps with non-finite gradients are skipped on the device.  Algorithm, blocks, cost, state
    layout and results: docs/mlbfgs.md.

    Args:
        params: iterable of params or of param-group dicts (float32 or float64, one dtype and one
            device; only ``lr``, ``momentum`` and ``weight_decay`` may differ between groups).
        lr: learning rate (default: 0.1, the authors' setting).
        momentum: momentum of the outer SGD (default: 0.9).
        weight_decay: L2 penalty added to the gradient that is preconditioned (default: 0; the
            authors use 2e-4 for ResNets).
        history_size: pairs kept per block, m (default: 10).
        update_freq: T, steps between pair updates (default: 50).
        param_momentum, grad_momentum: mu_p and mu_g of the averages (default: 0.999 each).
        pair_momentum: beta, momentum on the pairs (default: 0.9).
        sigma_low, sigma_high: curvature bounds of the damping (default: 0.01 and 1.5).
        damping_delta: delta, the damping keeps ``phi <= 1 - delta`` (default: 0.01).
        normalize: ``'kl'`` (default: times ``min(1, sqrt(kl_clip / g.H g))``), ``'l2'`` or None.
        kl_clip: c of ``normalize='kl'`` (default: 0.005, the authors').
        blocks: None (default: one block), ``'groups'`` or a list of lists of params (params left
            out of every block take plain SGD steps).
        history_dtype: storage dtype of the pairs (default: the params'; ``torch.bfloat16``
            with float32 params).
        on_nonfinite: ``'skip'`` (default) or ``'raise'`` (:class:`soo_ext.NonFiniteError`).
        maximize: maximise the objective (default: False).

    Example::

        opt = soo_ext.MLBFGS(model.parameters(), lr=0.1, update_freq=50)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    # sigma_low > 0 and damping_delta < 1 are what make every damped pair have y.s > 0.
    OPTIONS = OptionSpecs({
        "lr": Number(0, high_open=True), "momentum": Number(0, 1, high_open=True),
        "weight_decay": Number(0, high_open=True),
        "param_momentum": Number(0, 1), "grad_momentum": Number(0, 1),
        "pair_momentum": Number(0, 1, high_open=True),
        "sigma_low": Number(0, 1, low_open=True, high_open=True),
        "sigma_high": Number(1, low_open=True, high_open=True),
        "damping_delta": Number(0, 1, high_open=True),
        "kl_clip": Number(0, low_open=True, high_open=True),
        "history_size": Int(1), "update_freq": Int(1),
        "normalize": OneOf("l2", "kl", None),
        "history_dtype": OneOf(None, torch.float32, torch.float64, torch.bfloat16),
        "on_nonfinite": OneOf("raise", "skip"), "maximize": Bool(),
    }, per_group=("lr", "momentum", "weight_decay"))

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, history_size: int = 10, update_freq: int = 50,
                 param_momentum: float = 0.999, grad_momentum: float = 0.999,
                 pair_momentum: float = 0.9, sigma_low: float = 0.01, sigma_high: float = 1.5,
                 damping_delta: float = 0.01, normalize: str | None = "kl",
                 kl_clip: float = 0.005, *, blocks=None, history_dtype: torch.dtype | None = None,
                 on_nonfinite: str = "skip", maximize: bool = False) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "history_size": history_size, "update_freq": update_freq,
                    "param_momentum": param_momentum, "grad_momentum": grad_momentum,
                    "pair_momentum": pair_momentum, "sigma_low": sigma_low,
                    "sigma_high": sigma_high, "damping_delta": damping_delta,
                    "normalize": normalize, "kl_clip": kl_clip, "history_dtype": history_dtype,
                    "on_nonfinite": on_nonfinite, "maximize": maximize}
        self.OPTIONS.check(defaults)
        self._block_layout: BlockLayout | None = None
        self._skips, self._checks = SkipWarner("MLBFGS"), OptionChecks(self.OPTIONS)
        super().__init__(params, defaults)
        self._blocks = block_partition(blocks, all_params(self))

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_blocks": self._blocks}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_blocks", None)
        self.__dict__.setdefault("_skips", SkipWarner("MLBFGS"))
        self.__dict__.setdefault("_checks", OptionChecks(self.OPTIONS))
        self._block_layout = None  # rebuilt from the state at the next step

    def add_param_group(self, param_group: dict) -> None:
        if self.state:
            raise RuntimeError("MLBFGS: cannot add a param group after the first step (the "
                               "blocks are laid out over the params at the first step)")
        add_param_group_checked(self, param_group, lambda: (
            self.OPTIONS.check_groups(self.param_groups), self._check_params(all_params(self))))
        self._block_layout = None

    def _check_params(self, params: list[Tensor]) -> None:
        check_params(params, "MLBFGS")
        if params:
            check_history_dtype(params[0].dtype, self.param_groups[0]["history_dtype"])

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, _UNCAST).items():
            self.state[p].update(entries)
        self._block_layout = None

    def _layout(self, params: list[Tensor]) -> tuple[BlockLayout, dict]:
        """The block layout (built at the first step and after a load) and the global state."""
        group = self.param_groups[0]
        if self._block_layout is None:
            self._check_params(params)
            self._block_layout = BlockLayout([g["params"] for g in self.param_groups], self._blocks,
                                   self.state, group["history_size"], group["history_dtype"],
                                   "MLBFGS")
            state = self.state[params[0]]
            state.setdefault("step", 0)
            state.setdefault("pair_updates", 0)
            counter = state.get("nonfinite_steps")
            state["nonfinite_steps"] = (
                torch.zeros((), dtype=torch.int64, device=self._block_layout.device) if counter is None
                else counter.to(self._block_layout.device))
        elif self._block_layout.pre and self._block_layout.history_size != group["history_size"]:
            raise ValueError("Invalid history_size: it cannot change after the first step")
        return self._block_layout, self.state[params[0]]

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional: zeroes the gradients, calls backward, returns the
        loss) is called once, with grad enabled.  Returns what it returned, or None."""
        loss = call_closure(closure)
        params = all_params(self)
        if not any(p.grad is not None for p in params):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        self._checks(self.param_groups)
        run, state = self._layout(params)
        groups, group = self.param_groups, self.param_groups[0]
        k = state["step"] + 1
        pair_step = bool(run.pre) and k % group["update_freq"] == 0
        # 'raise' at a pair-update step waits for the pair update's host sync.
        guard, okf = gather_guarded(run.blocks, group, state, self._skips, "MLBFGS", _NONFINITE,
                                    defer_raise=pair_step)
        mu_p, mu_g, *momenta, neg_okf = run.factors(  # one select: 1 and 0 if skipped
            guard.ok, [group["param_momentum"], group["grad_momentum"]]
            + [g["momentum"] for g in groups], [-1.0])
        for b in run.pre:
            b.pairs.accumulate(b.param, b.grad, mu_p, mu_g, okf)
        if pair_step and not update_pairs(
                run.pairs, run.pre_grads, okf, state["pair_updates"] == 0,
                group["pair_momentum"], group["sigma_low"], group["sigma_high"],
                group["damping_delta"]):
            if group["on_nonfinite"] == "raise":
                raise SkipGuard.error(_NONFINITE)
            state["step"] = k
            return loss
        state["pair_updates"] += int(pair_step)
        state["step"] = k

        for b in run.blocks:  # g + wd p
            b.add_weight_decay([g["weight_decay"] for g in groups])
        steps = [(b.grad, okf) for b in run.blocks]  # plain SGD until the first pair
        if run.has_pairs():  # buf += coef d adds the normalised direction (nothing if skipped)
            ds, coef = directions(run.pairs, run.pre_grads, group["normalize"],
                                  group["kl_clip"], neg_okf)
            steps[:len(run.pre)] = [(d, coef) for d in ds]
        if pair_step:  # the pushes and the Gram entries the directions completed
            for b in run.pre:
                b.pairs.save()

        lrs = [g["lr"] for g in groups]
        for b, (direction, coef) in zip(run.blocks, steps):
            b.momentum_step(direction, coef, momenta, lrs, guard.ok, run.zero)
        return loss
