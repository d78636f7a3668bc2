"""Calling closures: with grad enabled for the optimizers that run under no_grad, and with the
same randomness for the repeated evaluations of one step (:class:`same_randomness`)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["call_closure", "capture_rng", "restore_rng", "same_randomness"]


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
