"""python -m bench spread: K-FAC's inverse update and Shampoo's root update spread over
data-parallel ranks, against one rank.

The factor sets are bench micro's (a ResNet-50 at --width, as random SPD matrices in same-size
buckets): K-FAC's factors for the modes 'eigen' and 'inverse', Shampoo's blocks (at most
1024 x 1024) for 'root'.  One update is what the optimizer runs at an inverse / root step: per
bucket one soo::kron_eigh ('eigen'), soo::kron_damped_inverse ('inverse', damping 1e-3) or
soo::kron_inverse_root ('root': p = 4, the order-2 root of a matrix param, epsilon 1e-12,
eigh) call.  Measured:
  one rank    one process decomposes every factor (what every rank does without
              process_group / with KFAC(..., spread_inverses=False), and without data
              parallelism)
  spread      --world processes (torch.distributed, gloo, CPU) each decompose the factors
              soo_ext._support.distributed.spread_factors gives them (largest first to the
              rank with the least sum n^3) and one all-gather gives every rank every result:
              the optimizers' own code (soo_ext._support.distributed.SpreadPlan) on the same
              factors
Each process runs torch on --threads threads (world x threads should not exceed the cores).
Times are medians over --reps updates after one untimed update; in the spread runs each update
starts and ends at a barrier, 'decompose' is the slowest rank's median time to its
all-gather, 'all-gather' the rest.  gathered MB: the bytes the all-gather delivers to each
rank (world x the longest rank's packed results).

--json: one record per mode (factors, largest, one_rank_ms, spread_ms, decompose_ms, gather_ms, speedup,
gathered_mb, loads: each rank's share of sum n^3); --plot: the times as bars.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soo_ext import ops
from soo_ext._support.distributed import SpreadPlan, spread_factors

from . import common
from .micro import KronBucket, buckets, kfac_factor_sizes, shampoo_factor_sizes

DAMPING = 1e-3
EPSILON = 1e-12
MAX_DIM = 1024
MODES = ("eigen", "inverse", "root")
QUICK = dict(width=0.0625, reps=1)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "spread", help="K-FAC's inverse update spread over data-parallel ranks (CPU, gloo)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a rank (default 1)")
    parser.add_argument("--width", type=float, default=None,
                        help="ResNet-50 width of the factor set (default 0.25; --quick 0.0625)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="K-FAC 'eigen' and 'inverse', Shampoo 'root' (default all)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed updates (default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a small factor set (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the times")
    return parser


def factor_set(mode: str, width: float, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """bucket size n -> [count, n, n] SPD factors: K-FAC's, or Shampoo's for 'root'."""
    sizes = shampoo_factor_sizes(width, MAX_DIM) if mode == "root" else kfac_factor_sizes(width)
    return {n: KronBucket(n, count, dtype, "cpu").stack for n, count in buckets(sizes)}


def decompose(mode: str, F: torch.Tensor):
    if mode == "eigen":
        return ops.kron_eigh(F)
    if mode == "inverse":
        return ops.kron_damped_inverse(F, DAMPING ** 0.5)
    return ops.kron_inverse_root(F, 4, EPSILON, "eigh")


def one_rank(mode: str, factors: dict, reps: int) -> list[float]:
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        for F in factors.values():
            decompose(mode, F)
        times.append(time.perf_counter() - start)
    return times[1:]


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, opts: dict) -> None:
    torch.set_num_threads(opts["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        dtype = getattr(torch, opts["dtype"])
        out = {}
        for mode in opts["modes"]:
            factors = factor_set(mode, opts["width"], dtype)
            spread = SpreadPlan(factors, dist.group.WORLD)
            done = [0.0]  # when the last decomposition of this rank ended

            def op(n, F):
                result = decompose(mode, F)
                done[0] = time.perf_counter()
                return result

            totals, decomposing = [], []
            for _ in range(opts["reps"] + 1):
                dist.barrier()
                start = time.perf_counter()
                spread.decompose(factors, op)
                dist.barrier()
                totals.append(time.perf_counter() - start)
                decomposing.append(done[0] - start)
            out[mode] = {"total": totals[1:], "decompose": decomposing[1:],
                         "gathered_bytes": spread.gathered_numel * dtype.itemsize}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    width = args.width if args.width is not None else (QUICK["width"] if args.quick else 0.25)
    reps = args.reps if args.reps is not None else (QUICK["reps"] if args.quick else 5)
    dtype = getattr(torch, args.dtype)
    env = common.environment(["cpu"])
    env.update(world=args.world, threads=args.threads, width=width, reps=reps, dtype=args.dtype,
               damping=DAMPING, epsilon=EPSILON, max_preconditioner_dim=MAX_DIM, backend="gloo")
    torch.set_num_threads(args.threads)
    single, sizes, loads = {}, {}, {}
    for mode in args.modes:
        factors = factor_set(mode, width, dtype)
        sizes[mode] = [(n, F.shape[0]) for n, F in factors.items()]
        owned = spread_factors(sizes[mode], args.world)
        total = sum(n ** 3 * count for n, count in sizes[mode])
        loads[mode] = [sum(n ** 3 * len(per[r]) for (n, _), per in zip(sizes[mode], owned))
                       / total for r in range(args.world)]
        single[mode] = one_rank(mode, factors, reps)
    env["buckets"] = sizes
    with tempfile.TemporaryDirectory() as tmp:
        opts = dict(threads=args.threads, width=width, dtype=args.dtype, modes=args.modes,
                    reps=reps)
        mp.spawn(_rank_main, args=(args.world, os.path.join(tmp, "init"), tmp, opts),
                 nprocs=args.world)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.world)]
    records = []
    for mode in args.modes:
        one = statistics.median(single[mode])
        spread = statistics.median(ranks[0][mode]["total"])
        slowest = max(statistics.median(r[mode]["decompose"]) for r in ranks)
        records.append({
            "mode": mode, "world": args.world, "width": width, "dtype": args.dtype,
            "factors": sum(count for _, count in sizes[mode]),
            "largest": max(n for n, _ in sizes[mode]),
            "one_rank_ms": one * 1e3, "spread_ms": spread * 1e3, "decompose_ms": slowest * 1e3,
            "gather_ms": (spread - slowest) * 1e3, "speedup": one / spread,
            "gathered_mb": ranks[0][mode]["gathered_bytes"] / 1e6, "loads": loads[mode],
            "one_rank_ms_reps": [t * 1e3 for t in single[mode]],
            "spread_ms_reps": [t * 1e3 for t in ranks[0][mode]["total"]]})
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    common.print_table(
        records, {"mode": "mode", "factors": "factors", "largest": "largest n",
                  "one_rank_ms": "one rank ms", "spread_ms": "spread ms",
                  "decompose_ms": "decompose ms", "gather_ms": "all-gather ms",
                  "gathered_mb": "gathered MB", "speedup": "x one rank"},
        f"K-FAC inverse / Shampoo root update of ResNet-50 factors (width {env['width']}, "
        f"{env['dtype']}) on "
        f"{env['world']} gloo ranks x {env['threads']} thread(s) against one rank "
        f"({env['devices']['cpu']}); median of {env['reps']}")
    if args.json:
        common.write_json(args.json, "spread", env, records)
    if args.plot:
        plot(records, env, args.plot)


def plot(records: list[dict], env: dict, path: str) -> None:
    fig, (ax,) = common.new_figure(1)
    x = range(len(records))
    ax.bar([i - 0.2 for i in x], [r["one_rank_ms"] for r in records], 0.4, label="one rank")
    ax.bar([i + 0.2 for i in x], [r["decompose_ms"] for r in records], 0.4,
           label=f"spread over {env['world']}: decompose")
    ax.bar([i + 0.2 for i in x], [r["gather_ms"] for r in records], 0.4,
           bottom=[r["decompose_ms"] for r in records], label="spread: all-gather")
    ax.set_xticks(list(x), [("Shampoo " if r["mode"] == "root" else "K-FAC ") + r["mode"]
                            for r in records])
    ax.set(ylabel="ms per update",
           title=f"ResNet-50 x{env['width']} factors, {env['world']} gloo ranks (CPU)")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, path)
