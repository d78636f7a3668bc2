"""The errors the optimizers raise (exported by ``soo_ext``)."""

__all__ = ["NonFiniteError", "RootFailureError"]


class NonFiniteError(RuntimeError):
    """A loss or gradient was not finite, with ``on_nonfinite='raise'``; the step changed nothing
    (for L-BFGS/BFGS: the params are at the last finite iterate)."""


class RootFailureError(RuntimeError):
    """Shampoo: the inverse root of a factor failed ``max_root_failures`` consecutive times."""
