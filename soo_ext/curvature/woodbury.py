"""Woodbury natural gradient (Ren & Goldfarb 2019; SENG's per-layer variant): the per-sample
gradients of the minibatch, captured from K-FAC's layer rows, and the damped empirical-Fisher
solve ``d = (lambda I + J^T J / N)^{-1} g`` through the ``N x N`` system::

    d = (g - J^T (lambda N I + J J^T)^{-1} J g) / lambda

one ``window_gram`` pass per layer (``J J^T`` and ``J g`` in float64), one batched Cholesky
(batched over the layers in the per-layer variant) and one ``window_combine`` pass per layer."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .kfac_layers import KFACLayer

__all__ = ["PerSampleGradients", "woodbury_coefficients", "WoodburyNaturalGradient"]


class PerSampleGradients:
    """The sink :class:`~soo_ext.curvature.kfac_layers.LayerCapture` stages into (in place of
    K-FAC's factors): for each layer, the per-sample gradients of its weight (and bias) as the
    rows of an ``[N, out * a_dim]`` window, row ``i`` the flattened ``g_i^T a_i`` (a conv's summed
    over its output positions), scaled back to the gradient of sample i's loss (``g_scale``: a
    mean loss's per-sample rows are ``grad_i / N``).

    Args:
        layers: the layers (one window each).
        dtype: of the windows (the params').
        max_state_bytes: the most bytes the windows may take (ValueError naming
            ``max_state_bytes`` before allocating more).
        owner: the optimizer's name, in the messages.
    """

    def __init__(self, layers: list[KFACLayer], dtype: torch.dtype, max_state_bytes: int,
                 owner: str = "NaturalGradient") -> None:
        self.layers, self.dtype, self.owner = layers, dtype, owner
        self.max_state_bytes = max_state_bytes
        self.windows: dict[int, Tensor] = {}  # layer index -> [N, out * a_dim]

    @property
    def samples(self) -> int:
        """N, the rows of the windows (0 before a capture)."""
        return next(iter(self.windows.values())).shape[0] if self.windows else 0

    def reset_staged(self) -> None:
        self.windows = {}

    def gather_(self, group) -> None:
        """Data parallel: every rank's windows replaced by all ranks' rows, in rank order (the
        whole batch's ``J``, as one process has it; every rank must hold as many samples)."""
        if group is None:
            return
        dist = torch.distributed
        for key in sorted(self.windows):
            J = self.windows[key]
            parts = [torch.empty_like(J) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, J.contiguous(), group=group)
            self.windows[key] = torch.cat(parts)

    def stage(self, layer: KFACLayer, a: Tensor, g: Tensor, decay: float, w: float,
              g_scale: float, samples: int) -> None:
        """One backward pass of ``layer``: ``a`` ``[N P, a_dim]`` and ``g`` ``[N P, out]`` rows
        (sample-major, P positions per sample)."""
        if layer.index in self.windows:
            raise RuntimeError(f"{self.owner}: layer {layer.name!r} ran backward twice before "
                               "step(): one backward pass per step (no gradient accumulation)")
        n = sum(l.out * l.a_dim for l in self.layers)
        need = samples * n * torch.empty((), dtype=self.dtype).element_size()
        if need > self.max_state_bytes:
            raise ValueError(
                f"{self.owner}: the per-sample gradients of {samples} samples x {n} params take "
                f"{need} bytes, above max_state_bytes={self.max_state_bytes} (raise "
                "max_state_bytes or use a smaller batch)")
        a = a.to(self.dtype).reshape(samples, -1, layer.a_dim)
        g = g.to(self.dtype).reshape(samples, -1, layer.out)
        if g_scale != 1:  # on the small output-gradient rows, not on the window
            g = g * g_scale ** 0.5
        self.windows[layer.index] = torch.bmm(g.transpose(1, 2), a).reshape(samples, -1)


def layer_vector(layer: KFACLayer, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A layer's weight (and bias) tensors as one vector in the windows' column order
    (``[out, a_dim]`` flattened, the bias last in each row)."""
    w = weight.reshape(layer.out, layer.fan_in)
    if bias is not None:
        w = torch.cat([w, bias.reshape(layer.out, 1)], 1)
    return w.reshape(-1).contiguous()


def woodbury_coefficients(K: Tensor, Jg: Tensor, damping: float) -> Tensor:
    """``c = (lambda N I + K)^{-1} Jg`` for ``K`` ``[..., N, N]`` (``J J^T``) and ``Jg``
    ``[..., N]``, float64, one batched Cholesky; no host sync (a failed factorization, only
    possible with non-finite input, gives non-finite ``c``)."""
    N = K.shape[-1]
    A = K + (damping * N) * torch.eye(N, dtype=K.dtype, device=K.device)
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(Jg.unsqueeze(-1), L).squeeze(-1)


class WoodburyNaturalGradient:
    """The Woodbury solve over the captured per-sample gradients.

    ``directions(grads, damping, per_layer)``: for the layers' gradient vectors ``grads``
    (:func:`layer_vector` order, with weight decay added) the natural-gradient directions
    ``(lambda I + J^T J / N)^{-1} g``, with ``J`` all the layers' windows side by side (one
    ``N x N`` system) or, ``per_layer``, each layer's own (SENG: block-diagonal Fisher, one
    system per layer, all in one batched Cholesky)."""

    def __init__(self, sink: PerSampleGradients) -> None:
        self.sink = sink

    def directions(self, layers: list[KFACLayer], grads: list[Tensor], damping: float,
                   per_layer: bool) -> list[Tensor]:
        windows = [self.sink.windows[l.index] for l in layers]
        N = windows[0].shape[0]
        grams = [ops.window_gram(J, [g], rows=N, full=True) for J, g in zip(windows, grads)]
        K = torch.stack([G for G, _ in grams])
        Jg = torch.stack([D[:, 0] for _, D in grams])
        if per_layer:
            c = woodbury_coefficients(K, Jg, damping)
        else:
            c = woodbury_coefficients(K.sum(0), Jg.sum(0), damping).expand(len(layers), N)
        coef = c * (-1.0 / damping)
        base_coef = torch.tensor(1.0 / damping, dtype=torch.float64, device=K.device)
        out = []
        for i, (J, g) in enumerate(zip(windows, grads)):
            d = torch.empty_like(g)
            ops.window_combine(d, J, coef[i].contiguous(), N, base=g, base_coef=base_coef)
            out.append(d)
        return out
