"""soo_ext: second-order optimizers for PyTorch on fused C++/CUDA kernels."""
from . import ops, reference  # ops loads the compiled module or warns
from ._support.closure import same_randomness
from ._support.errors import NonFiniteError, RootFailureError
from ._support.version import __version__
from .curvature.lbfgs_history import LBFGSHistory
from .ops import build_info
from .optim import (BFGS, DRSOM, EKFAC, GGT, KBFGS, KFAC, LBFGS, MFAC, MLBFGS, SOAP, PSGDKron,
                    Shampoo)
from .optim import NaturalGradient

__all__ = ["BFGS", "DRSOM", "EKFAC", "GGT", "KBFGS", "KFAC", "LBFGS", "LBFGSHistory", "MFAC",
           "MLBFGS", "NonFiniteError", "PSGDKron", "RootFailureError", "SOAP", "Shampoo",
           "build_info", "same_randomness", "ops", "reference", "__version__",
           "NaturalGradient"]
