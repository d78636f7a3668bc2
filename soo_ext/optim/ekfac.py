"""EKFAC (George et al. 2018): K-FAC with its eigenvalues corrected, the recipe of
:class:`soo_ext.KFAC` over soo_ext.curvature's :class:`EigenCorrectedFactors`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._support.options import Int, Number, OptionSpecs
from ..curvature.first_order_fallback import PER_GROUP as FALLBACK_GROUP
from ..curvature.kfac_factors import EigenCorrectedFactors
from .kfac import KFAC, OPTIONS as KFAC_OPTIONS, kfac_init

__all__ = ["EKFAC"]

OPTIONS = OptionSpecs(
    {**{k: v for k, v in KFAC_OPTIONS.specs.items() if k != "mode"},
     "scale_update_steps": Int(1), "scale_decay": Number(0, 1)},
    per_group=("lr", "momentum", "weight_decay") + FALLBACK_GROUP)


class EKFAC(KFAC):
    r"""EKFAC, eigenvalue-corrected K-FAC (George, Laurent, Bouthillier, Ballas, Vincent,
    NeurIPS 2018): :class:`soo_ext.KFAC` in eigen mode whose eigenvalues ``d_G d_A^T`` are
    replaced by the diagonal second moment of the per-sample gradients in the Kronecker
    eigenbasis, re-estimated more often than the basis.

    Every layer K-FAC preconditions gets ``V = Q_G [(Q_G^T grad Q_A) / (S + damping)] Q_A^T``:
    ``Q_A``, ``Q_G`` the eigenbases of K-FAC's running factors (refreshed every
    ``inv_update_steps``: automatic by default), ``S`` the running average (``scale_decay``) of
    ``mean_n ((Q_G^T grad_n Q_A) ** 2)`` over the per-sample gradients of the batch (every
    ``scale_update_steps``, after the basis refresh of that step; a conv's per-sample gradient
    sums its output positions before the square: exact). The rest is KFAC's: layers, KL clip,
    SGD with momentum, accumulation, AMP, data parallelism (``S`` averaged over the ranks),
    non-finite steps skipped. See docs/ekfac.md.

    Args:
        model: the nn.Module whose layers are hooked (or its ``torch.compile`` wrapper).
        lr, momentum, weight_decay: of the SGD step (0.1, 0.9, 0; per group).
        damping: added to the scaling (default 1e-3).
        factor_decay: running-average decay of the factors (default 0.95).
        scale_decay: running-average decay of the scaling (default 0.75; 0: the batch's).
        kl_clip: kappa of the KL clip, or None (default 1e-3).
        factor_update_steps, inv_update_steps, scale_update_steps: steps between factor
            updates, between eigendecompositions and between scaling updates (2, None, 2);
            None: automatic, the decompositions at most ``refresh_budget`` (0.1) of the time.
        kl_clip_lr, skip_layers, on_nonfinite, factor_dtype, accumulation_steps, batch_averaged,
            grad_scaler, params, process_group, spread_inverses, refresh_budget,
            refresh_timer, fallback, fallback_lr, fallback_betas, fallback_eps: as in
            :class:`soo_ext.KFAC`.

    Example::

        opt = soo_ext.EKFAC(model, lr=0.1)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """

    _OPTIONS = OPTIONS
    _UNCAST = KFAC._UNCAST + ("scale",)

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3, factor_decay: float = 0.95,
                 scale_decay: float = 0.75, kl_clip: float | None = 1e-3,
                 factor_update_steps: int | None = 2, inv_update_steps: int | None = None,
                 scale_update_steps: int = 2, *, kl_clip_lr: str = "peak", skip_layers=None,
                 on_nonfinite: str = "skip", factor_dtype: torch.dtype = torch.float32,
                 accumulation_steps: int = 1,
                 batch_averaged: bool = True, grad_scaler=None, params=None,
                 process_group=None, spread_inverses: bool = True,
                 refresh_budget: float | None = 0.1, refresh_timer=None, fallback: str = "adamw",
                 fallback_lr=None, fallback_betas=(0.9, 0.999), fallback_eps=1e-8) -> None:
        kfac_init(self, locals())

    def _mode(self, o: dict) -> str:
        return EigenCorrectedFactors.MODE

    def _statistics_due(self, k: int) -> bool:
        return super()._statistics_due(k) or k % self.param_groups[0]["scale_update_steps"] == 0

    def _statistics_captured(self, factors: EigenCorrectedFactors, k: int,
                             ok: Tensor | None) -> None:
        o = self.param_groups[0]
        if k % o["scale_update_steps"] == 0:
            factors.update_scale(o["scale_decay"], ok, self._process_group)
