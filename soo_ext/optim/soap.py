"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (soo_ext.curvature.soap_bases)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._support.closure import call_closure
from .._support.guard import SkipGuard
from .._support.options import Bool, Int, Number, OneOf, OptionSpecs
from .._support.params import all_params, check_dense_grads
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
    "shampoo_beta": _ShampooBeta(0, 1, high_open=True), "precondition_frequency": Int(1),
    "max_precond_dim": Int(1), "merge_dims": Bool(), "precondition_1d": Bool(),
    "factor_dtype": OneOf(torch.float32, torch.float64), "on_nonfinite": OneOf("raise", "skip"),
}, per_group=("lr", "betas", "weight_decay"))
_LAYOUT_OPTIONS = ("max_precond_dim", "merge_dims", "precondition_1d", "factor_dtype")
_UNCAST = ("GG", "Q", "adam_steps", "nonfinite_steps")  # factor dtype, counters: not cast


class SOAP(LaidOutOptimizer):
    r"""SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam in the eigenbasis of Shampoo's
    preconditioner.

    Every param (dims merged with ``merge_dims``) keeps a factor per dim,
    ``GG_k <- b GG_k + (1 - b) G_(k) G_(k)^T`` (``b = shampoo_beta``, default beta2), and its
    eigenbasis ``Q_k``: by eigh at the first step (which only gathers statistics), then every
    ``precondition_frequency`` steps by one power-iteration step and QR, ``Q <- qr(GG Q)``
    (one call per bucket of equal-size factors).  Adam runs on ``G' = G x_k Q_k^T``; the
    update ``lr (M' / (sqrt(V') + eps)) x_k Q_k`` is bias-corrected and followed by the decoupled
    weight decay ``p <- p (1 - lr weight_decay)``.  A dim above ``max_precond_dim`` is left
    unrotated; 1-D params take Adam (unless ``precondition_1d``).  Non-finite steps are skipped
    on the device.  Details, state layout and host syncs: docs/soap.md.

    Args:
        params: iterable of params or of param-group dicts (lr, betas, weight_decay per group).
        lr: learning rate (default: 3e-3).
        betas: Adam's (beta1, beta2) (default: (0.95, 0.95)).
        weight_decay: decoupled weight decay (default: 0.01).
        precondition_frequency: steps between basis refreshes (default: 10).
        eps: added to Adam's denominator (default: 1e-8).
        shampoo_beta: factor decay; None: each group's beta2 (default: None).
        max_precond_dim, merge_dims, precondition_1d: (default: 10000, False, False).
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
                 weight_decay: float = 0.01, precondition_frequency: int = 10, *,
                 eps: float = 1e-8, shampoo_beta: float | None = None,
                 max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, factor_dtype: torch.dtype = torch.float32,
                 on_nonfinite: str = "skip") -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "shampoo_beta": shampoo_beta, "precondition_frequency": precondition_frequency,
                    "max_precond_dim": max_precond_dim, "merge_dims": merge_dims,
                    "precondition_1d": precondition_1d, "factor_dtype": factor_dtype,
                    "on_nonfinite": on_nonfinite}
        super().__init__(params, defaults)  # self._run: (layout options, bases, member indices)

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional) runs forward and backward and returns the loss."""
        loss = call_closure(closure)
        params = all_params(self)
        if not any(p.grad is not None for p in params):
            return loss  # nothing to step on (as torch.optim: a param without grad is left alone)
        OPTIONS.check_groups(self.param_groups)
        check_dense_grads(params, "SOAP")
        bases, index = self._prepare()
        o, gstate = self.param_groups[0], self.state[bases.params[0]]
        k = gstate["step"] + 1
        self._skips.watch(gstate["nonfinite_steps"])
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bases.params]
        guard = SkipGuard.check(grads, o["on_nonfinite"], gstate["nonfinite_steps"],
                                "SOAP: the gradient is not finite")
        grads = [torch.where(guard.ok, g, g.new_zeros(())) for g in grads]  # NaN * 0 is NaN
        if all(p.grad is not None for p in bases.params):  # the params this step may change
            members, slots = [guard.ok] * len(index["members"]), dict.fromkeys(index["slots"],
                                                                                guard.ok)
        else:
            member = guard.ok & torch.tensor([p.grad is not None for p in bases.params],
                                             device=guard.ok.device)
            members = [member[ix] for ix in index["members"]]
            slots = {key: member[ix] for key, ix in index["slots"].items()}
        stacked = [bases.stack(grads, g) for g in range(len(bases.shape_groups))]
        gstate["step"] = k
        if k > 1:  # the first step only gathers statistics (the reference's)
            gstate["adam_steps"].add_(guard.ok)
            table, hyper = self._hyper(bases, index)
            taken = gstate["adam_steps"].to(table["lr"].dtype)
            step_size = (table["lr"] * (1 - table["beta2"] ** taken).sqrt()
                         / (1 - table["beta1"] ** taken))  # bias-corrected, per param
            for g, (G, mask) in enumerate(zip(stacked, members)):
                _adam_step_(bases, g, G, mask, step_size[index["members"][g]], o["eps"], hyper[g])
        decay, scale = self._factor_decay(bases, index)
        bases.update_factors(stacked, {key: torch.where(slots[key], d, 1.0)
                                       for key, d in decay.items()}, scale)
        if k == 1:
            bases.init_bases(slots)
        elif (k - 1) % o["precondition_frequency"] == 0:
            bases.refresh(slots, members)
        return loss

    def _hyper(self, bases: SOAPBases, index: dict) -> tuple[dict[str, Tensor], list[dict]]:
        """Each param's lr and betas (``[P]``), and per shape group its members' betas, ``1 -
        betas`` (columns against ``[B, *shape]``) and ``1 - lr weight_decay`` (``[B]``);
        cached while the groups' values stay."""
        values = [(g["lr"], *g["betas"], 1 - g["lr"] * g["weight_decay"])
                  for g in self.param_groups]
        if index.get("hyper_key") != values:
            rows = torch.tensor([values[gi] for gi in bases.group_of],
                                dtype=bases.exp_avg[0].dtype, device=bases.params[0].device)
            table = dict(zip(("lr", "beta1", "beta2"), rows.unbind(1)))
            hyper = []
            for ix, M in zip(index["members"], bases.exp_avg):
                b1, b2, shrink = rows[ix, 1:].unbind(1)
                cols = [t.view((-1,) + (1,) * (M.dim() - 1)) for t in (b1, b2)]
                hyper.append({"beta1": cols[0], "beta2": cols[1], "1-beta1": 1 - cols[0],
                              "1-beta2": 1 - cols[1], "shrink": shrink})
            index["hyper"], index["hyper_key"] = (table, hyper), values
        return index["hyper"]

    def _factor_decay(self, bases: SOAPBases, index: dict) -> tuple[dict, dict]:
        """Per bucket, each slot's factor decay and ``sqrt(1 - decay)`` (``[B]``); cached."""
        decays = [g["shampoo_beta"] if g["shampoo_beta"] is not None else g["betas"][1]
                  for g in self.param_groups]
        if index.get("decay_key") != decays:
            table = torch.tensor([decays[gi] for gi in bases.group_of], dtype=bases.fdtype,
                                 device=bases.params[0].device)
            decay = {key: table[ix] for key, ix in index["slots"].items()}
            index["decay"] = decay, {key: (1 - d).sqrt() for key, d in decay.items()}
            index["decay_key"] = decays
        return index["decay"]

    def _prepare(self) -> tuple[SOAPBases, dict]:
        """The bases of the run, built at the first step and whenever the params or a layout
        option changed; the state entries are views of their stacks."""
        o = self.param_groups[0]
        key = tuple(o[k] for k in _LAYOUT_OPTIONS)
        if self._run is not None and self._run[0] == key:
            return self._run[1:]
        bases = SOAPBases([g["params"] for g in self.param_groups], o["max_precond_dim"],
                          o["merge_dims"], o["precondition_1d"], o["factor_dtype"])
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
                                         "(max_precond_dim, merge_dims or precondition_1d "
                                         "differ from the saved run's)")
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
        device = p0.device
        index = {"members": [torch.tensor([i for i, _ in sg.members], device=device)
                             for sg in bases.shape_groups],
                 "slots": {key: torch.tensor(own, device=device)
                           for key, own in bases.owner.items()}}
        self._run = (key, bases, index)
        return bases, index


