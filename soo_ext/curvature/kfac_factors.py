"""K-FAC's factors: the layers' A and G factors in size buckets, the statistics staged since the
last step, and their decompositions, eigen (:class:`EigenFactors`) or damped inverses
(:class:`InverseFactors`), with one interface: ``refresh(damping)`` and ``precondition``; EKFAC's
eigenbases with a re-estimated diagonal scaling (:class:`EigenCorrectedFactors`)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from .._support.distributed import all_reduce_mean_
from .._support.guard import fill_if_, where_into_
from .._support.params import check_params
from .kfac_layers import KFACLayer
from .kron_buckets import KronBuckets, keep_where

__all__ = ["COUNTER_KEYS", "EigenCorrectedFactors", "EigenFactors", "FactorStore", "InverseFactors",
           "KFACFactors", "KFACLayout", "LayerGradients", "ShapeGroup", "kl_clip_", "load_views",
           "preconditioned_directions"]


class KFACLayout:
    """Where every factor of the layers lives: bucket ``n`` holds the factors of size ``n``, A
    and G alike; the layers of one ``(out, a_dim)`` shape form a shape group, contiguous in its
    A bucket and in its G bucket (so its factors are slices and one op call preconditions all
    of them).  Bookkeeping only: made when the optimizer is built, before any device is known."""

    def __init__(self, layers: list[KFACLayer]) -> None:
        self.layers = layers
        # Sorting by (out, a_dim) makes each shape group contiguous in both of its buckets: in
        # bucket n the A part lists the layers with a_dim = n by (out, index), the G part those
        # with out = n by (a_dim, index).
        order = sorted(layers, key=lambda l: (l.out, l.a_dim, l.index))
        self.buckets = KronBuckets()
        self.entries: dict[int, list[tuple[KFACLayer, str]]] = {}
        for n in sorted({l.a_dim for l in layers} | {l.out for l in layers}):
            self.entries[n] = [(l, "A") for l in order if l.a_dim == n] \
                + [(l, "G") for l in order if l.out == n]
            for l, which in self.entries[n]:
                if which == "A":
                    l.a_pos = self.buckets.reserve(n, n)
                else:
                    l.g_pos = self.buckets.reserve(n, n)
        self.shape_groups: list[list[KFACLayer]] = []
        for l in order:
            last = self.shape_groups[-1] if self.shape_groups else None
            if last and (last[0].out, last[0].a_dim) == (l.out, l.a_dim):
                last.append(l)
            else:
                self.shape_groups.append([l])


class ShapeGroup:
    """The layers of one shape and their gradients as ``[L, out, a_dim]`` (``grad``, a view of
    ``buffer``, the flat buffer of every group's gradients; weight part and bias column of each
    layer are views of it)."""

    def __init__(self, layers: list[KFACLayer], buffer: Tensor, offset: int) -> None:
        self.layers = layers
        L0 = layers[0]
        self.a = slice(L0.a_pos, L0.a_pos + len(layers))
        self.g = slice(L0.g_pos, L0.g_pos + len(layers))
        for r, layer in enumerate(layers):
            assert layer.a_pos == L0.a_pos + r and layer.g_pos == L0.g_pos + r
            layer.group, layer.row = self, r
        self.buffer = buffer
        size = len(layers) * L0.out * L0.a_dim
        self.grad = buffer[offset:offset + size].view(len(layers), L0.out, L0.a_dim)
        self.w_views = [self.grad[r, :, :l.fan_in].view(l.weight.shape)
                        for r, l in enumerate(layers)]
        self.b_views = [self.grad[r, :, l.fan_in] if l.bias is not None else None
                        for r, l in enumerate(layers)]


class KFACFactors:
    """The factors of a layout on a device: running averages ``F`` (identities at the start),
    the statistics staged since the last step (``P``: views of one buffer, which one all-reduce
    averages over data-parallel ranks and one fill clears), per-factor counters of failed
    decompositions and float64 retries, and the shape groups' gradients (views of one buffer).
    A subclass holds the decompositions (its ``KEYS``: state entries per factor)."""

    MODE = ""
    KEYS: tuple[str, ...] = ()

    def __init__(self, layout: KFACLayout, dtype: torch.dtype, device: torch.device,
                 damping: float) -> None:
        self.layout, self.dtype, self.device = layout, dtype, device
        buckets = layout.buckets
        self.F = buckets.stacks(dtype, device, identity=True)
        self.staged, self.P = buckets.flat_stacks(dtype, device)
        self.failures = buckets.vectors(torch.int64, device)
        self.fallbacks = buckets.vectors(torch.int64, device)
        self.dirty = {n: False for n in self.F}  # P[n] holds statistics
        # the shape groups' gradients: views of one buffer (one finiteness check, one mask)
        sizes = [len(g) * g[0].out * g[0].a_dim for g in layout.shape_groups]
        grads = torch.zeros(sum(sizes), dtype=dtype, device=device)
        self.groups = [ShapeGroup(g, grads, sum(sizes[:i]))
                       for i, g in enumerate(layout.shape_groups)]
        # Kept for the next steps: every stack is updated in place (a refresh, a commit, a load
        # copy into it), so these views stay valid for the life of the factors.
        self._group_views: dict[ShapeGroup, tuple] = {}  # a whole group's decomposition views
        self._gradients: tuple = (None, None)  # (key, LayerGradients): see :meth:`gradients`

    # ---- state entries -------------------------------------------------------------------- #

    def views(self, layer: KFACLayer) -> dict[str, Tensor]:
        """The layer's state entries: views of the buckets."""
        a, i, g, j = layer.a_dim, layer.a_pos, layer.out, layer.g_pos
        out = {"A": self.F[a][i], "G": self.F[g][j]}
        out.update(self._decomposition_views(a, i, g, j))
        out.update(A_inverse_failures=self.failures[a][i], G_inverse_failures=self.failures[g][j],
                   A_inverse_fallbacks=self.fallbacks[a][i],
                   G_inverse_fallbacks=self.fallbacks[g][j])
        return out

    def _decomposition_views(self, a: int, i: int, g: int, j: int) -> dict[str, Tensor]:
        raise NotImplementedError

    # ---- statistics ----------------------------------------------------------------------- #

    def stage(self, layer: KFACLayer, a: Tensor, g: Tensor, decay: float, w: float,
              g_scale: float, samples: int) -> None:
        """Pool one pass's rows into the layer's staged statistics (``decay`` the old rows'
        weight, ``w`` the new rows'; G's rows weigh ``g_scale`` more; the rows are ``samples``
        samples' rows, each sample's contiguous)."""
        # a Linear shared over a sequence (or an in-projection): G sums a sample's rows as A
        # averages them (K-FAC-expand, Eschenhagen et al. 2023); as their mean, G came out (rows
        # per sample) times too small on transformers and the damping swamped it
        expand = 1.0 if layer.conv else a.shape[0] / samples
        ops.kron_factor_update_(self.P[layer.a_dim][layer.a_pos], a, decay, w)
        ops.kron_factor_update_(self.P[layer.out][layer.g_pos], g, decay, w * g_scale * expand)
        self.dirty[layer.a_dim] = self.dirty[layer.out] = True

    def staged_statistics(self, process_group) -> list[Tensor]:
        """What was staged, to be checked for finiteness: the whole staging buffer (one check;
        the buckets not staged into hold zeros); data parallel: first averaged over the ranks
        (one all-reduce of it), so every rank commits the same."""
        if not any(self.dirty.values()):
            return []
        if process_group is not None:
            all_reduce_mean_(self.staged, process_group)
            self.dirty = dict.fromkeys(self.dirty, True)
        return [self.staged]

    def reset_staged(self) -> None:
        if any(self.dirty.values()):
            self.staged.zero_()  # after an all-reduce every bucket may hold values
            self.dirty = dict.fromkeys(self.dirty, False)

    def commit(self, decay: float, ok: Tensor | None) -> None:
        """``F <- decay F + (1 - decay) P`` for the factors captured at this step (not where
        ``ok`` is False)."""
        for n, entries in self.layout.entries.items():
            if not self.dirty[n]:
                continue
            captured = [l.captures > 0 for l, _ in entries]
            F, P = self.F[n], self.P[n]
            if all(captured):
                targets = [(F, P)]
            else:
                targets = [(F[i], P[i]) for i, c in enumerate(captured) if c]
            for Fv, Pv in targets:
                new = Fv.mul(decay).add_(Pv, alpha=1 - decay)
                _select_into(Fv, ok, new)

    # ---- decompositions ------------------------------------------------------------------- #

    def refresh(self, damping: float, ok: Tensor | None, process_group=None) -> None:
        """Decompose every factor again (one op call per bucket; spread over the ranks of
        ``process_group``).  A factor whose decomposition failed (status 2), or every factor on
        a skipped step (``ok`` False), keeps what it had."""
        results = self.layout.buckets.decompose(
            self.F, lambda n, F: self._decompose(F, damping), process_group)
        for n, outs in results.items():
            *news, status = outs
            if ok is not None:  # a skipped step: status 3, neither taken nor counted
                status = torch.where(ok, status, 3)
            failed, fallback, take = status == 2, status == 1, status < 2
            for old, new in zip(self._decomposition(n), news):
                keep_where(take, old, new)
            self.failures[n].add_(failed)
            self.fallbacks[n].add_(fallback)

    def _decompose(self, F: Tensor, damping: float) -> tuple:
        """The op's outputs for a stack of factors, the status last."""
        raise NotImplementedError

    def _decomposition(self, n: int) -> list[Tensor]:
        """The stacks of bucket ``n`` that :meth:`_decompose`'s outputs replace, in its order."""
        raise NotImplementedError

    def precondition(self, group: ShapeGroup, layers: list[KFACLayer],
                     damping: float) -> tuple[Tensor, Tensor]:
        """``(V, grad)``: the preconditioned gradients ``[L', out, a_dim]`` of ``layers`` (all or
        some of ``group``'s) and their gradients."""
        if len(layers) == len(group.layers):  # the whole group: its views, kept
            views = self._group_views.get(group)
            if views is None:
                views = self._group_views[group] = self._views(group, group.a, group.g,
                                                               slice(None))
            return self._apply(group.grad, views, damping), group.grad
        rows = [l.row for l in layers]  # some layers are not preconditioned this step
        views = self._views(group, [group.a.start + r for r in rows],
                            [group.g.start + r for r in rows], rows)
        grad = group.grad[rows]
        return self._apply(grad, views, damping), grad

    def _views(self, group: ShapeGroup, ia, ig, rows) -> tuple:
        """What :meth:`_apply` reads of the decompositions for some rows of ``group`` (``ia``,
        ``ig``: their A and G slots; ``rows``: in the group)."""
        raise NotImplementedError

    def _apply(self, grad: Tensor, views: tuple, damping: float) -> Tensor:
        raise NotImplementedError

    def gradients(self, layers: list[KFACLayer], weight_decays: list[float]) -> "LayerGradients":
        """The :class:`LayerGradients` of ``layers`` with their ``weight_decays``, kept for the
        next steps with the same ones (not yet gathered)."""
        key = (*layers, *weight_decays)
        if self._gradients[0] != key:
            wd = dict(zip(layers, weight_decays))
            self._gradients = (key, LayerGradients(layers, wd.__getitem__))
        return self._gradients[1]


