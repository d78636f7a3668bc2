"""python -m bench demo (also python -m bench without a subcommand; what `make demo` runs):
what soo_ext is for, side by side with what it replaces, in one table (about a minute on 2
cores).

1. The L-BFGS direction at one size (--n, default 4M entries; history m = 10, full and wrapped):
   soo_ext's fused op (soo_ext.ops.lbfgs_direction, one pass over the history per loop) against
   the two-loop recursion torch.optim.LBFGS runs every iteration (Python lists of flat vectors,
   2m dot products and 2m axpys, then g.d and max|d|), on the same data: fp32 history, and the
   bf16 history soo_ext also offers (torch.optim.LBFGS keeps its history in fp32).  Medians of
   interleaved blocks of calls (--min-run-time seconds per implementation), on all of torch's
   threads.
2. A small training race: soo_ext.KFAC against torch.optim.AdamW on the MNIST-1D CNN (5,210
   params, generated locally by the mnist1d package, nothing downloaded), minibatch 128, until
   the test accuracy reaches --target (0.8): training seconds (clock paused during evaluations,
   every 10 steps) and steps to the target, mean over --seeds, on one thread.  K-FAC runs the
   settings python -m bench train uses (inverse mode, damping 1e-4, KL clip 1e-4, factor decay
   0.2, factors and inverses every 10 steps, lr 0.3), AdamW lr 0.03 (the best of Adam's sweep
   there) and its default weight decay.  Each run stops at the target or after --budget
   seconds.  Skipped with a note if mnist1d is not installed.

The "speed-up" column is torch's time over soo_ext's.  Times and ratios vary with the CPU and
its load: the machine and the load during the run are printed with them.  The full benchmarks:
python -m bench micro (every op, dtype and size), python -m bench train (every optimizer, with
learning-rate sweeps).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import soo_ext
from soo_ext import ops

from . import common, micro, train

DEFAULTS = dict(n=4_000_000, min_run_time=1.0, seeds=[0, 1, 2, 3, 4], budget=10.0)
QUICK = dict(n=20_000, min_run_time=0.05, seeds=[0], budget=0.5)
M = 10
ADAMW_LR = 0.03
RACE_CASE = "mnist1d-cnn"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="what soo_ext is for, in a minute: the fused L-BFGS direction against "
                     "torch.optim.LBFGS's, and K-FAC against AdamW in training",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=micro.parse_count, default=None,
                        help=f"length of the L-BFGS vectors (default {DEFAULTS['n']}; "
                             f"--quick: {QUICK['n']}); 4M, 100k are accepted")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help=f"seconds of timing per implementation (default "
                             f"{DEFAULTS['min_run_time']:g}; --quick: {QUICK['min_run_time']:g})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="training runs per optimizer, one per seed (default: "
                             + " ".join(map(str, DEFAULTS["seeds"])) + "; --quick: 0)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help=f"training seconds per run at most (default {DEFAULTS['budget']:g}; "
                             f"--quick: {QUICK['budget']:g})")
    parser.add_argument("--target", type=float, default=0.8,
                        help="test accuracy to reach (default: 0.8)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    return parser


def count_label(n: int) -> str:
    """4000000 -> 4M, 100000 -> 100k, 20013 -> 20,013."""
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,}"


def direction_rows(n: int, min_run_time: float) -> list[dict]:
    rows = []
    for dtype in ("float32", "bf16"):
        case = micro.Case(n, M, dtype, "cpu")
        seconds = common.time_medians({"soo": lambda: case.soo_direction(False),
                                       "torch": case.torch_direction}, min_run_time, rounds=3)
        history = "bf16" if dtype == "bf16" else "fp32"
        rows.append({
            "what": f"L-BFGS direction, n = {count_label(n)}, m = {M}, {history} history",
            "soo_ext": f"{seconds['soo'] * 1e3:.3g} ms  fused op",
            "torch": f"{seconds['torch'] * 1e3:.3g} ms  torch.optim.LBFGS's (fp32)",
            "speedup": seconds["torch"] / seconds["soo"],
            "soo_ms": seconds["soo"] * 1e3, "torch_ms": seconds["torch"] * 1e3})
        del case
    return rows


def race_specs() -> tuple[train.OptimizerSpec, train.OptimizerSpec]:
    kfac = next(s for s in train.OPTIMIZERS if s.name == "soo_ext.KFAC")
    adamw = train.OptimizerSpec("torch.optim.AdamW", (ADAMW_LR,), False,
                                lambda params, lr, _: torch.optim.AdamW(params, lr=lr))
    return kfac, adamw


def race(seeds: list[int], budget_seconds: float, target: float) -> tuple[dict, list[dict]]:
    """Every seed's run of K-FAC and AdamW (seed by seed, alternating); the summary row."""
    case = next(c for c in train.CASES if c.name == RACE_CASE)
    data = case.load()
    budget = train.Budget(budget_seconds, 100_000, train.DEFAULTS["eval_every"], 1, 128)
    specs = race_specs()
    for spec in specs:  # untimed: lazy initialisation, kernel selection
        train.warm_up(case, spec, data, budget, "cpu")
    runs: dict[str, list[dict]] = {spec.name: [] for spec in specs}
    for seed in seeds:
        for spec in specs:
            run = train_to_target(case, spec, seed, data, budget, target)
            runs[spec.name].append(run)
    kfac, adamw = (summary(runs[spec.name]) for spec in specs)
    row = {"what": f"MNIST-1D CNN to {target:g} test accuracy "
                   f"({len(seeds)} seed{'s' if len(seeds) > 1 else ''}, 1 thread)",
           "soo_ext": f"{describe(kfac)}  KFAC",
           "torch": f"{describe(adamw)}  AdamW",
           "speedup": (adamw["seconds"] / kfac["seconds"]
                       if kfac["seconds"] and adamw["seconds"] else None),
           "soo_seconds": kfac["seconds"], "torch_seconds": adamw["seconds"],
           "soo_steps": kfac["steps"], "torch_steps": adamw["steps"],
           "soo_reached": kfac["reached"], "torch_reached": adamw["reached"]}
    return row, [dict(run, optimizer=name) for name, rs in runs.items() for run in rs]