def _adam_step_(bases: SOAPBases, g: int, G: Tensor, mask: Tensor, step_size: Tensor,
                eps: float, hyper: dict[str, Tensor]) -> None:
    """Adam in the eigenbasis for the params of shape group ``g`` (gradients ``G``, bias-
    corrected step sizes ``[B]``), those of ``mask`` only; the moments live in the rotated
    space."""
    ones = (1,) * (G.dim() - 1)
    m = mask.view((-1,) + ones)
    M, V = bases.exp_avg[g], bases.exp_avg_sq[g]
    Gr = bases.rotate(G, g)
    M.mul_(torch.where(m, hyper["beta1"], 1.0)).add_(Gr * hyper["1-beta1"])
    V.mul_(torch.where(m, hyper["beta2"], 1.0)).addcmul_(Gr, Gr * hyper["1-beta2"])
    U = bases.rotate(M / (V.sqrt() + eps), g, back=True)
    U = U * torch.where(mask, -step_size, 0.0).view((-1,) + ones)
    params = [bases.params[i] for i, _ in bases.shape_groups[g].members]
    torch._foreach_add_(params, [u.view(p.shape) for u, p in zip(U.unbind(0), params)])
    torch._foreach_mul_(params, list(torch.where(mask, hyper["shrink"], 1.0)
                                     .expand(len(params)).unbind(0)))
