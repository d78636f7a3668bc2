"""python -m bench step: a full soo_ext.LBFGS iteration against torch.optim.LBFGS.

Both optimizers run the same problem from the same start, without line search (fixed step
t = lr = 1, one closure evaluation per iteration) and with zero tolerances, so that every
iteration does the same work.  At least m + 2 untimed iterations first fill the history; then
each timed step() call runs --iters-per-step iterations, and the median time per iteration
(over the timed calls) is reported.  The optimizers' timed calls are interleaved, so that noise
on a shared machine hits them alike.

Problems:
  quadratic  f(x) = 1/2 sum c_i (x_i - 1)^2 over one vector of n entries, c log-uniform in
             [1e-3, 1]; the gradient is set without autograd, so the closure costs only a few
             passes over x and the time is mostly the optimizer's own.
  digits-mlp an MLP 64-h-h-10 (tanh) with cross-entropy on scikit-learn's bundled digits
             (1797 images, full batch): a real, small model where the closure dominates.
Implementations: torch.optim.LBFGS; soo_ext.LBFGS with fp32 history and with bf16 history.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch
from tqdm import tqdm

from soo_ext import LBFGS

from . import common
from .micro import parse_count

DEFAULT_N = 4_000_000
QUICK_N = 20_000
# (impl, history dtype) per measured optimizer; None: the params' dtype (fp32)
OPTIMIZERS = (("torch.optim.LBFGS", None), ("soo_ext.LBFGS", None),
              ("soo_ext.LBFGS", torch.bfloat16))
Problem = tuple[list[torch.Tensor], Callable[[], torch.Tensor]]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "step", help="time a full optimizer iteration: soo_ext.LBFGS vs torch.optim.LBFGS",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_device_argument(parser)
    parser.add_argument("--n", type=parse_count, default=None,
                        help=f"length of the quadratic's vector (default: {DEFAULT_N}; "
                             f"--quick: {QUICK_N})")
    parser.add_argument("--m", type=int, default=10, help="history size (default: 10)")
    parser.add_argument("--hidden", type=int, default=None,
                        help="width of the digits MLP's hidden layers (default 256; --quick: 32)")
    parser.add_argument("--iters-per-step", type=int, default=5,
                        help="L-BFGS iterations per timed step() call (max_iter; default: 5)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed step() calls per optimizer (default 10; --quick: 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of ms/iteration per case")
    return parser


def quadratic(n: int, device: str, seed: int = 0) -> Problem:
    """1/2 sum c_i (x_i - 1)^2 from x = 0, its gradient written without autograd."""
    gen = torch.Generator(device=device).manual_seed(seed)
    curvature = torch.empty(n, device=device).uniform_(math.log(1e-3), 0.0, generator=gen).exp_()
    x = torch.zeros(n, device=device, requires_grad=True)
    x.grad = torch.zeros_like(x)

    @torch.no_grad()
    def closure() -> torch.Tensor:
        diff = x - 1.0  # the target 1 keeps x - 1 away from subnormals as x converges
        torch.mul(diff, curvature, out=x.grad)
        return 0.5 * diff.dot(x.grad)

    return [x], closure


def digits_mlp(hidden: int, device: str, seed: int = 0) -> Problem:
    """Full-batch cross-entropy of a 64-hidden-hidden-10 tanh MLP on the bundled digits."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images, dtype=torch.float32, device=device) / 16.0
    targets = torch.tensor(labels, device=device)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, 10)).to(device)

    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    return list(model.parameters()), closure


def make_optimizer(impl: str, history_dtype: torch.dtype | None, params, m: int,
                   iters_per_step: int) -> torch.optim.Optimizer:
    # One closure evaluation per iteration; the default max_eval (5/4 max_iter) cuts short
    # steps of fewer than 4 iterations.
    options = dict(lr=1.0, max_iter=iters_per_step, max_eval=iters_per_step + 1, history_size=m,
                   line_search_fn=None, tolerance_grad=0.0, tolerance_change=0.0)
    if impl == "torch.optim.LBFGS":
        return torch.optim.LBFGS(params, **options)
    return LBFGS(params, history_dtype=history_dtype, **options)


