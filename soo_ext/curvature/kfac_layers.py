"""K-FAC's layers: which modules are preconditioned (discovery, and a warning naming those that are
not), their activation and output-gradient rows, and the capture of those rows' statistics from
the layers' forward calls (AMP loss scale, gradient accumulation, batch averaging; also under
torch.compile)."""
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

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


class KFACLayer:
    """One preconditioned nn.Linear / nn.Conv1d / nn.Conv2d: its shapes, its rows, where its
    factors live (set by the layout) and what was captured of it since the last step."""

    def __init__(self, name: str, module: nn.Module, index: int) -> None:
        self.name, self.module, self.index = name, module, index
        # spatial dims of the input: 0 Linear, 1 Conv1d (a Conv2d with a unit height), 2 Conv2d
        self.spatial = 1 if isinstance(module, nn.Conv1d) else 2 if isinstance(module, nn.Conv2d) \
            else 0
        self.conv = self.spatial > 0
        # an nn.MultiheadAttention: its in-projection, a Linear [3E, E] on the self-attention's
        # input (see _mha_forward)
        self.mha = isinstance(module, nn.MultiheadAttention)
        self.weight: Tensor = module.in_proj_weight if self.mha else module.weight
        self.bias: Tensor | None = module.in_proj_bias if self.mha else module.bias
        self.out = self.weight.shape[0]
        self.fan_in = self.weight[0].numel()  # in_features, or C kh kw (C k for a Conv1d)
        self.a_dim = self.fan_in + (self.bias is not None)
        # The layout of a sequence layer's input (find_layers): None for the others, whose
        # batch is dim 0; else the batch_first of the torch module that states it.
        self.batch_first: bool | None = None
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

    def batched(self, t: Tensor) -> Tensor:
        """A conv's input or output gradient with its batch dim (unbatched: a batch of 1)."""
        return t.unsqueeze(0) if self.conv and t.dim() == self.spatial + 1 else t

    def batch_major(self, t: Tensor) -> Tensor:
        """A sequence layer's input or output gradient as ``[N, T, ...]``, so that dim 0 holds
        the samples and each sample's rows are contiguous: ``[T, N, ...]`` (``batch_first``
        False) transposed, an unbatched ``[T, ...]`` one sample; the other layers' as they are
        (their batch is dim 0)."""
        if self.batch_first is None:
            return t
        if t.dim() == 2:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def a_rows(self, x: Tensor) -> Tensor:
        """The activation rows ``a`` (with the 1 of the bias), ``[N, a_dim]``: the layer input's
        rows for a Linear, the patches (N times the output positions rows, columns in the
        weight's ``(C, kh, kw)`` order, as ``F.unfold`` gives them) for a conv.  One copy: a
        conv's patches are a strided view of its (padded) input, gathered straight into the
        rows (``F.unfold`` loops over the samples on the CPU)."""
        if not self.conv:
            a = x.reshape(-1, self.fan_in)
            return a if self.bias is None else torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        patches = _patches(self.batched(x), self.module)
        if self.bias is None:
            return patches.reshape(-1, self.fan_in)
        a = patches.new_empty(patches.numel() // self.fan_in, self.a_dim)
        a.narrow(1, 0, self.fan_in).view(patches.shape).copy_(patches)
        a.select(1, self.fan_in).fill_(1)
        return a

    def g_rows(self, g: Tensor) -> Tensor:
        """The output-gradient rows, ``[N, out]`` (N as for :meth:`a_rows`)."""
        if self.conv:
            return self.batched(g).movedim(1, -1).reshape(-1, self.out)
        return g.reshape(-1, self.out)


def _patches(x: Tensor, conv: nn.Module) -> Tensor:
    """A conv's patches as a view of its batched input ``x`` (padded first as its forward pads
    it: a copy of the input only), ``[N, *positions, C, *kernel]``."""
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        pad = conv._reversed_padding_repeated_twice
    else:  # what F.conv reads for zero padding
        pad = [p for p in reversed(padding) for _ in range(2)]
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    n, c, *size = x.shape
    sn, sc, *step = x.stride()
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    positions = [(s - d * (k - 1) - 1) // t + 1
                 for s, k, d, t in zip(size, kernel, dilation, stride)]
    return x.as_strided((n, *positions, c, *kernel),
                        (sn, *(e * t for e, t in zip(step, stride)), sc,
                         *(e * d for e, d in zip(step, dilation))))


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


def _weight_bias(module: nn.Module) -> dict[str, Tensor]:
    names = ("in_proj_weight", "in_proj_bias") if isinstance(module, nn.MultiheadAttention) \
        else ("weight", "bias")
    return {n: p for n in names if (p := getattr(module, n, None)) is not None}


def _left_out(name: str, module: nn.Module, group_of: dict[int, int],
              patterns: tuple[re.Pattern, ...]) -> str | None:
    """Why ``module`` is not a K-FAC layer, or None (a candidate: it may still be tied)."""
    if not isinstance(module, SUPPORTED):
        return "module type not supported"
    if getattr(module, "groups", 1) != 1:
        return f"grouped convolution (groups={module.groups})"
    if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        return "separate query/key/value projections (kdim or vdim != embed_dim)"
    params = _weight_bias(module)
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params.values()):
        return "lazy module not materialised when the optimizer was built (build the optimizer " \
               "after a first forward)"
    if any(p.fullmatch(name) or p.fullmatch(type(module).__name__) for p in patterns):
        return "matched by skip_layers"
    missing = [n for n, p in params.items() if id(p) not in group_of]
    if missing:
        return f"its {' and '.join(missing)} not among this optimizer's params"
    if len({group_of[id(p)] for p in params.values()}) != 1:
        return "weight and bias in different param groups"
    return None


