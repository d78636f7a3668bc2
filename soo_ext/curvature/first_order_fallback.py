"""The first-order step of the params a K-FAC-type optimizer (KFAC, EKFAC, NaturalGradient)
leaves out (embeddings, norms, biases of unsupported layers, bare params): its options
(``fallback``, ``fallback_lr``, ``fallback_betas``, ``fallback_eps``) and the AdamW step
(torch.optim.AdamW's update, decoupled weight decay, bias correction by a per-param step count
on the device: no host sync).  The 'sgd' fallback is the optimizer's own SGD-with-momentum step
(KFAC's ``_sgd_momentum_``).  An LR scheduler scales ``fallback_lr`` as it scales the group's
``lr`` (:func:`schedule_factor`): torch's schedulers write ``lr`` only.

The AdamW state lives in the optimizer's per-param state (``exp_avg``, ``exp_avg_sq`` in the
param's dtype, ``fallback_step`` a float32 count that ``Optimizer.load_state_dict`` must not
cast: :data:`UNCAST`, put back by :func:`restore_uncast`), so ``state_dict`` holds it."""
from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from .._support.guard import select
from .._support.options import Number, OneOf, Spec

__all__ = ["OPTIONS", "PER_GROUP", "UNCAST", "adamw_fallback_", "fallback_params",
           "restore_uncast", "schedule_factor", "sgd_lr"]


class _Betas(Spec):
    requirement = "(beta1, beta2) with beta1 in [0, 1) and beta2 in [0, 1)"

    def accepts(self, b) -> bool:
        return isinstance(b, (tuple, list)) and len(b) == 2 and all(
            isinstance(x, Real) and not isinstance(x, bool) and 0 <= x < 1 for x in b)


# 'fallback' and 'fallback_eps' are one setting for the run; 'fallback_lr' (None: the group's
# lr with 'sgd', ADAMW_LR with 'adamw') and 'fallback_betas' may differ between param groups.
OPTIONS = {"fallback": OneOf("sgd", "adamw"),
           "fallback_lr": Number(0, high_open=True, none=True), "fallback_betas": _Betas(),
           "fallback_eps": Number(0, low_open=True, high_open=True)}
PER_GROUP = ("fallback_lr", "fallback_betas")
UNCAST = ("fallback_step",)
# fallback_lr=None with 'adamw': AdamW's best lr on the development token models (docs/kfac.md,
# "Other params"; torch.optim.AdamW's default is 1e-3)
ADAMW_LR = 1e-2


def fallback_params(params: list[Tensor], group: dict) -> tuple[list[Tensor], list[Tensor]]:
    """``(sgd, adamw)``: the left-out ``params`` that take the SGD-with-momentum step and those
    that take the AdamW step under the options ``group`` (the first param group's)."""
    return (params, []) if group["fallback"] == "sgd" else ([], params)


def schedule_factor(group: dict) -> float:
    """What an LR scheduler has made of ``group``'s lr: ``lr / initial_lr`` (``initial_lr``: the
    key torch's LRSchedulers set; ReduceLROnPlateau sets none), else 1 (also for an
    ``initial_lr`` of 0)."""
    initial = group.get("initial_lr")
    return group["lr"] / initial if initial else 1.0


def sgd_lr(group: dict) -> float:
    """The SGD fallback's lr in ``group``: ``fallback_lr`` (scheduled), or the group's ``lr``."""
    fallback_lr = group.get("fallback_lr")
    return group["lr"] if fallback_lr is None else fallback_lr * schedule_factor(group)


@torch.no_grad()
def adamw_fallback_(groups: list[dict], state: dict, group_of: dict[int, int],
                    params: list[Tensor], ok: Tensor | None) -> None:
    """One AdamW step of ``params`` (each with a gradient) in place, with each param group's
    ``fallback_lr`` (scheduled), ``fallback_betas`` and ``weight_decay`` (decoupled:
    ``p *= 1 - lr wd``) and the first group's ``fallback_eps``; ``ok`` (a bool scalar on the
    device, or None): where it is False nothing changes (params, moments and counts; the
    gradient may be non-finite)."""
    eps = groups[0]["fallback_eps"]
    for p in params:
        group = groups[group_of[id(p)]]
        lr = (ADAMW_LR if group["fallback_lr"] is None else group["fallback_lr"]) \
            * schedule_factor(group)
        b1, b2 = group["fallback_betas"]
        wd = group["weight_decay"]
        st = state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["fallback_step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        m, v, t = st["exp_avg"], st["exp_avg_sq"], st["fallback_step"]
        ct = torch.promote_types(p.dtype, torch.float32)  # the bias corrections' dtype
        g = p.grad
        if ok is None:
            t.add_(1)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step_lr = lr
        else:  # zero gradient and zero weights where skipped: m, v, t and p stay as they are
            okf = ok.to(ct)
            g = select(ok, g, 0.0)
            t.add_(okf.to(t.dtype))
            m.lerp_(g, (1 - b1) * okf.to(m.dtype))
            v.mul_(torch.where(ok, v.new_full((), b2), 1)).addcmul_(g, g, value=1 - b2)
            step_lr = lr * okf
        tc = t.to(ct).clamp_min(1)  # (a first step skipped: t = 0, no 0/0)
        bc1 = 1 - torch.pow(b1, tc)
        bc2_sqrt = (1 - torch.pow(b2, tc)).sqrt()
        if wd != 0:
            p.mul_((1 - step_lr * wd) if ok is None else (1 - step_lr * wd).to(p.dtype))
        update = (m / bc1.to(m.dtype)) / (v.sqrt() / bc2_sqrt.to(v.dtype) + eps)
        p.sub_(update * (step_lr if ok is None else step_lr.to(p.dtype)))


def restore_uncast(kept: dict[Tensor, dict[str, Tensor]], state: dict) -> None:
    """After ``load_state_dict_uncast``: move the :data:`UNCAST` entries of ``kept`` (by param,
    popped) into ``state``, as float32 on the param's device."""
    for p, entries in kept.items():
        for key in UNCAST:
            if key in entries:
                state[p][key] = entries.pop(key).to(device=p.device,
                                                    dtype=torch.float32).clone()
