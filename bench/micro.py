"""python -m bench micro: the op lbfgs_direction against the code it replaces.

Implementations timed on the same data:
  soo        soo_ext.ops.lbfgs_direction (fused kernels when built), update_gram=False
  soo+gram   the same with update_gram=True: the Gram row/column of a just-pushed pair is also
             recomputed, in the same pass over the history
  reference  soo_ext.reference.lbfgs_direction (pure-PyTorch compact form)
  torch      what torch.optim.LBFGS does per iteration: the two-loop recursion over Python lists
             of flat vectors, then g.d and max|t d| (the two scalars the op also returns)
"""
from __future__ import annotations

import argparse
import itertools

import torch
from tqdm import tqdm

from soo_ext import ops, reference

from . import common

OP = "lbfgs_direction"
IMPLS = ("soo", "soo+gram", "reference", "torch")
DEFAULT_N = [100_000, 1_000_000, 4_000_000]
QUICK_N = [4_096, 65_536]

BYTES_HELP = """\
Effective bandwidth = bytes / median time, with the same minimal byte count for every
implementation (so GB/s ratios are speed ratios):
  lbfgs_direction: bytes = (4*m*h + 3*b) * n
  h = bytes per history element (4 fp32, 8 fp64, 2 bf16), b = bytes per gradient element:
  two passes over S and Y (m x n each), g read twice, d written once."""


def parse_count(text: str) -> int:
    """An element count such as 4000000, 4e6, 4M or 100k."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    number = text[:-1] if scale != 1 else text
    value = float(number) * scale
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive element count: {text!r}")
    return int(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "micro", help="time the lbfgs_direction op: soo vs reference vs torch's two-loop",
        description=__doc__ + "\n" + BYTES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_device_argument(parser)
    parser.add_argument("--n", nargs="+", type=parse_count, default=None,
                        help=f"vector lengths (default: {' '.join(map(str, DEFAULT_N))}; "
                             f"--quick: {' '.join(map(str, QUICK_N))}); 4M, 100k are accepted")
    parser.add_argument("--m", nargs="+", type=int, default=[10],
                        help="history sizes (default: 10)")
    parser.add_argument("--dtype", nargs="+", choices=list(common.DTYPES),
                        default=list(common.DTYPES),
                        help="float32, float64, bf16 (float32 gradient, bfloat16 history); "
                             "the torch path always runs in the gradient dtype (default: all)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per impl and case (default 1; --quick: 0.05)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="the impls are timed in turn, this many times over, so that noise "
                             "on a shared machine hits them alike (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, short timings")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s vs n per impl")
    return parser


def random_pairs(n: int, m: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    """m pairs (rows of S, Y) with y = C s + noise, C = diag(c), c in [0.5, 1.5]: y.s > 0."""
    curvature = torch.rand(n, generator=gen, dtype=dtype, device=device) + 0.5
    S = torch.randn(m, n, generator=gen, dtype=dtype, device=device)
    Y = torch.randn(m, n, generator=gen, dtype=dtype, device=device).mul_(0.01)
    return S, Y.addcmul_(S, curvature)


class Case:
    """A full ring of m random pairs with positive curvature, its Gram blocks, a gradient, and
    the same pairs as torch.optim.LBFGS keeps them (lists of separate flat vectors)."""

    def __init__(self, n: int, m: int, dtype: str, device: str, seed: int = 0) -> None:
        grad_dtype, hist_dtype = common.DTYPES[dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        S, Y = random_pairs(n, m, grad_dtype, device, gen)
        self.S, self.Y = S.to(hist_dtype), Y.to(hist_dtype)
        acc = reference.accumulation_dtype(grad_dtype)
        self.SY = self.S.to(acc) @ self.Y.to(acc).T
        self.YY = self.Y.to(acc) @ self.Y.to(acc).T
        self.g = torch.randn(n, generator=gen, dtype=grad_dtype, device=device)
        self.m = m
        self.newest = m // 2  # the ring has wrapped around, as in a long run

        # torch.optim.LBFGS's state after m accepted pairs, oldest first, in the gradient dtype
        # (from the stored pairs, so that every impl sees the same bf16-rounded data).
        slots = reference.ring_slots(self.newest, m, m)
        self.old_stps = [self.S[j].to(grad_dtype, copy=True) for j in slots]
        self.old_dirs = [self.Y[j].to(grad_dtype, copy=True) for j in slots]
        self.ro = [1.0 / y.dot(s) for s, y in zip(self.old_stps, self.old_dirs)]
        s_new, y_new = self.old_stps[-1], self.old_dirs[-1]
        self.H_diag = y_new.dot(s_new) / y_new.dot(y_new)
        self.al = [None] * m

    def soo_direction(self, update_gram: bool):
        return ops.lbfgs_direction(self.S, self.Y, self.SY, self.YY, self.g, self.newest, self.m,
                                   update_gram)

    def reference_direction(self):
        return reference.lbfgs_direction(self.S, self.Y, self.SY, self.YY, self.g, self.newest,
                                         self.m, False)

    def torch_direction(self, t: float = 1.0):
        """torch.optim.LBFGS's direction code, as it runs once the history is full (t = lr)."""
        flat_grad, old_dirs, old_stps, ro, al = (self.g, self.old_dirs, self.old_stps, self.ro,
                                                 self.al)
        q = flat_grad.neg()
        for i in range(len(old_dirs) - 1, -1, -1):
            al[i] = old_stps[i].dot(q) * ro[i]
            q.add_(old_dirs[i], alpha=-al[i])
        d = r = torch.mul(q, self.H_diag)
        for i in range(len(old_dirs)):
            be_i = old_dirs[i].dot(r) * ro[i]
            r.add_(old_stps[i], alpha=al[i] - be_i)
        gtd = flat_grad.dot(d)
        return d, gtd, d.mul(t).abs().max()