def train_to_target(case, spec, seed, data, budget, target) -> dict:
    """bench train's minibatch run on one thread, stopped at the first evaluation at the target
    (or after the budget): training seconds and steps to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = case.make_model()
        trainer = train.make_trainer(spec, model, spec.lrs[0], data, budget, seed)
        seconds, accuracy = 0.0, 0.0
        while seconds < budget.seconds:
            start = time.perf_counter()
            trainer.advance()
            seconds += time.perf_counter() - start
            _, accuracy = train.evaluate(model, data)
            if accuracy >= target:
                return {"seed": seed, "time_to_target": seconds, "steps_to_target": trainer.steps,
                        "test_acc": accuracy}
        return {"seed": seed, "time_to_target": None, "steps_to_target": None,
                "test_acc": accuracy}
    finally:
        torch.set_num_threads(threads)


def summary(runs: list[dict]) -> dict:
    reached = [r for r in runs if r["time_to_target"] is not None]
    return {"reached": f"{len(reached)}/{len(runs)}",
            "seconds": statistics.fmean(r["time_to_target"] for r in reached) if reached else None,
            "steps": statistics.fmean(r["steps_to_target"] for r in reached) if reached else None}


def describe(s: dict) -> str:
    if s["seconds"] is None:
        return f"not reached ({s['reached']})"
    return f"{s['seconds']:.2f} s, {s['steps']:.0f} steps ({s['reached']})"


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    preset = QUICK if args.quick else DEFAULTS
    n = args.n or preset["n"]
    min_run_time = args.min_run_time or preset["min_run_time"]
    seeds = args.seeds or preset["seeds"]
    budget = args.budget or preset["budget"]
    env = common.environment(["cpu"])
    env.update(n=n, m=M, min_run_time=min_run_time, seeds=seeds, budget_seconds=budget,
               target=args.target, adamw_lr=ADAMW_LR, kfac_options=train.KFAC_OPTIONS)
    kernels = ("fused kernels" if ops.extension_loaded()
               else f"pure-PyTorch fallback: {ops.extension_error()}")
    print(f"soo_ext {soo_ext.__version__} ({kernels}), torch {torch.__version__}")
    print(f"1/2: the L-BFGS direction, n = {count_label(n)}, m = {M} ...", flush=True)
    records = direction_rows(n, min_run_time)
    runs = []
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        print("2/2: skipped: the training race needs the mnist1d package (make setup installs it)")
    else:
        print(f"2/2: K-FAC and AdamW on the MNIST-1D CNN, seeds {' '.join(map(str, seeds))} ...",
              flush=True)
        row, runs = race(seeds, budget, args.target)
        records.append(row)
    common.print_table(records, {"what": "", "soo_ext": "soo_ext", "torch": "torch",
                                 "speedup": "x torch"},
                       "soo_ext against torch (x torch: torch's time / soo_ext's)")
    print("direction: median time of one call.  Race: training seconds (and steps) to the first "
          "evaluation\nat the target, mean over the seeds that reached it (reached/seeds).")
    if args.json:
        common.write_json(args.json, "demo", env, records + runs)
    return records + runs, env