class OptimizerRun:
    """One optimizer on its own copy of the problem, and the times of its timed steps."""

    def __init__(self, impl: str, history_dtype: torch.dtype | None, problem: Problem, m: int,
                 iters_per_step: int) -> None:
        self.impl, self.history_dtype = impl, history_dtype
        self.params, self.closure = problem
        self.optimizer = make_optimizer(impl, history_dtype, self.params, m, iters_per_step)
        self.iters_per_step = iters_per_step
        self.seconds_per_iteration: list[float] = []

    def step(self, device: str, timed: bool) -> None:
        common.synchronize(device)
        start = time.perf_counter()
        self.optimizer.step(self.closure)
        common.synchronize(device)
        if timed:
            self.seconds_per_iteration.append((time.perf_counter() - start) / self.iters_per_step)

    def final_loss(self, expected_iterations: int) -> float:
        """The loss at the last iterate, after checking that every iteration was run."""
        iterations = self.optimizer.state[self.params[0]]["n_iter"]
        if iterations != expected_iterations:
            raise RuntimeError(f"{self.impl} stopped early ({iterations} of {expected_iterations} "
                               "iterations): the timings would not compare equal work")
        loss = float(self.closure().detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"{self.impl} diverged (loss {loss})")
        return loss


def measure_case(make_problem: Callable[[], Problem], device: str, m: int, iters_per_step: int,
                 repeats: int) -> list[tuple[OptimizerRun, float]]:
    """Every optimizer from the same start, with its final loss.  The timed steps of the
    optimizers are interleaved, so that slow phases of a shared machine hit them alike."""
    runs = [OptimizerRun(impl, history_dtype, make_problem(), m, iters_per_step)
            for impl, history_dtype in OPTIMIZERS]
    warmup_steps = -(-(m + 2) // iters_per_step)  # > m iterations: a full history
    for opt_run in runs:
        for _ in range(warmup_steps):
            opt_run.step(device, timed=False)
    for _ in range(repeats):
        for opt_run in runs:
            opt_run.step(device, timed=True)
    expected_iterations = (warmup_steps + repeats) * iters_per_step
    return [(opt_run, opt_run.final_loss(expected_iterations)) for opt_run in runs]


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device_list = common.devices(args.device)
    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    hidden = args.hidden or (32 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 10)
    cases = [("quadratic", lambda device: quadratic(n, device)),
             ("digits-mlp", lambda device: digits_mlp(hidden, device))]
    env = common.environment(device_list)
    env.update(iters_per_step=args.iters_per_step, repeats=repeats, line_search_fn=None)

    jobs = [(device, case) for device in device_list for case in cases]
    records = []
    for device, (case, make_problem) in tqdm(jobs, desc="step", unit="case"):
        results = measure_case(lambda: make_problem(device), device, args.m,
                               args.iters_per_step, repeats)
        torch_seconds = statistics.median(results[0][0].seconds_per_iteration)
        for opt_run, loss in results:
            seconds = statistics.median(opt_run.seconds_per_iteration)
            records.append({
                "case": case, "impl": opt_run.impl, "device": device,
                "n": sum(p.numel() for p in opt_run.params), "m": args.m,
                "history_dtype": common.dtype_name(opt_run.history_dtype
                                                   or opt_run.params[0].dtype),
                "median_ms_per_iter": seconds * 1e3, "speedup_vs_torch": torch_seconds / seconds,
                "final_loss": loss})
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    columns = {"case": "case", "impl": "impl", "device": "device", "n": "n", "m": "m",
               "history_dtype": "history dtype", "median_ms_per_iter": "median ms/iter",
               "speedup_vs_torch": "x torch.optim.LBFGS", "final_loss": "final loss"}
    title = (f"L-BFGS iteration without line search, {env['iters_per_step']} iterations per "
             f"step(), after a full history; soo_ext: "
             + ("fused kernels" if env["soo_ext"]["extension_loaded"] else "pure-PyTorch fallback"))
    common.print_table(records, columns, title)
    if args.json:
        common.write_json(args.json, "step", env, records)
    if args.plot:
        plot(records, args.plot)


def plot(records: list[dict], path: str) -> None:
    """One panel per (case, device): a bar of median ms/iteration per optimizer."""
    panels = list(dict.fromkeys((r["case"], r["device"]) for r in records))  # run order
    fig, axes = common.new_figure(len(panels))
    for ax, (case, device) in zip(axes, panels):
        rows = [r for r in records if r["case"] == case and r["device"] == device]
        labels = [f"{r['impl']}\n{r['history_dtype']} history" for r in rows]
        ax.bar(labels, [r["median_ms_per_iter"] for r in rows], color=["gray", "C0", "C1"])
        ax.set(ylabel="median ms / iteration", title=f"{case} {device} (n={rows[0]['n']})")
        ax.tick_params(axis="x", labelsize="small")
    common.save_figure(fig, path)
