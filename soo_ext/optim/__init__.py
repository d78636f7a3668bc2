"""The optimizer classes: a recipe each, composed from soo_ext.curvature."""
from .bfgs import BFGS
from .drsom import DRSOM
from .ekfac import EKFAC
from .kbfgs import KBFGS
from .kfac import KFAC
from .lbfgs import LBFGS
from .mlbfgs import MLBFGS
from .psgd_kron import PSGDKron
from .shampoo import Shampoo
from .soap import SOAP

__all__ = ["BFGS", "DRSOM", "EKFAC", "KBFGS", "KFAC", "LBFGS", "MLBFGS", "PSGDKron", "SOAP",
           "Shampoo"]
