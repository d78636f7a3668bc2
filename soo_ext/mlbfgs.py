"""mL-BFGS: momentum L-BFGS (Niu et al., TMLR 2023) on the fused history kernels."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (all_finite, call_closure, check_groups, check_history_dtype, check_params,
                      load_state_dict_uncast)
from .curvature.lbfgs_history import LBFGSHistory
from ._support.errors import NonFiniteError

__all__ = ["MLBFGS"]

# Options that may differ between param groups; every other option is one setting for the run
# (all blocks share the pair schedule and the normalisation of the direction).
_GROUP_OPTIONS = ("lr", "momentum", "weight_decay")
_GLOBAL_OPTIONS = ("history_size", "update_freq", "param_momentum", "grad_momentum",
                   "pair_momentum", "sigma_low", "sigma_high", "damping_delta", "normalize",
                   "kl_clip", "history_dtype", "on_nonfinite", "maximize")
# Number options: (accepts the value, what is required).  NaN fails every test.
_NUMBERS = {
    "lr": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "param_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "grad_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "pair_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    # sigma_low > 0 and delta < 1 are what make every damped pair have y.s > 0.
    "sigma_low": (lambda v: 0 < v < 1, "in (0, 1)"),
    "sigma_high": (lambda v: 1 < v < math.inf, "a number > 1"),
    "damping_delta": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "kl_clip": (lambda v: 0 < v < math.inf, "a number > 0"),
}
# State entries that Optimizer.load_state_dict must not cast to the params' dtype.
_UNCAST = ("history", "nonfinite_steps")


def _check_options(o: dict) -> None:
    """ValueError naming the offending option."""
    for key, (accepts, required) in _NUMBERS.items():
        v = o[key]
        if not isinstance(v, Real) or isinstance(v, bool) or not accepts(v):
            raise ValueError(f"Invalid {key}: {v!r} (must be {required})")
    for key in ("history_size", "update_freq"):
        v = o[key]
        if not isinstance(v, Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Invalid {key}: {v!r} (must be an int >= 1)")
    if o["normalize"] not in ("l2", "kl", None):
        raise ValueError(f"Invalid normalize: {o['normalize']!r} (must be 'l2', 'kl' or None)")
    if o["history_dtype"] not in (None, torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"Invalid history_dtype: {o['history_dtype']!r} "
                         "(must be None, torch.float32, torch.float64 or torch.bfloat16)")
    if o["on_nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"Invalid on_nonfinite: {o['on_nonfinite']!r} (must be 'raise' or 'skip')")
    if not isinstance(o["maximize"], bool):
        raise ValueError(f"Invalid maximize: {o['maximize']!r} (must be a bool)")


def _check_params(params: list[Tensor], history_dtype: torch.dtype | None) -> None:
    check_params(params, "MLBFGS")
    if params:
        check_history_dtype(params[0].dtype, history_dtype)


def _damping_phi(tau: float, sigma_low: float, sigma_high: float, delta: float) -> float:
    """Weight of y in the damped ``phi y + (1 - phi) s``, from ``tau = s.y / s.s``.

    It moves the curvature ``tau`` of the pair into ``[sigma_low, sigma_high]`` and always mixes in
    at least ``delta`` of s, so that the stored pair has ``y.s > 0``.
    """
    if tau < sigma_low:
        phi = (1 - sigma_low) / (1 - tau)
    elif tau > sigma_high:
        phi = (sigma_high - 1) / (tau - 1)
    else:
        phi = 1.0
    return min(phi, 1 - delta)


def _unless_skipped(ok: Tensor, value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device, or 1 where ``ok`` is False: the
    factor that leaves an accumulator unchanged on a skipped step, without a host sync."""
    return torch.where(ok, like.new_full((), value), 1.0)


class _Segment:
    """The params of one param group inside a block: ``flat[start:end]`` of the block's vectors."""

    def __init__(self, group: int, start: int, end: int, params: list[Tensor],
                 grad_views: list[Tensor]) -> None:
        self.group, self.start, self.end = group, start, end
        self.params, self.grad_views = params, grad_views


