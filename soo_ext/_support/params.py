"""Checks of the params an optimizer is given, and the state_dict helpers the optimizers share."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import is_dtensor

__all__ = ["add_param_group_checked", "all_params", "check_dense_grads", "check_history_dtype",
           "check_params", "group_index", "load_state_dict_uncast"]


def all_params(optimizer: Optimizer) -> list[Tensor]:
    """The params of every group, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def add_param_group_checked(optimizer: Optimizer, param_group: dict,
                            check: Callable[[], None]) -> None:
    """``Optimizer.add_param_group``, undone if ``check()`` then raises ValueError."""
    Optimizer.add_param_group(optimizer, param_group)
    try:
        check()
    except ValueError:
        optimizer.param_groups.pop()
        raise


def group_index(optimizer: Optimizer) -> dict[int, int]:
    """``id(param)`` -> the index of its param group."""
    return {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def check_params(params: list[Tensor], name: str) -> None:
    """ValueError unless the params are real float32/float64 dense tensors of one dtype on one
    device (one flat vector of them is what the fused kernels work on), not DTensors."""
    if not params:
        return
    p0 = params[0]
    for p in params:
        if is_dtensor(p):
            raise ValueError(f"Invalid params: {name} does not support DTensor params (FSDP2, "
                             "tensor parallel); for data parallelism use "
                             "DistributedDataParallel")
        if p.is_complex():
            raise ValueError(f"Invalid params: {name} does not support complex params (optimise "
                             "real and imaginary parts as separate real tensors, e.g. "
                             "torch.view_as_real)")
        if p.layout != torch.strided:
            raise ValueError(f"Invalid params: {name} does not support sparse params "
                             f"(got {p.layout})")
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid params: {name} params must have dtype float32 or float64, "
                             f"got {p.dtype}")
        if p.dtype != p0.dtype:
            raise ValueError(f"Invalid params: {name} params must share one dtype, got "
                             f"{p0.dtype} and {p.dtype}")
        if p.device != p0.device:
            raise ValueError(f"Invalid params: {name} params must be on one device, got "
                             f"{p0.device} and {p.device}")


def check_dense_grads(params: list[Tensor], name: str) -> None:
    """RuntimeError if a param's gradient is sparse or complex."""
    for p in params:
        g = p.grad
        if g is not None and g.layout != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients (got {g.layout})")
        if g is not None and g.is_complex():
            raise RuntimeError(f"{name} does not support complex gradients")


def check_history_dtype(dtype: torch.dtype, history_dtype: torch.dtype | None) -> None:
    """ValueError unless ``history_dtype`` may store the pairs of ``dtype`` params."""
    allowed = (None, dtype) + ((torch.bfloat16,) if dtype == torch.float32 else ())
    if history_dtype not in allowed:
        raise ValueError(f"Invalid history_dtype: {history_dtype} with {dtype} params "
                         f"(allowed: {', '.join(str(a) for a in allowed)})")


def load_state_dict_uncast(optimizer: Optimizer, state_dict: dict,
                           keys: tuple[str, ...]) -> dict[Tensor, dict]:
    """``Optimizer.load_state_dict`` for ``optimizer``, except the per-param state entries named
    in ``keys``: it would cast every floating tensor to the param's dtype/device (and an int64
    counter to float), so these go around it and are returned, as saved, by param, for the
    caller to store.  A saved param group without an option added since takes its default."""
    state_dict = dict(state_dict)
    state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
    kept = {k: {key: v.pop(key) for key in keys if key in v}
            for k, v in state_dict["state"].items()}
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    options = [set(group) - {"params"} for group in optimizer.param_groups]
    Optimizer.load_state_dict(optimizer, state_dict)
    for group, keys in zip(optimizer.param_groups, options):  # options added since: defaults
        for key in keys - set(group):
            group[key] = optimizer.defaults[key]
    by_id = dict(zip(saved_ids, (p for group in optimizer.param_groups for p in group["params"])))
    return {by_id[k]: entries for k, entries in kept.items()}
