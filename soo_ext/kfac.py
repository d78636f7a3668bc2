"""K-FAC (Martens & Grosse 2015; KAISA's defaults) as one optimizer, on bucketed Kronecker factors
and the ``soo::kron_*`` / ``soo::kfac_precondition_eigen`` ops."""
from __future__ import annotations

import functools
import math
import re
import warnings
import weakref
from numbers import Integral, Real
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from . import ops as _ops
from ._common import (SpreadPlan, all_finite, all_reduce_mean_, call_closure, check_groups,
                      check_params, check_process_group, load_state_dict_uncast)
from ._support.errors import NonFiniteError

__all__ = ["KFAC", "NonFiniteError"]

# Options that may differ between param groups; every other option is one setting for the run.
_GROUP_OPTIONS = ("lr", "momentum", "weight_decay")
_GLOBAL_OPTIONS = ("damping", "factor_decay", "kl_clip", "factor_update_steps", "inv_update_steps",
                   "mode", "factor_dtype", "accumulation_steps", "batch_averaged",
                   "on_nonfinite", "spread_inverses")
# Number options: (accepts the value, what is required).  NaN fails every test.
_NUMBERS = {
    "lr": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "damping": (lambda v: 0 < v < math.inf, "a number > 0"),
    "factor_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
_EIGEN_KEYS = ("QA", "dA", "QG", "dG")
_INVERSE_KEYS = ("A_inv", "G_inv")
_COUNTER_KEYS = ("A_inverse_failures", "G_inverse_failures", "A_inverse_fallbacks",
                 "G_inverse_fallbacks")
# Per-layer state entries that are views of the buckets: Optimizer.load_state_dict must not cast
# them (float64 factors with float32 params), they are copied into the buckets instead.
_VIEW_KEYS = ("A", "G") + _EIGEN_KEYS + _INVERSE_KEYS + _COUNTER_KEYS
_UNCAST = _VIEW_KEYS + ("nonfinite_steps",)


def _check_options(o: dict) -> None:
    """ValueError naming the offending option."""
    for key, (accepts, required) in _NUMBERS.items():
        v = o[key]
        if not isinstance(v, Real) or isinstance(v, bool) or not accepts(v):
            raise ValueError(f"Invalid {key}: {v!r} (must be {required})")
    v = o["kl_clip"]
    if v is not None and (not isinstance(v, Real) or isinstance(v, bool)
                          or not 0 < v < math.inf):
        raise ValueError(f"Invalid kl_clip: {v!r} (must be a number > 0 or None)")
    for key in ("factor_update_steps", "inv_update_steps", "accumulation_steps"):
        v = o[key]
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Invalid {key}: {v!r} (must be an int >= 1)")
    if o["mode"] not in ("eigen", "inverse"):
        raise ValueError(f"Invalid mode: {o['mode']!r} (must be 'eigen' or 'inverse')")
    if o["factor_dtype"] not in (torch.float32, torch.float64):
        raise ValueError(f"Invalid factor_dtype: {o['factor_dtype']!r} "
                         "(must be torch.float32 or torch.float64)")
    if o["on_nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"Invalid on_nonfinite: {o['on_nonfinite']!r} (must be 'raise' or 'skip')")
    for key in ("batch_averaged", "spread_inverses"):
        if not isinstance(o[key], bool):
            raise ValueError(f"Invalid {key}: {o[key]!r} (must be a bool)")


def _skip_patterns(skip_layers) -> tuple[re.Pattern, ...]:
    if skip_layers is None:
        return ()
    if isinstance(skip_layers, str):
        skip_layers = [skip_layers]
    try:
        items = list(skip_layers)
    except TypeError:
        raise ValueError(f"Invalid skip_layers: {skip_layers!r} (must be a str or a list of "
                         "str)") from None
    out = []
    for s in items:
        if not isinstance(s, str):
            raise ValueError(f"Invalid skip_layers: {s!r} is not a str")
        try:
            out.append(re.compile(s))
        except re.error as exc:
            raise ValueError(f"Invalid skip_layers: {s!r} is not a valid regex ({exc})") from None
    return tuple(out)


class _Layer:
    """One hooked nn.Linear / nn.Conv2d: its shapes and where its factors live."""

    def __init__(self, name: str, module: nn.Module, index: int) -> None:
        self.name, self.module, self.index = name, module, index
        self.conv = isinstance(module, nn.Conv2d)
        self.weight: Tensor = module.weight
        self.bias: Tensor | None = module.bias
        self.out = self.weight.shape[0]
        self.fan_in = self.weight[0].numel()  # in_features, or C kh kw
        self.a_dim = self.fan_in + (self.bias is not None)
        # Set by the layout: (bucket, position) of A and G, the shape group and the row in it.
        self.a_bucket = self.g_bucket = self.group = None
        self.a_pos = self.g_pos = self.row = -1
        # Statistics staged since the last step: rows pooled and backward passes captured.
        self.rows = 0
        self.captures = 0

    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def has_grads(self) -> bool:
        return all(p.grad is not None for p in self.params())

    def a_rows(self, x: Tensor) -> Tensor:
        """The activation rows ``a`` (with the 1 of the bias), ``[N, a_dim]``: the layer input's
        rows for a Linear, the unfolded patches (N times the output positions) for a Conv2d."""
        m = self.module
        if self.conv:
            padding = m.padding
            if isinstance(padding, str) or m.padding_mode != "zeros":
                if any(m._reversed_padding_repeated_twice):
                    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
                    x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            a = a.transpose(1, 2).reshape(-1, self.fan_in)
        else:
            a = x.reshape(-1, self.fan_in)
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a

    def g_rows(self, g: Tensor) -> Tensor:
        """The output-gradient rows, ``[N, out]`` (N as for :meth:`a_rows`)."""
        if self.conv:
            return g.permute(0, 2, 3, 1).reshape(-1, self.out)
        return g.reshape(-1, self.out)


class _Bucket:
    """The factors of one size ``n`` (A and G factors alike) stacked in ``[B, n, n]`` tensors:
    the running averages, the staged statistics of the current step, the eigendecompositions
    (eigen mode) or damped inverses (inverse mode), and per-factor status counters."""

    def __init__(self, n: int, entries: list[tuple[_Layer, str]], mode: str, dtype: torch.dtype,
                 device: torch.device, damping: float, staged: Tensor) -> None:
        self.n, self.entries = n, entries
        B = len(entries)
        eye = torch.eye(n, dtype=dtype, device=device)
        self.F = eye.repeat(B, 1, 1)  # factors start at the identity
        self.P = staged.view(B, n, n)  # staged statistics (a row-weighted mean)
        if mode == "eigen":
            self.Q = eye.repeat(B, 1, 1)
            self.d = torch.ones(B, n, dtype=dtype, device=device)
        else:
            self.X = eye.repeat(B, 1, 1) / (1 + math.sqrt(damping))
        self.failures = torch.zeros(B, dtype=torch.int64, device=device)
        self.fallbacks = torch.zeros(B, dtype=torch.int64, device=device)
        self.dirty = False  # P holds statistics


class _ShapeGroup:
    """The layers of one ``(out, a_dim)`` shape: contiguous in their A bucket and in their G
    bucket, so that their factors and eigenbases/inverses are slices (views) and one op call
    preconditions all of them; ``grad`` holds their gradients as ``[L, out, a_dim]``."""

    def __init__(self, layers: list[_Layer], dtype: torch.dtype, device: torch.device) -> None:
        self.layers = layers
        L0 = layers[0]
        self.a_bucket, self.g_bucket = L0.a_bucket, L0.g_bucket
        self.a = slice(L0.a_pos, L0.a_pos + len(layers))
        self.g = slice(L0.g_pos, L0.g_pos + len(layers))
        for r, layer in enumerate(layers):
            assert layer.a_bucket is self.a_bucket and layer.a_pos == L0.a_pos + r
            assert layer.g_bucket is self.g_bucket and layer.g_pos == L0.g_pos + r
            layer.group, layer.row = self, r
        self.grad = torch.zeros(len(layers), L0.out, L0.a_dim, dtype=dtype, device=device)
        # Views of grad: weight part (shaped like the weight) and bias column per layer.
        self.w_views = [self.grad[r, :, :l.fan_in].view(l.weight.shape)
                        for r, l in enumerate(layers)]
        self.b_views = [self.grad[r, :, l.fan_in] if l.bias is not None else None
                        for r, l in enumerate(layers)]


class _Layout:
    """The buckets (one per factor size) and shape groups of the K-FAC layers."""

    def __init__(self, layers: list[_Layer], mode: str, dtype: torch.dtype,
                 device: torch.device, damping: float) -> None:
        self.mode, self.dtype, self.device = mode, dtype, device
        self.spread: SpreadPlan | None = None  # data parallel: who decomposes what
        # Sorting by (out, a_dim) makes each shape group contiguous in both of its buckets: in
        # bucket n the A part lists the layers with a_dim = n by (out, index), the G part those
        # with out = n by (a_dim, index).
        order = sorted(layers, key=lambda l: (l.out, l.a_dim, l.index))
        sizes = sorted({l.a_dim for l in layers} | {l.out for l in layers})
        entries_of = {n: [(l, "A") for l in order if l.a_dim == n]
                      + [(l, "G") for l in order if l.out == n] for n in sizes}
        # The staged statistics of every bucket in one buffer: one all-reduce averages them
        # between data-parallel ranks, one fill zeroes them.
        self.staged = torch.zeros(sum(len(e) * n * n for n, e in entries_of.items()),
                                  dtype=dtype, device=device)
        self.buckets: dict[int, _Bucket] = {}
        offset = 0
        for n in sizes:
            entries = entries_of[n]
            size = len(entries) * n * n
            bucket = _Bucket(n, entries, mode, dtype, device, damping,
                             self.staged[offset:offset + size])
            offset += size
            for pos, (l, which) in enumerate(entries):
                if which == "A":
                    l.a_bucket, l.a_pos = bucket, pos
                else:
                    l.g_bucket, l.g_pos = bucket, pos
            self.buckets[n] = bucket
        self.groups: list[_ShapeGroup] = []
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and (order[j].out, order[j].a_dim) == (order[i].out,
                                                                           order[i].a_dim):
                j += 1
            self.groups.append(_ShapeGroup(order[i:j], dtype, device))
            i = j

    def views(self, layer: _Layer) -> dict[str, Tensor]:
        """The layer's state entries: views of its buckets."""
        a, i = layer.a_bucket, layer.a_pos
        g, j = layer.g_bucket, layer.g_pos
        out = {"A": a.F[i], "G": g.F[j]}
        if self.mode == "eigen":
            out.update(QA=a.Q[i], dA=a.d[i], QG=g.Q[j], dG=g.d[j])
        else:
            out.update(A_inv=a.X[i], G_inv=g.X[j])
        out.update(A_inverse_failures=a.failures[i], G_inverse_failures=g.failures[j],
                   A_inverse_fallbacks=a.fallbacks[i], G_inverse_fallbacks=g.fallbacks[j])
        return out


def _forward_hook(opt_ref: weakref.ref, layer: _Layer, module: nn.Module, inputs,
                  output) -> None:
    """The forward hook on a K-FAC layer; it holds the optimizer weakly (a dropped optimizer
    does not stay alive through its model's hooks, which then do nothing)."""
    opt = opt_ref()
    if opt is not None:
        opt._forward_hook(layer, module, inputs, output)


class KFAC(Optimizer):
    r"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015) with the
    defaults of KAISA (gpauloski/kfac-pytorch), as one optimizer: the preconditioner and SGD
    with momentum in one ``step()``.

    The constructor hooks every ``nn.Linear`` and ``nn.Conv2d`` (``groups == 1``) of ``model``
    (except ``skip_layers``) whose weight and bias are params of the optimizer, in one param
    group.  For such a layer with weight ``W`` (``[out, fan_in]``; ``fan_in = C kh kw`` for a
    conv) and the bias as an extra column, with ``a`` the activation rows (the input rows of a
    Linear, the unfolded patches of a Conv2d — ``F.unfold`` with the layer's kernel, stride,
    padding and dilation, one row per sample and output position) with a 1 appended when there
    is a bias, and ``g`` the gradient of the loss w.r.t. the layer's output rows:

    1. Statistics (every ``factor_update_steps`` steps): ``A_new = mean_rows(a a^T)``,
       ``G_new = mean_rows(g g^T)`` — for a Conv2d the mean runs over samples and output
       positions, i.e. the per-sample sum over positions divided by the spatial size (KAISA
       also divides the rows themselves by the spatial size, which scales its conv factors by
       a further 1 / spatial_size^2; only their size relative to ``damping`` differs).  The
       rows of all backward passes since the last ``step()`` are pooled (gradient
       accumulation).  Then ``A <- factor_decay A + (1 - factor_decay) A_new``, likewise G;
       both start at the identity.  ``batch_averaged=True`` (default; the loss is a mean over
       the batch, divided by ``accumulation_steps`` when accumulating): the output gradients
       are multiplied by the batch size (the leading dim of the layer's output) times
       ``accumulation_steps``, undoing the mean, so G is the mean of per-sample ``g g^T`` as in
       Martens & Grosse and does not shrink with the batch (as autograd delivers them they
       carry ``1/N``: G would be ``1/N^2`` smaller and the damping would swamp it — on the
       MNIST-1D CNN at N = 128 its eigenvalues were ~1e-6, and K-FAC degenerated into a
       damped gradient step).  ``False``: used as delivered (a summed loss).  Under a
       ``grad_scaler`` they are divided by the loss scale.
    2. Every ``inv_update_steps`` steps, one op call per distinct factor size:
       ``mode='eigen'``: ``A = Q_A diag(d_A) Q_A^T`` (``ops.kron_eigh``), G likewise;
       ``mode='inverse'``: ``(A + sqrt(damping) I)^{-1}`` and ``(G + sqrt(damping) I)^{-1}``
       (``ops.kron_damped_inverse``: the damping is split evenly between the two factors, as
       KAISA's inverse layers do with ``sqrt(damping)`` each).
    3. Preconditioning of ``grad = [dW, db] + weight_decay [W, b]`` (weight decay is added
       *before* preconditioning, so it is preconditioned and KL-clipped with the gradient):
       eigen: ``V = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T``
       (``ops.kfac_precondition_eigen``); inverse: ``V = G_inv grad A_inv``.  One op call per
       shape group (layers of equal ``(out, a_dim)``).
    4. KL clip: ``nu = min(1, sqrt(kl_clip / |sum_layers lr^2 <V, grad>|))`` (1 if the sum is 0,
       ``kl_clip=None`` disables), computed on the device; the direction is ``nu V``.
    5. SGD with momentum on every param: ``buf <- momentum buf + d``, ``p <- p - lr buf``
       (``d = nu V`` for K-FAC layers, ``d = grad + weight_decay p`` for the others).

    Params of other modules (LayerNorm, Embedding, conv with ``groups > 1``, skipped layers,
    layers whose weight or bias is tied to another hooked layer, lazy modules not materialised
    when the optimizer is built, K-FAC layers whose factors were never updated — e.g. a Linear
    that is never called through its ``forward``, such as ``MultiheadAttention.out_proj``)
    take exactly the update of
    ``torch.optim.SGD(lr, momentum, weight_decay)`` (bit-equal; dampening 0, no Nesterov).
    Params without a ``.grad`` are left alone, as SGD does; a K-FAC layer is preconditioned
    when all its params have a gradient.

    **Per-group options** ``lr``, ``momentum`` and ``weight_decay`` may differ between groups and
    are read at every step (LR schedulers work); the other options must agree in all groups.

    **Buckets.**  Every factor of size ``n`` (A and G factors alike) is a slice of one
    ``[B, n, n]`` bucket; each layer's state entries are views of the buckets.  An inverse update
    is one ``kron_eigh`` / ``kron_damped_inverse`` call per bucket; statistics go through
    ``kron_factor_update_``.

    **Hooks.**  Statistics are captured by a forward hook on each layer that, when the module is
    in training mode, grad is enabled and factors are due at the coming step, registers a hook
    on the output tensor; that hook receives the output gradient and stages
    ``mean_rows(a a^T)`` and ``mean_rows(g g^T)`` (pooled with earlier passes of the same step by
    ``kron_factor_update_`` with ``decay = rows_before / rows_after``).  (Module full backward
    hooks are not used: they refuse in-place ops on the output such as
    ``nn.ReLU(inplace=True)``.)  The staged statistics are committed by ``step()`` only if the
    step is finite, and dropped by ``zero_grad()`` (so that an iteration skipped by a
    ``GradScaler`` does not leak into the next).  :meth:`remove_hooks` detaches the optimizer
    from the model: later steps keep preconditioning with the factors they have.  The hooks
    hold the optimizer weakly: a dropped optimizer's hooks do nothing.

    If factors are due at a step, some K-FAC layer has a gradient and nothing was captured since
    the last step (no backward, or the model in eval mode), ``step()`` raises RuntimeError.

    **Gradient accumulation.**  Call backward ``accumulation_steps`` times (each on a loss
    divided by ``accumulation_steps``, as usual) and then ``step()``: the statistics are the
    mean over all rows of those passes, i.e. those of the full batch.  ``step()`` warns once if
    a layer captured a number of passes that is not a multiple of ``accumulation_steps``.

    **AMP.**  With ``grad_scaler=scaler`` (a ``torch.amp.GradScaler`` or a callable returning
    the current loss scale) the captured output gradients are divided by the scale (read on the
    device, no sync).  The param gradients must be unscaled before ``step()``: use
    ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` (``scaler.step``
    unscales, or call ``scaler.unscale_(opt)`` first, e.g. for clipping); every model param is
    in ``param_groups``, so ``unscale_`` reaches them all.  Steps with inf/NaN gradients are then
    skipped by the scaler itself.

    **Non-finite values.**  If a gradient or a staged statistic has a NaN or inf,
    ``on_nonfinite='skip'`` (default) skips the step on the device (every update is masked by a
    device flag, no host sync): params, momentum buffers, factors, eigenbases/inverses and
    counters are left as they were, and ``state['nonfinite_steps']`` (device tensor, under the
    first param) is incremented; ``'raise'`` raises :class:`NonFiniteError` (one host sync per
    step) and changes nothing.  ``step()`` never synchronises with the host otherwise (the
    reference ``kron_eigh``, used when the compiled module is missing, synchronises inside).

    **Failed decompositions.**  A factor whose eigh / Cholesky fails (status 2 of the ops) keeps
    its previous eigendecomposition / inverse; ``A_inverse_failures`` / ``G_inverse_failures``
    count those, ``*_inverse_fallbacks`` the float64 retries (status 1).

    **Data parallel** (``torch.distributed``).  Wrap the model in ``DistributedDataParallel``
    and give the wrapped model to ``KFAC``: DDP averages the gradients, and at every factor step
    ``step()`` averages the staged statistics over DDP's process group (``process_group=``
    chooses another group): one all-reduce of one buffer that holds all of them, as KAISA does.
    Every rank then commits the same factors.  The eigendecompositions / inverses are spread
    over the ranks (:class:`soo_ext._common.SpreadPlan`: factor by factor, largest first, to the
    rank with the least ``sum n^3`` so far): each rank decomposes its factors of a bucket in one
    op call and, after all buckets, one all-gather gives every rank all of them, so the work per
    rank shrinks with the world size and every rank preconditions with the same bits.  The
    all-gather moves about what the factor all-reduce moves; where it costs more than the
    decompositions it saves, ``spread_inverses=False`` makes every rank compute all of them (the
    same bits on every rank: the ops are deterministic).  ``python -m bench spread`` measures
    both: on 2 CPU ranks over gloo (ResNet-50 factors at width 0.5, 1 thread a rank) eigen takes
    4.84 s on one rank and 3.11 s spread (2.36 s decomposing, 0.75 s the all-gather of 176 MB),
    the damped inverse 0.67 s on one rank and 0.98 s spread; over NVLink the all-gather would
    take milliseconds.  The replicas stay equal (tested bitwise on 2 CPU ranks) and follow the
    single-process run on the concatenated batch when the ranks' batches are equal in size (the
    mean of the ranks' means, like DDP's gradient).  Every rank must capture the same layers at
    a factor step (as DDP itself requires the same backward on every rank).  Without the
    averaging each rank would precondition the common gradient with its own factors and the
    replicas would drift apart.  FSDP2 (DTensor params) is not supported.

    **State.**  Global, under the first param: ``step`` (int) and ``nonfinite_steps``.  Per
    param: ``momentum_buffer``.  Per K-FAC layer, under its weight: ``A``, ``G``; ``QA``,
    ``dA``, ``QG``, ``dG`` (eigen) or ``A_inv``, ``G_inv`` (inverse); the four counters (0-dim
    int64); ``factor_updates`` (int: factor-update steps that captured the layer, skipped steps
    included).  The tensors are views of the buckets: ``state_dict()``
    returns references (deep-copy or save it to snapshot); ``load_state_dict`` copies them into
    the buckets, uncast, so a resumed run is bit-identical.

    Args:
        model: the nn.Module whose layers are hooked.
        lr: learning rate (default 0.1).
        momentum: SGD momentum (default 0.9).
        weight_decay: L2 penalty added to the gradient before preconditioning (default 0).
        damping: lambda (default 1e-3).
        factor_decay: running-average decay of the factors (default 0.95).
        kl_clip: kappa of the KL clip, or None (default 1e-3).
        factor_update_steps: steps between factor updates (default 1).
        inv_update_steps: steps between eigendecompositions / inverses (default 1).
        mode: ``'eigen'`` (default) or ``'inverse'``.
        skip_layers: module names or class names (regexes, full match) not to precondition.
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.
        factor_dtype: ``torch.float32`` (default) or ``torch.float64``.
        accumulation_steps: backward passes per step (default 1).
        batch_averaged: the loss is a mean over the batch (default True): G is formed from
            per-sample output gradients (see 1. above); False for a summed loss.
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale.
        params: the params to optimise (iterable of tensors or param-group dicts); default: all
            params of ``model``.
        process_group: the data-parallel ranks whose statistics are averaged (default: the
            group of ``model`` if it is a ``DistributedDataParallel``, else none).
        spread_inverses: data parallel: spread the decompositions over the ranks (default
            True) or let every rank compute all of them (no all-gather).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3, factor_decay: float = 0.95,
                 kl_clip: float | None = 1e-3, factor_update_steps: int = 1,
                 inv_update_steps: int = 1, mode: str = "eigen", *, skip_layers=None,
                 on_nonfinite: str = "skip", factor_dtype: torch.dtype = torch.float32,
                 accumulation_steps: int = 1, batch_averaged: bool = True, grad_scaler=None,
                 params=None, process_group=None, spread_inverses: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} is not an nn.Module")
        if process_group is None:
            process_group = getattr(model, "process_group", None) if isinstance(
                model, nn.parallel.DistributedDataParallel) else None
        self._process_group = check_process_group(process_group)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "damping": damping, "factor_decay": factor_decay, "kl_clip": kl_clip,
                    "factor_update_steps": factor_update_steps,
                    "inv_update_steps": inv_update_steps, "mode": mode,
                    "factor_dtype": factor_dtype, "accumulation_steps": accumulation_steps,
                    "batch_averaged": batch_averaged, "on_nonfinite": on_nonfinite,
                    "spread_inverses": spread_inverses}
        _check_options(defaults)
        patterns = _skip_patterns(skip_layers)
        if grad_scaler is not None and not callable(grad_scaler) \
                and not hasattr(grad_scaler, "_get_scale_async"):
            raise ValueError(f"Invalid grad_scaler: {grad_scaler!r} (must be a "
                             "torch.amp.GradScaler, a callable returning the scale, or None)")
        self._grad_scaler = grad_scaler
        self._layers: list[_Layer] = []
        self._layout: _Layout | None = None
        self._handles: list = []
        self._warned_accumulation = False
        super().__init__(model.parameters() if params is None else params, defaults)

        group_of = self._group_of()
        candidates = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                continue  # lazy modules: shapes unknown here, plain update
            cls = type(module).__name__
            if any(p.fullmatch(name) or p.fullmatch(cls) for p in patterns):
                continue
            params_ = [module.weight] + ([module.bias] if module.bias is not None else [])
            groups = {group_of.get(id(p)) for p in params_}
            if len(groups) != 1 or None in groups:
                continue  # not optimised here, or split between groups: plain update
            candidates.append((name, module, params_))
        uses: dict[int, int] = {}
        for _, _, params_ in candidates:
            for p in params_:
                uses[id(p)] = uses.get(id(p), 0) + 1
        for name, module, params_ in candidates:
            if any(uses[id(p)] > 1 for p in params_):
                continue  # a param tied between hooked layers: plain update
            layer = _Layer(name, module, len(self._layers))
            self._layers.append(layer)
            self._handles.append(module.register_forward_hook(
                functools.partial(_forward_hook, weakref.ref(self), layer)))
        self._hooks_active = True

    # ----------------------------------------------------------------------------------------
    # Bookkeeping

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _group_of(self) -> dict[int, int]:
        return {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _check_options(self.param_groups[-1])
            check_params(self._all_params(), "KFAC")
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_groups(self) -> None:
        check_groups(self.param_groups, _check_options, _GLOBAL_OPTIONS, _GROUP_OPTIONS)
        first = self.param_groups[0]
        lay = self._layout
        if lay is not None:
            for key, have in (("mode", lay.mode), ("factor_dtype", lay.dtype)):
                if first[key] != have:
                    raise ValueError(f"Invalid {key}: {first[key]!r} (it cannot change after "
                                     f"the factors were laid out with {have!r})")

    @property
    def _global(self) -> dict:
        """The global state, under the first param."""
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs that K-FAC preconditions."""
        return [(l.name, l.module) for l in self._layers]

    def _ensure_layout(self) -> _Layout | None:
        """The buckets, built at the first use (on the weights' device at that time)."""
        if not self._layers:
            return None
        lay = self._layout
        device = self._layers[0].weight.device
        if lay is not None:
            if lay.device != device:
                raise RuntimeError(f"KFAC: the model moved from {lay.device} to {device} after "
                                   "the factors were laid out; create the optimizer after "
                                   "moving the model")
            return lay
        check_params(self._all_params(), "KFAC")
        g0 = self.param_groups[0]
        self._layout = lay = _Layout(self._layers, g0["mode"], g0["factor_dtype"], device,
                                     g0["damping"])
        self._attach_state()
        return lay

    def _attach_state(self) -> None:
        """Put the bucket views (and the global entries) into ``self.state``."""
        lay = self._layout
        for layer in self._layers:
            st = self.state[layer.weight]
            st.update(lay.views(layer))
            st.setdefault("factor_updates", 0)
        g = self._global
        g.setdefault("step", 0)
        if not isinstance(g.get("nonfinite_steps"), Tensor):
            g["nonfinite_steps"] = torch.zeros((), dtype=torch.int64, device=lay.device)

    def remove_hooks(self) -> None:
        """Detach from the model: no more statistics; later steps precondition with the factors
        and inverses they have."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooks_active = False
        self._reset_pending()

    def __getstate__(self) -> dict:
        raise TypeError("KFAC holds hooks on its model and cannot be pickled or copied; save "
                        "state_dict() instead")

    # ----------------------------------------------------------------------------------------
    # Statistics (hooks)

    def _current_scale(self):
        s = self._grad_scaler
        if s is None:
            return None
        if hasattr(s, "_get_scale_async"):
            if not s.is_enabled():
                return None
            return s._get_scale_async()  # a device tensor (None before the first scale())
        return s()

    def _forward_hook(self, layer: _Layer, module: nn.Module, inputs, output) -> None:
        if not (self._hooks_active and module.training and torch.is_grad_enabled()
                and isinstance(output, Tensor) and output.requires_grad):
            return
        if self._global.get("step", 0) % self.param_groups[0]["factor_update_steps"] != 0:
            return
        x = inputs[0] if inputs else None
        if not isinstance(x, Tensor):
            return  # called with a keyword input: not captured
        output.register_hook(functools.partial(self._capture, layer, x.detach()))

    @torch.no_grad()
    def _capture(self, layer: _Layer, x: Tensor, grad: Tensor) -> None:
        """Output-gradient hook: stage the statistics of one pass (pooled by rows)."""
        lay = self._ensure_layout()
        a = layer.a_rows(x)
        g = layer.g_rows(grad)
        N = a.shape[0]
        if N == 0:
            return
        low = (lay.dtype, torch.bfloat16, torch.float16)
        if a.dtype not in low:
            a = a.to(lay.dtype)
        scale = self._current_scale()
        if scale is not None and not (isinstance(scale, Real) and scale == 1):
            g = g.to(lay.dtype) / scale
        elif g.dtype not in low:
            g = g.to(lay.dtype)
        total = layer.rows + N
        decay, w = layer.rows / total, 1.0 / total
        _ops.kron_factor_update_(layer.a_bucket.P[layer.a_pos], a, decay, w)
        g_scale = 1.0
        if self.param_groups[0]["batch_averaged"]:  # undo the loss's mean: per-sample gradients
            batched = grad.dim() > (3 if layer.conv else 1)
            g_scale = float((grad.shape[0] if batched else 1)
                            * self.param_groups[0]["accumulation_steps"]) ** 2
        _ops.kron_factor_update_(layer.g_bucket.P[layer.g_pos], g, decay, w * g_scale)
        layer.a_bucket.dirty = layer.g_bucket.dirty = True
        layer.rows = total
        layer.captures += 1

    def _reset_pending(self) -> None:
        for layer in self._layers:
            layer.rows = layer.captures = 0
        lay = self._layout
        if lay is not None and any(b.dirty for b in lay.buckets.values()):
            lay.staged.zero_()  # after an all-reduce every bucket may hold values
            for b in lay.buckets.values():
                b.dirty = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``; also drops the statistics staged since the last step."""
        super().zero_grad(set_to_none)
        self._reset_pending()

    # ----------------------------------------------------------------------------------------
    # State dict

    def load_state_dict(self, state_dict: dict) -> None:
        kept = load_state_dict_uncast(self, state_dict, _UNCAST)
        self._reset_pending()
        self._layout = None  # fresh buckets with the loaded options
        for layer in self._layers:
            layer.a_bucket = layer.g_bucket = layer.group = None
        self._check_groups_loaded()
        lay = self._ensure_layout()
        views = {id(l.weight): lay.views(l) for l in self._layers} if lay else {}
        for p, entries in kept.items():
            target = views.get(id(p), {})
            for key, value in entries.items():
                if key == "nonfinite_steps":
                    self.state[p][key] = value.to(device=lay.device if lay else p.device,
                                                  dtype=torch.int64).clone()
                    continue
                if key not in target:
                    raise ValueError(f"KFAC.load_state_dict: state entry {key!r} of a param "
                                     "that is not a K-FAC layer's weight in this optimizer (the "
                                     "mode or the hooked layers differ from the saved run's)")
                if tuple(value.shape) != tuple(target[key].shape):
                    raise ValueError(f"KFAC.load_state_dict: {key!r} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(target[key].shape)}")
                target[key].copy_(value)
        if lay is not None:
            self._attach_state()

    def _check_groups_loaded(self) -> None:
        try:
            self._check_groups()
        except ValueError as exc:
            raise ValueError(f"KFAC.load_state_dict: {exc}") from None

    # ----------------------------------------------------------------------------------------
    # Step

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
        lay = self._ensure_layout()
        if lay is None:  # nothing to precondition: SGD
            glob = self._global
            glob.setdefault("step", 0)
            if not isinstance(glob.get("nonfinite_steps"), Tensor):
                p0 = self.param_groups[0]["params"][0]
                glob["nonfinite_steps"] = torch.zeros((), dtype=torch.int64, device=p0.device)
        glob = self._global
        g0 = self.param_groups[0]
        skip = g0["on_nonfinite"] == "skip"
        k = glob["step"]
        factor_step = self._hooks_active and k % g0["factor_update_steps"] == 0
        inv_step = k % g0["inv_update_steps"] == 0
        group_of = self._group_of()

        for p in self._all_params():
            if p.grad is not None and p.grad.layout != torch.strided:
                raise RuntimeError(f"KFAC does not support sparse gradients (got {p.grad.layout})")

        # Which K-FAC layers are preconditioned this step.
        kfac_layers: list[_Layer] = []
        if lay is not None:
            with_grads = [l for l in self._layers if l.has_grads()]
            if factor_step and with_grads and not any(l.captures for l in self._layers):
                raise RuntimeError(
                    "KFAC.step(): factor statistics are due at this step but no backward pass "
                    "of the model was captured since the last step (call loss.backward() with "
                    "the model in training mode and grad enabled before step(); "
                    "zero_grad() drops what was captured)")
            for l in with_grads:
                if self.state[l.weight]["factor_updates"] > 0 or (factor_step and l.captures):
                    kfac_layers.append(l)
            if factor_step:
                self._check_accumulation()
        in_kfac = {id(p) for l in kfac_layers for p in l.params()}

        # Gradients: K-FAC layers into their shape groups' buffers, g + wd p.
        active = {}  # shape group -> rows preconditioned
        for l in kfac_layers:
            active.setdefault(l.group, []).append(l)
        copies_dst, copies_src = [], []
        decay_by_wd: dict[float, tuple[list, list]] = {}
        for grp, members in active.items():
            for l in members:
                wd = self.param_groups[group_of[id(l.weight)]]["weight_decay"]
                dst = [grp.w_views[l.row]] + ([grp.b_views[l.row]] if l.bias is not None else [])
                copies_dst += dst
                copies_src += [p.grad for p in l.params()]
                if wd != 0:
                    d, s = decay_by_wd.setdefault(wd, ([], []))
                    d += dst
                    s += l.params()
        if copies_dst:
            torch._foreach_copy_(copies_dst, copies_src)
        plain: list[tuple[int, Tensor]] = [(group_of[id(p)], p) for p in self._all_params()
                                           if p.grad is not None and id(p) not in in_kfac]
        staged = [b.P for b in lay.buckets.values() if b.dirty] if (lay and factor_step) else []
        if staged and self._process_group is not None:
            # data parallel: every rank commits the mean of the ranks' statistics (and judges
            # all of them finite or not alike)
            all_reduce_mean_(lay.staged, self._process_group)
            staged = [lay.staged]
            for b in lay.buckets.values():
                b.dirty = True
        checked = [p.grad for _, p in plain] + staged
        for grp, members in active.items():
            if len(members) == len(grp.layers):
                checked.append(grp.grad)
            else:
                checked += [grp.grad[l.row] for l in members]
        ok = all_finite(checked) if checked else None
        if ok is not None and not skip and not ok.item():
            self._reset_pending()
            raise NonFiniteError("KFAC: the gradient (or a captured activation / output "
                                 "gradient) is not finite; the step was not taken and nothing "
                                 "changed (on_nonfinite='skip' skips such steps instead)")
        masked = skip and ok is not None  # every update goes through the device flag
        bad = ~ok if masked else None
        for wd, (d, s) in decay_by_wd.items():
            torch._foreach_add_(d, s, alpha=wd)
        if masked:
            for grp in active:
                grp.grad.masked_fill_(bad, 0)  # V = 0 on a skipped step (Q, d, X stay finite)
            glob["nonfinite_steps"].add_(bad)

        if lay is not None:
            if factor_step:
                self._commit_factors(lay, g0["factor_decay"], ok if masked else None)
            if inv_step:
                self._update_inverses(lay, g0["damping"], ok if masked else None)

        # Preconditioning and KL clip.
        directions: list[tuple[int, Tensor, Tensor]] = []  # (group index, param, d)
        if active:
            self._precondition(lay, active, g0, group_of, directions)
        # Plain params: g + wd p, as torch.optim.SGD.
        by_group: dict[int, list[Tensor]] = {}
        for gi, p in plain:
            by_group.setdefault(gi, []).append(p)
        for gi, ps in by_group.items():
            wd = self.param_groups[gi]["weight_decay"]
            grads = [p.grad for p in ps]
            if wd != 0:
                ds = torch._foreach_add(grads, ps, alpha=wd)
                if masked:
                    for d in ds:
                        d.masked_fill_(bad, 0)
            elif masked:
                ds = [g.masked_fill(bad, 0) for g in grads]
            else:
                ds = grads
            directions += [(gi, p, d) for p, d in zip(ps, ds)]

        self._sgd(directions, ok if masked else None)
        glob["step"] = k + 1
        if factor_step:
            for l in self._layers:
                if l.captures:
                    self.state[l.weight]["factor_updates"] += 1
        self._reset_pending()
        return loss

    def _check_accumulation(self) -> None:
        n = self.param_groups[0]["accumulation_steps"]
        if self._warned_accumulation:
            return
        odd = [l.name for l in self._layers if l.captures and l.captures % n]
        if odd:
            self._warned_accumulation = True
            warnings.warn(f"KFAC: layer {odd[0]!r} captured "
                          f"{next(l.captures for l in self._layers if l.name == odd[0])} "
                          f"backward passes for this step, not a multiple of "
                          f"accumulation_steps={n} (the statistics pool whatever was captured)",
                          RuntimeWarning, stacklevel=3)

    def _commit_factors(self, lay: _Layout, decay: float, ok: Tensor | None) -> None:
        """``F <- decay F + (1 - decay) P`` for the factors captured at this step (masked)."""
        for b in lay.buckets.values():
            if not b.dirty:
                continue
            captured = [l.captures > 0 for l, _ in b.entries]
            if all(captured):
                targets = [(b.F, b.P)]
            else:
                targets = [(b.F[i], b.P[i]) for i, c in enumerate(captured) if c]
            for Fv, Pv in targets:
                new = Fv.mul(decay).add_(Pv, alpha=1 - decay)
                Fv.copy_(new if ok is None else torch.where(ok, new, Fv))

    def _update_inverses(self, lay: _Layout, damping: float, ok: Tensor | None) -> None:
        """One eigh / damped inverse per bucket; a failed factor (status 2) or a skipped step
        keeps what it had."""
        group = self._process_group if self.param_groups[0]["spread_inverses"] else None
        factors = {n: b.F for n, b in lay.buckets.items()}

        def op(n: int, F: Tensor) -> tuple:
            return (_ops.kron_eigh(F) if lay.mode == "eigen"
                    else _ops.kron_damped_inverse(F, math.sqrt(damping)))

        if group is None:
            results = {n: op(n, F) for n, F in factors.items()}
        else:  # data parallel: each rank decomposes its share, then all get all
            if lay.spread is None:
                lay.spread = SpreadPlan(factors, group)
            results = lay.spread.decompose(factors, op)
        for b, outs in zip(lay.buckets.values(), results.values()):
            if lay.mode == "eigen":
                d, Q, status = outs
                news = [(b.d, d), (b.Q, Q)]
            else:
                X, status = outs
                news = [(b.X, X)]
            failed = status == 2
            fallback = status == 1
            take = ~failed
            if ok is not None:
                take = take & ok
                failed = failed & ok
                fallback = fallback & ok
            for old, new in news:
                mask = take.view(-1, *([1] * (old.dim() - 1)))
                old.copy_(torch.where(mask, new.to(old.dtype), old))
            b.failures.add_(failed)
            b.fallbacks.add_(fallback)

    def _precondition(self, lay: _Layout, active: dict, g0: dict, group_of: dict,
                      directions: list) -> None:
        """``V`` per layer (one op call per full shape group), the KL clip, and the directions
        ``nu V`` appended to ``directions``."""
        damping, kl_clip = g0["damping"], g0["kl_clip"]
        results = []  # (V [L', out, a_dim], grads [L', out, a_dim], layers)
        for grp, members in active.items():
            A, G = grp.a_bucket, grp.g_bucket
            if len(members) == len(grp.layers):
                ia, ig, grad = grp.a, grp.g, grp.grad
            else:  # some layers are not preconditioned this step: gather the others
                rows = [l.row for l in members]
                ia = [grp.a.start + r for r in rows]
                ig = [grp.g.start + r for r in rows]
                grad = grp.grad[rows]
            if lay.mode == "eigen":
                V = _ops.kfac_precondition_eigen(grad, G.Q[ig], G.d[ig], A.Q[ia], A.d[ia],
                                                 damping)
            else:
                V = G.X[ig] @ grad @ A.X[ia]
            results.append((V, grad, members))
        if kl_clip is not None:
            terms = []
            for V, grad, members in results:
                lrs = [self.param_groups[group_of[id(l.weight)]]["lr"] for l in members]
                if len(set(lrs)) == 1:
                    terms.append((V * grad).sum() * lrs[0] ** 2)
                else:
                    vg = (V * grad).sum((-2, -1))
                    terms += [vg[r] * lr ** 2 for r, lr in enumerate(lrs)]
            s = torch.stack(terms).sum().abs()
            nu = torch.where(s > 0, torch.sqrt(kl_clip / s).clamp_max(1), 1.0)
            for V, _, _ in results:
                V.mul_(nu)
        for V, _, members in results:
            for r, l in enumerate(members):
                gi = group_of[id(l.weight)]
                dw = V[r, :, :l.fan_in].view(l.weight.shape)
                directions.append((gi, l.weight, dw.to(l.weight.dtype)))
                if l.bias is not None:
                    directions.append((gi, l.bias, V[r, :, l.fan_in].to(l.bias.dtype)))

    def _sgd(self, directions: list[tuple[int, Tensor, Tensor]], ok: Tensor | None) -> None:
        """``buf <- m buf + d``, ``p <- p - lr buf`` per param group, as torch.optim.SGD's
        foreach path; masked by ``ok`` (nothing changes where it is False)."""
        by_group: dict[int, tuple[list, list]] = {}
        for gi, p, d in directions:
            ps, ds = by_group.setdefault(gi, ([], []))
            ps.append(p)
            ds.append(d)
        for gi, (ps, ds) in by_group.items():
            group = self.param_groups[gi]
            m, lr = group["momentum"], group["lr"]
            if m != 0:
                bufs = []
                for p in ps:
                    st = self.state[p]
                    if st.get("momentum_buffer") is None:
                        st["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format)
                    bufs.append(st["momentum_buffer"])
                if ok is None:
                    torch._foreach_mul_(bufs, m)
                else:
                    torch._foreach_mul_(bufs, torch.where(ok, m, 1.0).to(bufs[0].dtype))
                torch._foreach_add_(bufs, ds)
                steps = bufs if ok is None else [torch.where(ok, b, 0.0) for b in bufs]
            else:
                steps = ds  # already zero on a skipped step
            torch._foreach_add_(ps, steps, alpha=-lr)