class _Block:
    """One flat vector over some params: its layout (params sorted by group, so that each group is
    one slice), preallocated gradient and param buffers, its optimizer state (kept under its first
    param) and, for a preconditioned block, its curvature history."""

    def __init__(self, params: list[Tensor], group_of: dict[int, int], state: dict,
                 history: LBFGSHistory | None) -> None:
        self.params = params
        self.state = state
        self.history = history
        numels = [p.numel() for p in params]
        p0 = params[0]
        # grad holds g, then g + wd p (the vector that is preconditioned), then the step lr scales.
        self.grad = torch.empty(sum(numels), dtype=p0.dtype, device=p0.device)
        self.param = torch.empty_like(self.grad)
        self.grad_views = [v.view_as(p) for v, p in zip(self.grad.split(numels), params)]
        self.param_views = [v.view_as(p) for v, p in zip(self.param.split(numels), params)]
        self.segments: list[_Segment] = []
        start = i = 0
        while i < len(params):
            j = i
            while j < len(params) and group_of[id(params[j])] == group_of[id(params[i])]:
                j += 1
            end = start + sum(numels[i:j])
            self.segments.append(_Segment(group_of[id(params[i])], start, end, params[i:j],
                                          self.grad_views[i:j]))
            start, i = end, j

    def gather(self, maximize: bool) -> None:
        """Copy the params and their gradients into the flat buffers (a missing grad is zero)."""
        torch._foreach_copy_(self.param_views, self.params)
        dst, src, missing = [], [], []
        for p, v in zip(self.params, self.grad_views):
            if p.grad is None:
                missing.append(v)
            elif p.grad.layout != torch.strided:
                raise RuntimeError(f"MLBFGS does not support sparse gradients "
                                   f"(got {p.grad.layout})")
            elif p.grad.is_complex():
                raise RuntimeError("MLBFGS does not support complex gradients")
            else:
                dst.append(v)
                src.append(p.grad)
        if dst:
            torch._foreach_copy_(dst, src)
        if missing:
            torch._foreach_zero_(missing)
        if maximize:
            self.grad.neg_()


