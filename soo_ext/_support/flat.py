"""Flat parameter buffers: params laid out one after another in one vector (what the fused
kernels work on), views of such vectors shaped like the params, and the gather of gradients."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FlatLayout", "FlatParams", "gather"]


def gather(views: list[Tensor], grads: list[Tensor | None], name: str) -> None:
    """Copy ``grads`` into ``views`` (one ``_foreach_copy_``); a None gradient counts as zero.
    RuntimeError for a sparse or complex gradient (``name`` says whose)."""
    dst, src, missing = [], [], []
    for v, g in zip(views, grads):
        if g is None:
            missing.append(v)
        elif g.layout != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients (got {g.layout})")
        elif g.is_complex():
            raise RuntimeError(f"{name} does not support complex gradients")
        else:
            dst.append(v)
            src.append(g)
    if dst:
        torch._foreach_copy_(dst, src)
    if missing:
        torch._foreach_zero_(missing)


class FlatLayout:
    """The layout of ``params`` in a flat vector (dtype and device of the first param)."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        self.dtype, self.device = params[0].dtype, params[0].device

    def empty(self, extra: int = 0) -> Tensor:
        """A flat vector (``extra`` more entries at the end)."""
        return torch.empty(self.numel + extra, dtype=self.dtype, device=self.device)

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat[:numel]`` cut into views shaped like the params."""
        return [v.view(s) for v, s in zip(flat[:self.numel].split(self.numels), self.shapes)]

    def gather_grads(self, flat: Tensor, views: list[Tensor], name: str,
                     maximize: bool = False) -> None:
        """The params' ``.grad`` into ``flat`` (through its ``views``), negated when maximising."""
        gather(views, [p.grad for p in self.params], name)
        if maximize:
            flat.neg_()


class FlatParams:
    """The params moved into one flat vector ``x``: each ``p.data`` becomes a view of it, so that
    fused ops update all of them in one pass and in-place changes of the params (``copy_``,
    ``model.load_state_dict``) are seen in ``x``."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.layout = FlatLayout(params)
        self.x = self.layout.empty()
        views = self.layout.views(self.x)
        torch._foreach_copy_(views, [p.detach() for p in params])
        for p, v in zip(params, views):
            p.data = v
        self._ptrs = [v.data_ptr() for v in views]

    def check(self, name: str) -> None:
        """RuntimeError if a param's storage was replaced (``p.data = ...``, ``model.to()``)."""
        if any(p.data_ptr() != ptr for p, ptr in zip(self.params, self._ptrs)):
            raise RuntimeError(f"{name}: a param's storage was replaced after construction (e.g. "
                               "model.to()); construct the optimizer after moving the model")
