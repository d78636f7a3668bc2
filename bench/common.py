"""Helpers shared by the benchmarks: devices, dtypes, timing, environment, table, JSON and plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils import benchmark

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


def time_medians(fns: dict[str, Callable[[], Any]], min_run_time: float,
                 rounds: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, by ``torch.utils.benchmark`` (blocked_autorange).

    The functions are timed in turn, ``rounds`` times over, each for ``min_run_time / rounds``
    seconds a round; the median is over all rounds' blocks.  Interleaving spreads the slow phases
    of a shared machine over every function alike, which keeps their ratios meaningful.  Timing
    runs on all of torch's intra-op threads (Timer defaults to one) and synchronises CUDA itself.
    """
    timers = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocator, lazy initialisation, kernel selection
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, label=name,
                                       num_threads=torch.get_num_threads())
    block_times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            block_times[name] += timer.blocked_autorange(min_run_time=min_run_time / rounds).times
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


def environment(device_list: Sequence[str]) -> dict:
    """What a result depends on, recorded next to it."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "devices": {d: device_name(d) for d in device_list},
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
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
