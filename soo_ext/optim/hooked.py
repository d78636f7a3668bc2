"""What the optimizers that hook their model share (KFAC, EKFAC, NaturalGradient)."""
from __future__ import annotations

__all__ = ["ModelHooks"]


class ModelHooks:
    """Mixin (before ``Optimizer`` in the bases) for an optimizer whose ``_capture`` hooks the
    model and whose ``_between_steps()`` drops what was captured since the last step."""

    def remove_hooks(self) -> None:
        """Detach from the model: nothing more is captured; later steps use what the optimizer
        has (K-FAC: its factors and decompositions; the natural gradient: the SGD step)."""
        self._capture.remove()
        self._between_steps()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``Optimizer.zero_grad``; also drops what was captured since the last step."""
        super().zero_grad(set_to_none)
        self._between_steps()

    def __getstate__(self) -> dict:
        raise TypeError(f"{type(self).__name__} holds hooks on its model and cannot be pickled "
                        "or copied; save state_dict() instead")