def find_layers(model: nn.Module, group_of: dict[int, int], patterns: tuple[re.Pattern, ...],
                warn: bool = True, *, owner: str = "KFAC", stacklevel: int = 4,
                step: str = "plain SGD step") -> list[KFACLayer]:
    """The layers K-FAC preconditions: every nn.Linear, nn.Conv1d and nn.Conv2d
    (``groups == 1``) of ``model``, materialised, not matched by a skip pattern (module name or
    class name, full match), whose params are all in one param group (``group_of``: id ->
    group) and not tied to another such layer.  ``warn``: one UserWarning naming every module
    whose trainable params of the optimizer take the plain step instead, and why, in the name
    of ``owner`` (the optimizer), at ``stacklevel`` (4: the caller of the caller of this);
    ``step``: the words for the step they take."""
    candidates, why = [], {}
    for name, module in model.named_modules():
        reason = _left_out(name, module, group_of, patterns)
        if reason is None:
            candidates.append((name, module))
        else:
            why[name] = reason
    # an attention's out_proj is called by the attention's re-expressed forward only
    orphans = {id(m.out_proj): n for n, m in model.named_modules()
               if isinstance(m, nn.MultiheadAttention) and n in why}
    for name, module in [c for c in candidates if id(c[1]) in orphans]:
        candidates.remove((name, module))
        why[name] = f"out_proj of the MultiheadAttention {orphans[id(module)]!r} left out"
    owners: dict[int, list[str]] = {}
    for name, module in candidates:
        for p in _weight_bias(module).values():
            owners.setdefault(id(p), []).append(name)
    layers: list[KFACLayer] = []
    for name, module in candidates:
        tied = [f"{n} tied to " + ", ".join(repr(o) for o in owners[id(p)] if o != name)
                for n, p in _weight_bias(module).items() if len(owners[id(p)]) > 1]
        if tied:  # a param shared with another candidate: plain update for both
            why[name] = "; ".join(tied)
        else:
            layers.append(KFACLayer(name, module, len(layers)))
    stated = _stated_batch_first(model)
    for layer in layers:
        layer.batch_first = stated.get(id(layer.module))
    if warn:
        _warn_left_out(model, group_of, layers, why, owner, stacklevel, step)
    return layers


def _stated_batch_first(model: nn.Module) -> dict[int, bool]:
    """``batch_first`` of the modules whose sequence layout the model states (id -> bool): an
    nn.MultiheadAttention (its in-projection) and its ``out_proj`` (called by the hooked
    attention on the input's layout), and ``linear1`` / ``linear2`` of torch's own
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (which run them on the
    attention's layout).  Any other Linear on ``[d0, d1, ..., in]`` has its batch at dim 0 for
    K-FAC; the natural gradient resolves it against the batch size."""
    first: dict[int, bool] = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            first[id(module)] = first[id(module.out_proj)] = module.batch_first
        elif type(module) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
            first[id(module.linear1)] = first[id(module.linear2)] = module.self_attn.batch_first
    return first


