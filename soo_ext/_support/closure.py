"""Calling closures: with grad enabled for the optimizers that run under no_grad, with the same
randomness for the repeated evaluations of one step (:class:`same_randomness`), and the
evaluations of a closure that returns the loss without calling backward
(:class:`ClosureEvaluator`)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .distributed import all_reduce_mean_
from .flat import FlatLayout, gather

__all__ = ["ClosureEvaluator", "call_closure", "capture_rng", "restore_rng", "same_randomness"]


def call_closure(closure: Callable | None) -> Any:
    """What ``closure`` returns (None without one), called once with grad enabled: it runs the
    backward pass, and step() runs under no_grad."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def capture_rng() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class same_randomness:
    """Context manager making repeated evaluations of ``model`` see the same randomness.

    Inside the block, BatchNorm layers of ``model`` that are in training mode still normalise with
    the batch statistics but do not update their running statistics (nor
    ``num_batches_tracked``): ``track_running_stats`` is switched off and restored on exit.
    ``replay()`` restores the torch (CPU) and CUDA RNG states captured on entry (or the
    ``rng_state`` given), so that dropout draws the same masks again::

        with same_randomness(model) as ctx:
            l1 = loss_fn(model(x), y)
            ctx.replay()
            l2 = loss_fn(model(x), y)   # == l1, running stats unchanged

    :class:`soo_ext.DRSOM` given ``model=`` uses it for every extra evaluation of a step (finite-difference
    gradients, trial points): each replays the RNG state from before the step's base evaluation,
    and the RNG state after the base evaluation is put back at the end of the step, so the random
    stream advances as if the closure had been evaluated once.
    """

    def __init__(self, model: nn.Module | None = None, rng_state=None) -> None:
        self.model = model
        self.rng_state = rng_state
        self._frozen: list[nn.Module] = []

    def __enter__(self) -> "same_randomness":
        if self.rng_state is None:
            self.rng_state = capture_rng()
        if self.model is not None:
            for m in self.model.modules():
                if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                        and m.track_running_stats):
                    m.track_running_stats = False
                    self._frozen.append(m)
        return self

    def replay(self) -> None:
        """Put back the RNG state of the start (dropout masks repeat)."""
        restore_rng(self.rng_state)

    def __exit__(self, *exc) -> None:
        for m in self._frozen:
            m.track_running_stats = True
        self._frozen = []


