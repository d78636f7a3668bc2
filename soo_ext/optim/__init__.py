"""The optimizer classes: a recipe each, composed from soo_ext.curvature."""
from .drsom import DRSOM
from .kfac import KFAC
from .mlbfgs import MLBFGS
from .shampoo import Shampoo
from .bfgs import BFGS
from .lbfgs import LBFGS

__all__ = ["BFGS", "DRSOM", "KFAC", "LBFGS", "MLBFGS", "Shampoo"]
