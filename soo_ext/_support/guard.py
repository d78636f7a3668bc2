"""The device-side skip guard: a step's finiteness decided on the device, without a host sync, and
the masking that makes a skipped step change nothing."""
from __future__ import annotations

import math
import os
import sys
import warnings

import torch
from torch import Tensor

from .device import kept_scalar
from .errors import NonFiniteError

__all__ = ["MaskedSteps", "SkipGuard", "SkipWarner", "all_finite", "fill_if_", "finite_by_extremes",
           "host_flag", "max_abs", "select", "where_into_"]

# soo_ext's and torch's own frames (step() runs under torch's decorators): a warning names the
# first frame outside them, the user's call of step()
_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside soo_ext and torch, for a warning issued by
    the caller of this function."""
    level, frame = 1, sys._getframe(1)
    while (frame.f_back is not None
           and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL)):
        frame, level = frame.f_back, level + 1
    return level


def max_abs(v: Tensor) -> Tensor:
    """``max|v|`` (NaN if v holds one); aminmax is several times faster than the inf-norm on CPU."""
    if v.numel() == 0:
        return v.new_zeros(())
    lo, hi = torch.aminmax(v)
    return torch.maximum(hi, -lo)


_UNRESOLVED = object()
_fused_all_finite = _UNRESOLVED  # soo::all_finite, or None without the compiled module


def all_finite(vectors: list[Tensor]) -> Tensor:
    """0-dim bool tensor on the device: every entry of every vector is finite (no host sync).
    One op, ``soo::all_finite`` (one pass over the bits of all of them), where the compiled module
    registered it, else :func:`finite_by_extremes`.  The op is looked up in ``torch.ops`` at the
    first call (``_support`` imports no soo_ext module; ``soo_ext.ops`` has loaded the compiled
    module, or not, when the package was imported) and called without the wrapper's argument
    checks: the kernel checks them too, and these are a step's own gradients."""
    global _fused_all_finite
    if _fused_all_finite is _UNRESOLVED:
        op = getattr(torch.ops.soo, "all_finite", None)
        _fused_all_finite = op.default if op is not None else None
    if _fused_all_finite is None:
        return finite_by_extremes(vectors)
    return _fused_all_finite(vectors)


def finite_by_extremes(vectors: list[Tensor]) -> Tensor:
    """:func:`all_finite` in torch ops (the fallback, and ``soo_ext.reference.all_finite``).
    Extremes by aminmax: one pass, NaN propagates, and unlike a sum they cannot overflow; then
    ``max |extreme| < inf`` (amax propagates NaN), fewer ops than ``isfinite(...).all()``."""
    if not vectors:
        raise RuntimeError("all_finite: tensors must not be empty (the result is on their device)")
    extremes = [e for v in vectors if v.numel() for e in torch.aminmax(v)]
    if not extremes:
        return torch.ones((), dtype=torch.bool, device=vectors[0].device)
    return torch.stack(extremes).abs().amax() < math.inf


def host_flag(flag: Tensor) -> bool | None:
    """The value of a 0-dim bool ``flag`` where reading it waits for nothing (a CPU tensor), else
    None (a GPU's stays on the device).  The masking below then does its work on the host: on a
    taken step, the common case, no pass over the masked tensors at all."""
    return bool(flag.numpy()) if flag.device.type == "cpu" else None


def fill_if_(t: Tensor, flag: Tensor, value: float) -> Tensor:
    """``t.masked_fill_(flag, value)`` for a 0-dim bool ``flag`` (a fill, or nothing, on the
    CPU)."""
    known = host_flag(flag)
    if known is None:
        return t.masked_fill_(flag, value)
    return t.fill_(value) if known else t


def where_into_(flag: Tensor, new: Tensor, old: Tensor, out: Tensor) -> Tensor:
    """``torch.where(flag, new, old, out=out)`` for a 0-dim bool ``flag`` (one copy, or nothing
    where ``out`` already is the one chosen, on the CPU)."""
    known = host_flag(flag)
    if known is None:
        return torch.where(flag, new, old, out=out)
    chosen = new if known else old
    return out if chosen is out else out.copy_(chosen)


def select(flag: Tensor, new: Tensor, old: Tensor | float) -> Tensor:
    """``torch.where(flag, new, old)`` for a 0-dim bool ``flag`` and ``new`` of the result's
    shape.  On the CPU ``new`` or ``old`` itself (no copy: callers must only read the result)."""
    known = host_flag(flag)
    if known is None:
        return torch.where(flag, new, old)
    if known:
        return new
    return old if isinstance(old, Tensor) else torch.full_like(new, old)


