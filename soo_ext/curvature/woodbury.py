"""Woodbury natural gradient (Ren & Goldfarb 2019; SENG's per-layer variant): the per-sample
gradients of the minibatch (or of its first S samples), captured from K-FAC's layer rows, and
the damped empirical-Fisher solve ``d = (lambda I + J^T J / S)^{-1} g`` through the ``S x S``
system::

    d = (g - J^T (lambda S I + J J^T)^{-1} J g) / lambda

Sample i's gradient of a layer is ``J_i = sum_t g_it a_it^T`` over its rows t (a Linear's
tokens, a conv's output positions).  Per layer the cheaper of two routes gives ``J J^T`` and
``J g`` in float64 (:class:`SampleWindow`: ``J`` formed by one ``bmm``, then ``window_gram`` and
``window_combine``; :class:`TokenRows`: ``J`` never formed, ``(J J^T)_ij = sum_{t,s} (a_it .
a_js)(g_it . g_js)``), then one batched Cholesky (batched over the layers in the per-layer
variant) and ``J^T c`` by the same route."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .kfac_layers import KFACLayer, LayerCapture

__all__ = ["PerSampleCapture", "PerSampleGradients", "SampleWindow", "TokenRows",
           "WoodburyNaturalGradient", "layer_vector", "woodbury_coefficients"]

F64 = torch.float64


class SampleRows:
    """One layer's rows of a backward pass, as captured: ``a`` ``[R, a_dim]``, ``g``
    ``[R, out]``, the input's ``shape``, ``lead`` the leading dims of the rows kept (``R``
    their product: the input's, or those of its first samples), ``batch_dim`` the samples' dim
    in ``lead`` and ``batch`` the batch size (None until resolved), and the capture's
    ``samples`` and ``g_scale`` (its guess of the batch size: the leading dim kept)."""

    __slots__ = ("a", "g", "shape", "lead", "batch_dim", "batch", "samples", "g_scale")

    def __init__(self, a: Tensor, g: Tensor, shape: tuple[int, ...], lead: tuple[int, ...],
                 batch_dim: int | None, batch: int | None, samples: int,
                 g_scale: float) -> None:
        self.a, self.g, self.shape, self.lead, self.batch_dim = a, g, shape, lead, batch_dim
        self.batch, self.samples, self.g_scale = batch, samples, g_scale


class PerSampleGradients:
    """The sink :class:`PerSampleCapture` stages into (in place of K-FAC's factors): for each
    layer its rows of the backward pass, and where its samples are.  :meth:`resolve` finds the
    batch dim of every layer; :meth:`sample_major` then gives sample i's rows, scaled back to
    the gradient of sample i's loss (a mean loss's rows are ``grad_i / N``).

    A conv's input is ``[N, C, ...]`` and a Linear's ``[N, in]``: the batch is dim 0.  An
    attention's in-projection and the other sequence layers (``KFACLayer.batch_first`` set)
    arrive batch-major from the capture (``[N, T, E]``; ``[T, N, E]`` transposed, ``[T, E]``
    one sample).  Any other Linear on ``[d0, d1, ..., in]`` takes as batch dim the one dim of
    the batch size those layers give; none, or more than one such dim, or layers that disagree
    on the batch size: a ValueError naming the layers (their rows are not per-sample as far as
    can be told).

    ``curvature_samples`` (S, None: all): only the rows of the batch's first S samples are
    used; a layer whose batch dim is known when it is captured keeps only those
    (:meth:`samples_kept`), the others are cut at the step.

    Args:
        layers: the layers.
        dtype: of the rows kept (the params').
        max_state_bytes: the most bytes the per-sample data may take (ValueError naming
            ``max_state_bytes`` before allocating more): the rows of a backward pass when they
            are captured, the whole batch's per-sample data at the step.
        owner: the optimizer's name, in the messages.
    """

    def __init__(self, layers: list[KFACLayer], dtype: torch.dtype, max_state_bytes: int,
                 owner: str = "NaturalGradient") -> None:
        self.layers, self.dtype, self.owner = layers, dtype, owner
        self.max_state_bytes = max_state_bytes
        self.batch_averaged = True
        self.curvature_samples: int | None = None
        # of the pass being staged (PerSampleCapture): the input's shape, the samples kept
        self.input_shape: tuple[int, ...] = ()
        self.kept: int | None = None
        self.captured: dict[int, SampleRows] = {}  # layer index -> rows
        self.held_bytes = 0

    def reset_staged(self) -> None:
        self.captured, self.held_bytes = {}, 0

    def stage(self, layer: KFACLayer, a: Tensor, g: Tensor, decay: float, w: float,
              g_scale: float, samples: int) -> None:
        """One backward pass of ``layer``: its ``a`` ``[R, a_dim]`` and ``g`` ``[R, out]`` rows,
        in the order of the input's leading dims."""
        if layer.index in self.captured:
            raise RuntimeError(f"{self.owner}: layer {layer.name!r} ran backward twice before "
                               "step(): one backward pass per step (no gradient accumulation)")
        R = a.shape[0]
        need = self.held_bytes + R * (layer.a_dim + layer.out) * self.dtype.itemsize
        if need > self.max_state_bytes:
            raise ValueError(
                f"{self.owner}: the rows captured for the per-sample gradients take {need} "
                f"bytes, above max_state_bytes={self.max_state_bytes} (raise max_state_bytes or "
                "use a smaller batch)")
        lead, batch_dim = self._layout(layer, R, samples)
        batch = None if batch_dim is None else (
            self.input_shape[0] if self.kept is not None else lead[batch_dim])
        a, g = (t if t.dtype == self.dtype else t.to(self.dtype) for t in (a, g))
        self.captured[layer.index] = SampleRows(a, g, self.input_shape, lead, batch_dim, batch,
                                                samples, g_scale)
        self.held_bytes = need

    def samples_kept(self, layer: KFACLayer, shape: torch.Size) -> int | None:
        """How many leading samples of a pass with input ``shape`` to keep (the rows of the
        others are never formed), or None (all: S covers the batch, or where the samples are
        is not known before the step).  The batch is dim 0 of the (batch-major) input and
        output gradient where it is known now: a batched conv, a Linear on ``[N, in]``, a
        sequence layer."""
        S = self.curvature_samples
        if S is None or len(shape) < 2 or S >= shape[0]:
            return None
        if layer.conv:
            return S if len(shape) == layer.spatial + 2 else None
        return S if len(shape) == 2 or layer.batch_first is not None else None

    def _layout(self, layer: KFACLayer, R: int, samples: int) -> tuple[tuple[int, ...],
                                                                        int | None]:
        """The input's leading dims and the batch dim among them (None: to be resolved)."""
        if layer.conv:  # [N, C, ...] (unbatched: samples 1): sample-major rows
            return (samples, R // samples), 0
        lead = tuple(self.input_shape[:-1])
        if self.kept is not None:  # the first samples of a batch on dim 0
            lead = (self.kept, *lead[1:])
        if not lead:  # a 1-D input: one sample
            return (1,), 0
        if layer.batch_first is None:  # a Linear: [N, in], or resolved at the step
            return lead, 0 if len(lead) == 1 else None
        return lead, 0  # a sequence layer's batch-major [N, T]

    def resolve(self, layers: list[KFACLayer]) -> int:
        """The batch size N of the captured ``layers`` (each one's batch dim set), or ValueError
        saying which layers' rows cannot be split into samples and what to do."""
        rows = [(l, self.captured[l.index]) for l in layers]
        known = [(l, r) for l, r in rows if r.batch_dim is not None]
        sizes = {r.batch for _, r in known}
        if len(sizes) > 1:
            by_size: dict[int, list[str]] = {}
            for l, r in known:
                by_size.setdefault(r.batch, []).append(_describe(l, r))
            raise ValueError(
                f"{self.owner}: the layers disagree on the batch size: " + "; ".join(
                    f"{n} samples: {', '.join(names)}" for n, names in sorted(by_size.items()))
                + ". Each preconditioned layer's input must hold the batch's samples along "
                "one dim (not flattened with the tokens, nor without a batch dim, as a Linear "
                f"applied to a param): leave the others out with skip_layers=[...]{_SEE}")
        unknown = [(l, r) for l, r in rows if r.batch_dim is None]
        if unknown and not sizes:
            raise ValueError(
                f"{self.owner}: cannot tell which dim of these Linears' inputs holds the "
                f"samples: {', '.join(_describe(l, r) for l, r in unknown)}. A Linear on "
                "[d0, d1, ..., in] takes its batch dim from the batch size the model's other "
                "layers give (a conv, a Linear on [N, in], an nn.MultiheadAttention by its "
                "batch_first), and none was captured; pass skip_layers="
                f"{[l.name for l, _ in unknown]!r} (plain SGD step for them){_SEE}")
        N = next(iter(sizes)) if sizes else 0
        bad = []
        for l, r in unknown:
            dims = [k for k, s in enumerate(r.lead) if s == N]
            if len(dims) == 1:
                r.batch_dim, r.batch = dims[0], N
            else:
                bad.append((l, r, dims))
        if bad:
            raise ValueError(
                f"{self.owner}: the batch size is {N}, but these Linears' inputs hold it at "
                "no dim or at several (then batch-first [N, T, in] cannot be told from "
                "sequence-first [T, N, in]): " + ", ".join(
                    f"{_describe(l, r)}: dims {dims}" for l, r, dims in bad)
                + ". Use a batch size other than the sequence length, build the model from "
                "torch's transformer layers (their layout is known), or pass skip_layers="
                f"{[l.name for l, _, _ in bad]!r} (plain SGD step for them){_SEE}")
        return N

    def sample_major(self, layer: KFACLayer, count: int | None = None) -> tuple[Tensor, Tensor]:
        """``A`` ``[S, P, a_dim]`` and ``G`` ``[S, P, out]`` of the first ``count`` samples
        (default all kept; after :meth:`resolve`): sample i's P rows, ``G`` scaled so that
        ``sum_t G_it A_it^T`` is the gradient of sample i's loss."""
        r = self.captured[layer.index]
        N = r.batch
        S = r.lead[r.batch_dim] if count is None else count
        P = len(r.a) // r.lead[r.batch_dim]  # rows a sample
        if r.batch_dim == 0:  # sample-major rows: the first S samples' are the first S P
            A, G = r.a[:S * P].reshape(S, P, layer.a_dim), r.g[:S * P].reshape(S, P, layer.out)
        else:
            A = r.a.reshape(*r.lead, -1).narrow(r.batch_dim, 0, S).movedim(r.batch_dim, 0)
            G = r.g.reshape(*r.lead, -1).narrow(r.batch_dim, 0, S).movedim(r.batch_dim, 0)
            A, G = A.reshape(S, P, layer.a_dim), G.reshape(S, P, layer.out)
        # the capture undid the loss's mean with its guess of the batch size (the leading dim
        # kept): the mean was over N
        scale = r.g_scale * (N / r.samples) ** 2 if self.batch_averaged else r.g_scale
        if scale != 1:  # on the small output-gradient rows, not on the window
            G = G * scale ** 0.5
        return A, G

    def window(self, layer: KFACLayer, count: int | None = None) -> Tensor:
        """The per-sample gradients ``J`` ``[S, out * a_dim]`` of the first ``count`` samples
        (default all; after :meth:`resolve`), row i sample i's in :func:`layer_vector` order."""
        A, G = self.sample_major(layer, count)
        return torch.bmm(G.transpose(1, 2), A).reshape(A.shape[0], layer.out * layer.a_dim)


_SEE = " (docs/natural_gradient.md#input-layouts)"


def _describe(layer: KFACLayer, rows: SampleRows) -> str:
    return f"{type(layer.module).__name__} {layer.name!r} (input {list(rows.shape)})"


class PerSampleCapture(LayerCapture):
    """K-FAC's :class:`~soo_ext.curvature.kfac_layers.LayerCapture` staging into a
    :class:`PerSampleGradients`, which also needs each pass's input shape (where the samples
    are: the rows alone do not say); only the first samples' input and output gradient are
    passed on where the sink keeps no more (:meth:`PerSampleGradients.samples_kept`)."""

    def __init__(self, layers: list[KFACLayer], sink: PerSampleGradients, grad_scaler=None,
                 owner: str = "NaturalGradient") -> None:
        super().__init__(layers, lambda: sink, grad_scaler, owner)
        self.sink = sink

    def _stage(self, layer: KFACLayer, x: Tensor, grad: Tensor) -> None:
        sink = self.sink
        sink.input_shape, sink.kept = tuple(x.shape), sink.samples_kept(layer, x.shape)
        if sink.kept is not None:
            x, grad = x[:sink.kept], grad[:sink.kept]
        super()._stage(layer, x, grad)


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
    A = K.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(damping * K.shape[-1])
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_solve(Jg.unsqueeze(-1), L).squeeze(-1)


def tokens_cheaper(N: int, P: int, out: int, a_dim: int) -> bool:
    """Whether :class:`TokenRows` takes fewer flops than :class:`SampleWindow` for a layer of
    ``out x a_dim`` with P rows per sample: forming J (``N P out a``) and its Gram
    (``N^2 out a``) against the rows' Grams (``N^2 P^2 (a + out)``); ``J g`` and ``J^T c``
    take ``N out a`` each from the window, ``N P out a`` from the rows."""
    window = N * out * a_dim * (P + N + 2)
    tokens = N * N * P * P * (a_dim + out + 1) + 2 * N * P * out * a_dim
    return tokens < window


class SampleWindow:
    """A layer's per-sample gradients formed: ``J`` ``[N, out * a_dim]`` (params' dtype), its
    Gram and dots by ``window_gram`` and ``J^T c`` by ``window_combine`` (float64 sums)."""

    def __init__(self, J: Tensor) -> None:
        self.J = J

    def gram(self, g: Tensor) -> tuple[Tensor, Tensor]:
        K, D = ops.window_gram(self.J, [g], rows=self.J.shape[0], full=True)
        return K, D[:, 0]

    def combine(self, g: Tensor, c: Tensor, damping: float, out: Tensor) -> None:
        """``out <- (g - J^T c) / damping`` (``c`` float64)."""
        base = torch.full((), 1.0 / damping, dtype=F64, device=g.device)
        ops.window_combine(out, self.J, c * (-1.0 / damping), self.J.shape[0], base=g,
                           base_coef=base)


class TokenRows:
    """A layer's per-sample gradients kept as their rows, ``A`` ``[N, P, a_dim]`` and ``G``
    ``[N, P, out]``, never formed: ``(J J^T)_ij = sum_{t,s} (a_it . a_js)(g_it . g_js)`` (one
    row a sample: ``(A A^T) o (G G^T)``), ``(J g)_i = sum_t g_it^T W a_it`` and
    ``J^T c = G^T diag(c) A`` (summed over the tokens).  All in float64, as the window route
    sums: the ``N x N`` system is ill-conditioned (``cond`` up to ``|J|^2 / (lambda N)``), and
    the rows are small."""

    def __init__(self, A: Tensor, G: Tensor) -> None:
        self.N, self.P = A.shape[:2]
        self.A = A.to(F64).reshape(self.N * self.P, A.shape[2])
        self.G = G.to(F64).reshape(self.N * self.P, G.shape[2])
        self._g: Tensor | None = None  # the last g and its [out, a_dim] float64 view
        self._W: Tensor | None = None

    def gram(self, g: Tensor) -> tuple[Tensor, Tensor]:
        N, P, A, G = self.N, self.P, self.A, self.G
        K = (A @ A.T).mul_(G @ G.T)
        if P > 1:
            K = K.view(N, P, N, P).sum((1, 3))
        Jg = (G @ self._weights(g)).mul_(A).sum(1)
        return K, Jg.view(N, P).sum(1) if P > 1 else Jg

    def combine(self, g: Tensor, c: Tensor, damping: float, out: Tensor) -> None:
        """``out <- (g - J^T c) / damping`` (``c`` float64), rounded once to ``out``'s dtype."""
        c = c.repeat_interleave(self.P) if self.P > 1 else c
        d = torch.addmm(self._weights(g), self.G.T, self.A * c[:, None], beta=1.0 / damping,
                        alpha=-1.0 / damping)
        out.copy_(d.view(-1))

    def _weights(self, g: Tensor) -> Tensor:
        """``g`` as ``[out, a_dim]`` in float64 (converted once for gram and combine)."""
        if self._g is not g:
            self._g, self._W = g, g.to(F64).view(self.G.shape[1], self.A.shape[1])
        return self._W


class WoodburyNaturalGradient:
    """The Woodbury solve over the captured per-sample gradients.

    ``directions(layers, grads, damping, per_layer, group)``: for the layers' gradient vectors
    ``grads`` (:func:`layer_vector` order, with weight decay added) the natural-gradient
    directions ``(lambda I + J^T J / S)^{-1} g``, with ``J`` the per-sample gradients of the
    batch's first S samples (the sink's ``curvature_samples``; None: all N) of all the layers
    side by side (one ``S x S`` system) or, ``per_layer``, each layer's own (SENG:
    block-diagonal Fisher, one system per layer, all in one batched Cholesky).  Data parallel
    (``group``): the batch is the ranks' samples in rank order (every rank must hold as many);
    the first S of them are sent by the ranks that hold them (an all-gather when S is the whole
    batch, else a broadcast from each rank that holds some: rank 0 alone when S is at most its
    share), and every rank solves the same system.  ValueError (nothing done) when the layers'
    rows cannot be split into samples or the per-sample data would exceed
    ``max_state_bytes``."""

    def __init__(self, sink: PerSampleGradients) -> None:
        self.sink = sink

    def directions(self, layers: list[KFACLayer], grads: list[Tensor], damping: float,
                   per_layer: bool, group=None, out: Tensor | None = None) -> list[Tensor]:
        """The layers' directions, as views of ``out`` (a flat vector of the grads' total
        length and dtype: one finiteness check and one fill mask them all; default a new
        one)."""
        if out is None:
            out = grads[0].new_empty(sum(g.numel() for g in grads))
        views = out.split([g.numel() for g in grads])
        blocks = self._per_sample(layers, group)
        grams = [b.gram(g) for b, g in zip(blocks, grads)]
        K = torch.stack([k for k, _ in grams])
        Jg = torch.stack([v for _, v in grams])
        S = K.shape[-1]
        if per_layer:
            c = woodbury_coefficients(K, Jg, damping)
        else:
            c = woodbury_coefficients(K.sum(0), Jg.sum(0), damping).expand(len(layers), S)
        for i, (b, g) in enumerate(zip(blocks, grads)):
            b.combine(g, c[i], damping, views[i])
        return views

    def _per_sample(self, layers: list[KFACLayer], group) -> list[SampleWindow | TokenRows]:
        """Each layer's per-sample gradients of the batch's first S samples by its cheaper
        route, sent over ``group``."""
        sink, samples = self.sink, self.sink.curvature_samples
        world, rank = (1, 0) if group is None else (torch.distributed.get_world_size(group),
                                                    torch.distributed.get_rank(group))
        n = sink.resolve(layers)  # this rank's samples
        S = n * world if samples is None else min(samples, n * world)
        local = min(n, max(0, S - rank * n))  # this rank's share of the first S
        routes, need = [], 0
        for l in layers:
            r = sink.captured[l.index]
            P = len(r.a) // r.lead[r.batch_dim]
            tokens = tokens_cheaper(S, P, l.out, l.a_dim)
            routes.append(tokens)
            need += S * (P * (l.a_dim + l.out) if tokens else l.out * l.a_dim)
        need *= sink.dtype.itemsize
        if need > sink.max_state_bytes:
            raise ValueError(
                f"{sink.owner}: the per-sample gradients of {S} samples take {need} bytes, "
                f"above max_state_bytes={sink.max_state_bytes} (raise max_state_bytes or use "
                "curvature_samples or a smaller batch)")
        blocks = []
        for l, tokens in zip(layers, routes):
            if tokens:
                A, G = sink.sample_major(l, local)
                blocks.append(TokenRows(_first_samples(A, S, n, group),
                                        _first_samples(G, S, n, group)))
            else:
                blocks.append(SampleWindow(_first_samples(sink.window(l, local), S, n, group)))
        return blocks


def _first_samples(t: Tensor, S: int, n: int, group) -> Tensor:
    """The first ``S`` samples (dim 0) of the ranks' samples in rank order, on every rank, from
    ``t``: this rank's share of them (``n`` samples a rank; ``t`` itself without a group)."""
    if group is None:
        return t
    dist = torch.distributed
    world = dist.get_world_size(group)
    if S == n * world:  # the whole batch: one all-gather
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)
    parts, rank = [], dist.get_rank(group)
    for src in range(-(-S // n)):  # the ranks that hold some, each broadcasting its share
        share = t.contiguous() if src == rank else t.new_empty((min(n, S - src * n),
                                                                 *t.shape[1:]))
        dist.broadcast(share, dist.get_global_rank(group, src), group=group)
        parts.append(share)
    return torch.cat(parts)
