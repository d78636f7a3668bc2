"""K-FAC's layers: which modules are preconditioned (discovery), their activation and
output-gradient rows, and the capture of those rows' statistics from the layers' forward calls
(AMP loss scale, gradient accumulation, batch averaging; also under torch.compile)."""
from __future__ import annotations

import functools
import re
import sys
import warnings
import weakref
from numbers import Real
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KFACLayer", "LayerCapture", "compiled_inner", "find_layers", "skip_patterns"]


class KFACLayer:
    """One preconditioned nn.Linear / nn.Conv2d: its shapes, its rows, where its factors live
    (set by the layout) and what was captured of it since the last step."""

    def __init__(self, name: str, module: nn.Module, index: int) -> None:
        self.name, self.module, self.index = name, module, index
        self.conv = isinstance(module, nn.Conv2d)
        self.weight: Tensor = module.weight
        self.bias: Tensor | None = module.bias
        self.out = self.weight.shape[0]
        self.fan_in = self.weight[0].numel()  # in_features, or C kh kw
        self.a_dim = self.fan_in + (self.bias is not None)
        # Set by the layout: positions of A and G in their buckets, the shape group and the row
        # in it.
        self.a_pos = self.g_pos = self.row = -1
        self.group = None
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


def skip_patterns(skip_layers) -> tuple[re.Pattern, ...]:
    """The compiled ``skip_layers`` regexes (ValueError naming the argument)."""
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


def find_layers(model: nn.Module, group_of: dict[int, int],
                patterns: tuple[re.Pattern, ...]) -> list[KFACLayer]:
    """The layers K-FAC preconditions: every nn.Linear and nn.Conv2d (``groups == 1``) of
    ``model``, materialised, not matched by a skip pattern (module name or class name, full
    match), whose params are all in one param group (``group_of``: id -> group) and not tied to
    another such layer."""
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
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        groups = {group_of.get(id(p)) for p in params}
        if len(groups) != 1 or None in groups:
            continue  # not optimised here, or split between groups: plain update
        candidates.append((name, module, params))
    uses: dict[int, int] = {}
    for _, _, params in candidates:
        for p in params:
            uses[id(p)] = uses.get(id(p), 0) + 1
    layers: list[KFACLayer] = []
    for name, module, params in candidates:
        if any(uses[id(p)] > 1 for p in params):
            continue  # a param tied between hooked layers: plain update
        layers.append(KFACLayer(name, module, len(layers)))
    return layers