def _warn_left_out(model: nn.Module, group_of: dict[int, int], layers: list[KFACLayer],
                   why: dict[str, str], owner: str, stacklevel: int,
                   step: str = "plain SGD step") -> None:
    """One UserWarning listing each module with trainable params of the optimizer that are not
    preconditioned (they take the plain step), with the reason; nothing if there is none."""
    hooked = {id(l.module): l for l in layers}
    done = {id(p) for l in layers if all(p.requires_grad for p in l.params()) for p in l.params()}
    lines = []
    for name, module in model.named_modules():
        plain = [n for n, p in module.named_parameters(recurse=False)
                 if p.requires_grad and id(p) in group_of and id(p) not in done]
        if not plain:
            continue
        reason = why.get(name)
        if reason is None:  # a K-FAC layer: a frozen param in it, or params of its own
            frozen = not all(p.requires_grad for p in hooked[id(module)].params())
            reason = "a frozen param (requires_grad=False) in the layer: it is preconditioned " \
                "only when all its params have gradients" if frozen else \
                "params besides weight and bias"
        lines.append(f"  {name or '(the model)'} ({type(module).__name__}: "
                     f"{', '.join(plain)}): {reason}")
    if lines:
        warnings.warn(f"{owner}: the trainable params of these modules are not preconditioned "
                      f"and take the {step} (K-FAC preconditions nn.Linear, nn.Conv1d and "
                      "nn.Conv2d with groups=1, and nn.MultiheadAttention's in-projection, see "
                      "docs/kfac.md):\n" + "\n".join(lines),
                      UserWarning, stacklevel=stacklevel)


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
        capture = self.capture_ref()
        if capture is None or not capture.due:  # the forward of a step without statistics
            return self.inner(*args, **kwargs)
        if self.layer.mha and capture.wants(self.layer):
            return _mha_forward(capture, self.layer, args, kwargs)
        output = self.inner(*args, **kwargs)
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


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
_MHA_DEFAULTS = dict(key_padding_mask=None, need_weights=True, attn_mask=None,
                     average_attn_weights=True, is_causal=False)


