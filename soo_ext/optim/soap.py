"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (soo_ext.curvature.soap_bases)."""
from __future__ import annotations

from typing import Callable

import torch

from .._support.closure import call_closure
from .._support.distributed import check_process_group
from .._support.guard import SkipGuard
from .._support.options import Bool, Int, Number, OneOf, OptionChecks, OptionSpecs
from .._support.params import all_params, check_dense_grads
from ..curvature.refresh_schedule import RefreshSchedule
from ..curvature.soap_bases import SOAPBases
from .laid_out import LaidOutOptimizer
from .shampoo import _Betas

__all__ = ["SOAP"]


class _AdamBetas(_Betas):
    requirement = "(beta1, beta2) with beta1 in [0, 1) and beta2 in (0, 1)"

    def accepts(self, b) -> bool:
        return super().accepts(b) and b[1] < 1


class _ShampooBeta(Number):
    requirement = "None (beta2) or a number in [0, 1)"

    def accepts(self, value) -> bool:
        return value is None or super().accepts(value)


# lr, betas and weight_decay may differ between param groups (read at every step: LR schedulers
# work); every other option is one setting for the run (the buckets span all groups).
OPTIONS = OptionSpecs({
    "lr": Number(0, high_open=True), "betas": _AdamBetas(),
    "eps": Number(0, low_open=True, high_open=True), "weight_decay": Number(0, high_open=True),
    "shampoo_beta": _ShampooBeta(0, 1, high_open=True),
    "precondition_frequency": Int(1, none=True),
    "refresh_budget": Number(0, 1, low_open=True, high_open=True, none=True),
    "max_precond_dim": Int(1), "merge_dims": Bool(), "precondition_1d": Bool(),
    "one_sided": Bool(),
    "normalize_grads": Bool(), "correct_bias": Bool(),
    "factor_dtype": OneOf(torch.float32, torch.float64), "on_nonfinite": OneOf("raise", "skip"),
}, per_group=("lr", "betas", "weight_decay"))
_LAYOUT_OPTIONS = ("max_precond_dim", "merge_dims", "precondition_1d", "factor_dtype")
_UNSCHEDULED_FREQUENCY = 10  # the reference's, with the automatic schedule off
_UNCAST = ("GG", "Q", "adam_steps", "nonfinite_steps")  # factor dtype, counters: not cast


