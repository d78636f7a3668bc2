"""Shampoo (Gupta, Koren & Singer 2018; Anil et al. 2020) with grafting, on the Kronecker-factor
ops: every factor of one size lives in one bucket tensor, updated and rooted in batches."""
from __future__ import annotations

import itertools
import math
from numbers import Integral, Real
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from ._common import (SpreadPlan, all_finite, call_closure, check_groups, check_params,
                      check_process_group, load_state_dict_uncast)
from ._support.errors import NonFiniteError

__all__ = ["Shampoo", "RootFailureError", "merge_dims"]

# Options that may differ between param groups (read at every step: LR schedulers work); every
# other option is one setting for the run (the buckets span all groups).
_GROUP_OPTIONS = ("lr", "betas", "weight_decay")
_GLOBAL_OPTIONS = ("epsilon", "decoupled_weight_decay", "max_preconditioner_dim", "merge_dims",
                   "precondition_1d", "precondition_frequency", "start_preconditioning_step",
                   "grafting", "grafting_epsilon", "grafting_beta2", "root_method",
                   "factor_dtype", "max_root_failures", "on_nonfinite")
_NUMBERS = {  # (accepts the value, what is required); NaN fails every test
    "lr": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "epsilon": (lambda v: 0 < v < math.inf, "a number > 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "grafting_epsilon": (lambda v: 0 < v < math.inf, "a number > 0"),
    "grafting_beta2": (lambda v: 0 < v < 1, "in (0, 1)"),
}
_INTS = ("max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step",
         "max_root_failures")
_LAYOUT_OPTIONS = ("max_preconditioner_dim", "merge_dims", "precondition_1d", "factor_dtype",
                   "grafting")
_BOOLS = ("decoupled_weight_decay", "merge_dims", "precondition_1d")
# State entries that Optimizer.load_state_dict must not cast to the params' dtype (factors may be
# float64 with float32 params; counters are integers).
_UNCAST = ("factors", "roots", "root_failures", "nonfinite_steps", "failed_roots")
_FAILED = 2  # status of ops.kron_inverse_root: failed, zero output


class RootFailureError(RuntimeError):
    """The inverse root of a factor failed ``max_root_failures`` consecutive times."""


def _is_real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _check_options(o: dict) -> None:
    """ValueError naming the offending option."""
    for key, (accepts, required) in _NUMBERS.items():
        v = o[key]
        if not _is_real(v) or not accepts(v):
            raise ValueError(f"Invalid {key}: {v!r} (must be {required})")
    betas = o["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_real(b) for b in betas)
            or not 0 <= betas[0] < 1 or not 0 < betas[1] <= 1):
        raise ValueError(f"Invalid betas: {betas!r} (must be (beta1, beta2) with beta1 in [0, 1) "
                         "and beta2 in (0, 1])")
    for key in _INTS:
        v = o[key]
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Invalid {key}: {v!r} (must be an int >= 1)")
    for key in _BOOLS:
        if not isinstance(o[key], bool):
            raise ValueError(f"Invalid {key}: {o[key]!r} (must be a bool)")
    if o["grafting"] not in ("sgd", "adagrad", "adam", None):
        raise ValueError(f"Invalid grafting: {o['grafting']!r} (must be 'sgd', 'adagrad', "
                         "'adam' or None)")
    if o["root_method"] not in ("newton", "eigh"):
        raise ValueError(f"Invalid root_method: {o['root_method']!r} (must be 'newton' or "
                         "'eigh')")
    if o["factor_dtype"] not in (torch.float32, torch.float64):
        raise ValueError(f"Invalid factor_dtype: {o['factor_dtype']!r} (must be torch.float32 "
                         "or torch.float64)")
    if o["on_nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"Invalid on_nonfinite: {o['on_nonfinite']!r} (must be 'raise' or "
                         "'skip')")


def merge_dims(shape, max_dim: int) -> tuple[int, ...]:
    """Merge adjacent dims while their product stays ``<= max_dim``; size-1 dims disappear.

    ``merge_dims((64, 3, 3, 3), 1024) == (576, 3)``, ``merge_dims((10, 1, 1), 8) == (10,)``,
    ``merge_dims((1, 1), 8) == ()``.  A dim larger than ``max_dim`` stays as it is (it is
    blocked later).
    """
    out: list[int] = []
    product = 1
    for d in shape:
        if product * d <= max_dim:
            product *= d
        else:
            if product > 1:
                out.append(product)
            product = d
    if product > 1:
        out.append(product)
    return tuple(out)


class _Param:
    """Layout of one param: its merged shape and blocks (slices of the merged tensor), or None
    for a param that takes the grafting (diagonal) direction."""

    def __init__(self, p: Tensor, group: int, options: dict) -> None:
        self.p, self.group = p, group
        max_dim = options["max_preconditioner_dim"]
        if options["merge_dims"]:
            merged = merge_dims(p.shape, max_dim)
        else:
            merged = tuple(d for d in p.shape if d > 1)
        wanted = p.dim() >= 2 or (p.dim() == 1 and options["precondition_1d"])
        self.merged = merged if wanted and merged else None
        self.blocks: list[tuple[slice, ...]] = []
        self.block_shapes: list[tuple[int, ...]] = []
        if self.merged is not None:
            chunks = [[(a, min(a + max_dim, d)) for a in range(0, d, max_dim)] for d in merged]
            for combo in itertools.product(*chunks):
                self.blocks.append(tuple(slice(a, b) for a, b in combo))
                self.block_shapes.append(tuple(b - a for a, b in combo))

    def block(self, x: Tensor, j: int) -> Tensor:
        return x.reshape(self.merged)[self.blocks[j]]


class _ShapeGroup:
    """All blocks (of any param) of one shape: batched through the factor update and the
    preconditioning.  ``slots[i] = (bucket key, start)``: the factors of mode ``i`` of the
    ``B`` blocks are ``bucket[start:start + B]``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.members: list[tuple[int, int]] = []  # (param position, block index)
        self.slots: list[tuple[tuple[int, int], int]] = []


class _Workspace:
    """Layouts, shape groups and buckets of a run; the per-param state holds views of the
    buckets (so that state_dict() sees them)."""

    def __init__(self, opt: "Shampoo") -> None:
        groups = opt.param_groups
        params = [p for g in groups for p in g["params"]]
        check_params(params, "Shampoo")
        options = groups[0]
        p0 = params[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.fdtype = options["factor_dtype"]
        self.zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self.params = [_Param(p, gi, options) for gi, g in enumerate(groups) for p in g["params"]]
        self.by_group = [[i for i, P in enumerate(self.params) if P.group == gi]
                         for gi in range(len(groups))]

        shape_groups: dict[tuple[int, ...], _ShapeGroup] = {}
        for i, P in enumerate(self.params):
            for j, shape in enumerate(P.block_shapes):
                shape_groups.setdefault(shape, _ShapeGroup(shape)).members.append((i, j))
        self.shape_groups = list(shape_groups.values())
        sizes: dict[tuple[int, int], int] = {}  # bucket key (n, order) -> number of factors
        self.owner: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # slot -> (i, j, mode)
        slot_of: dict[tuple[int, int, int], tuple[tuple[int, int], int]] = {}
        for sg in self.shape_groups:
            for mode, n in enumerate(sg.shape):
                key = (n, len(sg.shape))
                start = sizes.get(key, 0)
                sg.slots.append((key, start))
                sizes[key] = start + len(sg.members)
                for m, (i, j) in enumerate(sg.members):
                    self.owner.setdefault(key, []).append((i, j, mode))
                    slot_of[(i, j, mode)] = (key, start + m)
        kw = {"dtype": self.fdtype, "device": self.device}
        self.factors = {key: torch.zeros(b, key[0], key[0], **kw) for key, b in sizes.items()}
        self.roots = {key: torch.eye(key[0], **kw).repeat(b, 1, 1) for key, b in sizes.items()}
        self.fails = {key: torch.zeros(b, dtype=torch.int32, device=self.device)
                      for key, b in sizes.items()}
        self.slot_group = {key: [self.params[i].group for i, _, _ in own]
                           for key, own in self.owner.items()}
        self.layout: tuple = ()
        self.spread: SpreadPlan | None = None  # data parallel: who roots what
        self._decay_key: tuple | None = None
        self._decay: dict[tuple[int, int], Tensor] | float = 1.0

        grafting = options["grafting"]
        assign: list[tuple[dict, str, list[Tensor]]] = []
        for i, P in enumerate(self.params):
            state = opt.state[P.p]
            for key in ("momentum_buffer",) + (("graft_state",) if grafting in ("adagrad", "adam")
                                               else ()):
                if key not in state:
                    state[key] = torch.zeros_like(P.p, memory_format=torch.preserve_format)
                elif state[key].shape != P.p.shape:
                    raise ValueError(f"Shampoo state {key!r} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(P.p.shape)}")
            if P.merged is None:
                for key in ("factors", "roots", "root_failures"):
                    if key in state:
                        raise ValueError(f"Shampoo state {key!r} of a param of shape "
                                         f"{tuple(P.p.shape)} that is not preconditioned with "
                                         "these options (max_preconditioner_dim, merge_dims, "
                                         "precondition_1d differ from the saved run's)")
                continue
            slots = [slot_of[(i, j, mode)] for j in range(len(P.blocks))
                     for mode in range(len(P.merged))]
            for key, buckets in (("factors", self.factors), ("roots", self.roots),
                                 ("root_failures", self.fails)):
                views = [buckets[k][s] for k, s in slots]
                saved = state.get(key)
                if saved is not None:
                    if (len(saved) != len(views)
                            or any(a.shape != b.shape for a, b in zip(saved, views))):
                        raise ValueError(
                            f"Shampoo state {key!r} of a param of shape {tuple(P.p.shape)} "
                            "does not match its blocks (max_preconditioner_dim, merge_dims "
                            "or precondition_1d differ from the saved run's)")
                    for v, s in zip(views, saved):
                        v.copy_(s)
                assign.append((state, key, views))
        for state, key, views in assign:  # only once every param's state fits
            state[key] = views
        self.state = opt.state[p0]
        self.state.setdefault("step", 0)
        self.state.setdefault("root_updates", 0)
        for key, dtype in (("nonfinite_steps", torch.int64), ("failed_roots", torch.int64)):
            counter = self.state.get(key)
            self.state[key] = (torch.zeros((), dtype=dtype, device=self.device) if counter is None
                               else counter.to(self.device))

    def decay(self, groups: list[dict]) -> dict[tuple[int, int], Tensor] | float:
        """beta2 per factor slot (a float if one for all); cached while the groups' beta2 stay."""
        betas2 = tuple(g["betas"][1] for g in groups)
        if betas2 != self._decay_key:
            self._decay_key = betas2
            if len(set(betas2)) == 1:
                self._decay = float(betas2[0])
            else:
                self._decay = {key: torch.tensor([betas2[gi] for gi in gs], dtype=self.fdtype,
                                                 device=self.device)
                               for key, gs in self.slot_group.items()}
        return self._decay


class Shampoo(Optimizer):
    r"""Shampoo with grafting (Gupta, Koren & Singer 2018; Anil et al. 2020, "Scalable
    second order optimization"; Distributed Shampoo, Shi et al. 2023).

    **Layout.**  Each param is viewed as a tensor of order ``k``: size-1 dims are dropped and, with
    ``merge_dims=True``, adjacent dims are merged while their product is
    ``<= max_preconditioner_dim`` (:func:`merge_dims`: a ``(64, 3, 3, 3)`` conv weight becomes
    ``(576, 3)``, a ``(20, 30)`` matrix becomes one dim of 600).  Every dim larger than
    ``max_preconditioner_dim`` is cut into blocks of that size (the last one partial); a block is
    a tensor of order ``k`` (its shape may hold a partial size, even 1) with one factor per dim.
    1-D params (biases, norms) and 0-d ones take the grafting (diagonal) direction; with
    ``precondition_1d=True`` a 1-D param is preconditioned as an order-1 tensor (one full factor
    per block: full-matrix AdaGrad on it).

    **Step** ``t`` (``g`` the gradient, ``+ weight_decay * p`` if ``decoupled_weight_decay`` is
    False):

    1. Factors of every block ``G`` (from step 1 on): ``L_i <- beta2 L_i + G_(i) G_(i)^T``
       (``G_(i)`` the mode-``i`` unfolding; for a matrix ``L = beta2 L + G G^T``,
       ``R = beta2 R + G^T G``); ``beta2 = 1`` sums them like AdaGrad.
    2. Roots, at steps ``start_preconditioning_step + j * precondition_frequency``:
       ``P_i = (L_i + epsilon I)^{-1/(2k)}`` by :func:`soo_ext.ops.kron_inverse_root`
       (``root_method``), one call per bucket.  A root that fails (status 2) keeps the
       previous one (the identity before the first) and counts against its factor.
    3. Direction per block: ``S = G x_1 P_1 ... x_k P_k`` (for a matrix ``P_L G P_R``), from
       ``start_preconditioning_step`` on; before it, or for a param without factors, the
       grafting direction ``A``.  With grafting, ``S <- ||A_block|| / ||S|| * S`` per block
       (``||S|| = 0`` gives 0): the step size from the grafting method, the direction from
       Shampoo.  Grafting directions (elementwise, per param): ``'sgd'``: ``A = g``;
       ``'adagrad'``: ``s <- s + g^2``, ``A = g / (sqrt(s) + grafting_epsilon)``; ``'adam'``
       (RMSProp with bias correction, no first moment of its own):
       ``v <- b v + (1 - b) g^2``, ``A = g / (sqrt(v) / sqrt(1 - b^t) + grafting_epsilon)``
       with ``b = grafting_beta2``; None: ``A = g`` and no rescaling (raw Shampoo).
    4. Momentum on the final direction ``d``: ``m <- beta1 m + (1 - beta1) d``, and
       ``p <- p - lr m / (1 - beta1^t)`` (bias-corrected, ``t`` the steps taken); with
       ``decoupled_weight_decay`` (default) also ``p <- p - lr weight_decay p`` first.
       So before the start step, with ``beta1 = 0`` the update is exactly the grafting
       optimizer's: SGD, AdaGrad (``initial_accumulator_value=0``), or Adam with
       ``betas=(0, grafting_beta2)``.

    A param whose ``.grad`` is None counts as having a zero gradient (its factors decay, its
    momentum moves it).

    **Data parallel.**  Under ``DistributedDataParallel`` the gradients are averaged, so every
    rank builds the same factors and takes the same steps without further communication.  With
    ``process_group=`` (e.g. ``ddp_model.process_group``) the roots are spread over its ranks
    as Distributed Shampoo spreads them: factor by factor, largest first, to the rank with the
    least ``sum n^3`` so far (:class:`soo_ext._common.SpreadPlan`); each rank roots its factors
    of a bucket in one op call and one all-gather after all buckets gives every rank every
    root (the same bits on every rank).

    **Buckets and cost.**  All factors of one size ``n`` and order ``k`` (across params, blocks
    and param groups) are one ``[B, n, n]`` tensor (factor_dtype), their roots another; the
    state's per-block ``factors`` and ``roots`` are views of them.  Blocks of one shape (across
    params) are stacked once per step into ``[B, *shape]``: one batched
    :func:`soo_ext.ops.kron_factor_update_` per mode and one batched matmul per mode to apply the
    roots.  A root step makes one ``kron_inverse_root`` call per bucket.  ``step()`` does not
    synchronise with the host, except once at a root step (to apply the failure policy, and to
    drop the new roots if the step is being skipped) and, with ``on_nonfinite='raise'``, once per
    step (the first step also copies per-factor ``beta2`` values to the device when the groups'
    ``beta2`` differ).

    **Non-finite gradients.**  ``on_nonfinite='skip'`` (default): a step whose gradient has a
    NaN or inf anywhere is skipped, decided on the device: factors, roots, grafting state,
    momentum and params are left bit for bit as they were; ``state['nonfinite_steps']`` (device
    int64) is incremented.  The step counts in ``state['step']`` (the root schedule is kept on
    the host); a skipped root step computes no roots.  ``'raise'``: raises
    :class:`soo_ext.quasi_newton.NonFiniteError` and changes nothing.

    **Root failures.**  ``root_failures[i]`` (per factor, device int32) counts consecutive failed
    roots of a factor (reset by a good one), ``state['failed_roots']`` all of them.  When a factor
    reaches ``max_root_failures`` consecutive failures, :class:`RootFailureError` is raised at that
    root step, before the params move (``step``, the factors and the other roots are already
    updated).

    **State.**  Global, under the first param: ``step`` (int, steps called), ``root_updates``
    (int, root steps done), ``nonfinite_steps``, ``failed_roots``.  Per param:
    ``momentum_buffer``, ``graft_state`` (AdaGrad sum or Adam second moment, for
    ``grafting='adagrad'/'adam'``) and, for a preconditioned param, lists over (block, dim) in
    block-major order: ``factors`` and ``roots`` (``[n, n]`` views of the buckets) and
    ``root_failures`` (0-d views).  ``load_state_dict`` keeps them out of ``Optimizer``'s dtype
    casting and copies them into fresh buckets at the next step; a resumed run (same options)
    is bit-identical to an uninterrupted one.  Param groups may be added at any time (the buckets
    are rebuilt).  As with torch, ``state_dict()`` returns references: deep-copy or save it to
    snapshot.

    Args:
        params: iterable of params or of param-group dicts (float32 or float64, one dtype and one
            device).
        lr: learning rate (default: 1e-3; with ``grafting='adam'`` an Adam learning rate).
        betas: ``(beta1, beta2)``: momentum of the final direction in [0, 1) and decay of the
            factors in (0, 1] (default: (0.9, 0.999)).
        epsilon: added to the factors in the root, ``(L + epsilon I)^{-1/(2k)}`` (default: 1e-12).
        weight_decay: (default: 0).
        decoupled_weight_decay: True (default): ``p <- p - lr wd p`` (AdamW style); False: L2,
            ``wd p`` added to the gradient before the statistics.
        max_preconditioner_dim: largest factor size: merging bound and block size
            (default: 1024).
        merge_dims: merge small adjacent dims (default: True).
        precondition_1d: give 1-D params full factors (default: False: grafting only).
        precondition_frequency: steps between root recomputations (default: 10).
        start_preconditioning_step: first step that uses (and computes) roots (default: 10).
        grafting: ``'adam'`` (default), ``'adagrad'``, ``'sgd'`` or None.
        grafting_epsilon: (default: 1e-8).
        grafting_beta2: second-moment decay of ``grafting='adam'`` (default: 0.999).
        root_method: ``'eigh'`` (default) or ``'newton'`` (coupled Newton iteration).
        factor_dtype: ``torch.float32`` (default) or ``torch.float64``.
        max_root_failures: consecutive failed roots of one factor that raise (default: 5).
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.
        process_group: data parallel: the ranks over which the roots are spread (default None:
            every rank computes all of them).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, *,
                 decoupled_weight_decay: bool = True, max_preconditioner_dim: int = 1024,
                 merge_dims: bool = True, precondition_1d: bool = False,
                 precondition_frequency: int = 10, start_preconditioning_step: int = 10,
                 grafting: str | None = "adam", grafting_epsilon: float = 1e-8,
                 grafting_beta2: float = 0.999, root_method: str = "eigh",
                 factor_dtype: torch.dtype = torch.float32, max_root_failures: int = 5,
                 on_nonfinite: str = "skip", process_group=None) -> None:
        defaults = {"lr": lr, "betas": betas, "epsilon": epsilon, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay,
                    "max_preconditioner_dim": max_preconditioner_dim, "merge_dims": merge_dims,
                    "precondition_1d": precondition_1d,
                    "precondition_frequency": precondition_frequency,
                    "start_preconditioning_step": start_preconditioning_step,
                    "grafting": grafting, "grafting_epsilon": grafting_epsilon,
                    "grafting_beta2": grafting_beta2, "root_method": root_method,
                    "factor_dtype": factor_dtype, "max_root_failures": max_root_failures,
                    "on_nonfinite": on_nonfinite}
        _check_options(defaults)
        self._process_group = check_process_group(process_group)
        self._ws: _Workspace | None = None
        super().__init__(params, defaults)
        check_params(self._all_params(), "Shampoo")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._process_group = None  # a process group is not copied
        self._ws = None  # rebuilt from the state at the next step

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_groups()
            check_params(self._all_params(), "Shampoo")
        except ValueError:
            self.param_groups.pop()
            raise
        self._ws = None  # the buckets are rebuilt (the existing factors copied) at the next step

    def _check_groups(self) -> None:
        check_groups(self.param_groups, _check_options, _GLOBAL_OPTIONS, _GROUP_OPTIONS)

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, _UNCAST).items():
            self.state[p].update(entries)
        self._ws = None

    def _workspace(self) -> _Workspace:
        # Options that shape the buckets or the state: changing one rebuilds them (a layout that
        # no longer matches the saved factors raises ValueError).
        key = tuple(self.param_groups[0][k] for k in _LAYOUT_OPTIONS)
        if self._ws is None or self._ws.layout != key:
            self._ws = _Workspace(self)
            self._ws.layout = key
        return self._ws

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: optional; reevaluates the model (zeroing the gradients, calling backward)
                and returns the loss.  It is called once, with grad enabled.

        Returns:
            What the closure returned, or None.
        """
        loss = call_closure(closure)
        if not self._all_params():
            return loss
        self._check_groups()
        ws = self._workspace()
        groups = self.param_groups
        opt0 = groups[0]
        gstate = ws.state
        k = gstate["step"] + 1

        grads = [self._grad(P.p) for P in ws.params]
        ok = all_finite(grads)
        if opt0["on_nonfinite"] == "skip":
            gstate["nonfinite_steps"].add_(~ok)
        elif not ok.item():
            raise NonFiniteError("Shampoo: the gradient is not finite; the step was not taken "
                                 "and nothing changed (on_nonfinite='skip' skips such steps "
                                 "instead of raising)")
        okf = ok.to(ws.dtype)
        # From here every update is masked: on a skipped step the gradient is zero (NaN * 0 is
        # NaN, so it is replaced, not scaled) and every decay is 1.
        geff = [torch.where(ok, g, ws.zero) for g in grads]
        if not opt0["decoupled_weight_decay"]:
            for P, g in zip(ws.params, geff):
                wd = groups[P.group]["weight_decay"]
                if wd != 0:
                    g.addcmul_(P.p, okf, value=wd)
        # Steps taken, this one included (>= 1 for the bias corrections of a skipped step).
        taken = (k - gstate["nonfinite_steps"]).clamp_min(1).to(torch.float64)

        stacked = self._update_factors(ws, geff, ok)
        gstate["step"] = k
        start, freq = opt0["start_preconditioning_step"], opt0["precondition_frequency"]
        preconditioning = k >= start
        if preconditioning and (k - start) % freq == 0:
            self._update_roots(ws, ok, k)

        graft = self._grafting(ws, geff, ok, taken)
        dirs = graft if not preconditioning else self._shampoo(ws, stacked, graft)

        for gi, group in enumerate(groups):
            members = ws.by_group[gi]
            if not members:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            beta1 = group["betas"][0]
            params = [ws.params[i].p for i in members]
            if opt0["decoupled_weight_decay"] and wd != 0:
                torch._foreach_mul_(params, torch.where(ok, okf.new_full((), 1 - lr * wd), 1.0))
            if beta1 > 0:
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, torch.where(ok, okf.new_full((), beta1), 1.0))
                torch._foreach_add_(bufs, [dirs[i] for i in members], alpha=1 - beta1)
                correction = (1 - torch.pow(beta1, taken)).to(ws.dtype)
                coef = torch.where(ok, -lr / correction, 0.0)
                updates = bufs
            else:
                coef = torch.where(ok, okf.new_full((), -lr), 0.0)
                updates = [dirs[i] for i in members]
            for p, u in zip(params, updates):
                p.addcmul_(u, coef)
        return loss

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        g = p.grad
        if g is None:
            return torch.zeros_like(p)
        if g.layout != torch.strided:
            raise RuntimeError(f"Shampoo does not support sparse gradients (got {g.layout})")
        if g.is_complex():
            raise RuntimeError("Shampoo does not support complex gradients")
        return g

    def _update_factors(self, ws: _Workspace, geff: list[Tensor], ok: Tensor) -> list[Tensor]:
        """``L_i <- beta2 L_i + G_(i) G_(i)^T`` for every block; returns the stacked blocks
        ``[B, *shape]`` (factor dtype) of each shape group."""
        decay = ws.decay(self.param_groups)
        if isinstance(decay, float):
            if decay != 1.0:
                scale = None
                for F in ws.factors.values():
                    if scale is None:
                        scale = torch.where(ok, F.new_full((), decay), 1.0)
                    F.mul_(scale)
        else:
            for key, F in ws.factors.items():
                F.mul_(torch.where(ok, decay[key], 1.0)[:, None, None])
        stacked = []
        for sg in ws.shape_groups:
            G = torch.stack([ws.params[i].block(geff[i], j) for i, j in sg.members])
            G = G.to(ws.fdtype)
            stacked.append(G)
            B = G.shape[0]
            for mode, (key, start) in enumerate(sg.slots):
                X = G.movedim(1 + mode, -1).reshape(B, -1, sg.shape[mode])  # G_(i)^T
                ops.kron_factor_update_(ws.factors[key][start:start + B], X, 1.0, 1.0)
        return stacked

    def _update_roots(self, ws: _Workspace, ok: Tensor, k: int) -> None:
        """New inverse roots for every bucket; a failed one keeps the previous root.  One host
        sync (the skip flag and the failure counts)."""
        opt0 = self.param_groups[0]
        if not ws.factors:
            return
        def root(key: tuple[int, int], F: Tensor) -> tuple[Tensor, Tensor]:
            return ops.kron_inverse_root(F, 2 * key[1], opt0["epsilon"], opt0["root_method"])

        group = self._process_group
        if group is None:
            results = {key: root(key, F) for key, F in ws.factors.items()}
        else:  # data parallel: each rank roots its share, then all get all
            if ws.spread is None:
                ws.spread = SpreadPlan(ws.factors, group)
            results = ws.spread.decompose(ws.factors, root)
        new = {}
        checks = [ok.to(torch.int64)]
        for key, (X, status) in results.items():
            failed = status == _FAILED
            roots = torch.where(failed[:, None, None], ws.roots[key], X)
            fails = torch.where(failed, ws.fails[key] + 1, 0).to(torch.int32)
            new[key] = (roots, fails, failed)
            checks += [fails.max().to(torch.int64), failed.sum(dtype=torch.int64)]
        values = torch.stack(checks).tolist()
        if not values[0]:
            return  # a skipped step: nothing changes
        gstate = ws.state
        gstate["root_updates"] += 1
        for key, (roots, fails, failed) in new.items():
            ws.roots[key].copy_(roots)
            ws.fails[key].copy_(fails)
        gstate["failed_roots"].add_(sum(values[2::2]))
        worst = max(values[1::2], default=0)
        limit = opt0["max_root_failures"]
        if worst >= limit:
            key, slot = next((key, s) for key, (_, fails, _) in new.items()
                             for s, f in enumerate(fails.tolist()) if f >= limit)
            i, j, mode = ws.owner[key][slot]
            P = ws.params[i]
            raise RootFailureError(
                f"Shampoo: the inverse root of the {key[0]}x{key[0]} factor of dim {mode} of "
                f"block {j} of param {i} (shape {tuple(P.p.shape)}, merged {P.merged}) failed "
                f"{worst} consecutive times (max_root_failures={limit}), at step {k}; its factor "
                "is probably not finite or badly conditioned (try root_method='eigh', a larger "
                "epsilon or factor_dtype=torch.float64)")

    def _grafting(self, ws: _Workspace, geff: list[Tensor], ok: Tensor,
                  taken: Tensor) -> list[Tensor]:
        """The grafting direction of every param (the gradient for 'sgd' and None)."""
        opt0 = self.param_groups[0]
        kind, eps = opt0["grafting"], opt0["grafting_epsilon"]
        if kind in ("sgd", None):
            return geff
        out = []
        states = [self.state[P.p]["graft_state"] for P in ws.params]
        if kind == "adagrad":
            for s, g in zip(states, geff):
                s.addcmul_(g, g)
                out.append(g / (s.sqrt() + eps))
            return out
        b2 = opt0["grafting_beta2"]
        keep = torch.where(ok, ws.zero.new_full((), b2), 1.0)
        root_bc = torch.sqrt(1 - torch.pow(b2, taken)).to(ws.dtype)
        for v, g in zip(states, geff):
            v.mul_(keep).addcmul_(g, g, value=1 - b2)
            out.append(g / ((v.sqrt() / root_bc) + eps))
        return out

    def _shampoo(self, ws: _Workspace, stacked: list[Tensor], graft: list[Tensor]) -> list[Tensor]:
        """The final directions: Shampoo's (grafted per block) for preconditioned params, the
        grafting direction for the others."""
        grafting = self.param_groups[0]["grafting"] is not None
        dirs: list[Tensor] = list(graft)
        bufs: dict[int, Tensor] = {}
        for i, P in enumerate(ws.params):
            if P.merged is not None:
                bufs[i] = torch.empty(P.merged, dtype=ws.dtype, device=ws.device)
                dirs[i] = bufs[i].view(P.p.shape)
        dst, src = [], []
        for sg, G in zip(ws.shape_groups, stacked):
            B = G.shape[0]
            T = G
            for mode, (key, start) in enumerate(sg.slots):
                R = ws.roots[key][start:start + B]
                # Contract the leading block dim with the root; it moves to the end, so after
                # all modes the dims are back in order.  (X^T R^T)^T = R X: R x_i G.
                T = T.reshape(B, sg.shape[mode], -1).transpose(1, 2) @ R.transpose(1, 2)
            S = T.reshape(G.shape)
            if grafting:
                A = torch.stack([ws.params[i].block(graft[i], j) for i, j in sg.members])
                a = torch.linalg.vector_norm(A.flatten(1), dim=1).to(ws.fdtype)
                s = torch.linalg.vector_norm(S.flatten(1), dim=1)
                scale = torch.where(s > 0, a / s, 0.0)
                S = S * scale.view((B,) + (1,) * len(sg.shape))
            S = S.to(ws.dtype)
            for (i, j), block in zip(sg.members, S.unbind(0)):
                dst.append(bufs[i][ws.params[i].blocks[j]])
                src.append(block)
        if dst:
            torch._foreach_copy_(dst, src)
        return dirs