def direction_bytes(n: int, m: int, dtype: str) -> int:
    grad_dtype, hist_dtype = common.DTYPES[dtype]
    h = torch.empty((), dtype=hist_dtype).element_size()
    b = torch.empty((), dtype=grad_dtype).element_size()
    return (4 * m * h + 3 * b) * n


def measure_case(n: int, m: int, dtype: str, device: str, min_run_time: float,
                 rounds: int) -> list[dict]:
    case = Case(n, m, dtype, device)
    calls = {"soo": lambda: case.soo_direction(False),
             "soo+gram": lambda: case.soo_direction(True),
             "reference": case.reference_direction, "torch": case.torch_direction}
    grad_dtype, hist_dtype = common.DTYPES[dtype]
    nbytes = direction_bytes(n, m, dtype)
    seconds = common.time_medians(calls, min_run_time, rounds)
    rows = []
    for impl in IMPLS:
        rows.append({
            "op": OP, "impl": impl, "device": device, "n": n, "m": m, "dtype": dtype,
            "grad_dtype": common.dtype_name(grad_dtype),
            # torch.optim.LBFGS keeps its history in the gradient dtype
            "history_dtype": common.dtype_name(grad_dtype if impl == "torch" else hist_dtype),
            "median_ms": seconds[impl] * 1e3, "bytes": nbytes,
            "gbps": nbytes / seconds[impl] / 1e9,
        })
    by_impl = {row["impl"]: row["median_ms"] for row in rows}
    for row in rows:
        row["speedup_vs_torch"] = by_impl["torch"] / row["median_ms"]
        row["speedup_vs_reference"] = by_impl["reference"] / row["median_ms"]
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device_list = common.devices(args.device)
    sizes = args.n or (QUICK_N if args.quick else DEFAULT_N)
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick else 3)
    env = common.environment(device_list)
    env["copy_gbps"] = {}
    if "cuda" in device_list:
        env["copy_gbps"]["cuda"] = common.copy_bandwidth("cuda", min_run_time=min_run_time)

    cases = list(itertools.product(device_list, args.dtype, args.m, sizes))
    records = []
    for device, dtype, m, n in tqdm(cases, desc="micro", unit="case"):
        records += measure_case(n, m, dtype, device, min_run_time, rounds)
        if device == "cuda":
            torch.cuda.empty_cache()  # give the next (larger) case the memory back
    for row in records:
        copy_gbps = env["copy_gbps"].get(row["device"])
        row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps if copy_gbps else None
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    kernels = ("fused kernels" if ops.extension_loaded()
               else f"pure-PyTorch fallback ({ops.extension_error()})")
    columns = {"op": "op", "impl": "impl", "device": "device", "n": "n", "m": "m",
               "dtype": "dtype", "median_ms": "median ms", "gbps": "eff. GB/s",
               "speedup_vs_torch": "x torch", "speedup_vs_reference": "x reference"}
    if env["copy_gbps"]:
        columns["pct_of_copy"] = "% of copy"
    title = f"lbfgs_direction, soo = {kernels}; bytes = (4*m*h + 3*b)*n"
    for device, gbps in env["copy_gbps"].items():
        title += f"\n{device} copy bandwidth (clone, 2*size bytes): {gbps:.0f} GB/s"
    common.print_table(records, columns, title)
    if args.json:
        common.write_json(args.json, "micro", env, records)
    if args.plot:
        plot(records, env, args.plot)


def plot(records: list[dict], env: dict, path: str) -> None:
    """One panel per (device, dtype): effective GB/s vs n, a line per (impl, m)."""
    panels = list(dict.fromkeys((r["device"], r["dtype"]) for r in records))  # run order
    fig, axes = common.new_figure(len(panels))
    for ax, (device, dtype) in zip(axes, panels):
        rows = [r for r in records if r["device"] == device and r["dtype"] == dtype]
        for impl, m in dict.fromkeys((r["impl"], r["m"]) for r in rows):
            line = sorted((r["n"], r["gbps"]) for r in rows if r["impl"] == impl and r["m"] == m)
            ax.plot(*zip(*line), marker="o", label=f"{impl} (m={m})")
        if device in env["copy_gbps"]:
            ax.axhline(env["copy_gbps"][device], color="gray", linestyle="--", label="copy")
        ax.set(xscale="log", xlabel="n", ylabel="effective GB/s", title=f"{OP} {device} {dtype}")
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    common.save_figure(fig, path)
