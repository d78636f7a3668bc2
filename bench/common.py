"""Helpers shared by the benchmarks: devices, dtypes, timing, the machine and its load,
environment, table, JSON and plots.

Nothing here imports ``torch.utils.benchmark``: it imports ``torch.utils.cpp_extension``
(through its C++ timer), which looks for a CUDA toolkit on import and, on a machine without a
GPU, warns "No CUDA runtime is found" on every start.  ``time_medians`` is its
``blocked_autorange`` in a few lines.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import soo_ext

# CLI name -> (gradient dtype, history storage dtype).  "bf16" is a float32 gradient with
# bfloat16 S/Y storage; float32 is the only gradient dtype bfloat16 storage is allowed with.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "bf16": (torch.float32, torch.bfloat16),
}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16"}[dtype]


def add_device_argument(parser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                        help="where to run (default: cpu, plus cuda when available)")


def devices(choice: str | None) -> list[str]:
    """The devices named by ``--device``; asking for cuda without one is an error."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice in ("cpu", "cuda"):
        return [choice]
    return ["cpu"] + (["cuda"] if cuda else [])


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_block(fn: Callable[[], Any], number: int) -> float:
    """Seconds for ``number`` calls of ``fn``, the device synchronised before and after."""
    _sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    _sync()
    return time.perf_counter() - start


def block_size(fn: Callable[[], Any], min_run_time: float) -> int:
    """Calls per timed block, as ``torch.utils.benchmark.Timer.blocked_autorange`` chooses it:
    the first power of 10 whose block makes the timer's own overhead negligible (<= 1e-4 of the
    block) and lasts min_run_time / 1000, or the first block that lasts over min_run_time."""
    overhead = statistics.median(_time_block(fn, 0) for _ in range(5))
    number = 1
    while True:
        seconds = _time_block(fn, number)
        if (overhead <= 1e-4 * seconds and seconds >= min_run_time / 1000) or \
                seconds > min_run_time or number * 10 > 2**31 - 1:
            return number
        number *= 10


def time_medians(fns: dict[str, Callable[[], Any]], min_run_time: float,
                 rounds: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, over timed blocks of calls.

    Each function gets a block size (``block_size``: blocked_autorange's rule); then the
    functions are timed in turn, ``rounds`` times over, each in blocks for at least
    ``min_run_time / rounds`` seconds a round; the median is over all rounds' blocks.
    Interleaving spreads the slow phases of a shared machine over every function alike, which
    keeps their ratios meaningful.  Timing runs on all of torch's intra-op threads, and
    synchronises CUDA around every block.
    """
    numbers = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocator, lazy initialisation, kernel selection
        numbers[name] = block_size(fn, min_run_time / rounds)
    block_times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            spent = 0.0
            while spent < min_run_time / rounds:
                seconds = _time_block(fn, numbers[name])
                spent += seconds
                block_times[name].append(seconds / numbers[name])
    return {name: statistics.median(times) for name, times in block_times.items()}


def note_interrupted(env: dict, bench: str) -> None:
    """After Ctrl-C or SIGTERM in a benchmark's loop: the report that follows holds
    only the cases measured before it; the environment (and so the JSON) says so."""
    env["interrupted"] = True
    print(f"\n{bench}: interrupted; reporting the cases measured so far", file=sys.stderr)


def copy_bandwidth(device: str, nbytes: int = 1 << 30, min_run_time: float = 0.5) -> float:
    """Device-to-device copy bandwidth in GB/s: a clone reads and writes the tensor (2 * size)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    seconds = time_medians({"copy": src.clone}, min_run_time)["copy"]
    return 2 * nbytes / seconds / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, all cores together), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all cores have been busy since boot (/proc/stat; None where unreadable).
    Steal time counts as busy: the hypervisor gave the core to someone else."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """How busy the machine was while a benchmark ran: from the machine's busy CPU time
    (/proc/stat) minus this process's own, the mean number of cores other processes kept busy."""

    def __init__(self) -> None:
        self.start, self.busy, self.own = time.monotonic(), _busy_cpu_seconds(), _own_cpu_seconds()
        self.loadavg_at_start = load_average()

    def read(self) -> dict:
        seconds = time.monotonic() - self.start
        busy, own = _busy_cpu_seconds(), _own_cpu_seconds() - self.own
        out = {"seconds": round(seconds, 2), "loadavg_at_start": self.loadavg_at_start,
               "loadavg_at_end": load_average(), "own_cores": None, "other_cores": None}
        if busy is not None and self.busy is not None and seconds > 0:
            out["own_cores"] = round(own / seconds, 2)
            out["other_cores"] = round(max(0.0, busy - self.busy - own) / seconds, 2)
        return out


_meter: LoadMeter | None = None


def start_run(reset: bool = False) -> LoadMeter:
    """The meter of the machine's load during this run: started by the first call (python -m
    bench makes it, with reset, before the benchmark starts)."""
    global _meter
    if _meter is None or reset:
        _meter = LoadMeter()
    return _meter


def machine() -> dict:
    """The CPU a result was measured on: model, cores, usable cores, torch's threads, ISA."""
    return {"cpu": device_name("cpu"), "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "torch_num_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def machine_line() -> str:
    m, load = machine(), load_average()
    gpu = f"; GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
            f"torch {m['torch_num_threads']} threads, {m['torch_cpu_capability']}{gpu}; "
            f"load average {'?' if load is None else f'{load:.2f}'} (1 min) at start")


def load_line(reading: dict) -> str:
    """What the load was during the run, and what it means for the ratios."""
    cores = usable_cores()
    if reading["other_cores"] is None:
        during = f"load average {reading['loadavg_at_end']} at the end"
    else:
        during = (f"other processes kept {reading['other_cores']:.2f} of {cores} cores busy "
                  f"(this one {reading['own_cores']:.2f})")
    busy = reading["other_cores"] is not None and reading["other_cores"] > 0.25 * cores
    return (f"load during the run ({reading['seconds']:.0f} s): {during}.  Times and speed-up "
            f"ratios vary with the CPU and its load"
            + (": this machine was busy, so expect them lower than on a quiet one." if busy
               else "; compare ratios within one run."))


def environment(device_list: Sequence[str]) -> dict:
    """What a result depends on, recorded next to it (write_json adds the load during the run)."""
    start_run()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "devices": {d: device_name(d) for d in device_list},
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "machine": machine(),
        "soo_ext": soo_ext.build_info(),
    }


def print_table(rows: list[dict], columns: dict[str, str], title: str) -> None:
    """``columns`` maps record keys to headers; None values print as blanks."""
    from tabulate import tabulate

    body = [[row.get(key) for key in columns] for row in rows]
    print(f"\n{title}")
    print(tabulate(body, headers=list(columns.values()), floatfmt=".3g", missingval=""))


def write_json(path: str, benchmark_name: str, env: dict, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    env = dict(env, load=start_run().read())
    payload = {"benchmark": benchmark_name, "environment": env, "records": records}
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def new_figure(n_panels: int):
    """A row of ``n_panels`` axes on a non-interactive backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4.2), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
