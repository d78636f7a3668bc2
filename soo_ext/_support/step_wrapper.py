"""The base of every soo_ext optimizer: torch.optim's wrapper of ``step`` only on demand."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

__all__ = ["OnDemandStepWrapper"]


class OnDemandStepWrapper(Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step`` goes through torch's wrapper (the step hooks,
    the profiler's ``Optimizer.step#<Name>.step`` label) only while a profiler runs or a step
    hook is registered, globally or on the optimizer; otherwise it calls ``step`` and the
    profiler's entry point as that wrapper does.  The label's ``record_function`` costs every op
    of the step ~0.3 us even when nothing records (60-110 us a step on the MNIST-1D MLP)."""

    @staticmethod
    def profile_hook_step(func: Callable) -> Callable:
        observed = Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def step(self, *args, **kwargs):
            if (torch.autograd._profiler_enabled() or self._optimizer_step_pre_hooks
                    or self._optimizer_step_post_hooks
                    or _torch_optimizer._global_optimizer_pre_hooks
                    or _torch_optimizer._global_optimizer_post_hooks):
                return observed(self, *args, **kwargs)
            out = func(self, *args, **kwargs)
            self._optimizer_step_code()
            return out
        return step