class _Workspace:
    """The blocks of a run (preconditioned ones, then the params left out of every block) and the
    global state (kept under the first param)."""

    def __init__(self, opt: "MLBFGS") -> None:
        params = opt._all_params()
        group = opt.param_groups[0]
        _check_params(params, group["history_dtype"])
        p0 = params[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.zero = torch.zeros((), dtype=self.dtype, device=self.device)
        group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        position = {id(p): j for j, p in enumerate(params)}
        if opt._blocks is None:
            parts = [params]
        elif opt._blocks == "groups":
            parts = [list(g["params"]) for g in opt.param_groups if g["params"]]
        else:
            parts = [[params[j] for j in block] for block in opt._blocks]
        in_blocks = {id(p) for part in parts for p in part}
        rest = [p for p in params if id(p) not in in_blocks]

        def order(p: Tensor) -> tuple[int, int]:
            return group_of[id(p)], position[id(p)]

        self.pre = [self._block(opt, sorted(part, key=order), group_of, group) for part in parts]
        self.plain = [self._block(opt, rest, group_of, None)] if rest else []
        self.blocks = self.pre + self.plain
        self.state = opt.state[p0]
        self.state.setdefault("step", 0)
        self.state.setdefault("pair_updates", 0)
        counter = self.state.get("nonfinite_steps")
        self.state["nonfinite_steps"] = (
            torch.zeros((), dtype=torch.int64, device=self.device) if counter is None
            else counter.to(self.device))

    def _block(self, opt: "MLBFGS", params: list[Tensor], group_of: dict[int, int],
               group: dict | None) -> _Block:
        """A block and its state; ``group`` (the global options) for a preconditioned one."""
        state = opt.state[params[0]]
        n = sum(p.numel() for p in params)
        keys = ("momentum_buffer",) + (("p_bar", "p_bar_prev", "g_bar", "g_bar_prev")
                                       if group is not None else ())
        for key in keys:
            if key not in state:
                state[key] = torch.zeros(n, dtype=self.dtype, device=self.device)
            elif state[key].shape != (n,):
                raise ValueError(f"MLBFGS state {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected ({n},): the blocks differ from the saved run's")
        history = None
        if group is not None:
            history = LBFGSHistory(n, group["history_size"], self.dtype, self.device,
                                   group["history_dtype"])
            if "history" in state:
                history.load_state_dict(state["history"])
            state["history"] = history.state_dict()
        return _Block(params, group_of, state, history)

    def has_pairs(self) -> bool:
        return any(len(b.history) for b in self.pre)


class MLBFGS(Optimizer):
    r"""mL-BFGS, momentum L-BFGS (Niu et al., TMLR 2023): stochastic block-wise L-BFGS whose
    curvature pairs are built from momentum averages of params and gradients.

    One gradient per step, like SGD.  With ``p`` the params and ``g`` the gradient at step ``k``:

    1. ``p_bar <- mu_p p_bar + p`` and ``g_bar <- mu_g g_bar + g`` (both start at 0; ``g`` is the
       loss gradient, without weight decay).
    2. Every ``update_freq`` (T) steps a pair-update step: ``s = p_bar - p_bar_prev``,
       ``y = g_bar - g_bar_prev`` (no pair at the first one, which only records the averages);
       momentum on the pair, ``s <- (1 - beta) s + beta s_last`` and ``y`` likewise, with
       ``(s_last, y_last)`` the newest stored pair (y_last as damped and stored; with a bfloat16
       history, as stored); damping ``tau = s.y / s.s``, ``phi = (1 - sigma_low) / (1 - tau)``
       if ``tau < sigma_low``, ``(sigma_high - 1) / (tau - 1)`` if ``tau > sigma_high``, else 1,
       ``phi <- min(phi, 1 - damping_delta)``, ``y <- phi y + (1 - phi) s``; the pair is stored.
       Then ``p_bar_prev <- p_bar``, ``g_bar_prev <- g_bar`` and ``g_bar`` restarts from the
       current gradient: ``g_bar <- g``.  So each ``g_bar`` window sums the gradients of T + 1
       steps (the step that closes a window also opens the next), while ``p_bar`` is never
       restarted.  This is our reading of the authors' public code.  A pair with ``s.s = 0``
       (the params did not move) or non-finite products is not stored.
    3. Direction: per block, the two-loop recursion on ``g + weight_decay * p`` with
       ``gamma = s.y / y.y`` of the newest pair (``d = H (g + wd p)``); then normalised over all
       blocks together: ``normalize='l2'`` divides by the global l2 norm of d, ``'kl'``
       multiplies by ``nu = min(1, sqrt(kl_clip / (g+wd p).d))``, None leaves it.
       Until the first pair is stored (in any block) the direction is ``g + wd p`` (plain SGD).
    4. Outer SGD with momentum: ``buf <- momentum buf + d``, ``p <- p - lr buf``.

    **Blocks.**  ``blocks=None``: one block over all params of all groups (one flat vector);
    ``blocks='groups'``: one block per param group; or a partition, a list of lists of params.
    Each block has its own :class:`soo_ext.LBFGSHistory`.  Params left out of every block take
    plain SGD steps (momentum, weight decay, their own lr), never normalised.  Blocks are laid out
    at the first step; param groups cannot be added after it.

    **Per-group options** ``lr``, ``momentum`` and ``weight_decay`` may differ between groups
    (also within one block) and are read at every step, so LR schedulers work; every other
    option must be the same in all groups.

    **Cost.**  Between pair updates a step is, per block, one :meth:`LBFGSHistory.direction` call
    (two passes over the history) plus whole-block elementwise updates on preallocated flat
    buffers, on CPU or CUDA, with no host synchronisation.  A pair-update step synchronises once
    (for the damping and the finiteness of the step).  Memory: ``2 m n`` for the history plus
    ``7 n`` (averages, momentum buffer, gradient and param buffers) per block of ``n`` elements.

    **Non-finite gradients.**  ``on_nonfinite='skip'`` (default): a step whose gradient has a NaN
    or inf anywhere is skipped, decided on the device (every update is masked with the step's
    finiteness flag): params, averages, momentum buffers and history are left as they were and
    ``state['nonfinite_steps']`` (a device tensor) is incremented.  The step still counts in
    ``state['step']`` (the pair schedule is kept on the host); a skipped pair-update step updates
    no pair, so the next pair spans 2T steps.  ``'raise'`` raises
    :class:`soo_ext.quasi_newton.NonFiniteError` (one host sync per step) and changes
    nothing.

    A param whose ``.grad`` is None counts as having a zero gradient (it is part of a flat
    block: its momentum and weight decay still act).

    **State.**  Global, under the first param: ``step`` (int), ``pair_updates`` (int, pair-update
    steps done) and ``nonfinite_steps``.  Per block, under its first param: ``momentum_buffer``
    (flat over the block) and, for preconditioned blocks, ``p_bar``, ``p_bar_prev``, ``g_bar``,
    ``g_bar_prev`` and ``history`` (:meth:`LBFGSHistory.state_dict`).  ``load_state_dict`` keeps
    ``history`` and ``nonfinite_steps`` out of ``Optimizer``'s dtype casting, so a bfloat16
    history is restored as is; a resumed run (constructed with the same blocks) is bit-identical
    to an uninterrupted one.  As with torch, ``state_dict()`` returns references: deep-copy or
    save it to snapshot.

    Args:
        params: iterable of params or of param-group dicts (float32 or float64, one dtype and
            one device).
        lr: learning rate (default: 0.1, the authors' setting).
        momentum: momentum of the outer SGD (default: 0.9).
        weight_decay: L2 penalty added to the gradient that is preconditioned (default: 2e-4,
            the authors' setting for ResNets).
        history_size: number of pairs kept per block, m (default: 10).
        update_freq: T, steps between pair updates (default: 50).
        param_momentum: mu_p of ``p_bar`` (default: 0.999).
        grad_momentum: mu_g of ``g_bar`` (default: 0.999).
        pair_momentum: beta, momentum on the pairs (default: 0.9).
        sigma_low: sigma_L, lower curvature bound of the damping (default: 0.01).
        sigma_high: sigma_H, upper curvature bound of the damping (default: 1.5).
        damping_delta: delta, ``phi <= 1 - delta`` (default: 0.01).
        normalize: ``'l2'`` (default, the authors' block-wise variant), ``'kl'`` (the KL-style
            clip of their full-model variant) or None.
        kl_clip: c of ``normalize='kl'`` (default: 0.005, the authors' default).
        blocks: None (default), ``'groups'`` or a list of lists of params.
        history_dtype: storage dtype of the pairs (default: None, the params' dtype;
            ``torch.bfloat16`` is allowed with float32 params).
        on_nonfinite: ``'skip'`` (default) or ``'raise'``.
        maximize: maximise the objective instead of minimising it (default: False).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 2e-4, history_size: int = 10, update_freq: int = 50,
                 param_momentum: float = 0.999, grad_momentum: float = 0.999,
                 pair_momentum: float = 0.9, sigma_low: float = 0.01, sigma_high: float = 1.5,
                 damping_delta: float = 0.01, normalize: str | None = "l2",
                 kl_clip: float = 0.005, *, blocks=None, history_dtype: torch.dtype | None = None,
                 on_nonfinite: str = "skip", maximize: bool = False) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "history_size": history_size, "update_freq": update_freq,
                    "param_momentum": param_momentum, "grad_momentum": grad_momentum,
                    "pair_momentum": pair_momentum, "sigma_low": sigma_low,
                    "sigma_high": sigma_high, "damping_delta": damping_delta,
                    "normalize": normalize, "kl_clip": kl_clip, "history_dtype": history_dtype,
                    "on_nonfinite": on_nonfinite, "maximize": maximize}
        _check_options(defaults)
        self._ws: _Workspace | None = None
        super().__init__(params, defaults)
        self._blocks = self._normalise_blocks(blocks)

    def _normalise_blocks(self, blocks) -> None | str | tuple[tuple[int, ...], ...]:
        """None, 'groups', or the partition as positions in the list of all params (positions
        survive pickling and deep copies of the optimizer, tensors' identities do not)."""
        if blocks is None:
            return None
        if isinstance(blocks, str):
            if blocks != "groups":
                raise ValueError(f"Invalid blocks: {blocks!r} (must be None, 'groups' or a list "
                                 "of lists of params)")
            return blocks
        if isinstance(blocks, Tensor):
            raise ValueError("Invalid blocks: a Tensor (must be None, 'groups' or a list of lists "
                             "of params)")
        position = {id(p): j for j, p in enumerate(self._all_params())}
        seen: set[int] = set()
        out = []
        for i, block in enumerate(blocks):
            if isinstance(block, Tensor):
                raise ValueError(f"Invalid blocks: block {i} is a Tensor, not a list of params")
            block = list(block)
            if not block:
                raise ValueError(f"Invalid blocks: block {i} is empty")
            for p in block:
                if not isinstance(p, Tensor) or id(p) not in position:
                    raise ValueError(f"Invalid blocks: block {i} holds something that is not "
                                     "one of the optimizer's params")
                if id(p) in seen:
                    raise ValueError(f"Invalid blocks: a param appears twice (block {i})")
                seen.add(id(p))
            out.append(tuple(position[id(p)] for p in block))
        return tuple(out)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_blocks": self._blocks}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_blocks", None)
        self._ws = None  # rebuilt from the state at the next step

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict) -> None:
        if self.state:
            raise RuntimeError("MLBFGS: cannot add a param group after the first step (the "
                               "blocks are laid out over the params at the first step)")
        super().add_param_group(param_group)
        try:
            self._check_groups()
            _check_params(self._all_params(), self.param_groups[0]["history_dtype"])
        except ValueError:
            self.param_groups.pop()
            raise
        self._ws = None

    def _check_groups(self) -> None:
        check_groups(self.param_groups, _check_options, _GLOBAL_OPTIONS, _GROUP_OPTIONS)

    def load_state_dict(self, state_dict: dict) -> None:
        for p, entries in load_state_dict_uncast(self, state_dict, _UNCAST).items():
            self.state[p].update(entries)
        self._ws = None

    def _workspace(self) -> _Workspace:
        if self._ws is None:
            self._ws = _Workspace(self)
        elif self._ws.pre and (self._ws.pre[0].history.history_size
                               != self.param_groups[0]["history_size"]):
            raise ValueError("Invalid history_size: it cannot change after the first step")
        return self._ws

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: optional; reevaluates the model (zeroing the gradients, calling backward)
                and returns the loss.  It is called once, with grad enabled.

        Returns:
            What the closure returned, or None.
        """
        loss = call_closure(closure)
        if not self._all_params():
            return loss
        self._check_groups()
        ws = self._workspace()
        group = self.param_groups[0]
        skip = group["on_nonfinite"] == "skip"
        k = ws.state["step"] + 1
        pair_step = bool(ws.pre) and k % group["update_freq"] == 0

        for b in ws.blocks:
            b.gather(group["maximize"])
        ok = all_finite([b.grad for b in ws.blocks])
        bad = ~ok
        if skip:
            ws.state["nonfinite_steps"].add_(bad)
        elif not pair_step and not ok.item():
            raise self._nonfinite_error()
        okf = ok.to(ws.dtype)
        # From here every update is masked by ok, so that a non-finite step changes nothing.
        # NaN * 0 is NaN: the gradient itself is replaced, not scaled.
        for b in ws.blocks:
            b.grad.masked_fill_(bad, 0)

        if ws.pre:
            mu_p = _unless_skipped(ok, group["param_momentum"], okf)
            mu_g = _unless_skipped(ok, group["grad_momentum"], okf)
            for b in ws.pre:
                b.state["p_bar"].mul_(mu_p).addcmul_(b.param, okf)
                b.state["g_bar"].mul_(mu_g).add_(b.grad)
        if pair_step and not self._update_pairs(ws, group, ok):
            if not skip:
                raise self._nonfinite_error()
            ws.state["step"] = k
            return loss
        ws.state["step"] = k

        for b in ws.blocks:  # g + wd p
            for seg in b.segments:
                wd = self.param_groups[seg.group]["weight_decay"]
                if wd != 0:
                    b.grad[seg.start:seg.end].add_(b.param[seg.start:seg.end], alpha=wd)
        steps = self._directions(ws, group, okf)
        if pair_step:  # the pushes and the Gram entries the directions completed
            for b in ws.pre:
                b.state["history"] = b.history.state_dict()

        momenta: dict[float, Tensor] = {}
        for b, (direction, coef) in zip(ws.blocks, steps):
            buf = b.state["momentum_buffer"]
            for seg in b.segments:
                m = self.param_groups[seg.group]["momentum"]
                if m not in momenta:
                    momenta[m] = _unless_skipped(ok, m, okf)
                buf[seg.start:seg.end].mul_(momenta[m])
            buf.addcmul_(direction, coef)
            # What -lr multiplies: buf, or 0 on a skipped step (buf itself is kept).
            torch.where(ok, buf, ws.zero, out=b.grad)
            for seg in b.segments:
                torch._foreach_add_(seg.params, seg.grad_views,
                                    alpha=-self.param_groups[seg.group]["lr"])
        return loss

    def _directions(self, ws: _Workspace, group: dict, okf: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per block ``(v, c)`` such that ``buf += c v`` adds the step's (normalised) direction,
        or nothing (``c = 0``) on a skipped step; ``grad`` holds ``g + wd p``."""
        steps = [(b.grad, okf) for b in ws.blocks]
        if not ws.has_pairs():
            return steps  # plain SGD until the first pair
        outs = [b.history.direction(b.grad) for b in ws.pre]  # d = -H (g + wd p)
        if group["normalize"] == "l2":
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d)
                                                         for d, _ in outs]))
            coef = -okf / torch.where(norm > 0, norm, 1.0)
        elif group["normalize"] == "kl":
            ghg = -torch.stack([stats[0] for _, stats in outs]).sum()  # stats[0] = g.d = -g.Hg
            coef = -okf * torch.sqrt(group["kl_clip"] / ghg.clamp_min(0)).clamp_max(1)
        else:
            coef = -okf
        steps[:len(ws.pre)] = [(d, coef) for d, _ in outs]
        return steps

    def _update_pairs(self, ws: _Workspace, group: dict, ok: Tensor) -> bool:
        """A pair-update step: form, damp and store one pair per block, then roll the averages.
        One host sync.  Returns False (having changed nothing) if the step is not finite."""
        beta = group["pair_momentum"]
        pairs, scalars = [], [ok.to(ws.dtype)]
        if ws.state["pair_updates"] > 0:
            for b in ws.pre:
                st, h = b.state, b.history
                s = st["p_bar"] - st["p_bar_prev"]
                y = st["g_bar"] - st["g_bar_prev"]
                if len(h):
                    s.mul_(1 - beta).add_(h.S[h.newest], alpha=beta)
                    y.mul_(1 - beta).add_(h.Y[h.newest], alpha=beta)
                scalars += [torch.dot(s, s), torch.dot(s, y)]
                pairs.append((b, s, y))
        values = torch.stack(scalars).tolist()
        if not values[0]:
            return False
        for (b, s, y), ss, sy in zip(pairs, values[1::2], values[2::2]):
            if not (ss > 0 and math.isfinite(ss) and math.isfinite(sy)):
                continue
            phi = _damping_phi(sy / ss, group["sigma_low"], group["sigma_high"],
                               group["damping_delta"])
            if not phi * sy + (1 - phi) * ss > 0:  # only rounding can get here
                continue
            y.mul_(phi).add_(s, alpha=1 - phi)
            b.history.push(s, y)
        for b in ws.pre:
            st = b.state
            st["p_bar_prev"].copy_(st["p_bar"])
            st["g_bar_prev"].copy_(st["g_bar"])
            st["g_bar"].copy_(b.grad)  # g_bar restarts from the current gradient
        ws.state["pair_updates"] += 1
        return True

    def _nonfinite_error(self) -> NonFiniteError:
        return NonFiniteError("MLBFGS: the gradient is not finite; the step was not taken and "
                              "nothing changed (on_nonfinite='skip' skips such steps instead of "
                              "raising)")