def _mha_forward(capture: "LayerCapture", layer: KFACLayer, args: tuple, kwargs: dict):
    """nn.MultiheadAttention's forward (training, self-attention) with its in-projection
    re-expressed: ``qkv = F.linear(x, in_proj_weight, in_proj_bias)`` on the input ``x`` (whose
    output gradient is captured: a Linear ``[3E, E]``), then F.multi_head_attention_forward on
    ``qkv``'s thirds with identity projections (exact: ``x 1 + 0``) and the output projection
    by ``out_proj``'s own forward on the input's layout (captured as a Linear: batch-first
    rows, dim 0 the samples, as for the in-projection).  The same values as the module's
    forward; RuntimeError for distinct query/key/value (cross-attention)."""
    m, a = layer.module, {**_MHA_DEFAULTS, **dict(zip(_MHA_ARGS, args)), **kwargs}
    x = a["query"]
    if not (x is a["key"] and x is a["value"]):
        raise RuntimeError(
            f"{capture.owner}: nn.MultiheadAttention {layer.name!r} was called with distinct "
            "query, key and value; K-FAC preconditions the in-projection of self-attention "
            f"(query is key is value) only: pass skip_layers=[{layer.name!r}] to leave it out")
    mask = a["attn_mask"]
    key_padding_mask = F._canonical_mask(
        mask=a["key_padding_mask"], mask_name="key_padding_mask",
        other_type=F._none_or_dtype(mask), other_name="attn_mask", target_type=x.dtype)
    mask = F._canonical_mask(mask=mask, mask_name="attn_mask", other_type=None, other_name="",
                             target_type=x.dtype, check_other=False)
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    if qkv.requires_grad:
        _register_capture(capture, layer, x, qkv)
    q, k, v = qkv.chunk(3, -1)
    first = m.batch_first and x.dim() == 3
    if first:
        q, k, v = (t.transpose(1, 0) for t in (q, k, v))
    eye = torch.eye(m.embed_dim, dtype=qkv.dtype, device=qkv.device)
    out, weights = F.multi_head_attention_forward(
        q, k, v, m.embed_dim, m.num_heads, None, None, m.bias_k, m.bias_v, m.add_zero_attn,
        m.dropout, eye, None, training=m.training, key_padding_mask=key_padding_mask,
        need_weights=a["need_weights"], attn_mask=mask, use_separate_proj_weight=True,
        q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"])
    return m.out_proj(out.transpose(1, 0) if first else out), weights  # in the input's layout


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
    (G times a sample's rows for a Linear on a sequence: the factors' ``stage``; pooled with the
    earlier passes of the step: ``decay = rows_before / rows_after``).  (Module
    full backward hooks would refuse in-place ops on the output such as ``nn.ReLU(inplace=True)``.)
    Under torch.compile the registration is a graph break (the hook runs in eager autograd).
    RuntimeError if a layer is hooked by another live capture already.

    Args:
        layers: the layers to hook.
        factors: returns the factors to stage into (made at the first use).
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale (the
            output gradients are divided by it), or None.
        owner: the optimizer's name, in the messages.
    """

    def __init__(self, layers: list[KFACLayer], factors: Callable[[], object],
                 grad_scaler=None, owner: str = "KFAC") -> None:
        self.owner = owner
        if grad_scaler is not None and not callable(grad_scaler) \
                and not hasattr(grad_scaler, "_get_scale_async"):
            raise ValueError(f"Invalid grad_scaler: {grad_scaler!r} (must be a "
                             "torch.amp.GradScaler, a callable returning the scale, or None)")
        for layer in layers:
            current = layer.module.__dict__.get("forward")
            if isinstance(current, _CapturingForward) and current.capture_ref() is not None:
                raise RuntimeError(
                    f"{owner}: layer {layer.name!r} of this model is hooked by another KFAC "
                    "already (both would capture every forward); call remove_hooks() on that "
                    "optimizer, or drop it, before creating a new one")
        self.layers = layers
        self._factors = factors
        self._grad_scaler = grad_scaler
        self.active = True
        self.due = True  # factors are due at the coming step
        self.batch_averaged = True
        self.accumulation_steps = 1
        self._warned_accumulation = False
        self._captured = False  # a pass was captured since the last reset
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
                f"{self.owner}.step(): factor statistics are due at this step but no backward "
                "pass of the model was captured since the last step (call loss.backward() with "
                "the model in training mode and grad enabled before step(); zero_grad() drops "
                "what was captured)")
        self._warn_uneven_accumulation()

    def reset(self) -> None:
        """Forget what was captured since the last step (the layers' counts)."""
        if self._captured:
            for layer in self.layers:
                layer.rows = layer.captures = 0
            self._captured = False

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
            warnings.warn(f"{self.owner}: layer {odd[0].name!r} captured {odd[0].captures} "
                          "backward passes for this step, not a multiple of "
                          f"accumulation_steps={n} (the statistics pool whatever was captured)",
                          RuntimeWarning, stacklevel=7)

    def _current_scale(self):
        s = self._grad_scaler
        if s is None:
            return None
        if hasattr(s, "_get_scale_async"):
            if not s.is_enabled():
                return None
            return s._get_scale_async()  # a device tensor (None before the first scale())
        return s()

    def wants(self, layer: KFACLayer) -> bool:
        """Whether a forward of ``layer`` now is captured."""
        return self.active and self.due and layer.module.training and torch.is_grad_enabled()

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
        """Output-gradient hook: stage the statistics of one pass, batch-major
        (:meth:`KFACLayer.batch_major`)."""
        self._stage(layer, layer.batch_major(x), layer.batch_major(grad))

    def _stage(self, layer: KFACLayer, x: Tensor, grad: Tensor) -> None:
        """Stage the statistics of one pass (pooled by rows) of the batch-major input ``x``
        and output gradient ``grad``."""
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
        samples = grad.shape[0] if grad.dim() > layer.spatial + 1 else 1  # the batch size
        g_scale = 1.0
        if self.batch_averaged:  # undo the loss's mean: per-sample gradients
            g_scale = float(samples * self.accumulation_steps) ** 2
        factors.stage(layer, a, g, decay, w, g_scale, samples)
        layer.rows = total
        layer.captures += 1
        self._captured = True
