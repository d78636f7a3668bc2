"""Cost-aware refresh scheduling: how often a preconditioner refreshes (K-FAC's factors and
decompositions, EKFAC's eigenbases, Shampoo's roots, SOAP's bases; PSGD-Kron's fits, whose
annealed probability takes ``1 / interval`` as its floor) so that the refresh work is at most a
``budget`` fraction of the training time.

The schedule counts the steps ``n = 0, 1, 2, ...`` since it began (the optimizer says which of its
steps these are) and keeps everything it knows in a plain ``record`` dict that the optimizer
stores in its state, so ``state_dict`` carries it.

Measurement: a window of ``2 * samples + 1`` steps refreshing on every other step (``n0``,
``n0 + 2``, ...).  At the end of every step of the window the clock is read (on CUDA the wall clock after one device synchronization:
only on these steps, never in between; on CPU the process's CPU time, which other processes' load
does not inflate: with the wall clock a loaded 2-core machine gave intervals anywhere from 1 to
100 for one setting); the time between two readings is a whole training iteration (the forward and backward of the step, its statistics capture, the
step itself).  ``P`` is the median of the iterations without a refresh, ``R`` the median of those
with one minus ``P``.  Over ``T`` steps with one refresh the refresh's share of the time is
``R / (T P + R)``; the interval is the least ``T`` whose share is at most ``budget``,

    ``T = ceil(R (1 - budget) / (budget P))``, bounded to ``[1, max_interval]``.

The first window starts at ``n = 0``; a new one every ``remeasure_steps`` steps (at the first
refresh due from then on) and at the next refresh after :meth:`RefreshSchedule.restart` (the
refresh sizes changed).  The chosen interval is logged at INFO (logger ``soo_ext``).  With a
``process_group`` the measured times are averaged over the ranks (one all-reduce per window) so
that every rank keeps the same schedule.

Resume: the record (interval, window, the times of a window in progress, the last clock reading)
is saved, so after ``load_state_dict`` the optimizer refreshes exactly where the saved one would
have, given the same clock.  With a real clock this makes a resume bit-identical up to the next
measurement window, which then measures the resumed run's own timings (a window in progress at
the save finishes with the resumed run's clock).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Callable

import torch

__all__ = ["RefreshSchedule"]

logger = logging.getLogger("soo_ext")


class RefreshSchedule:
    """The automatic refresh interval.

    Args:
        name: what is refreshed (in the log line), e.g. ``'KFAC factors and decompositions'``.
        budget: the most the refreshes may take of the training time, in (0, 1) (default 0.25).
        max_interval: the longest interval (default 100).
        samples: timed steps with and without a refresh per window (default 3).
        remeasure_steps: steps between measurement windows (default 2000).
        timer: the clock, seconds as a float (default: ``time.process_time`` on CPU,
            ``time.perf_counter`` on CUDA; tests pass a fake).
        sync: called before each reading of the clock (default: ``torch.cuda.synchronize`` of the
            device on CUDA, nothing on CPU).
    """

    def __init__(self, name: str, budget: float = 0.25, *, max_interval: int = 100,
                 samples: int = 3, remeasure_steps: int = 2000,
                 timer: Callable[[], float] | None = None,
                 sync: Callable[[], None] | None = None) -> None:
        if not 0 < budget < 1:
            raise ValueError(f"Invalid refresh_budget: {budget!r} (must be in (0, 1) or None)")
        if max_interval < 1 or samples < 1 or remeasure_steps < 1:
            raise ValueError("Invalid RefreshSchedule bounds: max_interval, samples and "
                             "remeasure_steps must be >= 1")
        self.name, self.budget, self.max_interval = name, budget, max_interval
        self.samples, self.remeasure_steps = samples, remeasure_steps
        self.timer = timer
        self.sync = sync

    @staticmethod
    def new_record() -> dict:
        """A fresh record: a measurement window starting at ``n = 0``."""
        return {"interval": None, "anchor": 0, "measuring": True, "next_measure": 0,
                "plain": [], "refresh": [], "stamp": None, "cost_plain": None,
                "cost_refresh": None}

    def record_in(self, state: dict, sizes: list[int], n: int, start: int = 0) -> dict:
        """The record kept in ``state['refresh_schedule']`` at step ``n`` for refreshes of
        ``sizes`` (ints that set their cost, e.g. the refreshed shapes).  A fresh one at the
        first call: its first window starts at ``max(start, n)`` (the schedule may be turned on
        mid-run, or a state dict from before it loaded); when the sizes differ from the
        record's, measure again from step ``n`` (:meth:`restart`)."""
        record = state.get("refresh_schedule")
        if record is None:
            record = state["refresh_schedule"] = {**self.new_record(), "anchor": max(start, n),
                                                  "sizes": sizes}
        elif record.get("sizes") != sizes:
            record["sizes"] = sizes
            self.restart(record, n)
        return record

    @staticmethod
    def due(record: dict, n: int) -> bool:
        """Whether step ``n`` refreshes (pure: may be asked more than once)."""
        if n < record["anchor"]:
            return False
        period = 2 if record["measuring"] else record["interval"]
        return (n - record["anchor"]) % period == 0

    def interval_for(self, cost_plain: float, cost_refresh: float) -> int:
        """The interval for a plain iteration of ``cost_plain`` seconds and a refresh of
        ``cost_refresh`` more."""
        if cost_refresh <= 0:
            return 1
        if cost_plain <= 0:
            return self.max_interval
        t = cost_refresh * (1 - self.budget) / (self.budget * cost_plain)
        return max(1, min(self.max_interval, math.ceil(t * (1 - 1e-12))))

    def after_step(self, record: dict, n: int, device: torch.device | None = None,
                   process_group=None) -> None:
        """At the end of step ``n`` (its work done): read the clock in a window; start a window
        when one is due at step ``n + 1``."""
        if not record["measuring"]:
            nxt = n + 1
            if nxt >= record["next_measure"] and self.due(record, nxt):
                record.update(measuring=True, anchor=nxt, plain=[], refresh=[], stamp=None)
            return
        i = n - record["anchor"]
        if i < 0:
            return
        now = self._now(device)
        if i >= 1 and record["stamp"] is not None:
            record["refresh" if i % 2 == 0 else "plain"].append(now - record["stamp"])
        record["stamp"] = now
        if i >= 2 * self.samples:
            self._finish(record, n, device, process_group)

    def restart(self, record: dict, n: int) -> None:
        """The refresh sizes changed: measure again from the next refresh due at or after
        step ``n``."""
        if not record["measuring"]:
            record["next_measure"] = n

    def _finish(self, record: dict, n: int, device, process_group) -> None:
        plain = statistics.median(record["plain"]) if record["plain"] else 0.0
        refresh = statistics.median(record["refresh"]) if record["refresh"] else 0.0
        if process_group is not None:
            import torch.distributed as dist
            t = torch.tensor([plain, refresh], dtype=torch.float64,
                             device=device if device is not None else "cpu")
            dist.all_reduce(t, group=process_group)
            plain, refresh = (t / dist.get_world_size(process_group)).tolist()
        cost = max(refresh - plain, 0.0)
        interval = self.interval_for(plain, cost)
        record.update(interval=interval, anchor=n, measuring=False,
                      next_measure=n + self.remeasure_steps, plain=[], refresh=[], stamp=None,
                      cost_plain=plain, cost_refresh=cost)
        logger.info("%s: refresh every %d steps (measured: step %.3g ms, refresh %.3g ms more; "
                    "budget %.2f)", self.name, interval, plain * 1e3, cost * 1e3, self.budget)

    def _now(self, device) -> float:
        cuda = device is not None and torch.device(device).type == "cuda"
        if self.sync is not None:
            self.sync()
        elif cuda:
            torch.cuda.synchronize(device)
        if self.timer is not None:
            return float(self.timer())
        return time.perf_counter() if cuda else time.process_time()
