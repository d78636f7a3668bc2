"""Host values onto the device without a host sync."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["device_tensor", "kept_scalar"]


def device_tensor(values, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without the host sync of a CUDA copy
    from pageable memory (which waits for the device's queue): the values are staged in pinned
    memory and copied asynchronously, like a kernel launch (torch's pinned-memory allocator keeps
    the staging buffer until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


_KEPT: dict[tuple, Tensor] = {}


def kept_scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device, made once and kept (a hot
    path's hyperparameters: one fill less a step).  Read-only: callers must not modify it."""
    key = (value, like.dtype, like.device)
    kept = _KEPT.get(key)
    if kept is None:
        if len(_KEPT) >= 64:  # schedules change the values: keep only the recent ones
            _KEPT.clear()
        kept = _KEPT[key] = like.new_full((), value)
    return kept
