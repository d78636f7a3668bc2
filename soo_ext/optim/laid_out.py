"""The base of the optimizers that lay their params out at their first step (Shampoo, SOAP,
PSGDKron): options, param checks, the skip warner, and the layout rebuilt after a change."""
from __future__ import annotations

from typing import Any


from .._support.guard import SkipWarner
from .._support.options import OptionSpecs
from .._support.params import (add_param_group_checked, all_params, check_params,
                               load_state_dict_uncast)
from .._support.step_wrapper import OnDemandStepWrapper

__all__ = ["LaidOutOptimizer"]


class LaidOutOptimizer(OnDemandStepWrapper):
    """A subclass gives its ``OPTIONS`` and the state entries a load must not cast to the params'
    dtype (``UNCAST``); it builds ``self._run`` (its layout of the params, None until then) at
    a step from the params and the state, which is why a load, an added group or unpickling
    drops it."""

    OPTIONS: OptionSpecs
    UNCAST: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict) -> None:
        self.OPTIONS.check(defaults)
        self._run: Any = None
        self._skips = SkipWarner(type(self).__name__)
        super().__init__(params, defaults)
        check_params(all_params(self), type(self).__name__)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_skips", SkipWarner(type(self).__name__))
        self._run = None  # rebuilt from the state at the next step

    def add_param_group(self, param_group: dict) -> None:
        add_param_group_checked(self, param_group, lambda: (
            self.OPTIONS.check_groups(self.param_groups),
            check_params(all_params(self), type(self).__name__)))
        self._run = None  # rebuilt (the existing state copied) at the next step

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, self.UNCAST).items():
            self.state[p].update(entries)
        self._run = None
