"""python -m bench bfgs: soo_ext.BFGS against scipy's BFGS, in closure evaluations to the same optimum.

Every solver minimises the same float64 function from the same start, with gradients by torch
autograd, to a gradient tolerance --gtol (max|g|, default 1e-10: at or below the rounding floor of
these problems, so runs end where float64 stops making progress):
  soo_ext.BFGS         line_search_fn='strong_wolfe', tolerance_grad=gtol, tolerance_change=0,
                       max_iter=--max-iter, one step() call
  scipy BFGS           scipy.optimize.minimize(method='BFGS', jac=True, gtol=gtol) (norm inf),
                       only when scipy is installed
  torch.optim.LBFGS    the same options as soo_ext.BFGS with history_size=--max-iter (never
                       forgets a pair: the limited-memory method at its best, as a reference)

Problems (float64):
  breast-cancer      logistic regression on scikit-learn's bundled breast-cancer data (569 x 30,
                     features standardised), mean binary cross-entropy + 5e-4 |w|^2 (bias not
                     regularised), 31 params, from 0 (issue 19's problem)
  breast-cancer-sum  the same with the summed cross-entropy: 569 times less regularised
                     relative to the data term (condition ~1e6), where the initial scale of the
                     inverse-Hessian approximation matters
  rosenbrock-N       sum 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2, N = 2, 10, 30, 100, from
                     (-1.2, 1, -1.2, 1, ...); for N >= 4 there is a second (local) minimiser near
                     (-1, 1, ..., 1), f = 3.98..., and solvers may end in either
  digits-softmax     softmax regression on scikit-learn's 8x8 digits (1797 x 64, pixels / 16),
                     mean cross-entropy + 1e-3 |W|^2, 650 params, from 0

Columns: closure evaluations (each returns loss and gradient; scipy's nfev), iterations,
evaluations / scipy's on the same problem, the final loss, its excess over the lowest final loss
of the solvers on that problem (0 to rounding: the same minimum), max|g| (both recomputed at the
returned point), wall-clock seconds of the run (median of --repeat runs).  --json: one record
per (problem, solver) with those fields, the solver's stop reason and max|x - x_scipy|.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, NamedTuple

import torch

import soo_ext

from . import common

SOO = "soo_ext.BFGS"
SCIPY = "scipy BFGS"
TORCH = "torch.optim.LBFGS"
SOLVERS = (SOO, SCIPY, TORCH)


class Problem(NamedTuple):
    loss: Callable[[torch.Tensor], torch.Tensor]  # flat float64 params -> scalar loss
    x0: torch.Tensor


def logistic_regression(l2: float = 5e-4, reduction: str = "mean") -> Problem:
    """Breast-cancer logistic regression: params [w (30), b]; ``l2 |w|^2`` on the weights."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    X = torch.tensor(features, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    t = torch.tensor(labels, dtype=torch.float64)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:-1], theta[-1]
        return (torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, t,
                                                                     reduction=reduction)
                + l2 * w.pow(2).sum())
    return Problem(loss, torch.zeros(X.shape[1] + 1, dtype=torch.float64))


def rosenbrock(n: int) -> Problem:
    def loss(x: torch.Tensor) -> torch.Tensor:
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
    x0 = torch.full((n,), -1.2, dtype=torch.float64)
    x0[1::2] = 1.0
    return Problem(loss, x0)


