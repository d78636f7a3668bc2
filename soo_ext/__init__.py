"""soo_ext: second-order optimizers for PyTorch on fused C++/CUDA kernels."""
__version__ = "0.1.0"

from . import ops, reference  # noqa: E402  (ops loads the compiled module or warns)
from .bfgs import BFGS  # noqa: E402
from .drsom import DRSOM, same_randomness  # noqa: E402
from .history import LBFGSHistory  # noqa: E402
from .kfac import KFAC  # noqa: E402
from .lbfgs import LBFGS  # noqa: E402
from .mlbfgs import MLBFGS  # noqa: E402
from .ops import build_info  # noqa: E402
from .quasi_newton import NonFiniteError  # noqa: E402
from .shampoo import RootFailureError, Shampoo  # noqa: E402

__all__ = ["BFGS", "DRSOM", "KFAC", "LBFGS", "LBFGSHistory", "MLBFGS", "NonFiniteError", "RootFailureError", "Shampoo", "build_info", "same_randomness",
           "ops", "reference", "__version__"]