class EigenFactors(KFACFactors):
    """Eigendecompositions ``A = Q_A diag(d_A) Q_A^T`` (``ops.kron_eigh``), G likewise;
    ``V = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T``
    (``ops.kfac_precondition_eigen``)."""

    MODE = "eigen"
    KEYS = ("QA", "dA", "QG", "dG")

    def __init__(self, layout: KFACLayout, dtype: torch.dtype, device: torch.device,
                 damping: float) -> None:
        super().__init__(layout, dtype, device, damping)
        self.Q = layout.buckets.stacks(dtype, device, identity=True)
        self.d = layout.buckets.vectors(dtype, device, fill=1, per_row=True)

    def _decomposition_views(self, a, i, g, j):
        return {"QA": self.Q[a][i], "dA": self.d[a][i], "QG": self.Q[g][j], "dG": self.d[g][j]}

    def _decompose(self, F, damping):
        return ops.kron_eigh(F)

    def _decomposition(self, n):
        return [self.d[n], self.Q[n]]

    def _views(self, group, ia, ig, rows):
        a, g = group.layers[0].a_dim, group.layers[0].out
        return self.Q[g][ig], self.d[g][ig], self.Q[a][ia], self.d[a][ia]

    def _apply(self, grad, views, damping):
        return ops.kfac_precondition_eigen(grad, *views, damping)


