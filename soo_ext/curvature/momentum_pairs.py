"""mL-BFGS curvature (Niu et al., TMLR 2023): curvature pairs from momentum averages of params and
gradients, damped and stored in an :class:`LBFGSHistory` per block, and the block layout of the flat
vectors they are computed on."""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from .._support.flat import FlatLayout
from .._support.guard import select, where_into_
from .lbfgs_history import LBFGSHistory

__all__ = ["Block", "BlockLayout", "MomentumPairs", "Segment", "SkipFactors", "block_partition",
           "directions", "update_pairs"]


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


class MomentumPairs:
    """The mL-BFGS curvature of one block of ``n`` elements.

    ``state`` (the block's state dict) holds the flat averages ``p_bar``, ``g_bar`` and their
    values at the last pair update, ``p_bar_prev``, ``g_bar_prev``; ``history`` stores the damped
    pairs and is adopted from ``state['history']`` when the state has one (a resumed run).
    """

    KEYS = ("p_bar", "p_bar_prev", "g_bar", "g_bar_prev")

    def __init__(self, state: dict, history: LBFGSHistory) -> None:
        self.state = state
        self.history = history
        if "history" in state:
            history.load_state_dict(state["history"])
        self.save()

    def __len__(self) -> int:
        return len(self.history)

    def save(self) -> None:
        """Put the history's current state into the block's state."""
        self.state["history"] = self.history.state_dict()

    def accumulate(self, param: Tensor, grad: Tensor, mu_p: Tensor, mu_g: Tensor,
                   okf: Tensor) -> None:
        """``p_bar <- mu_p p_bar + okf p``, ``g_bar <- mu_g g_bar + g`` (on a skipped step
        ``mu = 1``, ``okf = 0`` and ``grad`` is zero: nothing changes)."""
        self.state["p_bar"].mul_(mu_p).addcmul_(param, okf)
        self.state["g_bar"].mul_(mu_g).add_(grad)

    def candidate(self, beta: float) -> tuple[Tensor, Tensor]:
        """The motion of the averages since the last pair update, ``s = p_bar - p_bar_prev``,
        ``y = g_bar - g_bar_prev``, with momentum ``beta`` on the newest stored pair (new
        tensors)."""
        st, h = self.state, self.history
        s = st["p_bar"] - st["p_bar_prev"]
        y = st["g_bar"] - st["g_bar_prev"]
        if len(h):
            s.mul_(1 - beta).add_(h.S[h.newest], alpha=beta)
            y.mul_(1 - beta).add_(h.Y[h.newest], alpha=beta)
        return s, y

    def store(self, s: Tensor, y: Tensor, ss: float, sy: float, sigma_low: float,
              sigma_high: float, delta: float) -> bool:
        """Damp ``y`` (in place) and push the pair, given its ``ss = s.s`` and ``sy = s.y``; a
        pair with ``s.s = 0`` or non-finite products is not stored (returns False)."""
        if not (ss > 0 and math.isfinite(ss) and math.isfinite(sy)):
            return False
        phi = _damping_phi(sy / ss, sigma_low, sigma_high, delta)
        if not phi * sy + (1 - phi) * ss > 0:  # only rounding can get here
            return False
        y.mul_(phi).add_(s, alpha=1 - phi)
        self.history.push(s, y)
        return True

    def roll(self, grad: Tensor) -> None:
        """After a pair update: the averages become the previous ones, and ``g_bar`` restarts from
        the current gradient."""
        st = self.state
        st["p_bar_prev"].copy_(st["p_bar"])
        st["g_bar_prev"].copy_(st["g_bar"])
        st["g_bar"].copy_(grad)

    def direction(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, [g.d, max|d|])`` with ``d = -H g`` (``-g`` while no pair is stored)."""
        return self.history.direction(g)


def update_pairs(pairs: list[MomentumPairs], grads: list[Tensor], okf: Tensor, first: bool,
                 beta: float, sigma_low: float, sigma_high: float, delta: float) -> bool:
    """A pair-update step over the blocks: form (unless ``first``: the first one only records the
    averages), damp and store one pair per block, then roll the averages (``grads``: the blocks'
    current gradients).  One host sync, which also fetches ``okf`` (the step's finiteness as 0/1
    in the blocks' dtype): returns False, having changed nothing, if it is 0."""
    scalars, formed = [okf], []
    if not first:
        for p in pairs:
            s, y = p.candidate(beta)
            scalars += [torch.dot(s, s), torch.dot(s, y)]
            formed.append((p, s, y))
    values = torch.stack(scalars).tolist()
    if not values[0]:
        return False
    for (p, s, y), ss, sy in zip(formed, values[1::2], values[2::2]):
        p.store(s, y, ss, sy, sigma_low, sigma_high, delta)
    for p, grad in zip(pairs, grads):
        p.roll(grad)
    return True


def directions(pairs: list[MomentumPairs], grads: list[Tensor], normalize: str | None,
               kl_clip: float, neg_okf: Tensor) -> tuple[list[Tensor], Tensor]:
    """Per block ``d = -H g`` (of its ``grads`` entry) and the coefficient ``c``, one for all
    blocks, such that ``c d`` is the step's direction ``H g`` normalised over all blocks together
    (``'l2'``: by the global l2 norm; ``'kl'``: times ``min(1, sqrt(kl_clip / g.H g))``; None:
    not at all), times ``-neg_okf`` (``neg_okf``: -1, or 0 on a skipped step)."""
    outs = [p.direction(g) for p, g in zip(pairs, grads)]
    if normalize == "l2":
        norms = [torch.linalg.vector_norm(d) for d, _ in outs]
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        # d = 0 (norm 0): c = 0, not inf (inf * 0 would be NaN)
        coef = torch.div(neg_okf, norm).nan_to_num_(0.0, 0.0, 0.0)
    elif normalize == "kl":
        gds = [stats[0] for _, stats in outs]  # stats[0] = g.d = -g.Hg
        ghg = -(gds[0] if len(gds) == 1 else torch.stack(gds).sum())
        # rsqrt(max(ghg / c, 1)) = min(1, sqrt(c / ghg)), also where ghg is -0.0 (a zero or
        # skipped gradient), where c / ghg would be -inf and its sqrt NaN
        coef = neg_okf * torch.rsqrt((ghg / kl_clip).clamp_min(1))
    else:
        coef = neg_okf
    return [d for d, _ in outs], coef


class SkipFactors:
    """The factors of a skip-guarded step as 0-dim device tensors, made by one select from two
    kept vectors: their values on a taken step and on a skipped one (1 for a decay, which then
    leaves an accumulator as it was; 0 for a scale).  A value that changed since the last step
    (an option changed by a schedule) is refilled from the host, without a host sync."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._kinds = (0, 0)  # how many decays and scales the kept vectors hold
        self._values: list[float] = []
        self._taken: Tensor | None = None
        self._skipped: Tensor | None = None

    def __call__(self, ok: Tensor, decays: list[float], scales: list[float]
                 ) -> tuple[Tensor, ...]:
        """``decays + scales`` as tensors, or 1 for each decay and 0 for each scale if ``ok`` (a
        0-dim bool tensor) is False."""
        values = decays + scales
        if self._taken is None or (len(decays), len(scales)) != self._kinds:
            self._kinds = (len(decays), len(scales))
            self._skipped = self._filled([1.0] * len(decays) + [0.0] * len(scales))
            self._taken = self._filled(values)
        elif values != self._values:
            for slot, value, old in zip(self._taken.unbind(), values, self._values):
                if value != old:
                    slot.fill_(value)
        self._values = values
        return select(ok, self._taken, self._skipped).unbind()

    def _filled(self, values: list[float]) -> Tensor:
        """A device vector of ``values``, filled slot by slot (a copy from the host would wait
        for the device)."""
        out = torch.empty(len(values), dtype=self.dtype, device=self.device)
        for slot, value in zip(out.unbind(), values):
            slot.fill_(value)
        return out


# ---------------------------------------------------------------------------------------------
# The block layout

def block_partition(blocks, params: list[Tensor]) -> None | str | tuple[tuple[int, ...], ...]:
    """The ``blocks=`` argument as None, ``'groups'``, or the partition as positions in
    ``params`` (positions survive pickling and deep copies of an optimizer, tensors' identities
    do not); ValueError for anything else."""
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
    position = {id(p): j for j, p in enumerate(params)}
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


class Segment:
    """The params of one param group inside a block: ``flat[start:end]`` of the block's vectors."""

    def __init__(self, group: int, start: int, end: int, params: list[Tensor],
                 grad_views: list[Tensor]) -> None:
        self.group, self.start, self.end = group, start, end
        self.params, self.grad_views = params, grad_views


class Block:
    """One flat vector over some params: its layout (params sorted by group, so that each group is
    one :class:`Segment`), preallocated gradient and param buffers, its state dict and, for a
    preconditioned block, its :class:`MomentumPairs`."""

    def __init__(self, params: list[Tensor], group_of: dict[int, int], state: dict,
                 pairs: MomentumPairs | None) -> None:
        self.params, self.state, self.pairs = params, state, pairs
        self.layout = FlatLayout(params)
        # grad holds g, then g + wd p (the vector that is preconditioned), then the step lr scales.
        self.grad = self.layout.empty()
        self.param = torch.empty_like(self.grad)
        self.grad_views = self.layout.views(self.grad)
        self.param_views = self.layout.views(self.param)
        self.segments: list[Segment] = []
        numels = self.layout.numels
        start = i = 0
        while i < len(params):
            j = i
            while j < len(params) and group_of[id(params[j])] == group_of[id(params[i])]:
                j += 1
            end = start + sum(numels[i:j])
            self.segments.append(Segment(group_of[id(params[i])], start, end, params[i:j],
                                         self.grad_views[i:j]))
            start, i = end, j

    def gather(self, maximize: bool, name: str) -> None:
        """Copy the params and their gradients into the flat buffers (a missing grad is zero;
        RuntimeError naming ``name`` for a sparse or complex one)."""
        torch._foreach_copy_(self.param_views, self.params)
        self.layout.gather_grads(self.grad, self.grad_views, name, maximize)

    # Per param group options act segment by segment (``by_group[i]``: the value of group i).

    def part(self, v: Tensor, seg: Segment) -> Tensor:
        """``seg``'s part of ``v`` (a flat vector of the block; all of it for the only segment,
        without a slicing op)."""
        return v if len(self.segments) == 1 else v[seg.start:seg.end]

    def add_weight_decay(self, by_group: list[float]) -> None:
        """``grad <- grad + wd param`` with the weight decay of each segment's group."""
        for seg in self.segments:
            wd = by_group[seg.group]
            if wd != 0:
                self.part(self.grad, seg).add_(self.part(self.param, seg), alpha=wd)

    def scale(self, v: Tensor, by_group: list[Tensor]) -> None:
        """``v`` (a flat vector of the block) times the factor of each segment's group."""
        for seg in self.segments:
            self.part(v, seg).mul_(by_group[seg.group])

    def momentum_step(self, direction: Tensor, coef: Tensor, momenta: list[Tensor],
                      lrs: list[float], ok: Tensor, zero: Tensor) -> None:
        """``buf <- m buf + coef direction``, ``param <- param - lr buf`` (``m``, ``lr`` of
        each segment's group; ``grad`` takes the update).  On a skipped step (``ok`` False)
        ``coef`` and the update are zero and ``m`` is 1.  A param without a gradient is left
        alone, as torch.optim does: its params and its part of ``buf`` do not change."""
        buf = self.state["momentum_buffer"]
        absent = self.absent()
        kept = buf.clone() if absent is not None else None
        self.scale(buf, momenta)
        buf.addcmul_(direction, coef)
        # What -lr multiplies: buf, or 0 on a skipped step (buf itself is kept).
        where_into_(ok, buf, zero, self.grad)
        if absent is not None:
            buf.copy_(torch.where(absent, kept, buf))
        for seg in self.segments:
            params, updates = seg.params, seg.grad_views
            if absent is not None:
                present = [i for i, p in enumerate(params) if p.grad is not None]
                params, updates = [params[i] for i in present], [updates[i] for i in present]
            if params:
                torch._foreach_add_(params, updates, alpha=-lrs[seg.group])

    def absent(self) -> Tensor | None:
        """A flat bool mask of the entries of params without a gradient (None if all have
        one)."""
        missing = [p.grad is None for p in self.params]
        if not any(missing):
            return None
        return torch.cat([torch.full((p.numel(),), m, dtype=torch.bool, device=self.grad.device)
                          for p, m in zip(self.params, missing)])


class BlockLayout:
    """The params of a run laid out in flat blocks: the preconditioned blocks ``pre`` (one per part
    of ``partition``, see :func:`block_partition`; each with its :class:`MomentumPairs`), then the
    ``plain`` block of the params left out of every block.

    Args:
        groups: the params of each param group.
        partition: None (one block), ``'groups'`` or positions in the list of all params.
        state: param -> state dict (``Optimizer.state``); a block's state is its first param's,
            where its flat entries (``momentum_buffer``, and the averages of a preconditioned
            block) are created, or checked against the block's size when resumed.
        history_size, history_dtype: of each block's :class:`LBFGSHistory`.
        name: the optimizer's, for error messages.

    ``pairs`` and ``pre_grads`` list the preconditioned blocks' pairs and gradient buffers;
    ``factors`` (:class:`SkipFactors`) makes the skip-guarded factors of a step.
    """

    def __init__(self, groups: list[list[Tensor]], partition, state: Mapping[Tensor, dict],
                 history_size: int, history_dtype: torch.dtype | None, name: str) -> None:
        params = [p for g in groups for p in g]
        p0 = params[0]
        self.dtype, self.device, self.name = p0.dtype, p0.device, name
        self.zero = torch.zeros((), dtype=self.dtype, device=self.device)
        group_of = {id(p): i for i, g in enumerate(groups) for p in g}
        position = {id(p): j for j, p in enumerate(params)}
        if partition is None:
            parts = [params]
        elif partition == "groups":
            parts = [list(g) for g in groups if g]
        else:
            parts = [[params[j] for j in block] for block in partition]
        in_blocks = {id(p) for part in parts for p in part}
        rest = [p for p in params if id(p) not in in_blocks]

        def order(p: Tensor) -> tuple[int, int]:
            return group_of[id(p)], position[id(p)]

        history = (history_size, history_dtype)
        self.pre = [self._block(sorted(part, key=order), group_of, state, history)
                    for part in parts]
        self.plain = [self._block(rest, group_of, state, None)] if rest else []
        self.blocks = self.pre + self.plain
        # what a step hands the pair updates and directions (kept: the buffers do not change)
        self.pairs = [b.pairs for b in self.pre]
        self.pre_grads = [b.grad for b in self.pre]
        self.factors = SkipFactors(self.dtype, self.device)

    def _block(self, params: list[Tensor], group_of: dict[int, int],
               state_of: Mapping[Tensor, dict], history: tuple | None) -> Block:
        """A block and its state; ``history`` (size and dtype) for a preconditioned one."""
        state = state_of[params[0]]
        n = sum(p.numel() for p in params)
        keys = ("momentum_buffer",) + (MomentumPairs.KEYS if history is not None else ())
        for key in keys:
            if key not in state:
                state[key] = torch.zeros(n, dtype=self.dtype, device=self.device)
            elif state[key].shape != (n,):
                raise ValueError(f"{self.name} state {key!r} has shape "
                                 f"{tuple(state[key].shape)}, expected ({n},): the blocks "
                                 "differ from the saved run's")
        pairs = None
        if history is not None:
            pairs = MomentumPairs(state, LBFGSHistory(n, history[0], self.dtype, self.device,
                                                      history[1]))
        return Block(params, group_of, state, pairs)

    @property
    def history_size(self) -> int | None:
        """The history size of the preconditioned blocks (None without one)."""
        return self.pre[0].pairs.history.history_size if self.pre else None

    def has_pairs(self) -> bool:
        """A pair is stored in some block (until then the direction is plain SGD's)."""
        return any(len(p) for p in self.pairs)