class SkipGuard:
    """The finiteness flag ``ok`` of a step (0-dim bool, on the device) and the masks built from
    it: every update of a step goes through them, so that a step judged non-finite leaves every
    param and state entry bit for bit as it was.

    :meth:`check` applies the ``on_nonfinite`` policy: ``'skip'`` counts the step in ``counter``
    (on the device), ``'raise'`` fetches the flag (one host sync) and raises
    :class:`NonFiniteError` before anything changed.
    """

    def __init__(self, ok: Tensor) -> None:
        self.ok = ok
        self.bad = ~ok

    @classmethod
    def check(cls, tensors: list[Tensor], on_nonfinite: str, counter: Tensor, message: str,
              *, defer_raise: bool = False) -> "SkipGuard":
        """The guard of ``tensors``; ``defer_raise``: the caller raises later, at a host sync it
        makes anyway (with :meth:`error`)."""
        guard = cls(all_finite(tensors))
        if on_nonfinite == "skip":
            counter.add_(guard.bad)
        elif not defer_raise and not guard.ok.item():
            raise cls.error(message)
        return guard

    @staticmethod
    def error(message: str) -> NonFiniteError:
        return NonFiniteError(f"{message}; the step was not taken and nothing changed "
                              "(on_nonfinite='skip' skips such steps instead of raising)")

    def unless_skipped(self, value: float, like: Tensor) -> Tensor:
        """``value`` as a 0-dim tensor of ``like``'s dtype and device, or 1 on a skipped step: the
        factor that leaves an accumulator unchanged (read-only: it may be kept)."""
        return select(self.ok, kept_scalar(value, like), kept_scalar(1.0, like))


class MaskedSteps:
    """The steps of a skip-guarded update, ``p - lr step``, made by one copy and one fill: the
    tensors are copied into views of one flat buffer per dtype and device and the buffers are
    zeroed on a skipped step, where a select per tensor (``torch.where(ok, t, 0)``) takes an op
    for each.  The fill writes +0, so ``p - lr (+0)`` is ``p`` bit for bit (``t * ok`` would
    be -0 where t < 0, which turns a -0.0 param into +0.0).  The buffers are kept for the next
    call with the same shapes (one set per ``slot``: a param group)."""

    def __init__(self) -> None:
        self._slots: dict[object, tuple] = {}  # slot -> (shapes, buffers, views)

    def __call__(self, slot: object, tensors: list[Tensor], bad: Tensor) -> list[Tensor]:
        """``tensors``, all zero where ``bad`` (a 0-dim bool tensor) is True: copies, or on the
        CPU (:func:`host_flag`) the tensors themselves or zeros (callers only read them)."""
        known = host_flag(bad)
        if known is False:
            return tensors
        shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        kept = self._slots.get(slot)
        if kept is None or kept[0] != shapes:
            kept = self._slots[slot] = (shapes, *_flat_views(tensors))
        _, buffers, views = kept
        if known is None:
            torch._foreach_copy_(views, tensors)
        for b in buffers:
            fill_if_(b, bad, 0)
        return views


def _flat_views(tensors: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``(buffers, views)``: one flat buffer per dtype and device, and views of them shaped like
    ``tensors``."""
    by_kind: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.dtype, t.device), []).append(i)
    buffers, views = [], [None] * len(tensors)
    for (dtype, device), index in by_kind.items():
        sizes = [tensors[i].numel() for i in index]
        buffers.append(torch.empty(sum(sizes), dtype=dtype, device=device))
        for i, part in zip(index, buffers[-1].split(sizes)):
            views[i] = part.view(tensors[i].shape)
    return buffers, views


class SkipWarner:
    """Warns once, the first time a step of ``name`` is skipped for a non-finite value, so that
    skipping is never silent (``state['nonfinite_steps']`` still counts every one).

    :meth:`watch`, called at the start of every step, reads the device counter of the skipped
    steps without a host sync: a CPU counter directly, a GPU counter from a non-blocking copy
    into pinned memory made at an earlier step, read once the copy has completed; the first
    reading is the baseline (0, or what a loaded state counted), a larger one warns (a step or a
    few late).  :meth:`skipped` is for the optimizers that know it on the host.
    """

    def __init__(self, name: str, counted: bool = True) -> None:
        self.name = name
        self.counted = counted  # the optimizer counts skips in state['nonfinite_steps']
        self.warned = False
        self._baseline: int | None = None  # the count when watching began (a resumed run)
        self._copy: tuple[Tensor, object] | None = None  # (pinned copy, its CUDA event)

    def skipped(self) -> None:
        """A step was skipped (the warning names the line that called ``step()``)."""
        if not self.warned:
            self.warned = True
            counter = "state['nonfinite_steps'] counts the skipped steps; " if self.counted else ""
            warnings.warn(f"{self.name}: a step was skipped because its loss or gradient was not "
                          f"finite ({counter}on_nonfinite='raise' raises instead); later skips "
                          "are not reported", RuntimeWarning, stacklevel=_user_stacklevel())

    def watch(self, counter: Tensor) -> None:
        """Call at the start of a step, before it may update ``counter``."""
        if self.warned:
            return
        if counter.device.type == "cpu":
            count = int(counter.numpy())  # a CPU tensor: reading it waits for nothing
        else:
            count = self._read_copy()
            if self._copy is None:
                pinned = torch.empty((), dtype=counter.dtype, pin_memory=True)
                pinned.copy_(counter, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._copy = (pinned, event)
            if count is None:
                return
        if self._baseline is None:
            self._baseline = count
        elif count > self._baseline:
            self.skipped()

    def _read_copy(self) -> int | None:
        if self._copy is None or not self._copy[1].query():
            return None
        pinned, self._copy = self._copy[0], None
        return int(pinned.numpy())