def softmax_regression(l2: float = 1e-3) -> Problem:
    """Digits softmax regression: params [W (64 x 10), b (10)]; ``l2 |W|^2``."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    X = torch.tensor(features / 16.0, dtype=torch.float64)
    y = torch.tensor(labels)

    def loss(theta: torch.Tensor) -> torch.Tensor:
        W, b = theta[:640].reshape(64, 10), theta[640:]
        return torch.nn.functional.cross_entropy(X @ W + b, y) + l2 * W.pow(2).sum()
    return Problem(loss, torch.zeros(650, dtype=torch.float64))


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "breast-cancer": logistic_regression,
    "breast-cancer-sum": lambda: logistic_regression(reduction="sum"),
    "rosenbrock-2": lambda: rosenbrock(2),
    "rosenbrock-10": lambda: rosenbrock(10),
    "rosenbrock-30": lambda: rosenbrock(30),
    "rosenbrock-100": lambda: rosenbrock(100),
    "digits-softmax": softmax_regression,
}
QUICK_PROBLEMS = ["breast-cancer", "rosenbrock-2"]


class Result(NamedTuple):
    evaluations: int
    iterations: int
    x: torch.Tensor
    stop: str


def loss_and_grad(problem: Problem, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = problem.loss(x)
        (grad,) = torch.autograd.grad(loss, x)
    return loss.item(), grad


def run_torch(cls, problem: Problem, gtol: float, max_iter: int, **kwargs) -> Result:
    """One ``step()`` of a torch-style quasi-Newton optimizer to ``tolerance_grad=gtol``."""
    x = problem.x0.clone().requires_grad_(True)
    opt = cls([x], line_search_fn="strong_wolfe", tolerance_grad=gtol, tolerance_change=0.0,
              max_iter=max_iter, **kwargs)
    count = [0]

    def closure():
        count[0] += 1
        opt.zero_grad()
        loss = problem.loss(x)
        loss.backward()
        return loss
    opt.step(closure)
    iterations = opt.state[x]["n_iter"]
    grad_max = loss_and_grad(problem, x)[1].abs().max().item()
    stop = ("tolerance_grad" if grad_max <= gtol else "max_iter" if iterations >= max_iter
            else "no further progress in float64")
    return Result(count[0], iterations, x.detach(), stop)


def run_soo(problem: Problem, gtol: float, max_iter: int) -> Result:
    return run_torch(soo_ext.BFGS, problem, gtol, max_iter)


def run_lbfgs(problem: Problem, gtol: float, max_iter: int) -> Result:
    return run_torch(torch.optim.LBFGS, problem, gtol, max_iter, history_size=max_iter)


def run_scipy(problem: Problem, gtol: float, max_iter: int) -> Result:
    import numpy as np
    from scipy.optimize import minimize

    count = [0]

    def fun(x):
        count[0] += 1
        loss, grad = loss_and_grad(problem, torch.from_numpy(x))
        return loss, grad.numpy()
    result = minimize(fun, problem.x0.numpy(), jac=True, method="BFGS",
                      options={"gtol": gtol, "maxiter": max_iter, "norm": np.inf})
    return Result(count[0], int(result.nit), torch.from_numpy(result.x), str(result.message))


RUNNERS = {SOO: run_soo, SCIPY: run_scipy, TORCH: run_lbfgs}


def scipy_available() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bfgs", help="soo_ext.BFGS vs scipy's BFGS: closure evaluations to the same optimum",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=None,
                        help="problems (default: all; --quick: " + " ".join(QUICK_PROBLEMS) + ")")
    parser.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=list(SOLVERS),
                        metavar="SOLVER", help="solvers (default: all; scipy only if installed)")
    parser.add_argument("--gtol", type=float, default=1e-10,
                        help="gradient tolerance, max|g| (default 1e-10)")
    parser.add_argument("--max-iter", type=int, default=10_000,
                        help="iteration limit of every solver (default 10000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per solver and problem, for the median wall time (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="two small problems, one run each (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    return parser


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    problems = args.problems or (QUICK_PROBLEMS if args.quick else list(PROBLEMS))
    repeat = 1 if args.quick else max(1, args.repeat)
    solvers = [s for s in args.solvers if s != SCIPY or scipy_available()]
    env = common.environment(["cpu"])
    env.update(problems=problems, solvers=solvers, gtol=args.gtol, max_iter=args.max_iter,
               repeat=repeat, scipy_found=scipy_available(), dtype="float64")
    if SCIPY in args.solvers and SCIPY not in solvers:
        print("scipy is not installed: scipy BFGS is left out")
    records = []
    try:
        for name in problems:
            problem = PROBLEMS[name]()
            results = {}
            for solver in solvers:
                seconds = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    result = RUNNERS[solver](problem, args.gtol, args.max_iter)
                    seconds.append(time.perf_counter() - start)
                results[solver] = (result, statistics.median(seconds))
            reference = results.get(SCIPY, (None,))[0]
            final = {solver: loss_and_grad(problem, result.x)
                     for solver, (result, _) in results.items()}
            best = min(loss for loss, _ in final.values())
            for solver, (result, seconds) in results.items():
                loss, grad = final[solver]
                records.append({
                    "problem": name, "n_params": problem.x0.numel(), "solver": solver,
                    "evaluations": result.evaluations, "iterations": result.iterations,
                    "loss": loss, "loss_above_best": loss - best,
                    "grad_max": grad.abs().max().item(), "seconds": seconds,
                    "evals_vs_scipy": (result.evaluations / reference.evaluations
                                       if reference is not None else None),
                    "distance_to_scipy": ((result.x - reference.x).abs().max().item()
                                          if reference is not None else None),
                    "stop": result.stop})
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (python -m bench): report what was measured
        common.note_interrupted(env, "bfgs")
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    common.print_table(
        records, {"problem": "problem", "n_params": "params", "solver": "solver",
                  "evaluations": "evals", "iterations": "iters",
                  "evals_vs_scipy": "x scipy evals", "loss": "final loss",
                  "loss_above_best": "- best loss", "grad_max": "max|g|", "seconds": "s"},
        f"Quasi-Newton solvers to max|g| <= {env['gtol']:g} (float64, cpu: "
        f"{env['devices']['cpu']}; wall time: median of {env['repeat']} run(s))")
    if args.json:
        common.write_json(args.json, "bfgs", env, records)
