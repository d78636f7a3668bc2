"""Woodbury natural gradient (Ren & Goldfarb 2019; SENG, Yang et al. 2020, per layer): the
damped empirical Fisher of the minibatch's per-sample gradients inverted through the N x N system
(soo_ext.curvature.woodbury), and SGD with momentum, in one ``step()``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._support.closure import call_closure
from .._support.distributed import check_process_group
from .._support.errors import NonFiniteError
from .._support.guard import MaskedSteps, SkipGuard, SkipWarner, fill_if_
from .._support.options import Bool, Int, Number, OneOf, OptionChecks, OptionSpecs
from .._support.params import (add_param_group_checked, all_params, check_dense_grads,
                               check_params, group_index, load_state_dict_uncast)
from .._support.step_wrapper import OnDemandStepWrapper
from ..curvature.first_order_fallback import (OPTIONS as FALLBACK, PER_GROUP as FALLBACK_GROUP,
                                              UNCAST as FALLBACK_UNCAST, restore_uncast)
from ..curvature.kfac_layers import compiled_inner, find_layers, skip_patterns
from ..curvature.woodbury import (PerSampleCapture, PerSampleGradients, WoodburyNaturalGradient,
                                  layer_vector)
from .hooked import ModelHooks
from .kfac import _momentum_and_fallback_

__all__ = ["NaturalGradient"]

OPTIONS = OptionSpecs({
    "lr": Number(0, high_open=True), "momentum": Number(0, 1, high_open=True),
    "weight_decay": Number(0, high_open=True),
    "damping": Number(0, low_open=True, high_open=True), "per_layer": Bool(),
    "curvature_samples": Int(1, none=True),
    "max_state_bytes": Int(1), "on_nonfinite": OneOf("raise", "skip"), "batch_averaged": Bool(),
    **FALLBACK}, per_group=("lr", "momentum", "weight_decay") + FALLBACK_GROUP)


class NaturalGradient(ModelHooks, OnDemandStepWrapper):
    r"""Subsampled natural gradient through the Woodbury identity (Ren & Goldfarb, "Efficient
    subsampled Gauss-Newton and natural gradient methods for training neural networks", 2019;
    ``per_layer``: SENG, Yang et al. 2020): with ``J`` the ``S x n`` per-sample gradients of the
    minibatch's first S samples, the step direction is ``d = (damping I + J^T J / S)^{-1} g``
    (``g`` the whole minibatch's gradient), computed as ``(g - J^T (damping S I + J J^T)^{-1} J
    g) / damping`` (one float64 ``S x S`` Gram, one batched Cholesky), taken by SGD with momentum.

    The per-sample gradients of every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (groups=1) and
    self-attention ``nn.MultiheadAttention`` (in-projection) come from K-FAC's hooks (the
    layer's input rows and output gradients, a sample's summed over its tokens or positions);
    the other params take the ``fallback`` step, AdamW's or SGD's (a warning names them). Where a
    Linear's input ``[d0, d1, ..., in]`` holds the samples is told from the batch size of the
    other layers (or the attention's ``batch_first``); ValueError at ``step()`` where it cannot
    be told. One backward pass per step; the empirical Fisher of the loss given (mean or sum:
    ``batch_averaged``). See docs/natural_gradient.md.

    Args:
        model: the nn.Module whose layers are hooked (or its ``torch.compile`` wrapper).
        lr, momentum, weight_decay: of the SGD step (0.1, 0.9, 0; per group; the weight decay
            is added to the gradient before the solve).
        damping: lambda (default 1; off the span of the S samples' gradients ``d = g / damping``).
        per_layer: one system per layer (block-diagonal Fisher, SENG) instead of one for all.
        curvature_samples: S, the samples of the Fisher (default 32; None: the whole batch).
        max_state_bytes: the most the per-sample data may take (default 1 GiB).
        skip_layers: module or class names (regexes, full match) not to precondition.
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.
        batch_averaged: the loss is a mean over the batch (default True).
        grad_scaler: a ``torch.amp.GradScaler`` or a callable returning the loss scale.
        params: the params to optimise (default: all of ``model``'s).
        process_group: data-parallel ranks (default: a DDP ``model``'s group): the first S
            samples of the ranks' batch sent to every rank, each solving the same system.
        fallback: the others' step, ``'adamw'`` (default, at 1e-2) or ``'sgd'``: docs.

    Example::

        opt = soo_ext.NaturalGradient(model, lr=0.1)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1.0, per_layer: bool = False, *,
                 curvature_samples: int | None = 32, max_state_bytes: int = 2 ** 30,
                 skip_layers=None, on_nonfinite: str = "skip", batch_averaged: bool = True,
                 grad_scaler=None, params=None, process_group=None, fallback: str = "adamw",
                 fallback_lr=None, fallback_betas=(0.9, 0.999), fallback_eps=1e-8) -> None:
        model = compiled_inner(model)
        if process_group is None and isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = getattr(model, "process_group", None)
        self._process_group = check_process_group(process_group)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                        per_layer=per_layer, curvature_samples=curvature_samples,
                        max_state_bytes=max_state_bytes,
                        on_nonfinite=on_nonfinite, batch_averaged=batch_averaged,
                        fallback=fallback, fallback_lr=fallback_lr,
                        fallback_betas=fallback_betas, fallback_eps=fallback_eps)
        OPTIONS.check(defaults)
        patterns = skip_patterns(skip_layers)
        super().__init__(model.parameters() if params is None else params, defaults)
        OPTIONS.check_groups(self.param_groups)  # before the hooks: nothing to undo
        check_params(all_params(self), type(self).__name__)
        self._layers = find_layers(model, group_index(self), patterns, owner="NaturalGradient",
                                   stacklevel=4, step=f"fallback step ({fallback})")
        dtype = self._layers[0].weight.dtype if self._layers else torch.float32
        self._sink = PerSampleGradients(self._layers, dtype, max_state_bytes)
        self._solver = WoodburyNaturalGradient(self._sink)
        self._capture = PerSampleCapture(self._layers, self._sink, grad_scaler)
        self._skips, self._checks = SkipWarner("NaturalGradient"), OptionChecks(OPTIONS)
        self._masked_steps = MaskedSteps()
        self._directions: dict[tuple, torch.Tensor] = {}  # layers -> their flat directions
        self._between_steps()

    @property
    def layers(self) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs that are preconditioned."""
        return [(l.name, l.module) for l in self._layers]

    def add_param_group(self, param_group: dict) -> None:
        add_param_group_checked(self, param_group, lambda: (
            OPTIONS.check_groups(self.param_groups),
            check_params(all_params(self), type(self).__name__)))

    def load_state_dict(self, state_dict: dict) -> None:
        kept = load_state_dict_uncast(self, state_dict, ("nonfinite_steps",) + FALLBACK_UNCAST)
        restore_uncast(kept, self.state)
        for p, entries in kept.items():
            self.state[p].update(entries)
        try:
            OPTIONS.check_groups(self.param_groups)
        except ValueError as exc:
            raise ValueError(f"NaturalGradient.load_state_dict: {exc}") from None
        self._between_steps()

    @torch.compiler.disable  # eager under torch.compile: see docs/architecture.md
    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """One step; ``closure`` (optional) runs forward and backward and returns the loss."""
        loss = call_closure(closure)
        params = all_params(self)
        if not any(p.grad is not None for p in params):
            return loss
        self._checks(self.param_groups)  # skipped while no option changed
        o, group_of = self.param_groups[0], group_index(self)
        check_dense_grads(params, type(self).__name__)
        glob = self._global_state()
        self._skips.watch(glob["nonfinite_steps"])
        with_grads = [l for l in self._layers if l.has_grads()] if self._capture.active else []
        self._capture.check(True, bool(with_grads))
        layers = [l for l in with_grads if l.index in self._sink.captured]
        done = {id(p) for l in layers for p in l.params()}
        plain = [p for p in params if p.grad is not None and id(p) not in done]
        wd = [self.param_groups[group_of[id(l.weight)]]["weight_decay"] for l in layers]
        grads = [layer_vector(l, l.weight.grad, l.bias.grad if l.bias is not None else None)
                 for l in layers]
        grads = [g if w == 0 else g.add(layer_vector(l, l.weight, l.bias), alpha=w)
                 for l, g, w in zip(layers, grads, wd)]
        # a non-finite gradient or per-sample gradient makes its layer's direction non-finite
        # (through J g and the Gram's diagonal): the directions are checked instead of the rows
        flat = self._flat_directions(layers, grads)
        try:  # ValueError: rows not per-sample, or above max_state_bytes (nothing changed)
            ds = self._solver.directions(layers, grads, o["damping"], o["per_layer"],
                                         self._process_group, flat) if layers else []
        except ValueError:
            self._between_steps()
            raise
        guard = self._guard([p.grad for p in plain] + ([flat] if layers else []), glob)
        directions = []
        if layers:
            if guard:
                fill_if_(flat, guard.bad, 0)
            for l, d in zip(layers, ds):
                d = d.view(l.out, l.a_dim)  # views, not copies: the momentum reads them once
                directions.append((l.weight, d[:, :l.fan_in].unflatten(1, l.weight.shape[1:])))
                if l.bias is not None:
                    directions.append((l.bias, d[:, l.fan_in]))
        _momentum_and_fallback_(self, directions, plain, group_of, guard,
                                guard.ok if guard else None)
        glob["step"] += 1
        self._between_steps()
        return loss

    def _flat_directions(self, layers: list, grads: list) -> torch.Tensor | None:
        """The layers' directions' flat buffer (kept while the same layers are stepped)."""
        if not layers:
            return None
        key = (tuple(l.index for l in layers), grads[0].dtype, grads[0].device)
        if key not in self._directions:
            self._directions = {key: grads[0].new_empty(sum(g.numel() for g in grads))}
        return self._directions[key]

    def _global_state(self) -> dict:
        """The global state (under the first param): ``step`` and ``nonfinite_steps``."""
        glob = self.state[self.param_groups[0]["params"][0]]
        glob.setdefault("step", 0)
        if not isinstance(glob.get("nonfinite_steps"), torch.Tensor):
            glob["nonfinite_steps"] = torch.zeros((), dtype=torch.int64,
                                                  device=self.param_groups[0]["params"][0].device)
        return glob

    def _guard(self, checked: list, glob: dict) -> SkipGuard | None:
        """The step's skip guard (None: nothing to mask), or NonFiniteError ('raise')."""
        policy = self.param_groups[0]["on_nonfinite"]
        try:
            guard = SkipGuard.check(checked, policy, glob["nonfinite_steps"],
                                    "NaturalGradient: the gradient (or a captured per-sample "
                                    "gradient) is not finite") if checked else None
        except NonFiniteError:
            self._between_steps()
            raise
        return guard if policy == "skip" else None

    def _between_steps(self) -> None:
        """Drop what was captured since the last step; hand the options to the capture."""
        self._capture.reset()
        self._sink.reset_staged()
        o = self.param_groups[0]
        self._sink.max_state_bytes = o["max_state_bytes"]
        self._sink.batch_averaged = o["batch_averaged"]
        self._sink.curvature_samples = o["curvature_samples"]
        self._capture.configure(True, o["batch_averaged"], 1)