class SOAP(LaidOutOptimizer):
    r"""SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam in the eigenbasis of Shampoo's
    preconditioner.

    Every param (dims merged with ``merge_dims``) keeps a factor per dim,
    ``GG_k <- b GG_k + (1 - b) G_(k) G_(k)^T`` (``b = shampoo_beta``, default beta2), and its
    eigenbasis ``Q_k``: by eigh at the first step (which only gathers statistics), then every
    ``precondition_frequency`` steps (automatic by default) by one power-iteration step and QR,
    ``Q <- qr(GG Q)`` (one call per bucket of equal-size factors).  Adam runs on
    ``G' = G x_k Q_k^T``; the update ``lr (M' / (sqrt(V') + eps)) x_k Q_k`` is bias-corrected
    and followed by the decoupled weight decay ``p <- p (1 - lr weight_decay)``.  A dim above
    ``max_precond_dim`` is left unrotated; 1-D params take Adam (unless ``precondition_1d``).
    Non-finite steps are skipped on the device.  Details, state layout and host syncs:
    docs/soap.md.

    Args:
        params: iterable of params or of param-group dicts (lr, betas, weight_decay per group).
        lr: learning rate (default: 3e-3).
        betas: Adam's (beta1, beta2) (default: (0.95, 0.95)).
        weight_decay: decoupled weight decay (default: 0.01).
        precondition_frequency: steps between basis refreshes; None (default): automatic,
            refreshes at most ``refresh_budget`` of the training time (default 0.1; None:
            every 10 steps); ``refresh_timer``: its clock; ``process_group``: its ranks.
        eps: added to Adam's denominator (default: 1e-8).
        shampoo_beta: factor decay; None: each group's beta2 (default: None).
        max_precond_dim, merge_dims, precondition_1d: (default: 10000, False, False).
        one_sided: the largest rotated dim of each param left unrotated (default: False).
        normalize_grads, correct_bias: the update scaled to RMS 1 per param; Adam's bias
            corrections (default: False, True).
        factor_dtype: ``torch.float32`` (default) or ``torch.float64``.
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.

    Example::

        opt = soo_ext.SOAP(model.parameters(), lr=3e-3)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """

    OPTIONS, UNCAST = OPTIONS, _UNCAST

    def __init__(self, params, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 weight_decay: float = 0.01, precondition_frequency: int | None = None, *,
                 eps: float = 1e-8, shampoo_beta: float | None = None,
                 max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, one_sided: bool = False,
                 normalize_grads: bool = False,
                 correct_bias: bool = True, refresh_budget: float | None = 0.1,
                 factor_dtype: torch.dtype = torch.float32, on_nonfinite: str = "skip",
                 refresh_timer=None, process_group=None) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "shampoo_beta": shampoo_beta, "precondition_frequency": precondition_frequency,
                    "refresh_budget": refresh_budget, "max_precond_dim": max_precond_dim,
                    "merge_dims": merge_dims, "precondition_1d": precondition_1d,
                    "one_sided": one_sided,
                    "normalize_grads": normalize_grads, "correct_bias": correct_bias,
                    "factor_dtype": factor_dtype, "on_nonfinite": on_nonfinite}
        self._process_group = check_process_group(process_group)
        self._schedule = RefreshSchedule("SOAP bases", timer=refresh_timer)
        self._checks = OptionChecks(OPTIONS)  # skipped while the options are unchanged
        super().__init__(params, defaults)  # self._run: (layout options, bases, sizes)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # load_state_dict comes here too: it keeps these; a copy or unpickling has none
        self.__dict__.setdefault("_process_group", None)
        self.__dict__.setdefault("_schedule", RefreshSchedule("SOAP bases"))
        self.__dict__.setdefault("_checks", OptionChecks(OPTIONS))
        for group in self.param_groups:  # saved before the option existed
            group.setdefault("one_sided", False)

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional) runs forward and backward and returns the loss."""
        loss = call_closure(closure)
        params = all_params(self)
        if not any(p.grad is not None for p in params):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        self._checks(self.param_groups)
        check_dense_grads(params, "SOAP")
        bases, sizes = self._prepare()
        o, gstate = self.param_groups[0], self.state[bases.params[0]]
        k = gstate["step"] + 1
        record = self._refresh_record(gstate, sizes, k - 2)
        self._skips.watch(gstate["nonfinite_steps"])
        grad = bases.load_grads([p.grad for p in bases.params])
        guard = SkipGuard.check([grad], o["on_nonfinite"], gstate["nonfinite_steps"],
                                "SOAP: the gradient is not finite")
        bases.set_hyper(self._hyper(bases))
        bases.mask(guard.ok, guard.bad)  # a param without a gradient is left alone too
        gstate["step"] = k
        # the factors from this gradient: the reference updates them after the Adam step, which
        # reads only the bases, so here first (then the update overwrites the gradient buffer)
        bases.update_factors()
        if k > 1:  # the first step only gathers statistics (the reference's)
            gstate["adam_steps"].add_(guard.ok)
            bases.adam_step_(gstate["adam_steps"], o["eps"], o["correct_bias"],
                             o["normalize_grads"])
        if k == 1:
            bases.init_bases()
        elif _refresh_due(o, k - 2, record):  # n = k - 2: the Adam steps before this one
            bases.refresh()
        if record is not None and k >= 2:
            self._schedule.after_step(record, k - 2, bases.params[0].device, self._process_group)
        return loss

    def _refresh_record(self, gstate: dict, sizes: list[int], n: int) -> dict | None:
        """The automatic schedule's record (in the state), None when it is off."""
        o = self.param_groups[0]
        if o["precondition_frequency"] is not None or o["refresh_budget"] is None:
            return None
        self._schedule.budget = o["refresh_budget"]
        return self._schedule.record_in(gstate, sizes, max(n, 0))

    def _hyper(self, bases: SOAPBases) -> list[tuple[float, float, float, float, float]]:
        """Each param's ``(lr, beta1, beta2, 1 - lr weight_decay, factor decay)``."""
        values = [(g["lr"], *g["betas"], 1 - g["lr"] * g["weight_decay"],
                   g["betas"][1] if g["shampoo_beta"] is None else g["shampoo_beta"])
                  for g in self.param_groups]
        return [values[gi] for gi in bases.group_of]

    def _prepare(self) -> tuple[SOAPBases, list[int]]:
        """The bases of the run, built at the first step and whenever the params or a layout
        option changed; the state entries are views of their stacks.  Also the sizes that
        set a refresh's cost (the automatic schedule measures again when they change)."""
        o = self.param_groups[0]
        key = (o["one_sided"], *(o[k] for k in _LAYOUT_OPTIONS))
        if self._run is not None and self._run[0] == key:
            return self._run[1:]
        bases = SOAPBases([g["params"] for g in self.param_groups], o["max_precond_dim"],
                          o["merge_dims"], o["precondition_1d"], o["factor_dtype"],
                          o["one_sided"])
        assign = []
        for i, p in enumerate(bases.params):
            state = self.state[p]
            for name, views in bases.views(i).items():
                saved = state.get(name)
                if saved is not None:
                    pairs = list(zip(saved, views)) if isinstance(views, list) else [(saved,
                                                                                      views)]
                    if (isinstance(views, list) and len(saved) != len(views)) or any(
                            a.shape != b.shape for a, b in pairs):
                        raise ValueError(f"SOAP state {name!r} of a param of shape "
                                         f"{tuple(p.shape)} does not match its layout "
                                         "(max_precond_dim, merge_dims, precondition_1d or "
                                         "one_sided differ from the saved run's)")
                    for a, b in pairs:
                        b.copy_(a)
                assign.append((state, name, views))
        for state, name, views in assign:  # only once every param's state fits
            state[name] = views
        p0 = bases.params[0]
        gstate = self.state[p0]
        gstate.setdefault("step", 0)
        for name in ("adam_steps", "nonfinite_steps"):
            counter = gstate.get(name)
            gstate[name] = (torch.zeros((), dtype=torch.int64, device=p0.device) if counter is None
                            else counter.to(p0.device))
        # one_sided: a leading marker (the sizes without it stay those of the saved records)
        sizes = [-2] * o["one_sided"] + [d for p in bases.params for d in (*p.shape, -1)] + [
            int(o[k] if k != "factor_dtype" else o[k] == torch.float64) for k in _LAYOUT_OPTIONS]
        self._run = (key, bases, sizes)
        return bases, sizes


def _refresh_due(o: dict, n: int, record: dict | None) -> bool:
    """Whether the bases are refreshed after ``n + 1`` Adam steps (options ``o``): every
    ``precondition_frequency``, or automatic (``record``: the schedule's)."""
    if record is not None:
        return RefreshSchedule.due(record, n)
    every = o["precondition_frequency"]
    return (n + 1) % (_UNSCHEDULED_FREQUENCY if every is None else every) == 0