def compiled_inner(model: nn.Module) -> nn.Module:
    """``model``, or the module that a ``torch.compile`` wrapper (``OptimizedModule``) of it
    wraps (so that layer names and DDP are seen through it); ValueError for a wrapper compiled
    with ``fullgraph=True``, which cannot run K-FAC's capture (a graph break per layer), and for
    what is not an nn.Module."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} is not an nn.Module")
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        ctx = getattr(model, "dynamo_ctx", None)
        if getattr(ctx, "fullgraph", False) or getattr(ctx, "error_on_graph_break", False):
            raise ValueError(
                "Invalid model: compiled with fullgraph=True, but K-FAC captures its statistics "
                "in Python (a hook on each layer's output: a graph break per layer at the steps "
                "that update the factors). Compile without fullgraph (torch.compile(model), any "
                "backend): steps without a factor update run whole graphs")
        model = model._orig_mod
    return model


def _identity(x):
    return x


class _CapturingForward:
    """A hooked layer's ``forward``: an attribute of the module instance that calls the forward
    it replaced, then the capture (held weakly: a dropped optimizer's layers capture nothing).

    An attribute rather than a forward hook for torch.compile: dynamo does not guard on module
    hooks (``skip_nnmodule_hook_guards``), so a hook registered after the compiled model first
    ran would never be called, but it guards on ``forward``: setting or removing this makes a
    compiled model retrace.  A copied or pickled model gets the forward it replaced (the copy is
    not hooked)."""

    def __init__(self, capture_ref: weakref.ref, layer: KFACLayer, inner: Callable,
                 previous: Callable | None) -> None:
        self.capture_ref, self.layer, self.inner = capture_ref, layer, inner
        self.previous = previous  # the instance attribute it replaced, if any
        self.__wrapped__ = inner  # inspect.signature

    def __call__(self, *args, **kwargs):
        output = self.inner(*args, **kwargs)
        capture = self.capture_ref()
        if capture is not None:
            capture.forward_done(self.layer, args, kwargs, output)
        return output

    def __reduce__(self):
        return _identity, (self.inner,)


def _register_capture(capture: "LayerCapture", layer: KFACLayer, x: Tensor,
                      output: Tensor) -> None:
    output.register_hook(functools.partial(capture._capture, layer, x.detach()))


# Run eagerly under torch.compile (a graph break): the hook updates Python counters, which a
# traced hook would not (and fullgraph=True then fails with this reason).
_register_capture = torch.compiler.disable(
    _register_capture, reason="KFAC captures each layer's statistics in a Python hook on its "
    "output (a graph break per layer at the steps that update the factors): compile without "
    "fullgraph=True")


def _unhook(wrappers: list[_CapturingForward]) -> None:
    """Give the modules back the forward each wrapper replaced (unless replaced since)."""
    for w in wrappers:
        module = w.layer.module
        if module.__dict__.get("forward") is w:
            if w.previous is None:
                del module.forward
            else:
                module.forward = w.previous


class LayerCapture:
    """Captures the statistics of the layers' rows into the staged factors.

    Each layer's ``forward`` is wrapped (an instance attribute, see :class:`_CapturingForward`):
    after the forward, when the module is in training mode, grad is enabled and factors are due
    at the coming step (:attr:`due`), a hook is registered on the output tensor; that hook
    receives the output gradient and stages ``mean_rows(a a^T)`` and ``mean_rows(g g^T)``
    (pooled with the earlier passes of the step: ``decay = rows_before / rows_after``).  (Module
    full backward hooks would refuse in-place ops on the output such as ``nn.ReLU(inplace=True)``.)
    Under torch.compile the registration is a graph break (the hook runs in eager autograd).

    Args:
        layers: the layers to hook.
        factors: returns the factors to stage into (made at the first use).
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale (the
            output gradients are divided by it), or None.
    """

    def __init__(self, layers: list[KFACLayer], factors: Callable[[], object],
                 grad_scaler=None) -> None:
        if grad_scaler is not None and not callable(grad_scaler) \
                and not hasattr(grad_scaler, "_get_scale_async"):
            raise ValueError(f"Invalid grad_scaler: {grad_scaler!r} (must be a "
                             "torch.amp.GradScaler, a callable returning the scale, or None)")
        self.layers = layers
        self._factors = factors
        self._grad_scaler = grad_scaler
        self.active = True
        self.due = True  # factors are due at the coming step
        self.batch_averaged = True
        self.accumulation_steps = 1
        self._warned_accumulation = False
        ref = weakref.ref(self)
        wrappers = []
        for layer in layers:
            previous = layer.module.__dict__.get("forward")
            if isinstance(previous, _CapturingForward):  # a dropped capture's, not undone yet
                previous = previous.previous
            inner = previous if previous is not None \
                else type(layer.module).forward.__get__(layer.module)
            wrappers.append(_CapturingForward(ref, layer, inner, previous))
            layer.module.forward = wrappers[-1]
        self._unhook = weakref.finalize(self, _unhook, wrappers)
        self._unhook.atexit = False

    def configure(self, due: bool, batch_averaged: bool, accumulation_steps: int) -> None:
        """What the next captures do (set by the optimizer after each step, at zero_grad and
        when a state is loaded)."""
        self.due, self.batch_averaged = due, batch_averaged
        self.accumulation_steps = accumulation_steps

    def remove(self) -> None:
        """Unwrap the layers: nothing is captured from now on."""
        self._unhook()
        self.active = False

    def check(self, factor_step: bool, backward_ran: bool) -> None:
        """At a step: RuntimeError if factors are due, some layer has a gradient
        (``backward_ran``) and nothing was captured; warns once about uneven accumulation."""
        if not factor_step:
            return
        if backward_ran and not any(layer.captures for layer in self.layers):
            raise RuntimeError(
                "KFAC.step(): factor statistics are due at this step but no backward pass of "
                "the model was captured since the last step (call loss.backward() with the "
                "model in training mode and grad enabled before step(); zero_grad() drops what "
                "was captured)")
        self._warn_uneven_accumulation()

    def reset(self) -> None:
        """Forget what was captured since the last step (the layers' counts)."""
        for layer in self.layers:
            layer.rows = layer.captures = 0

    def _warn_uneven_accumulation(self) -> None:
        """Warn once if a layer captured a number of passes that is not a multiple of
        ``accumulation_steps``."""
        n = self.accumulation_steps
        if self._warned_accumulation:
            return
        odd = [l for l in self.layers if l.captures and l.captures % n]
        if odd:
            self._warned_accumulation = True
            # (stacklevel: here, check, KFAC.step, its no_grad and compiler.disable wrappers,
            # Optimizer's step hooks, the caller)
            warnings.warn(f"KFAC: layer {odd[0].name!r} captured {odd[0].captures} backward "
                          f"passes for this step, not a multiple of accumulation_steps={n} (the "
                          "statistics pool whatever was captured)", RuntimeWarning, stacklevel=7)

    def _current_scale(self):
        s = self._grad_scaler
        if s is None:
            return None
        if hasattr(s, "_get_scale_async"):
            if not s.is_enabled():
                return None
            return s._get_scale_async()  # a device tensor (None before the first scale())
        return s()

    def forward_done(self, layer: KFACLayer, args: tuple, kwargs: dict, output) -> None:
        """After a forward of ``layer``: register the capture on its output if due."""
        if not (self.active and self.due and layer.module.training and torch.is_grad_enabled()
                and isinstance(output, Tensor) and output.requires_grad):
            return
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor):
            _register_capture(self, layer, x, output)

    @torch.no_grad()
    def _capture(self, layer: KFACLayer, x: Tensor, grad: Tensor) -> None:
        """Output-gradient hook: stage the statistics of one pass (pooled by rows)."""
        factors = self._factors()
        a = layer.a_rows(x)
        g = layer.g_rows(grad)
        N = a.shape[0]
        if N == 0:
            return
        low = (factors.dtype, torch.bfloat16, torch.float16)
        if a.dtype not in low:
            a = a.to(factors.dtype)
        scale = self._current_scale()
        if scale is not None and not (isinstance(scale, Real) and scale == 1):
            g = g.to(factors.dtype) / scale
        elif g.dtype not in low:
            g = g.to(factors.dtype)
        total = layer.rows + N
        decay, w = layer.rows / total, 1.0 / total
        g_scale = 1.0
        if self.batch_averaged:  # undo the loss's mean: per-sample gradients
            batched = grad.dim() > (3 if layer.conv else 1)
            g_scale = float((grad.shape[0] if batched else 1) * self.accumulation_steps) ** 2
        factors.stage(layer, a, g, decay, w, g_scale)
        layer.rows = total
        layer.captures += 1
