"""python -m bench precond: what the preconditioners add to a training step, against SGD.

One training iteration = zero_grad, forward, cross-entropy, backward, optimizer.step() on a
minibatch of --batch-size MNIST-1D training samples (the batches cycle through a fixed shuffled
list, so data loading costs nothing).  Every optimizer trains its own copy of the model from the
same initial weights.  Per optimizer the mean time of an iteration over a whole cycle of
--cycle iterations (so that the periodic factor inversions / root computations are included
at their frequency) is measured --rounds times, after one untimed cycle; the median over the
rounds is reported, and its ratio to SGD's (the overhead: 1.0 = as cheap as SGD).  The
optimizers take their rounds in turn, so that noise on a shared machine hits them alike.

Models (bench train's MNIST-1D models, whose CNN convolves with Conv2d 1 x k kernels):
  mnist1d-mlp   Linear 40-100-100-10 (ReLU)                                 15,210 params
  mnist1d-cnn   3 convolutions (25 channels) and Linear 125-10 (ReLU)        5,210 params
  wide-mlp      Linear 40-512-512-512-10 (ReLU): larger factors (513 x 513)  552,458 params

Optimizers (frequencies: --freqs, default 1 10 100):
  SGD                    torch.optim.SGD, lr 0.1, momentum 0.9 (the baseline)
  Adam                   torch.optim.Adam, lr 1e-3
  MFAC, GGT              soo_ext.MFAC / soo_ext.GGT(params, window=32), their other defaults
                         but GGT's betas (0.6, 1.0) (a window of 32 is short for beta1 0.9):
                         every step the same work (no update frequency)
  NaturalGradient        soo_ext.NaturalGradient(model), its defaults: the S x S Woodbury
                         system of the batch's first S = 32 samples every step (no update
                         frequency)
  KFAC eigen / inverse   soo_ext.KFAC(model, lr=0.1, momentum=0.9, mode=...), factors every
                         step, inverses / eigendecompositions every F steps
  EKFAC                  soo_ext.EKFAC(model, lr=0.1, momentum=0.9), factors and scaling every
                         2 steps (its defaults), eigendecompositions every F steps
  Shampoo                soo_ext.Shampoo(params, lr=1e-3, grafting='adam'), roots every F steps
  KBFGS / KBFGS(L)       soo_ext.KBFGS(model) with its defaults (history_size None / 10), H_a
                         every F steps; its iteration is step(closure), which runs the forward
                         and backward twice (the second pass gives the BFGS pairs)
  SOAP                   soo_ext.SOAP(params) with its defaults (lr 3e-3), bases refreshed every
                         F steps
  PSGDKron               soo_ext.PSGDKron(params, lr=3e-4), factors fitted with probability 1/F
                         (its default schedule: 1 for 500 steps, then annealed to 0.03, F ~ 33)
  kron_torch Kron,       kron_torch.Kron, pytorch_optimizer.Kron, heavyball.PSGDKron (lr 3e-4,
  pytorch_optimizer Kron, update probability 1/F, their other defaults; kron-torch and
  heavyball PSGDKron     heavyball eager, see bench train): only when installed
  ASDL K-FAC             asdfghjkl's KfacGradientMaker (curvature every step, preconditioner
                         every F steps, damping 1e-2 as in bench train: at 1e-3 its float32
                         Cholesky fails) + torch.optim.SGD: only when installed
  pytorch_optimizer      pytorch_optimizer.Shampoo (preconditioning_compute_steps = F):
  Shampoo                only when installed
  pytorch_optimizer SOAP pytorch_optimizer.SOAP(params, precondition_frequency=F), its defaults:
                         only when installed
  heavyball SOAP         heavyball.SOAP with the reference's defaults (betas (0.95, 0.95),
                         shampoo_beta 0.95, max_precond_dim 10000, merge_dims False), eager
                         (heavyball.utils.compile_mode = None: its torch.compile takes minutes
                         on a CPU): only when installed
Peers run in the same process on the same model, data and batches.  A peer that raises (a
failed factorisation) is reported with its error and no time.

--json: one record per (model, optimizer, frequency): ms_per_step (median), ms_per_step_rounds,
vs_sgd; the environment lists the options and which peers were found.  --plot: a bar chart of
vs_sgd per model.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import soo_ext

from . import common, train

DEFAULTS = dict(cycle=100, rounds=3, freqs=[1, 10, 100])
# the rest are peers
OWN = ("SGD", "Adam", "MFAC", "GGT", "KFAC eigen", "KFAC inverse", "EKFAC", "Shampoo", "KBFGS",
       "KBFGS(L)", "SOAP", "PSGDKron", "NaturalGradient")
# rows without an update frequency (nothing is refreshed: the window methods work every step)
UNSCHEDULED = ("SGD", "Adam", "MFAC", "GGT", "NaturalGradient")
WINDOW = 32  # of MFAC and GGT
QUICK = dict(cycle=4, rounds=1, freqs=[1, 2])


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


MODELS = {"mnist1d-mlp": train.mnist1d_mlp, "mnist1d-cnn": train.mnist1d_cnn, "wide-mlp": wide_mlp}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "precond", help="per-step overhead of the preconditioners against SGD",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to run (default: cpu)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="models (default: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch size (default 128)")
    parser.add_argument("--freqs", nargs="+", type=int, default=None, metavar="F",
                        help="inverse / root update frequencies (default 1 10 100; --quick: 1 2)")
    parser.add_argument("--cycle", type=int, default=None,
                        help="iterations per timed cycle (default 100; --quick: 4)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed cycles per optimizer (default 3; --quick: 1)")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out ASDL and pytorch_optimizer even when installed")
    parser.add_argument("--quick", action="store_true", help="tiny cycles (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the overheads")
    return parser


def find_peers() -> dict[str, bool]:
    found = {}
    for name, module in (("asdl", "asdl"), ("pytorch_optimizer", "pytorch_optimizer"),
                         ("heavyball", "heavyball"), ("kron_torch", "kron_torch")):
        try:
            __import__(module)
            found[name] = True
        except ImportError:
            found[name] = False
    return found


class Iteration:
    """One training iteration of an optimizer on its own model copy."""

    def __init__(self, model: nn.Module, make: Callable[[nn.Module], object], asdl: bool = False):
        self.model = model
        self.optimizer = make(model)
        self.asdl = asdl

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        opt = self.optimizer
        if self.asdl:  # (SGD, grad maker): ASDL runs forward and backward itself
            sgd, gm = opt
            sgd.zero_grad()
            dummy = gm.setup_model_call(self.model, x)
            gm.setup_loss_call(F.cross_entropy, dummy, y)
            gm.forward_and_backward()
            sgd.step()
            return
        if isinstance(opt, soo_ext.KBFGS):  # torch's closure, evaluated twice a step()
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(self.model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            return
        opt.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        opt.step()


def asdl_kfac(freq: int, batch_size: int) -> Callable[[nn.Module], tuple]:
    def make(model: nn.Module):
        from asdl.precondition import KfacGradientMaker, PreconditioningConfig
        config = PreconditioningConfig(data_size=batch_size, damping=train.ASDL_DAMPING,
                                       preconditioner_upd_interval=freq, curvature_upd_interval=1)
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), KfacGradientMaker(
            model, config)
    return make


def psgd_kron_settings(f: int, peers: dict[str, bool]) -> list[tuple]:
    """PSGDKron and its installed peers, the factors fitted with probability 1/f."""
    out = [("PSGDKron", f, lambda m: soo_ext.PSGDKron(m.parameters(), lr=3e-4,
                                                      update_probability=1 / f), False)]
    if peers.get("kron_torch"):
        out.append(("kron_torch Kron", f, lambda m: train.kron_torch_kron(
            m.parameters(), 3e-4, 1 / f), False))
    if peers.get("pytorch_optimizer"):
        out.append(("pytorch_optimizer Kron", f, lambda m: __import__("pytorch_optimizer").Kron(
            m.parameters(), lr=3e-4, pre_conditioner_update_probability=1 / f), False))
    if peers.get("heavyball"):
        out.append(("heavyball PSGDKron", f, lambda m: train.heavyball_psgd_kron(
            m.parameters(), 3e-4, 1 / f), False))
    return out


def settings(freqs: list[int], batch_size: int, peers: dict[str, bool]) -> list[tuple]:
    """(optimizer name, frequency or None, factory, is_asdl)."""
    out = [("SGD", None, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), False),
           ("Adam", None, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), False),
           ("MFAC", None, lambda m: soo_ext.MFAC(m.parameters(), window=WINDOW), False),
           # beta1 0.6: at window 32 the default 0.9 leaves m's older part off the window's
           # span, amplified by 1 / eps (GGT warns; docs/ggt.md)
           ("GGT", None, lambda m: soo_ext.GGT(m.parameters(), window=WINDOW,
                                               betas=(0.6, 1.0)), False),
           ("NaturalGradient", None, lambda m: soo_ext.NaturalGradient(m), False)]
    for f in freqs:
        for mode in ("eigen", "inverse"):
            out.append((f"KFAC {mode}", f, lambda m, f=f, mode=mode: soo_ext.KFAC(
                m, lr=0.1, momentum=0.9, mode=mode, inv_update_steps=f), False))
        out.append(("EKFAC", f, lambda m, f=f: soo_ext.EKFAC(
            m, lr=0.1, momentum=0.9, inv_update_steps=f), False))
        out.append(("Shampoo", f, lambda m, f=f: soo_ext.Shampoo(
            m.parameters(), lr=1e-3, grafting="adam", precondition_frequency=f), False))
        out.append(("KBFGS", f, lambda m, f=f: soo_ext.KBFGS(m, inv_update_steps=f), False))
        out.append(("KBFGS(L)", f, lambda m, f=f: soo_ext.KBFGS(
            m, history_size=10, inv_update_steps=f), False))
        out.append(("SOAP", f, lambda m, f=f: soo_ext.SOAP(
            m.parameters(), precondition_frequency=f), False))
        if peers.get("pytorch_optimizer"):
            out.append(("pytorch_optimizer SOAP", f, lambda m, f=f: __import__(
                "pytorch_optimizer").SOAP(m.parameters(), precondition_frequency=f), False))
        if peers.get("heavyball"):
            out.append(("heavyball SOAP", f, lambda m, f=f: train.heavyball_soap(
                m.parameters(), 3e-3, precondition_frequency=f), False))
        out += psgd_kron_settings(f, peers)
        if peers.get("asdl"):
            out.append(("ASDL K-FAC", f, asdl_kfac(f, batch_size), True))
        if peers.get("pytorch_optimizer"):
            out.append(("pytorch_optimizer Shampoo", f, lambda m, f=f: __import__(
                "pytorch_optimizer").Shampoo(m.parameters(), lr=1e-3,
                                             preconditioning_compute_steps=f), False))
    return out


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device = common.devices(args.device)[0]
    preset = QUICK if args.quick else DEFAULTS
    opt = {key: getattr(args, key) if getattr(args, key) is not None else preset[key]
           for key in DEFAULTS}
    peers = {} if args.no_peers else find_peers()
    env = common.environment([device])
    env.update(batch_size=args.batch_size, models=args.models, peers=peers, **opt)
    data = train.mnist1d_data().to(device)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.x), generator=gen).to(device)
    n_batches = len(data.x) // args.batch_size
    batches = [(data.x[i], data.y[i]) for i in order[:n_batches * args.batch_size]
               .split(args.batch_size)]

    records = []
    for name in tqdm(args.models, desc="precond", unit="model"):
        torch.manual_seed(0)
        base = MODELS[name]().to(device)
        n_params = sum(p.numel() for p in base.parameters())
        runs = [(label, freq, Iteration(copy.deepcopy(base), make, asdl))
                for label, freq, make, asdl in settings(opt["freqs"], args.batch_size, peers)]
        position = [0]

        def cycle(it: Iteration) -> float:
            common.synchronize(device)
            start = time.perf_counter()
            for _ in range(opt["cycle"]):
                x, y = batches[position[0] % len(batches)]
                position[0] += 1
                it(x, y)
            common.synchronize(device)
            return (time.perf_counter() - start) / opt["cycle"]

        times = {i: [] for i in range(len(runs))}
        errors: dict[int, str] = {}
        # the first cycle is untimed: lazy state, first inversions, kernel selection
        for timed in [False] + [True] * opt["rounds"]:
            for i, (label, _, it) in enumerate(runs):
                if i in errors:
                    continue
                try:
                    seconds = cycle(it)
                except (torch.linalg.LinAlgError, ValueError) as exc:
                    if label in OWN:
                        raise
                    errors[i] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    continue
                if timed:
                    times[i].append(seconds)
        sgd = statistics.median(times[0])
        for i, (label, freq, _) in enumerate(runs):
            med = statistics.median(times[i]) if i not in errors else None
            records.append({"model": name, "n_params": n_params, "optimizer": label,
                            "update_every": freq,
                            "ms_per_step": med * 1e3 if med is not None else None,
                            "ms_per_step_rounds": [t * 1e3 for t in times[i]],
                            "vs_sgd": med / sgd if med is not None else None,
                            "error": errors.get(i), "device": device,
                            "batch_size": args.batch_size})
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    kernels = ("fused kernels" if env["soo_ext"]["extension_loaded"]
               else "pure-PyTorch fallback")
    devices = ", ".join(f"{device} ({name})" for device, name in env["devices"].items())
    common.print_table(
        [dict(r, update_every="" if r["update_every"] is None else r["update_every"],
              ms_per_step="failed" if r["error"] else r["ms_per_step"],
              vs_sgd="" if r["error"] else r["vs_sgd"]) for r in records],
        {"model": "model", "n_params": "params", "optimizer": "optimizer",
         "update_every": "inverse/root every", "ms_per_step": "ms/step", "vs_sgd": "x SGD"},
        f"Training-step time against SGD ({devices}, batch {env['batch_size']}, mean over "
        f"cycles of {env['cycle']} steps, median of {env['rounds']}; soo_ext: {kernels})")
    if args.json:
        common.write_json(args.json, "precond", env, records)
    if args.plot:
        plot(records, args.plot)


def plot(records: list[dict], path: str) -> None:
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = common.new_figure(len(models))
    for ax, model in zip(axes, models):
        rows = [r for r in records if r["model"] == model and r["vs_sgd"] is not None]
        labels = [r["optimizer"] + ("" if r["update_every"] is None
                                    else f"\n/{r['update_every']}") for r in rows]
        names = list(dict.fromkeys(r["optimizer"] for r in rows))
        ax.bar(range(len(rows)), [r["vs_sgd"] for r in rows],
               color=[f"C{names.index(r['optimizer']) % 10}" for r in rows])
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set_xticks(range(len(rows)), labels, fontsize="x-small", rotation=90)
        ax.set(yscale="log", ylabel="step time / SGD step time", title=model)
        ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, path)