def _select_into(old: Tensor, ok: Tensor | None, new: Tensor) -> None:
    """``old <- new``, or (``ok`` False) ``old`` left as it is: one op, written in place."""
    if ok is None:
        old.copy_(new)
    else:
        where_into_(ok, new, old, old)


class EigenCorrectedFactors(EigenFactors):
    """EKFAC's factors (George et al. 2018): the eigenbases of :class:`EigenFactors` and, in
    place of ``d_G d_A^T``, a scaling ``S`` per layer (``[out, a_dim]``, ones at the start): the
    running average of the diagonal second moment of the per-sample gradients in the basis,
    ``S_new = mean_n ((Q_G^T grad_n Q_A) ** 2)`` with ``grad_n = sum_t g_nt a_nt^T`` (the
    sample's rows: one for a Linear on ``[N, in]``, its output positions for a conv: exact, the
    sum runs before the square); ``V = Q_G [(Q_G^T grad Q_A) / (S + damping)] Q_A^T``.

    The rows a pass stages are also held until the step, where :meth:`update_scale` projects
    them on the bases the step's refresh left (the paper's order: eigenbasis, then scaling).
    A refresh carries ``S`` into the new bases: ``S <- (R_G o R_G) S (R_A o R_A)^T`` with
    ``R = Q_new^T Q_old``, the diagonal of the old estimate ``diag(S)`` seen in the new basis
    (the paper leaves it open; its authors' code restarts from ``d_G d_A^T``, see docs/ekfac.md)."""

    MODE = "ekfac"
    KEYS = EigenFactors.KEYS + ("scale",)

    def __init__(self, layout: KFACLayout, dtype: torch.dtype, device: torch.device,
                 damping: float) -> None:
        super().__init__(layout, dtype, device, damping)
        self.S = {group: torch.ones_like(group.grad) for group in self.groups}
        # S_new of every group: views of one buffer (one all-reduce, one fill)
        self.staged_scale = torch.zeros(sum(g.grad.numel() for g in self.groups), dtype=dtype,
                                        device=device)
        self.PS, offset = {}, 0
        for group in self.groups:
            n = group.grad.numel()
            self.PS[group] = self.staged_scale[offset:offset + n].view_as(group.grad)
            offset += n
        self.held: dict[KFACLayer, list[tuple]] = {}  # layer -> the passes' rows

    def views(self, layer: KFACLayer) -> dict[str, Tensor]:
        return {**super().views(layer), "scale": self.S[layer.group][layer.row]}

    def stage(self, layer, a, g, decay, w, g_scale, samples):
        super().stage(layer, a, g, decay, w, g_scale, samples)
        self.held.setdefault(layer, []).append((a, g, decay, w * g_scale, samples))

    def reset_staged(self) -> None:
        super().reset_staged()
        self.held = {}

    def refresh(self, damping: float, ok: Tensor | None, process_group=None) -> None:
        old = {n: Q.clone() for n, Q in self.Q.items()}
        super().refresh(damping, ok, process_group)
        for group, S in self.S.items():
            l0 = group.layers[0]
            RA = torch.bmm(self.Q[l0.a_dim][group.a].mT, old[l0.a_dim][group.a]).square_()
            RG = torch.bmm(self.Q[l0.out][group.g].mT, old[l0.out][group.g]).square_()
            _select_into(S, ok, torch.bmm(torch.bmm(RG, S), RA.mT))

    def update_scale(self, decay: float, ok: Tensor | None, process_group=None) -> None:
        """``S <- decay S + (1 - decay) S_new`` for the layers captured since the last step
        (not where ``ok`` is False); data parallel: ``S_new`` averaged over the ranks."""
        if not self.held:
            return
        self.staged_scale.zero_()
        for layer, passes in self.held.items():
            PS = self.PS[layer.group][layer.row]
            QA, QG = self.Q[layer.a_dim][layer.a_pos], self.Q[layer.out][layer.g_pos]
            for a, g, pool, w, samples in passes:
                s = _projected_square_sum(a.to(self.dtype), g.to(self.dtype), QA, QG, samples)
                # rows-pooled like A and G; ``rows`` per sample makes it a mean over samples
                PS.mul_(pool).add_(s, alpha=w * (a.shape[0] // samples))
        if process_group is not None:
            all_reduce_mean_(self.staged_scale, process_group)
        for group, S in self.S.items():
            captured = [l in self.held for l in group.layers]
            if not any(captured):
                continue
            PS = self.PS[group]
            targets = [(S, PS)] if all(captured) else \
                [(S[r], PS[r]) for r, c in enumerate(captured) if c]
            for Sv, Pv in targets:
                _select_into(Sv, ok, Sv.mul(decay).add_(Pv, alpha=1 - decay))

    def _views(self, group, ia, ig, rows):
        a, g = group.layers[0].a_dim, group.layers[0].out
        S = self.S[group]
        QG, QA = self.Q[g][ig], self.Q[a][ia]
        return QG, QG.mT, QA, QA.mT, S if rows == slice(None) else S[rows]

    def _apply(self, grad, views, damping):
        QG, QGt, QA, QAt, S = views
        # torch.bmm: what ``@`` runs on these stacks, without its broadcast views
        scaled = torch.bmm(torch.bmm(QGt, grad), QA).div_(S + damping)
        return torch.bmm(torch.bmm(QG, scaled), QAt)


def _projected_square_sum(a: Tensor, g: Tensor, QA: Tensor, QG: Tensor, samples: int) -> Tensor:
    """``sum_n (Q_G^T grad_n Q_A) ** 2`` (``[out, a_dim]``) of the per-sample gradients
    ``grad_n = g_n^T a_n``, ``a_n``, ``g_n`` the sample's ``rows`` rows of ``a``, ``g``.

    One row per sample: ``((g Q_G) ** 2)^T ((a Q_A) ** 2)``, one matmul.  More rows: one
    batched product of the per-sample gradients (their sum over the rows comes before the
    square), each basis applied where it costs less (costs are per sample and add up): ``Q_A``
    on the rows (``rows a_dim^2``) or on the gradients (``out a_dim^2``), ``Q_G`` on the rows
    (``rows out^2``) or on the gradients (``a_dim out^2``)."""
    rows, a_dim, out = a.shape[0] // samples, a.shape[1], g.shape[1]
    if rows == 1:
        return (g @ QG).square_().T @ (a @ QA).square_()
    a_on_grads, g_on_grads = out < rows, a_dim < rows
    if not a_on_grads:
        a = a @ QA
    if not g_on_grads:
        g = g @ QG
    a, g = a.view(samples, rows, a_dim), g.view(samples, rows, out)
    if g_on_grads and not a_on_grads:  # [N, a_dim, out]: Q_G by one matmul on its rows
        grads = torch.bmm(a.transpose(1, 2), g).view(-1, out) @ QG
        return grads.square_().view(samples, a_dim, out).sum(0).T
    grads = torch.bmm(g.transpose(1, 2), a)  # [N, out, a_dim]
    if a_on_grads:
        grads = (grads.view(-1, a_dim) @ QA).view(samples, out, a_dim)
    if g_on_grads:
        grads = QG.mT @ grads
    return grads.square_().sum(0)


class InverseFactors(KFACFactors):
    """Damped inverses ``(A + sqrt(damping) I)^{-1}`` and ``(G + sqrt(damping) I)^{-1}``
    (``ops.kron_damped_inverse``: the damping split evenly between the factors);
    ``V = G_inv grad A_inv``."""

    MODE = "inverse"
    KEYS = ("A_inv", "G_inv")

    def __init__(self, layout: KFACLayout, dtype: torch.dtype, device: torch.device,
                 damping: float) -> None:
        super().__init__(layout, dtype, device, damping)
        self.X = layout.buckets.stacks(dtype, device, identity=True,
                                       divisor=1 + math.sqrt(damping))

    def _decomposition_views(self, a, i, g, j):
        return {"A_inv": self.X[a][i], "G_inv": self.X[g][j]}

    def _decompose(self, F, damping):
        return ops.kron_damped_inverse(F, math.sqrt(damping))

    def _decomposition(self, n):
        return [self.X[n]]

    def _views(self, group, ia, ig, rows):
        return self.X[group.layers[0].out][ig], self.X[group.layers[0].a_dim][ia]

    def _apply(self, grad, views, damping):
        XG, XA = views
        return XG @ grad @ XA


FACTORS = {cls.MODE: cls for cls in (EigenFactors, InverseFactors, EigenCorrectedFactors)}
COUNTER_KEYS = ("A_inverse_failures", "G_inverse_failures", "A_inverse_fallbacks",
                "G_inverse_fallbacks")


class FactorStore:
    """The factors of a layout, made at their first use (a capture or a step) on the layers'
    device at that time, with the options set last by :meth:`configure`."""

    def __init__(self, layout: KFACLayout, owner: str = "KFAC") -> None:
        self.layout, self.owner = layout, owner  # (the optimizer's name, in the messages)
        self.factors: KFACFactors | None = None
        self._options: tuple | None = None

    def configure(self, mode: str, dtype: torch.dtype, damping: float) -> None:
        """ValueError if the mode or the dtype changed since the factors were made."""
        if self.factors is not None:
            for key, value, have in (("mode", mode, self.factors.MODE),
                                     ("factor_dtype", dtype, self.factors.dtype)):
                if value != have:
                    raise ValueError(f"Invalid {key}: {value!r} (it cannot change after the "
                                     f"factors were laid out with {have!r})")
        self._options = (mode, dtype, damping)

    def get(self) -> KFACFactors:
        device = self.layout.layers[0].weight.device
        if self.factors is None:
            check_params([p for l in self.layout.layers for p in l.params()], self.owner)
            mode, dtype, damping = self._options
            self.factors = FACTORS[mode](self.layout, dtype, device, damping)
        elif self.factors.device != device:
            raise RuntimeError(f"{self.owner}: the model moved from {self.factors.device} to "
                               f"{device} after the factors were laid out; create the optimizer "
                               "after moving the model")
        return self.factors


def kl_clip_(results: list[tuple[Tensor, Tensor, list[float]]], kl_clip: float) -> None:
    """Scale every ``V`` by ``nu = min(1, sqrt(kl_clip / |sum_layers lr^2 <V, grad>|))`` (1 if
    the sum is 0), on the device; ``results`` holds ``(V, grad, lrs of its rows)``."""
    Vs = [V for V, _, _ in results]
    products = torch._foreach_mul(Vs, [grad for _, grad, _ in results])  # one op for all
    terms, squares = [], []
    for VG, (_, _, lrs) in zip(products, results):
        if len(set(lrs)) == 1:
            terms.append(VG.sum())
            squares.append(lrs[0] ** 2)
        else:
            vg = VG.sum((-2, -1))
            terms += [vg[r] for r in range(len(lrs))]
            squares += [lr ** 2 for lr in lrs]
    s = torch.stack(torch._foreach_mul(terms, squares)).sum().abs_()
    # sqrt(kl_clip / s) clamped to 1, in place; s = 0 gives inf, then 1; a NaN s gives 1
    nu = s.reciprocal_().mul_(kl_clip).sqrt_().clamp_max_(1).nan_to_num_(1.0)
    torch._foreach_mul_(Vs, nu)


class LayerGradients:
    """The gradients of the layers preconditioned at a step, copied into their shape groups'
    buffers by :meth:`gather` (one foreach copy); ``active`` maps each shape group to its
    layers among them.  The bookkeeping of a set of layers and weight decays, made once and
    kept by the factors (:meth:`KFACFactors.gradients`): the buffers' views, the params, the
    finiteness check's tensors and how ``V`` is cut into the params' directions."""

    def __init__(self, layers: list[KFACLayer],
                 weight_decay: Callable[[KFACLayer], float]) -> None:
        self.active: dict[ShapeGroup, list[KFACLayer]] = {}
        for l in layers:
            self.active.setdefault(l.group, []).append(l)
        self.param_ids = {id(p) for l in layers for p in l.params()}
        self._dst: list[Tensor] = []
        self._params: list[Tensor] = []  # whose gradients go to _dst
        self._decay: dict[float, tuple[list, list]] = {}  # wd -> (buffer views, params)
        # per group, per layer: (row of V, fan_in, weight, bias)
        self._cuts = []
        for group, members in self.active.items():
            cut = []
            for r, l in enumerate(members):  # r: the row of V (of the active layers)
                views = [group.w_views[l.row]] + ([group.b_views[l.row]] if l.bias is not None
                                                  else [])
                self._dst += views
                self._params += l.params()
                wd = weight_decay(l)
                if wd != 0:
                    views_, params = self._decay.setdefault(wd, ([], []))
                    views_ += views
                    params += l.params()
                cut.append((r, l.fan_in, l.weight, l.bias))
            self._cuts.append(cut)
        self._tensors = self._checked()

    def gather(self) -> None:
        """Copy the params' gradients into the groups' buffers."""
        if self._dst:
            torch._foreach_copy_(self._dst, [p.grad for p in self._params])

    def _checked(self) -> list[Tensor]:
        out = []
        for g, members in self.active.items():
            out += [g.grad] if len(members) == len(g.layers) else [g.grad[l.row] for l in members]
        buffer = next(iter(self.active)).buffer if self.active else None
        if buffer is not None and sum(t.numel() for t in out) == buffer.numel():
            return [buffer]  # disjoint parts of the buffer that cover it
        return out

    def tensors(self) -> list[Tensor]:
        """What holds the gradients (for the finiteness check): the groups' whole buffer when
        every layer is preconditioned (one check), else the active groups and rows (the other
        rows may hold an earlier step's values)."""
        return self._tensors

    def add_weight_decay_(self) -> None:
        """``grad += weight_decay * param`` (preconditioned and KL-clipped with the gradient)."""
        for wd, (views, params) in self._decay.items():
            torch._foreach_add_(views, params, alpha=wd)

    def zero_where_(self, bad: Tensor) -> None:
        """Zero on a skipped step: ``V = 0`` (Q, d, X stay finite); one fill of the groups'
        buffer (the rows not preconditioned at this step are scratch too)."""
        if self.active:
            fill_if_(next(iter(self.active)).buffer, bad, 0)

    def directions(self, Vs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``V`` of each active group (in order) cut into the directions of its layers' params,
        ``(param, d)``: ``V[r, :, :fan_in]`` viewed as the weight and ``V[r, :, fan_in]``, each
        by one ``as_strided`` (indexing takes two or three view ops and parses the index)."""
        out = []
        for V, cut in zip(Vs, self._cuts):
            s0, s1, s2 = V.stride()
            offset = V.storage_offset()
            for r, fan_in, weight, bias in cut:
                d = V.as_strided(weight.shape, _split_strides(weight.shape, s1, s2),
                                 offset + r * s0)
                out.append((weight, d if weight.dtype == V.dtype else d.to(weight.dtype)))
                if bias is not None:
                    b = V.as_strided(bias.shape, (s1,), offset + r * s0 + fan_in * s2)
                    out.append((bias, b if bias.dtype == V.dtype else b.to(bias.dtype)))
        return out


def _split_strides(shape: torch.Size, s1: int, s2: int) -> tuple[int, ...]:
    """The strides of ``[out, fan_in]`` (strides ``(s1, s2)``) viewed as ``shape``
    (``[out, *rest]``, ``prod(rest) = fan_in``)."""
    strides, inner = [s1], s2
    for n in reversed(shape[1:]):
        strides.insert(1, inner)
        inner *= n
    return tuple(strides)


def preconditioned_directions(factors: KFACFactors, grads: LayerGradients, damping: float,
                              kl_clip: float | None,
                              lr: Callable[[KFACLayer], float]) -> list[tuple[Tensor, Tensor]]:
    """``V`` of the layers of ``grads`` (one op call per shape group, :func:`kl_clip_` with the
    layers' ``lr``) cut into the directions of their params: ``(param, d)``."""
    results = [(*factors.precondition(g, members, damping), [lr(l) for l in members])
               for g, members in grads.active.items()]
    if kl_clip is not None:
        kl_clip_(results, kl_clip)
    return grads.directions([V for V, _, _ in results])


def load_views(factors: KFACFactors | None, layers: list[KFACLayer],
               saved: dict[Tensor, dict[str, Tensor]], state: dict, owner: str = "KFAC") -> None:
    """Copy saved state entries (by param) into the factors' views of the layers' weights, and
    ``nonfinite_steps`` (int64, on the factors' device) into ``state``; ValueError (in the name
    of the optimizer ``owner``) for an entry of another param or of another shape."""
    views = {id(l.weight): factors.views(l) for l in layers} if factors else {}
    for p, entries in saved.items():
        if "nonfinite_steps" in entries:
            state[p]["nonfinite_steps"] = entries.pop("nonfinite_steps").to(
                device=factors.device if factors else p.device, dtype=torch.int64).clone()
        target = views.get(id(p), {})
        for key, value in entries.items():
            if key not in target:
                raise ValueError(f"{owner}.load_state_dict: state entry {key!r} of a param that is "
                                 "not a K-FAC layer's weight in this optimizer (the mode or the "
                                 "hooked layers differ from the saved run's)")
            if tuple(value.shape) != tuple(target[key].shape):
                raise ValueError(f"{owner}.load_state_dict: {key!r} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(target[key].shape)}")
            target[key].copy_(value)
