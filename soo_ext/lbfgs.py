"""L-BFGS: a drop-in replacement of ``torch.optim.LBFGS`` on the fused history kernels."""
from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

from ._common import check_history_dtype
from .history import LBFGSHistory
from .quasi_newton import NonFiniteError, QuasiNewton

__all__ = ["LBFGS", "NonFiniteError"]


class LBFGS(QuasiNewton):
    r"""L-BFGS, a drop-in replacement of :class:`torch.optim.LBFGS` on the fused history kernels.

    Same constructor arguments, defaults, closure semantics, stopping rules and strong-Wolfe line
    search as ``torch.optim.LBFGS`` (so replacing the import is enough); on deterministic problems
    the iterates match torch's up to rounding.  The curvature pairs live in preallocated ring
    buffers (:class:`soo_ext.LBFGSHistory`) and the direction is one fused kernel call.

    Host syncs: each closure evaluation fetches, in one transfer, the loss, ``max|g|`` and what
    the next decisions need (``sum|g|`` on the very first iteration, ``g.d`` in the line search, the
    curvature ``y.s`` of the pair that evaluation completes); each direction fetches ``g.d`` and
    ``max|d|`` once.  A step makes (evaluations + iterations) syncs: 2 per iteration without line
    search, 1 + (line-search evaluations) with it, plus 1 for the step's first evaluation.

    Beyond ``torch.optim.LBFGS``:

    * **Param groups.**  All params of all groups share one curvature history (one flat vector);
      only ``lr`` may differ between groups.  With ``lr_ref = max_g lr_g`` and ``P`` the diagonal
      matrix holding ``lr_g / lr_ref`` on the entries of group ``g``, the step length ``t`` (the
      line-search scalar) is computed exactly as torch does with ``lr = lr_ref``, and the initial
      inverse Hessian is ``gamma * P`` instead of ``gamma * I`` (``gamma = s.y / y.P.y`` of the
      newest pair): this is torch's L-BFGS run on the rescaled variables ``z = P^{-1/2} x``.
      The first step on each group is therefore ``lr_g`` times torch's unit-lr step, a group
      with ``lr = 0`` stays fixed, and every direction is a descent direction (scaling the
      direction ``-H g`` group-wise would not guarantee that).  Stopping tests and the first
      step length use the actual gradient and step.  With one group (or equal lrs) ``P = I``:
      torch's algorithm.  An LR scheduler changes ``lr_ref`` (hence ``t``) and ``P`` at the next
      ``step``; pairs stored before a change of the lr ratios keep the scaling they had.
    * ``history_dtype``: storage dtype of the pairs (``None``: the params' dtype;
      ``torch.bfloat16`` is allowed with float32 params).
    * ``on_nonfinite``: what happens when an evaluation gives a non-finite loss or gradient.
      ``'raise'`` (default) raises :class:`NonFiniteError`, ``'skip'`` returns the loss of the
      step's first evaluation.  Either way the bad evaluation is discarded: nothing from it reaches
      the history or the state, and the params are back at the last iterate whose loss and
      gradient were finite -- the step is a no-op when the first evaluation is the bad one.
      (If the very first iteration of the run fails, the next step starts afresh, with the
      damped first step length.)
    * CPU or CUDA params, float32 or float64, all on one device and of one dtype.
    * **Data parallel.**  With the model wrapped in ``DistributedDataParallel`` (which averages
      the gradients) each rank's closure returns the loss of its own shard, so the line search
      and the stopping tests would decide differently on each rank and the replicas drift
      apart: pass ``process_group=`` (e.g. ``model.process_group``) and the losses are averaged
      over it (one all-reduce per evaluation), so every rank takes the same steps as one process
      on the concatenated batch (ranks' batches of equal size).  ``step`` returns the rank's
      own loss.

    State (global, kept with the first param like torch): ``func_evals``, ``n_iter``, ``d`` (last
    direction), ``t`` (step taken along ``d`` from the point where ``prev_flat_grad`` was
    evaluated, 0.0 when none was taken), ``prev_flat_grad``, ``prev_loss`` and ``history``
    (:meth:`LBFGSHistory.state_dict`).  ``load_state_dict`` keeps ``history`` out of
    ``Optimizer``'s dtype casting, so a bfloat16 history is restored as is; a resumed run is
    bit-identical to an uninterrupted one.  As with torch, ``state_dict()`` returns references:
    deep-copy or save it to snapshot.

    Args:
        params: iterable of params or of param-group dicts.
        lr: learning rate (default: 1).
        max_iter: maximal number of iterations per ``step`` (default: 20).
        max_eval: maximal number of closure evaluations per ``step``
            (default: ``max_iter * 5 // 4``).
        tolerance_grad: stop when ``max|g| <= tolerance_grad`` (default: 1e-7).
        tolerance_change: stop on a smaller change of loss or params (default: 1e-9).
        history_size: number of curvature pairs kept (default: 100).
        line_search_fn: ``None`` (fixed step) or ``'strong_wolfe'``.
        maximize: maximise the objective instead of minimising it (default: False).
        history_dtype: storage dtype of the history (default: None, the params' dtype).
        on_nonfinite: ``'raise'`` (default) or ``'skip'``.
        process_group: data parallel (``torch.distributed``): the ranks whose losses are
            averaged (default None: the loss is the closure's own).
    """

    STATE_KEY = "history"
    CURVATURE_OPTIONS = ("history_size", "history_dtype")

    def __init__(self, params, lr: float | Tensor = 1, max_iter: int = 20,
                 max_eval: int | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None, *, maximize: bool = False,
                 history_dtype: torch.dtype | None = None, on_nonfinite: str = "raise",
                 process_group=None) -> None:
        super().__init__(params, {
            "lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change, "history_size": history_size,
            "line_search_fn": line_search_fn, "maximize": maximize,
            "history_dtype": history_dtype, "on_nonfinite": on_nonfinite}, process_group)

    @classmethod
    def _check_curvature_options(cls, options: dict) -> None:
        v = options["history_size"]
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Invalid history_size: {v!r} (must be an int >= 1)")
        if options["history_dtype"] not in (None, torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"Invalid history_dtype: {options['history_dtype']!r} "
                             "(must be None, torch.float32, torch.float64 or torch.bfloat16)")

    def _check_curvature_params(self, params: list[Tensor], group: dict) -> None:
        check_history_dtype(params[0].dtype, group["history_dtype"])

    def _new_curvature(self, n: int, dtype: torch.dtype, device: torch.device,
                       group: dict) -> LBFGSHistory:
        return LBFGSHistory(n, group["history_size"], dtype, device, group["history_dtype"])

    def _check_curvature_unchanged(self, curvature: LBFGSHistory, group: dict) -> None:
        if curvature.history_size != group["history_size"]:
            raise ValueError("Invalid history_size: it cannot change after the first step")
