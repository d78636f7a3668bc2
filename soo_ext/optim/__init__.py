"""The optimizer classes: a recipe each, composed from soo_ext.curvature."""
from .bfgs import BFGS
from .drsom import DRSOM
from .ekfac import EKFAC
from .ggt import GGT
from .kbfgs import KBFGS
from .kfac import KFAC
from .lbfgs import LBFGS
from .mfac import MFAC
from .mlbfgs import MLBFGS
from .natural_gradient import NaturalGradient
from .psgd_kron import PSGDKron
from .shampoo import Shampoo
from .soap import SOAP

__all__ = ["BFGS", "DRSOM", "EKFAC", "GGT", "KBFGS", "KFAC", "LBFGS", "MFAC", "MLBFGS",
           "NaturalGradient", "PSGDKron", "SOAP", "Shampoo"]