class ClosureEvaluator:
    """Evaluations of a closure that returns the loss without calling backward (DRSOM's
    convention): the objective (the loss, negated when maximising) and its gradient
    (``torch.autograd.grad``) gathered into a flat vector, trial losses under no_grad, each
    averaged over ``process_group``, and the same randomness for the extra evaluations of a step.

    A step: :meth:`begin` with the step's closure, the base evaluation (:meth:`gradient`), then
    the extra evaluations (:meth:`gradient`, :meth:`loss`) inside :meth:`extra_evaluations`.
    Given ``model``, each of those first replays the RNG state from before the base evaluation,
    with the model's BatchNorm running statistics frozen (:class:`same_randomness`), and the RNG
    state after the base evaluation is put back at the end: the random stream advances as if the
    closure had been evaluated once.

    Data parallel: a gradient vector from :meth:`gradient_vector` is the head of a buffer one
    longer, whose last entry takes the loss, so that one all-reduce averages both.
    """

    def __init__(self, params: list[Tensor], name: str, *, process_group=None,
                 model: nn.Module | None = None) -> None:
        self.params = params
        self.layout = FlatLayout(params)
        self.name = name
        self.group = process_group  # None: nothing to average
        self.model = model
        self.closure: Callable | None = None
        self.maximize = False
        self._with_loss: dict[int, Tensor] = {}  # data_ptr of a gradient vector -> its buffer
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}  # data_ptr -> (flat, views)
        self.calls_backward = False  # the step's closure calls backward itself
        self.absent: list[int] = []  # the params without a gradient at the last gradient()
        self._rng: tuple | None = None  # the RNG state before the base evaluation (with a model)
        self._randomness: same_randomness | None = None  # set inside extra_evaluations()

    def gradient_vector(self) -> Tensor:
        """A flat vector for :meth:`gradient` (with its loss slot when averaging)."""
        buf = self.layout.empty(int(self.group is not None))
        vec = buf[:self.layout.numel]
        self._with_loss[vec.data_ptr()] = buf
        return vec

    def begin(self, closure: Callable, maximize: bool = False) -> None:
        """A new step: its closure; with a model, the RNG state of the base evaluation."""
        self.closure, self.maximize = closure, maximize
        self._rng = capture_rng() if self.model is not None else None

    @contextlib.contextmanager
    def extra_evaluations(self):
        """The block of a step's extra evaluations (finite-difference points, trials), after
        its base evaluation: each of them sees the base evaluation's randomness (with a model)."""
        if self.model is None:
            yield
            return
        after = capture_rng()
        self._randomness = same_randomness(self.model, self._rng).__enter__()
        try:
            yield
        finally:
            self._randomness.__exit__(None, None, None)
            self._randomness = None
            restore_rng(after)

    def _replay(self) -> None:
        if self._randomness is not None:
            self._randomness.replay()

    def _objective(self) -> tuple[Any, Tensor]:
        loss = self.closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise RuntimeError(f"{self.name}: the closure must return the loss as a one-element "
                               "tensor")
        obj = -loss if self.maximize else loss
        return loss, obj.reshape(())

    def _grad_marks(self) -> list:
        """What identifies the params' ``.grad`` now (a backward in between changes it)."""
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.params]

    def gradient(self, out: Tensor, create_graph: bool = False):
        """Evaluate the closure with grad and write the flat gradient of the objective into
        ``out``; returns ``(loss, objective as a device scalar of the params' dtype, the
        per-param gradients (with their graph) with create_graph else None)``, the objective
        and ``out`` averaged over the process group.

        A closure that calls backward itself (torch's convention) is accepted: the gradient
        is then the params' ``.grad``; not with ``create_graph``, which needs the loss's
        graph.  A param that does not require grad, or that the loss does not reach, has no
        gradient (:attr:`absent` lists them): its entries of ``out`` are zero."""
        self._replay()
        marks = self._grad_marks()
        with torch.enable_grad():
            loss, obj = self._objective()
            self.calls_backward = self._grad_marks() != marks
            if self.calls_backward:
                if create_graph:
                    raise RuntimeError(
                        f"{self.name}: the closure called backward, but the Hessian-vector "
                        "products of hvp='autograd' need the loss's graph: return the loss "
                        "without calling backward, or use hvp='fd', 'central' or 'interp' "
                        "(they accept a closure that calls backward)")
                grads = [None if p.grad is None else (-p.grad if self.maximize else p.grad)
                         for p in self.params]
            else:
                if not obj.requires_grad:
                    raise RuntimeError(f"{self.name}: the loss does not require grad (the "
                                       "closure must return the loss computed under grad mode)")
                used = [i for i, p in enumerate(self.params) if p.requires_grad]
                found = torch.autograd.grad(obj, [self.params[i] for i in used],
                                            allow_unused=True, create_graph=create_graph)
                grads = [None] * len(self.params)
                for i, g in zip(used, found):
                    grads[i] = g
        self.absent = [i for i, g in enumerate(grads) if g is None]
        self.gather(grads, out)
        obj = obj.detach().to(self.layout.dtype)
        if self.group is not None:
            buf = self._with_loss[out.data_ptr()]
            buf[-1:].copy_(obj.reshape(1))
            obj = all_reduce_mean_(buf, self.group)[-1]
        return loss, obj, (grads if create_graph else None)

    def loss(self) -> Tensor:
        """The objective under no_grad (a trial point; with grad if the step's closure calls
        backward), a device scalar of the params' dtype, averaged over the process group (the
        closure's loss stays the rank's own)."""
        self._replay()
        with torch.set_grad_enabled(self.calls_backward):
            _, obj = self._objective()
        obj = obj.detach()
        if self.group is not None:
            return all_reduce_mean_(obj.to(self.layout.dtype, copy=True).reshape(1),
                                    self.group)[0]
        return obj.to(self.layout.dtype)

    def gather(self, grads, out: Tensor) -> None:
        """Per-param gradients (None: zero) into the flat vector ``out``."""
        key = out.data_ptr()
        cached = self._views.get(key)
        if cached is None or cached[0] is not out:
            cached = self._views[key] = (out, self.layout.views(out))
        gather(cached[1], [g if g is None else g.detach() for g in grads], self.name)

    def zero_absent_(self, vectors: list[Tensor]) -> None:
        """Zero the entries of the params in :attr:`absent` in flat ``vectors`` (so that steps
        along them leave those params alone)."""
        if self.absent and vectors:
            views = [self.layout.views(v) for v in vectors]
            torch._foreach_zero_([vs[i] for vs in views for i in self.absent])

    def average_(self, t: Tensor) -> Tensor:
        """``t`` averaged over the process group, in place."""
        return t if self.group is None else all_reduce_mean_(t, self.group)
