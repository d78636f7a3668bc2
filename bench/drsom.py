"""python -m bench drsom: what one soo_ext.DRSOM step costs, and how accurate its model Q is.

Models: the MNIST-1D MLP (15,210 params) and 1-D CNN (5,210 params) of ``python -m bench train``,
with mean cross-entropy on minibatches of --batch-size training samples.  The closure is
``F.cross_entropy(model(x), y)`` on the step's minibatch; it returns the loss and does not call
backward (DRSOM differentiates it itself).

(a) Cost of a step in gradient-evaluation units, per model and hvp mode ('fd', 'central',
'autograd', 'interp'; DRSOM's defaults otherwise, k = 2 directions, model= given):
  cost units     median time of opt.step(closure) / median time of one forward+backward of the
                 same closure on the same batch (loss, then torch.autograd.grad over the params,
                 as DRSOM computes its gradients).  Target for hvp='fd': <= 3.3.
  forward units  median time of one forward-only evaluation (no_grad) / the same gradient time
  grads/step     closure evaluations under grad mode per step: the base gradient, plus k ('fd')
                 or 2k ('central') finite-difference gradients; 1 for 'autograd', which adds
                 k Hessian-vector products by double backward (hvps/step), and for 'interp'
  fwd/step       forward-only closure evaluations per step (trust-region or line-search trials,
                 and for 'interp' the k (k + 1) / 2 = 3 interpolation points)
  trials/step, rejections/step, line searches/step  from DRSOM's own counters
  eval units     grads/step + fwd/step x forward units: the evaluations' share of the cost
  overhead       cost units - eval units: the optimizer's own time (ops, small solves, host
                 syncs, Python; for 'autograd' also the k double-backward products), and the
                 evaluations' own slowdown when they alternate with it (code and data no longer
                 in cache: on the MNIST-1D MLP a forward right after DRSOM's own work takes
                 ~130 us, ~93 us in a tight loop)
  x Adam step    median time of opt.step(closure) / median time of a torch.optim.Adam
                 training step (zero_grad, forward, backward, step) on a copy of the model,
                 same batches: the per-iteration comparison of the DRSOM paper's authors
                 (pydrsom: about 4-5x Adam on CIFAR-10 ResNet-18)
The steps, the gradient evaluations and the Adam steps are timed in turn (--rounds times over,
--min-run-time seconds each in all), after --warmup-steps untimed steps.  As in training, every
step takes the next minibatch of a shuffled pass over the training set (drawn before timing,
then cycled) and the steps go on from each other, so the trials per step are those of a
training run (the gradient is timed on the current batch).  Ctrl-C (SIGINT) or SIGTERM stops
the run and reports the cases measured so far (the JSON's environment: "interrupted": true).
(On one fixed batch the run soon reaches that batch's noise floor, where the trust region keeps
rejecting: not what a training step costs.)

(b) Accuracy of Q = V^T H V on one fixed minibatch drawn by the seed (V = [g, d]: the gradient
and a random direction d ~ N(0, I), as in a step whose last step is d) from finite differences
and from function values ('interp') against exact products by double backward, in float32 and
float64 (model and batch cast), over --seeds (model init, minibatch and d drawn from the
seed): the relative Frobenius error ||Q_mode - Q_autograd||_F /
||Q_autograd||_F, median and max over the seeds.  Q is built the way DRSOM builds it, with the
public fused ops: drsom_perturb to x + t v_j (t ||v_j|| = c sqrt(eps) (1 + mean|x_i|), c = 0.25
fp32 / 1 fp64, for 'fd'; eps^(1/3) (1 + mean|x_i|) and x - t v_j too for 'central':
soo_ext.curvature.drsom_models.fd_perturbation_length), a gradient there, and
drsom_reduce for the column V^T (g(x + t v_j) - g) / t (central: (g+ - g-) / 2t), ||v_j||^2
from drsom_reduce's Gram; symmetrised; x restored from x0 bit-exactly (tests check that this
is DRSOM's own Q to rounding); 'interp' as soo_ext.DRSOM documents it (drsom_update to
x + t_i v_i + t_j v_j, t_i ||v_i|| = eps^(1/4) (1 + mean|x_i|), one forward each).  Expected
relative accuracy: about sqrt(eps) for 'fd' (fp32 3.5e-4, fp64 1.5e-8), eps^(2/3) for 'central'
(fp32 2.5e-5, fp64 3.7e-11), eps^(1/4) for 'interp' (first order in t: fp32 1.9e-2,
fp64 1.2e-4).  Those
bounds hold for smooth models (checked with a tanh MLP); both MNIST-1D models use ReLU, and
where the perturbation x + t v flips the sign of pre-activations (the gradient jumps there:
a kink, not curvature) the difference quotient is off by O(1).  The fd factor c = 0.25 in
float32 keeps such flips rare (a longer step flips more, a shorter one loses digits); central
differences take a longer step twice and cross kinks often in float32.  autograd is the Hessian
of the current activation pattern.

--json: records with kind "cost" (the columns of (a), plus the medians in ms and the target)
and kind "q_accuracy" (model, dtype, hvp, rel_error_median, rel_error_max, rel_errors per seed,
expected); the environment holds the options.  --plot: cost units per model and mode, and the
Q errors (log scale).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import soo_ext
from soo_ext import ops
from soo_ext.curvature.drsom_models import (fd_perturbation_length, interp_perturbation_length,
                                            interpolated_model, interpolation_values)

from . import common, train

MODELS = {"mlp": train.mnist1d_mlp, "cnn": train.mnist1d_cnn}
HVPS = ("fd", "central", "autograd", "interp")
Q_MODES = ("fd", "central", "interp")  # Q accuracy against autograd
FD_TARGET = 3.3  # gradient-evaluation units per step, hvp='fd'
DEFAULTS = dict(min_run_time=2.0, rounds=3, seeds=[0, 1, 2, 3, 4], warmup_steps=5)
QUICK = dict(min_run_time=0.05, rounds=1, seeds=[0, 1], warmup_steps=2)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "drsom", help="DRSOM: step cost in gradient evaluations, accuracy of Q (fd/central)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to run (default: cpu)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="MNIST-1D models (default: mlp cnn)")
    parser.add_argument("--hvp", nargs="+", choices=list(HVPS), default=list(HVPS),
                        help="hvp modes whose step cost is measured (default: all)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="samples per minibatch (default: 128)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                        help="seeds of the Q accuracy (default 0 1 2 3 4; --quick: 0 1)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed DRSOM steps before timing (default 5; --quick: 2)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per measured call (default 2; --quick: 0.05)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="the step and the gradient are timed in turn, this many times over "
                             "(default 3; --quick: 1)")
    parser.add_argument("--skip-cost", action="store_true", help="only the Q accuracy")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the step cost")
    parser.add_argument("--quick", action="store_true", help="short timings, two seeds")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: cost units and Q errors")
    return parser


def fixed_batch(device: str, batch_size: int, seed: int, dtype=torch.float32):
    """A minibatch of MNIST-1D training samples drawn by the seed."""
    data = train.mnist1d_data()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x), generator=gen)[:batch_size]
    return data.x[idx].to(device=device, dtype=dtype), data.y[idx].to(device)


def make_model(name: str, seed: int, device: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- #
# (a) cost of a step

def minibatches(device: str, batch_size: int, seed: int):
    """Endless minibatches of the MNIST-1D training set, reshuffled every pass (by the seed)."""
    data = train.mnist1d_data()
    x, y = data.x.to(device), data.y.to(device)
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=gen).to(device)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[start:start + batch_size]
            yield x[idx], y[idx]


def measure_cost(name: str, hvp: str, device: str, batch_size: int, min_run_time: float,
                 rounds: int, warmup_steps: int, seed: int = 0) -> dict:
    model = make_model(name, seed, device)
    stream = minibatches(device, batch_size, seed)
    # one pass over the training set, drawn before the clock starts and then cycled: a step's
    # time is the optimizer's and its closure's, not the gathering of samples
    epoch = [next(stream) for _ in range(max(1, len(train.mnist1d_data().x) // batch_size))]
    batches = itertools.cycle(epoch)
    batch = [next(batches)]
    counts = {"grad": 0, "forward": 0}

    def loss():
        xb, yb = batch[0]
        return F.cross_entropy(model(xb), yb)

    def closure():
        counts["grad" if torch.is_grad_enabled() else "forward"] += 1
        return loss()

    # the peer: a torch.optim.Adam training step on a copy of the model, same batches
    adam_model = copy.deepcopy(model)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    opt = soo_ext.DRSOM(model.parameters(), hvp=hvp, model=model)
    params = list(model.parameters())
    steps = [0]

    def step():
        batch[0] = next(batches)
        opt.step(closure)
        steps[0] += 1

    def gradient():
        torch.autograd.grad(loss(), params)

    @torch.no_grad()
    def forward():
        loss()

    adam_batches = itertools.cycle(epoch)

    def adam_step():
        xb, yb = next(adam_batches)
        adam.zero_grad()
        F.cross_entropy(adam_model(xb), yb).backward()
        adam.step()

    for _ in range(warmup_steps):
        batch[0] = next(batches)
        opt.step(closure)
    st = opt.state[params[0]]
    keys = ("grad_evals", "trials", "rejections", "line_searches")
    before = {key: st[key] for key in keys}
    counts.update(grad=0, forward=0)
    seconds = common.time_medians({"step": step, "gradient": gradient, "forward": forward,
                                   "adam_step": adam_step}, min_run_time, rounds)
    n = steps[0]
    k = opt.param_groups[0]["directions"]
    row = {
        "kind": "cost", "model": name, "n_params": sum(p.numel() for p in params), "hvp": hvp,
        "device": device, "dtype": "float32", "batch_size": batch_size, "k": k,
        "step_ms": seconds["step"] * 1e3, "gradient_ms": seconds["gradient"] * 1e3,
        "forward_ms": seconds["forward"] * 1e3, "adam_step_ms": seconds["adam_step"] * 1e3,
        "cost_units": seconds["step"] / seconds["gradient"],
        "adam_step_units": seconds["step"] / seconds["adam_step"],
        "forward_units": seconds["forward"] / seconds["gradient"],
        "steps_timed": n,
        "grads_per_step": counts["grad"] / n, "forwards_per_step": counts["forward"] / n,
        "hvps_per_step": k if hvp == "autograd" else 0,
        **{f"{key}_per_step": (st[key] - before[key]) / n for key in keys},
        "target": FD_TARGET if hvp == "fd" else None,
    }
    row["closure_calls_per_step"] = row["grads_per_step"] + row["forwards_per_step"]
    # what the evaluations would cost at the measured gradient and forward times; the rest is
    # the optimizer's own time (its ops, the small solves, host syncs, Python) and the hvps
    row["evaluation_units"] = row["grads_per_step"] + row["forwards_per_step"] * row[
        "forward_units"]
    row["overhead_units"] = row["cost_units"] - row["evaluation_units"]
    row["meets_target"] = row["cost_units"] <= FD_TARGET if hvp == "fd" else None
    return row


# --------------------------------------------------------------------------------------------- #
# (b) accuracy of Q

def flatten_params(params: list[torch.Tensor]) -> torch.Tensor:
    """One flat buffer holding the params; each ``p.data`` becomes a view of it (as DRSOM does)."""
    x = torch.cat([p.detach().reshape(-1) for p in params])
    for p, v in zip(params, x.split([p.numel() for p in params])):
        p.data = v.view_as(p)
    return x


def flat_gradient(loss_fn, params, create_graph: bool = False):
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, create_graph=create_graph)
    return torch.cat([g.detach().reshape(-1) for g in grads]), grads


def q_autograd(loss_fn, params, V: list[torch.Tensor]) -> torch.Tensor:
    """Q = V^T H V, symmetrised, from exact Hessian-vector products (double backward)."""
    _, grads = flat_gradient(loss_fn, params, create_graph=True)
    numels = [p.numel() for p in params]
    cols = []
    for v in V:
        vs = [w.view_as(p) for w, p in zip(v.split(numels), params)]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        hv = torch.cat([h.reshape(-1) for h in hv])
        cols.append(torch.stack([torch.dot(w, hv) for w in V]))
    Q = torch.stack(cols, 1)
    return (Q + Q.T) / 2


def q_finite_difference(loss_fn, params, x: torch.Tensor, g: torch.Tensor,
                        V: list[torch.Tensor], central: bool) -> torch.Tensor:
    """Q as DRSOM's 'fd' / 'central' modes build it, on the public fused ops (x: the params'
    flat buffer, g: the gradient at x; x is restored bit-exactly)."""
    _, G, _ = ops.drsom_reduce(g, g, V, torch.ones((), dtype=x.dtype, device=x.device), True)
    ts = fd_perturbation_length(x, central) / torch.sqrt(torch.diagonal(G))
    x0 = torch.empty_like(x)
    cols = []
    for j, v in enumerate(V):
        t = ts[j]
        ops.drsom_perturb(x, x0, v, t, j == 0)
        gp, _ = flat_gradient(loss_fn, params)
        if central:
            ops.drsom_perturb(x, x0, v, -t, False)
            gm, _ = flat_gradient(loss_fn, params)
            q, _, _ = ops.drsom_reduce(gp, gm, V, 2 * t, False)
        else:
            q, _, _ = ops.drsom_reduce(gp, g, V, t, False)
        cols.append(q)
    x.copy_(x0)
    Q = torch.stack(cols, 1)
    return (Q + Q.T) / 2


@torch.no_grad()
def q_interpolated(loss_fn, x: torch.Tensor, g: torch.Tensor,
                   V: list[torch.Tensor]) -> torch.Tensor:
    """Q as DRSOM's 'interp' mode builds it (interpolation_values and interpolated_model of
    soo_ext.curvature.drsom_models, the functions DRSOM's model calls; x: the params' flat
    buffer, g: the gradient at x; x is restored bit-exactly)."""
    _, G, c = ops.drsom_reduce(g, g, V, torch.ones((), dtype=x.dtype, device=x.device), True)
    ts = interp_perturbation_length(x) / torch.sqrt(torch.diagonal(G))
    f0 = loss_fn().to(x.dtype)
    values = interpolation_values(x, x.clone(), torch.empty_like(x), V, ts,
                                  lambda: loss_fn().to(x.dtype))
    return interpolated_model(f0, values, ts, c)


def q_errors(name: str, dtype: str, seed: int, device: str, batch_size: int) -> dict[str, float]:
    """Relative Frobenius error of Q in 'fd', 'central' and 'interp' mode against 'autograd'."""
    dt = common.DTYPES[dtype][0]
    model = make_model(name, seed, device, dt)
    xb, yb = fixed_batch(device, batch_size, seed, dt)
    params = list(model.parameters())
    x = flatten_params(params)

    def loss_fn():
        return F.cross_entropy(model(xb), yb)

    g, _ = flat_gradient(loss_fn, params)
    gen = torch.Generator(device=device).manual_seed(seed)
    d = torch.randn(x.shape, generator=gen, dtype=dt, device=device)
    V = [g, d]
    exact = q_autograd(loss_fn, params, V)
    norm = torch.linalg.matrix_norm(exact)
    Qs = {mode: q_finite_difference(loss_fn, params, x, g, V, mode == "central")
          for mode in ("fd", "central")}
    Qs["interp"] = q_interpolated(loss_fn, x, g, V)
    return {mode: (torch.linalg.matrix_norm(Q - exact) / norm).item() for mode, Q in Qs.items()}


def expected_error(hvp: str, dtype: str) -> float:
    eps = torch.finfo(common.DTYPES[dtype][0]).eps
    return {"fd": math.sqrt(eps), "central": eps ** (2 / 3), "interp": eps ** 0.25}[hvp]


# --------------------------------------------------------------------------------------------- #

def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device = common.devices(args.device)[0]
    preset = QUICK if args.quick else DEFAULTS
    opt = {key: getattr(args, key) if getattr(args, key) is not None else preset[key]
           for key in DEFAULTS}
    env = common.environment([device])
    env.update(batch_size=args.batch_size, models=args.models, hvp=args.hvp,
               fd_target=FD_TARGET, **opt)

    jobs = []
    if not args.skip_cost:
        jobs += [("cost", name, hvp) for name in args.models for hvp in args.hvp]
    if not args.skip_accuracy:
        jobs += [("q", name, dtype) for name in args.models for dtype in ("float32", "float64")]
    records = []
    try:
        for kind, name, what in tqdm(jobs, desc="drsom", unit="case"):
            if kind == "cost":
                records.append(measure_cost(name, what, device, args.batch_size,
                                            opt["min_run_time"], opt["rounds"],
                                            opt["warmup_steps"]))
                continue
            per_seed = [q_errors(name, what, seed, device, args.batch_size)
                        for seed in opt["seeds"]]
            n_params = sum(p.numel() for p in MODELS[name]().parameters())
            for hvp in Q_MODES:
                errors = [e[hvp] for e in per_seed]
                records.append({
                    "kind": "q_accuracy", "model": name, "n_params": n_params, "device": device,
                    "dtype": what, "hvp": hvp, "seeds": opt["seeds"],
                    "rel_error_median": statistics.median(errors), "rel_error_max": max(errors),
                    "rel_errors": errors, "expected": expected_error(hvp, what),
                })
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (python -m bench): report what was measured
        common.note_interrupted(env, "drsom")
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    kernels = ("fused kernels" if env["soo_ext"]["extension_loaded"]
               else "pure-PyTorch fallback")
    devices = ", ".join(f"{device} ({name})" for device, name in env["devices"].items())
    cost = [r for r in records if r["kind"] == "cost"]
    if cost:
        common.print_table(
            [dict(r, meets_target={True: "yes", False: "NO", None: ""}[r["meets_target"]])
             for r in cost],
            {"model": "model", "n_params": "params", "hvp": "hvp", "step_ms": "step ms",
             "gradient_ms": "grad ms", "cost_units": "cost (grads)", "meets_target": "<= 3.3",
             "forward_units": "fwd (grads)", "evaluation_units": "eval units",
             "overhead_units": "overhead", "adam_step_units": "x Adam step",
             "grads_per_step": "grads/step",
             "forwards_per_step": "fwd/step", "hvps_per_step": "hvps/step",
             "trials_per_step": "trials/step", "rejections_per_step": "rejects/step",
             "line_searches_per_step": "line s./step"},
            f"DRSOM step cost in gradient evaluations ({devices}, fresh minibatches of "
            f"{env['batch_size']}, k = 2; soo_ext: {kernels})")
    accuracy = [r for r in records if r["kind"] == "q_accuracy"]
    if accuracy:
        common.print_table(
            accuracy,
            {"model": "model", "dtype": "dtype", "hvp": "hvp",
             "rel_error_median": "median rel. error", "rel_error_max": "max rel. error",
             "expected": "~ expected"},
            f"Accuracy of Q = V^T H V against autograd (relative Frobenius error over seeds "
            f"{env['seeds']})")
    if args.json:
        common.write_json(args.json, "drsom", env, records)
    if args.plot:
        plot(records, args.plot)


def plot(records: list[dict], path: str) -> None:
    """Left: cost units per model and hvp mode (target line for 'fd'); right: median Q error per
    model, dtype and mode (max as an error bar), log scale."""
    cost = [r for r in records if r["kind"] == "cost"]
    accuracy = [r for r in records if r["kind"] == "q_accuracy"]
    panels = [p for p in (cost, accuracy) if p]
    fig, axes = common.new_figure(max(len(panels), 1))
    ax_iter = iter(axes)
    if cost:
        ax = next(ax_iter)
        labels = [f"{r['model']}\n{r['hvp']}" for r in cost]
        ax.bar(range(len(cost)), [r["cost_units"] for r in cost],
               color=[f"C{HVPS.index(r['hvp'])}" for r in cost])
        ax.axhline(FD_TARGET, color="gray", linestyle="--", label=f"fd target {FD_TARGET}")
        ax.set_xticks(range(len(cost)), labels, fontsize="small")
        ax.set(ylabel="step time / gradient time", title="DRSOM step cost")
        ax.legend(fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    if accuracy:
        ax = next(ax_iter)
        med = [max(r["rel_error_median"], 1e-18) for r in accuracy]
        top = [max(r["rel_error_max"], 1e-18) for r in accuracy]
        ax.bar(range(len(accuracy)), med, yerr=[[0] * len(med), [t - m for t, m in zip(top, med)]],
               color=[f"C{HVPS.index(r['hvp'])}" for r in accuracy])
        ax.scatter(range(len(accuracy)), [r["expected"] for r in accuracy], marker="_", s=200,
                   color="black", label="~ expected", zorder=3)
        ax.set_xticks(range(len(accuracy)),
                      [f"{r['model']}\n{common.dtype_name(common.DTYPES[r['dtype']][0])}"
                       f"\n{r['hvp']}" for r in accuracy], fontsize="small")
        ax.set(yscale="log", ylabel="||Q - Q_autograd||_F / ||Q_autograd||_F",
               title="Accuracy of Q (median, max over seeds)")
        ax.legend(fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, path)
