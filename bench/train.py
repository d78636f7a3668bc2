"""python -m bench train: optimizers side by side on real training problems, to a target accuracy.

Data (nothing is downloaded):
  MNIST-1D   generated locally by the mnist1d package with its default arguments and data seed 42
             (the canonical set): 4000 training and 1000 test sequences of 40 floats, 10 classes.
             Generated once per process (a few seconds).
  digits     scikit-learn's bundled 8x8 digits (1797 images, pixels / 16), split 75/25
             (stratified, random_state 0): 1347 training and 450 test images, 10 classes.
  stdlib     the text of the running Python's standard library (bench/tasks.py): the .py files
             sorted by path, read until 1.5 MB, every 10th file to validation; windows of 64
             bytes (each byte's label: the next byte); ~22k training windows, and 256 validation
             windows spread over the validation text (the test set).
  docs       the prose of Python's documentation topics (pydoc_data/topics.py, what help() shows;
             bench/tasks.py): the topics' texts sorted by name, UTF-8 (~466 kB, 79 topics in
             3.11), every 10th topic to validation, as the files above (in 3.11: 7 short
             topics, 10.9 kB, 2.3 %); the same windows: 7,112 training windows, and all 170
             validation windows as the test set.

Cases (model, parameter count, default target test accuracy):
  mnist1d-mlp  Linear 40-100, ReLU, Linear 100-100, ReLU, Linear 100-10      15,210 params  0.60
  mnist1d-cnn  Conv 1->25 (k5, stride 2, pad 1), ReLU, Conv 25->25 (k3, stride 2, pad 1),
               ReLU, the same again, ReLU, flatten (25 x 5), Linear 125-10     5,210 params  0.80
               (1-D convolutions written as Conv2d with 1 x k kernels: K-FAC handles Conv2d)
  digits-mlp   Linear 64-32, tanh, Linear 32-10                               2,410 params  0.90
  mnist1d-transformer  each of the 40 floats a token: Linear 1-32 value embedding + position
               Embedding (40 x 32), 2 pre-LN nn.TransformerEncoderLayer (d 32, 4 heads, GELU
               MLP 64, no dropout, no mask), LayerNorm, mean over positions, Linear 32-10
                                                                          18,826 params  0.50
               a budget of 400 steps (no time limit: a step costs ~15x the CNN's), evaluated
               every 20 steps (train loss over 1000 training samples, spread evenly)
  mnist1d-resnet  Conv1d 1->32 (k5) + BatchNorm + ReLU, three residual blocks (conv-BN-ReLU-
               conv-BN plus the input; 32, 32, 64 channels, the third at stride 2 with a 1x1
               projection), global average pooling, Linear 64-10          52,842 params  0.97
  stdlib-lm    byte-level causal transformer: embeddings (256 bytes, 64 positions), 3 pre-LN
               nn.TransformerEncoderLayer (d 96, 4 heads, GELU MLP 384, no dropout), LayerNorm,
               Linear 96-256 (not tied); loss over every position        391,264 params
               target: validation loss (lower is better), by default the reference optimizer's
               best final one (see --protocol); minibatches of 16 windows, a budget of 600 steps
               (no time limit), evaluated every 50 steps (train loss over 256 training windows);
               the full-batch optimizers do not run on it
  docs-lm      the same transformer, smaller (d 64, 2 layers, 4 heads, GELU MLP 256) on the
               docs text                                                 137,216 params
               a step costs ~0.45x stdlib-lm's; the same protocol (validation loss, target the
               reference's best final one, 16 windows, evaluated every 50 steps), a budget of
               1200 steps (AdamW at 600 / 1200 / 2400 steps: 1.97 / 1.46 / 1.29, seed 0: the
               budget is where its gains have slowed, not where they stop)
The MNIST-1D MLP over-fits: it levels off at 0.62-0.66 test accuracy with Adam (full-batch
L-BFGS drives its training loss to 0 at about 0.58), hence its low target; the CNN passes 0.85.
digits-mlp is the case sized for dense BFGS (n^2 state: 23 MB in float32; the MNIST-1D MLP's is
0.93 GB).
Loss: mean cross-entropy; no weight decay for any optimizer in the tuned protocol, so all
minimise the same function.  Evaluations run the model in eval mode (BatchNorm's running
statistics).  Without --cases: the first three cases (--protocol tuned) or all seven (defaults).
Development and held-out cases: the MNIST-1D MLP and CNN and the digits MLP are the development
cases, where defaults were (and may be) tuned; mnist1d-resnet and stdlib-lm are held out: no
default of any optimizer was or may be chosen by a run on them, so their defaults-protocol
results are the ones that say what a new user gets (the JSON's case entry says "held_out").
mnist1d-transformer is a development case too: LayerNorm, embeddings and nn.MultiheadAttention
(what K-FAC-type methods capture or leave to their fallback step) where defaults may be tuned;
it is not in the tuned protocol's default run.  docs-lm is the development counterpart of
stdlib-lm (a token embedding, a causal LM, other text: defaults for token models are chosen on
it, never on stdlib-lm); not in the tuned protocol's default run either.

Protocols (--protocol):
  tuned      the settings and lr sweeps below (some found by sweeps on these very cases: tuned
             results, labelled as such); the ratio column is to the best Adam setting
  defaults   every optimizer with its defaults, only the lr swept: 5 values a factor sqrt(10)
             apart around its default lr (the default lr of each is given below as 'default');
             the baselines are AdamW (torch's defaults, weight decay 0.01; on the LM cases with a
             linear warm-up over 5 % of the steps and a cosine decay to 0 over the budget) and
             SGD with momentum 0.9; the ratio column is to the faster of the two, so both
             run with any --optimizers (a note says so; --no-baselines leaves them out).  The
             reference for the LM cases' targets is AdamW (tuned: Adam).  --schedule all gives
             AdamW's warm-up and decay to every minibatch optimizer stepped once a step (a
             variant, labelled in the table and the JSON; the target stays AdamW's).

Optimizers and learning-rate sweeps (tuned protocol; defaults: see 'default'):
  torch.optim.SGD     momentum 0.9, minibatch              lr 0.03, 0.1, 0.3        default 0.1
  torch.optim.Adam    default betas, minibatch             lr 0.003, 0.01, 0.03     (tuned only)
  torch.optim.AdamW   its defaults, minibatch (defaults protocol only)              default 1e-3
  AdaBelief           bench/adabelief.py (plain PyTorch, Zhuang et al. 2020): betas (0.9, 0.999),
                      eps 1e-16, no weight decay, minibatch    lr 0.003, 0.01, 0.03 (tuned only)
  soo_ext.MLBFGS      momentum L-BFGS defaults (momentum 0.9, history 10, pairs every 50
                      steps), weight_decay 0, minibatch    lr 0.03, 0.1, 0.3        default 0.1
  soo_ext.DRSOM       hvp='fd' and the other defaults (k = 2 directions, gamma 1e-6, up to 20
                      trials), model= given, minibatch: every step() evaluates its closure on
                      one minibatch (the same batch for all of the step's evaluations)
                                                           no lr (lr column: blank / null)
                      (defaults protocol: DRSOM with all its defaults)
  soo_ext.DRSOM interp  the same with hvp='interp' (Q from 3 forwards, no extra gradient), no lr
                      (tuned only)
  torch.optim.LBFGS   strong Wolfe, history 100, full batch    lr 0.1, 1                default 1
  soo_ext.LBFGS       the same options, full batch             lr 0.1, 1                default 1
  soo_ext.BFGS        strong Wolfe, full batch, where its n^2 state fits 256 MiB
                      (otherwise skipped with a note)                lr 0.1, 1          default 1
                      (the quasi-Newton ones keep strong Wolfe in the defaults protocol: their
                      documented use for these problems)
  soo_ext.KFAC        inverse mode, momentum 0.9, damping 1e-4, KL clip 1e-4, factor decay 0.2,
                      factors and inverses every 10 steps, minibatch (chosen by a sweep of ~250
                      settings on the MNIST-1D CNN; the KL clip sets every step's length there,
                      so the lr does not matter: one lr)   lr 0.3                   default 0.1
  soo_ext.EKFAC       its defaults (eigen bases: automatic, factors and scaling every 2 steps,
                      scale decay 0.75, damping and KL clip 1e-3, momentum 0.9), minibatch
                                                           lr 0.03, 0.1, 0.3        default 0.1
  soo_ext.Shampoo     Adam grafting, roots every 10 steps, its other defaults, minibatch
                                                           lr 0.003, 0.01, 0.03     default 1e-3
  soo_ext.KBFGS       its defaults (BFGS H_g, H_a every 20 steps), minibatch with torch's closure:
                      a step() call evaluates it twice on one minibatch, each counts as a step
                                                           lr 0.3, 1, 3             default 1
  soo_ext.KBFGS(L)    the same with history_size=10 (K-BFGS(L))
                                                           lr 0.3, 1, 3             default 1
  soo_ext.SOAP        its defaults (bases refreshed every 10 steps), minibatch
                                                           lr 0.001, 0.003, 0.01    default 3e-3
  soo_ext.PSGDKron    its defaults (factors fitted every 2nd step for 500 steps, then with
                      a probability annealed to a measured floor; update RMS clip 1.1), minibatch
                                                           lr 0.001, 0.003, 0.01    default 3e-3
  soo_ext.MFAC        its defaults (window 32, damping 1e-2, no momentum), minibatch
                                                           lr 0.01, 0.03, 0.1       default 0.03
  soo_ext.GGT         its defaults (window 100, betas (0.9, 1), eps 1e-4), minibatch
                                                           lr 0.03, 0.1, 0.3        default 0.1
  soo_ext.NaturalGradient  its defaults (damping 1, momentum 0.9, the Fisher of the first 32
                      samples of each minibatch: one 32 x 32 Woodbury system for all layers;
                      norms and embeddings: the 'adamw' fallback, AdamW at 1e-2),
                      minibatch                            lr 0.03, 0.1, 0.3        default 0.1
Optional peers, run in the same process when their package is installed (otherwise skipped
with a note), same models, data and budget:
  asdl.KFAC           ASDL's KfacGradientMaker (package asdfghjkl): curvature every step,
                      preconditioner every 10 steps, damping 1e-2 (it has no KL clip: at 1e-3
                      it diverges), data_size = batch size, then torch.optim.SGD momentum 0.9
                                                           lr 0.001, 0.003, 0.01 (tuned only)
  pytorch_optimizer.Shampoo  (package pytorch-optimizer) preconditioning_compute_steps 10,
                      its other defaults                   lr 0.003, 0.01, 0.03     default 1e-3
  pytorch_optimizer.SOAP  (package pytorch-optimizer) its defaults (the reference's)
                                                           lr 0.001, 0.003, 0.01    default 3e-3
  heavyball.SOAP      (package heavyball) the reference's defaults (betas (0.95, 0.95),
                      shampoo_beta 0.95, precondition_frequency 10, max_precond_dim 10000,
                      merge_dims False), eager (compile_mode None: its torch.compile takes
                      minutes on a CPU)                    lr 0.001, 0.003, 0.01    default 3e-3
  kron_torch.Kron     (package kron-torch) its defaults, eager (its torch.compile'd functions
                      run uncompiled: their compilation takes minutes on a CPU)
                                                           lr 0.001, 0.003, 0.01    default 3e-4
  pytorch_optimizer.Kron  (package pytorch-optimizer) its defaults
                                                           lr 0.001, 0.003, 0.01    default 1e-3
  heavyball.PSGDKron  (package heavyball) its defaults, eager (compile_mode None)
                                                           lr 0.001, 0.003, 0.01    default 1e-3
Minibatch optimizers draw --batch-size samples a step() call, without replacement, reshuffled
every epoch (the last incomplete batch of an epoch is dropped).  Full-batch optimizers take a closure
over the whole training set; each step() call runs up to --full-batch-iters iterations.

Budget and clock: every run of a case gets the same budget: it stops at the first evaluation
after --budget seconds of training or --max-steps steps.  A step is one gradient evaluation:
one minibatch for the minibatch optimizers, one closure call (whole training set, line-search
trials included) for the full-batch ones.  A DRSOM step() call is several: every evaluation of
its closure counts as one step, the 1 + k = 3 gradients of an 'fd' step and each forward-only
trial alike (a trial forward is counted as a whole gradient evaluation: an upper bound on its
cost, about 0.3-0.5 of one, see python -m bench drsom); so a DRSOM step() that accepts its first
trial is 4 steps, and the per-step columns stay comparable with the other optimizers.  The
runs' grad_evals and forward_evals keep the two kinds apart.  Evaluations (training loss over
the whole training set, test accuracy) run every --eval-every steps for the minibatch optimizers
(for DRSOM: after the first step() call that reaches the next multiple; a call is not cut, so it
may pass --max-steps) and after every step() call for the full-batch ones, and at step 0; the clock is paused while they run.  Each
(case, optimizer, lr) runs once per seed (--seeds): torch.manual_seed(seed) before the model is
built (so every optimizer starts from the same weights for a seed), and the seed also orders the
minibatches.  An untimed warm-up step per (case, optimizer) on a throwaway model comes first.
By default every setting above runs on the 3 cases with 3 seeds, about 10 s a run (fewer runs
when BFGS or a peer is skipped): about an hour.

Best learning rate per (case, optimizer): the most seeds reaching the target, then the smallest
mean wall-clock to target, then the best mean final metric.

Columns (mean +- sample std over seeds; time and steps to target over the seeds that reached it):
  reached        seeds whose metric reached the target at some evaluation
  s to target    training seconds (clock paused during evaluations) at the first evaluation with
                 test accuracy >= target (validation loss <= target)
  steps to tgt   steps (gradient evaluations) at that evaluation
  x Adam         s to target / that of the fastest baseline's best setting on the case (tuned:
  (x AdamW/SGD)  Adam; the goal is <= 0.8 for soo_ext.MLBFGS on MNIST-1D and soo_ext.KFAC on the
                 CNN; defaults: AdamW or SGD)
  train loss     training loss at the last evaluation
  final          test accuracy (validation loss) at the last evaluation
  ms/step        training seconds / steps (per gradient evaluation)
  epochs         training samples processed / training-set size, at the end
  diverged       seeds stopped by a non-finite loss (or, for a peer, an exception of its own:
                 a failed Cholesky/SVD or NaN probabilities; the run record keeps it as error)

--json: one record per (case, optimizer, lr): the columns' means (keys time_to_target,
steps_to_target, time_to_target_vs_baseline, final_train_loss, final_test_acc (final_val_loss
on the LM cases), ms_per_step, steps, epochs) with their std as KEY_std, metric, the per-seed numbers under runs (with grad_evals and
forward_evals), full_batch and closure (minibatch with a closure: DRSOM), best, and for the best
setting its mean curve (time, step, train_loss, and test_acc or val_loss, per evaluation; what
--plot draws).
null stands for "not reached"; NaN for a mean over seeds of which one diverged (non-finite).
The environment holds the protocol, the schedule (--schedule), its reference and baselines, the options, the cases
(n_params, n_train, n_test, metric, target, budget), the sweeps, the notes on skipped optimizers
and, with stdlib-lm or docs-lm, what text was read (Python version, files or topics, bytes).
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import soo_ext
from soo_ext import NonFiniteError

from . import common, tasks
from .adabelief import AdaBelief

MNIST1D_SEED = 42  # mnist1d's default: the canonical MNIST-1D
CURVE_KEYS = ("time", "step", "train_loss")  # and the case's metric (Case.metric)
DEFAULTS = dict(budget=10.0, max_steps=5000, eval_every=10, full_batch_iters=10)
QUICK = dict(budget=0.2, max_steps=10, eval_every=5, full_batch_iters=2)
DOCS_LM_STEPS = 1200  # docs-lm's budget in steps (why this many: the module docstring)


@dataclass(frozen=True)
class Data:
    """Training inputs and labels, test inputs and labels."""
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: str) -> "Data":
        return Data(*(t.to(device) for t in (self.x, self.y, self.x_test, self.y_test)))


@functools.lru_cache(maxsize=None)
def mnist1d_data() -> Data:
    """MNIST-1D from its generator (cached: the generation takes a few seconds)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = MNIST1D_SEED
    raw = make_dataset(args)
    return Data(torch.tensor(raw["x"], dtype=torch.float32), torch.tensor(raw["y"]),
                torch.tensor(raw["x_test"], dtype=torch.float32), torch.tensor(raw["y_test"]))


@functools.lru_cache(maxsize=None)
def digits_data() -> Data:
    """scikit-learn's digits, pixels scaled to [0, 1], a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x, x_test, y, y_test = train_test_split(images / 16.0, labels, test_size=0.25,
                                            random_state=0, stratify=labels)
    return Data(torch.tensor(x, dtype=torch.float32), torch.tensor(y),
                torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test))


def mnist1d_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def mnist1d_cnn() -> nn.Module:
    """Three convolutions over the 40-sample signal, as Conv2d with 1 x k kernels on a 1 x 40
    image: the function and initial weights of the Conv1d form (same fan-in, same draws in the
    same order), in the layer type that K-FAC implementations precondition."""
    return nn.Sequential(nn.Unflatten(1, (1, 1, 40)),
                         nn.Conv2d(1, 25, (1, 5), stride=(1, 2), padding=(0, 1)), nn.ReLU(),
                         nn.Conv2d(25, 25, (1, 3), stride=(1, 2), padding=(0, 1)), nn.ReLU(),
                         nn.Conv2d(25, 25, (1, 3), stride=(1, 2), padding=(0, 1)), nn.ReLU(),
                         nn.Flatten(), nn.Linear(25 * 5, 10))  # lengths 19, 10, 5


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def text_windows(text: Callable[[], tuple[bytes, bytes, dict]]) -> Data:
    """Windows of a text split (bench/tasks.py): all training windows; as the 'test' set
    EVAL_WINDOWS validation windows spread evenly over the validation text."""
    train_text, validation_text, _ = text()
    x, y = tasks.windows(train_text)
    x_val, y_val = tasks.windows(validation_text)
    keep = torch.linspace(0, len(x_val) - 1, min(tasks.EVAL_WINDOWS, len(x_val))).long()
    return Data(x, y, x_val[keep], y_val[keep])


@functools.lru_cache(maxsize=None)
def stdlib_lm_data() -> Data:
    """The standard library's text in windows."""
    return text_windows(tasks.stdlib_text)


@functools.lru_cache(maxsize=None)
def docs_lm_data() -> Data:
    """The documentation topics' text (pydoc_data) in windows."""
    return text_windows(tasks.docs_text)


@dataclass(frozen=True)
class Case:
    """A data set, a model, the metric and its default target, and what the case sets apart
    from the command line's budget."""
    name: str
    load: Callable[[], Data]
    make_model: Callable[[], nn.Module]
    target: float | None  # None: the reference optimizer's final metric (see targets_from)
    metric: str = "test_acc"  # 'test_acc' (reached when >= target) or 'val_loss' (<= target)
    batch_size: int | None = None  # instead of --batch-size
    max_steps: int | None = None  # a budget in steps (instead of --max-steps and --budget)
    eval_every: int | None = None  # instead of --eval-every
    train_eval: int | None = None  # the train loss over this many training samples (None: all)
    full_batch: bool = True  # the full-batch optimizers run on it
    schedule: bool = False  # the scheduled optimizers warm up and decay (see schedule, --schedule)
    # held out: no default of any optimizer may be chosen by runs on it (the development cases
    # are where defaults are tuned; see --help)
    held_out: bool = False


CASES = (Case("mnist1d-mlp", mnist1d_data, mnist1d_mlp, 0.6),
         Case("mnist1d-cnn", mnist1d_data, mnist1d_cnn, 0.8),
         Case("digits-mlp", digits_data, digits_mlp, 0.9),
         # target: AdamW (defaults protocol, 3 seeds) reaches 0.5 at 140-220 steps at lr 0.01,
         # 220-300 at 3.16e-3, and 0.45 at 80-140: 0.5 is the round value nearest half its
         # 400-step budget (a step costs ~15x the CNN's: a budget in steps, not 10 s)
         Case("mnist1d-transformer", mnist1d_data, tasks.MNIST1DTransformer, 0.5,
              max_steps=400, eval_every=20, train_eval=1000),
         # budget: where AdamW's fall in validation loss has slowed (the module docstring)
         Case("docs-lm", docs_lm_data, tasks.docs_transformer, None, metric="val_loss",
              batch_size=16, max_steps=DOCS_LM_STEPS, eval_every=50,
              train_eval=tasks.EVAL_WINDOWS, full_batch=False, schedule=True),
         Case("mnist1d-resnet", mnist1d_data, tasks.mnist1d_resnet, 0.97, held_out=True),
         Case("stdlib-lm", stdlib_lm_data, tasks.CausalTransformer, None, metric="val_loss",
              batch_size=16, max_steps=600, eval_every=50, train_eval=tasks.EVAL_WINDOWS,
              full_batch=False, schedule=True, held_out=True))
DEFAULT_CASES = ("mnist1d-mlp", "mnist1d-cnn", "digits-mlp")  # bench train without --cases


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer, its learning-rate sweep and how it is fed (minibatches or a closure)."""
    name: str
    lrs: tuple[float, ...]
    full_batch: bool
    make: Callable[..., torch.optim.Optimizer]  # (params, lr, full_batch_iters[, model])
    # minibatch optimizer fed a closure (no backward) over its minibatch, made with model=
    closure: bool = False
    # minibatch optimizer fed torch's closure (zero_grad, loss, backward) over its minibatch,
    # made from the model: K-BFGS (two evaluations a step() call)
    backward_closure: bool = False
    # made from the model (make gets it as a 4th argument): K-FAC hooks its layers
    takes_model: bool = False
    # ASDL: make(params, lr, batch_size, model) returns (optimizer, grad maker); the grad maker
    # runs forward and backward
    asdl: bool = False
    # an optional peer: its own failures (a failed factorisation, NaN probabilities) end the run
    # as diverged instead of the benchmark
    peer: bool = False
    # --protocol defaults: the documented default lr (the sweep's centre; None: no lr) and the
    # maker with every other option at its default (None: make is that already)
    default_lr: float | None = None
    make_default: Callable[..., torch.optim.Optimizer] | None = None
    protocols: tuple[str, ...] = ("tuned", "defaults")
    # warm-up and cosine decay on the cases that use a schedule (every minibatch optimizer
    # stepped once a step with --schedule all)
    scheduled: bool = False


def _strong_wolfe(make: Callable[..., torch.optim.Optimizer]) -> Callable:
    return lambda params, lr, iters: make(params, lr=lr, max_iter=iters,
                                          line_search_fn="strong_wolfe")


# Dense BFGS moves 3 n^2 elements an iteration: run it where that stays small next to the
# closure (digits-mlp, mnist1d-cnn), not on the 15k-parameter MLP (0.93 GB of state).
BFGS_MAX_STATE_BYTES = 256 * 2**20

# K-FAC and Shampoo: preconditioners recomputed every this many steps
PRECONDITION_EVERY = 10
# soo_ext.KFAC's settings, from a sweep on the MNIST-1D CNN (modes, damping 1e-4..1e-1, KL clip
# 1e-4..1e-2 and none, lr 0.03..1, factor decay 0.95/0.5/0.2, factors every 1 or 10 steps; 3-6
# seeds): 88 +- 8 steps to 0.8, stable over 2000 steps.  Its defaults (KAISA's: eigen, damping
# and KL clip 1e-3, decay 0.95, factors every step) need 150 steps at 1.8x the cost per step;
# damping and KL clip 1e-3 with the rest as here take ~100.  Factors every 10 steps need a short
# running average (0.95 over updates 10 steps apart is slow), hence decay 0.2.
KFAC_OPTIONS = dict(momentum=0.9, mode="inverse", damping=1e-4, kl_clip=1e-4, factor_decay=0.2,
                    factor_update_steps=PRECONDITION_EVERY, inv_update_steps=PRECONDITION_EVERY)


def _peer(module: str):
    """An optional peer package, or ValueError (the run is skipped with this note)."""
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"{module} is not installed (optional peer)") from None


# ASDL's K-FAC has no KL clip: with soo_ext.KFAC's damping 1e-3 its steps blow up (NaN
# probabilities at lr 0.003-0.1 within 40 steps) and fp32 Cholesky fails on rank-deficient
# factors; damping 1e-2 without a running average and lower learning rates are what it survives.
ASDL_DAMPING = 1e-2


def heavyball_soap(params, lr, precondition_frequency=PRECONDITION_EVERY):
    """heavyball's SOAP with the reference's defaults, eager (no torch.compile)."""
    heavyball = _peer("heavyball")
    heavyball.utils.compile_mode = None
    return heavyball.SOAP(params, lr=lr, betas=(0.95, 0.95), shampoo_beta=0.95,
                          precondition_frequency=precondition_frequency, max_precond_dim=10000,
                          merge_dims=False)


def kron_torch_kron(params, lr, update_probability=None):
    """kron-torch's Kron (PSGD-Kron), its defaults, eager: its torch.compile'd functions run
    uncompiled (their compilation takes minutes on a CPU), as heavyball's below."""
    kron = _peer("kron_torch").kron
    for name in ("_update_precond", "_precond_grad", "_clip_update_rms", "_balance_Q"):
        f = getattr(kron, name)
        setattr(kron, name, getattr(f, "_torchdynamo_orig_callable", f))
    return kron.Kron(params, lr=lr, preconditioner_update_probability=update_probability)


def heavyball_psgd_kron(params, lr, update_probability=None):
    """heavyball's PSGDKron, its defaults (its own update schedule unless given), eager."""
    heavyball = _peer("heavyball")
    heavyball.utils.compile_mode = None
    extra = {} if update_probability is None else {
        "preconditioner_update_probability": update_probability}
    return heavyball.PSGDKron(params, lr=lr, **extra)


def _asdl_kfac(params, lr, batch_size, model):
    _peer("asdl")
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig
    config = PreconditioningConfig(data_size=batch_size, damping=ASDL_DAMPING,
                                   curvature_upd_interval=1,
                                   preconditioner_upd_interval=PRECONDITION_EVERY)
    return torch.optim.SGD(params, lr=lr, momentum=0.9), KfacGradientMaker(model, config)


OPTIMIZERS = (
    OptimizerSpec("torch.optim.SGD", (0.03, 0.1, 0.3), False,
                  lambda params, lr, _: torch.optim.SGD(params, lr=lr, momentum=0.9),
                  default_lr=0.1),
    OptimizerSpec("torch.optim.Adam", (3e-3, 1e-2, 3e-2), False,
                  lambda params, lr, _: torch.optim.Adam(params, lr=lr), protocols=("tuned",)),
    OptimizerSpec("torch.optim.AdamW", (1e-3,), False,
                  lambda params, lr, _: torch.optim.AdamW(params, lr=lr), default_lr=1e-3,
                  protocols=("defaults",), scheduled=True),
    OptimizerSpec("AdaBelief", (3e-3, 1e-2, 3e-2), False,
                  lambda params, lr, _: AdaBelief(params, lr=lr), protocols=("tuned",)),
    OptimizerSpec("soo_ext.MLBFGS", (0.03, 0.1, 0.3), False,
                  lambda params, lr, _: soo_ext.MLBFGS(params, lr=lr), default_lr=0.1),
    OptimizerSpec("soo_ext.DRSOM", (None,), False,
                  lambda params, lr, _, model: soo_ext.DRSOM(params, hvp="fd", model=model),
                  closure=True,
                  make_default=lambda params, lr, _, model: soo_ext.DRSOM(params, model=model)),
    OptimizerSpec("soo_ext.DRSOM interp", (None,), False,
                  lambda params, lr, _, model: soo_ext.DRSOM(params, hvp="interp", model=model),
                  closure=True, protocols=("tuned",)),
    OptimizerSpec("torch.optim.LBFGS", (0.1, 1.0), True, _strong_wolfe(torch.optim.LBFGS),
                  default_lr=1.0),
    OptimizerSpec("soo_ext.LBFGS", (0.1, 1.0), True, _strong_wolfe(soo_ext.LBFGS),
                  default_lr=1.0),
    OptimizerSpec("soo_ext.BFGS", (0.1, 1.0), True,
                  _strong_wolfe(lambda *args, **kw: soo_ext.BFGS(
                      *args, max_state_bytes=BFGS_MAX_STATE_BYTES, **kw)), default_lr=1.0),
    OptimizerSpec("soo_ext.KFAC", (0.3,), False,
                  lambda params, lr, _, model: soo_ext.KFAC(model, lr=lr, **KFAC_OPTIONS),
                  takes_model=True, default_lr=0.1,
                  make_default=lambda params, lr, _, model: soo_ext.KFAC(model, lr=lr)),
    OptimizerSpec("soo_ext.EKFAC", (0.03, 0.1, 0.3), False,
                  lambda params, lr, _, model: soo_ext.EKFAC(model, lr=lr),
                  takes_model=True, default_lr=0.1),
    OptimizerSpec("soo_ext.Shampoo", (3e-3, 1e-2, 3e-2), False,
                  lambda params, lr, _: soo_ext.Shampoo(
                      params, lr=lr, grafting="adam", precondition_frequency=PRECONDITION_EVERY),
                  default_lr=1e-3,
                  make_default=lambda params, lr, _: soo_ext.Shampoo(params, lr=lr)),
    OptimizerSpec("soo_ext.KBFGS", (0.3, 1.0, 3.0), False,
                  lambda params, lr, _, model: soo_ext.KBFGS(model, lr=lr),
                  backward_closure=True, default_lr=1.0),
    OptimizerSpec("soo_ext.KBFGS(L)", (0.3, 1.0, 3.0), False,
                  lambda params, lr, _, model: soo_ext.KBFGS(model, lr=lr, history_size=10),
                  backward_closure=True, default_lr=1.0),
    OptimizerSpec("soo_ext.SOAP", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: soo_ext.SOAP(params, lr=lr), default_lr=3e-3),
    OptimizerSpec("soo_ext.PSGDKron", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: soo_ext.PSGDKron(params, lr=lr), default_lr=3e-3),
    OptimizerSpec("soo_ext.MFAC", (0.01, 0.03, 0.1), False,
                  lambda params, lr, _: soo_ext.MFAC(params, lr=lr), default_lr=0.03),
    OptimizerSpec("soo_ext.GGT", (0.03, 0.1, 0.3), False,
                  lambda params, lr, _: soo_ext.GGT(params, lr=lr), default_lr=0.1),
    OptimizerSpec("soo_ext.NaturalGradient", (0.03, 0.1, 0.3), False,
                  lambda params, lr, _, model: soo_ext.NaturalGradient(model, lr=lr),
                  takes_model=True, default_lr=0.1),
    OptimizerSpec("kron_torch.Kron", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: kron_torch_kron(params, lr), peer=True, default_lr=3e-4),
    OptimizerSpec("pytorch_optimizer.Kron", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: _peer("pytorch_optimizer").Kron(params, lr=lr),
                  peer=True, default_lr=1e-3),
    OptimizerSpec("heavyball.PSGDKron", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: heavyball_psgd_kron(params, lr), peer=True,
                  default_lr=1e-3),
    OptimizerSpec("asdl.KFAC", (1e-3, 3e-3, 1e-2), False, _asdl_kfac, takes_model=True,
                  asdl=True, peer=True, protocols=("tuned",)),
    OptimizerSpec("pytorch_optimizer.Shampoo", (3e-3, 1e-2, 3e-2), False,
                  lambda params, lr, _: _peer("pytorch_optimizer").Shampoo(
                      params, lr=lr, preconditioning_compute_steps=PRECONDITION_EVERY),
                  peer=True, default_lr=1e-3,
                  make_default=lambda params, lr, _: _peer("pytorch_optimizer").Shampoo(
                      params, lr=lr)),
    OptimizerSpec("pytorch_optimizer.SOAP", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: _peer("pytorch_optimizer").SOAP(params, lr=lr),
                  peer=True, default_lr=3e-3),
    OptimizerSpec("heavyball.SOAP", (1e-3, 3e-3, 1e-2), False,
                  lambda params, lr, _: heavyball_soap(params, lr), peer=True, default_lr=3e-3),
)
ADAM = "torch.optim.Adam"
ADAMW = "torch.optim.AdamW"
SGD = "torch.optim.SGD"
MLBFGS = "soo_ext.MLBFGS"
# per protocol: the optimizer whose final metric sets a case's target when the case has none
# (the best over its lrs), and the baselines of the ratio columns (the best of them)
REFERENCE = {"tuned": ADAM, "defaults": ADAMW}
BASELINES = {"tuned": (ADAM,), "defaults": (ADAMW, SGD)}
WARMUP = 0.05  # of the steps, for the scheduled baseline


def lr_sweep(centre: float | None) -> tuple[float | None, ...]:
    """--protocol defaults: 5 log-spaced values, a factor sqrt(10) apart, around ``centre``."""
    if centre is None:
        return (None,)
    return tuple(float(f"{centre * 10 ** (k / 2):.3g}") for k in (-2, -1, 0, 1, 2))


def protocol_specs(protocol: str) -> list[OptimizerSpec]:
    """The optimizers of a protocol, as they run in it (defaults: the lr sweep around the
    default lr, the defaults maker)."""
    specs = [spec for spec in OPTIMIZERS if protocol in spec.protocols]
    if protocol == "tuned":
        return specs
    return [replace(spec, lrs=lr_sweep(spec.default_lr), make=spec.make_default or spec.make)
            for spec in specs]


def schedule(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over WARMUP of the steps, then cosine decay to 0 (a LambdaLR factor)."""
    warmup = max(1, round(WARMUP * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass(frozen=True)
class Budget:
    """What every run gets, and how often it is evaluated (see the module docstring)."""
    seconds: float
    max_steps: int
    eval_every: int
    full_batch_iters: int
    batch_size: int


def parse_target(text: str) -> tuple[str | None, float]:
    """``0.7`` (every accuracy case) or ``CASE=0.7`` (one case; an LM case: a validation loss)."""
    name, _, value = text.rpartition("=")
    case = next((c for c in CASES if c.name == name), None)
    if name and case is None:
        raise argparse.ArgumentTypeError(f"unknown case {name!r}")
    try:
        target = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if case is not None and case.metric == "val_loss":
        if not 0 < target < math.inf:
            raise argparse.ArgumentTypeError(f"target loss must be positive, got {target}")
    elif not 0 < target <= 1:
        raise argparse.ArgumentTypeError(f"target accuracy must be in (0, 1], got {target}")
    return name or None, target


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train real models with each optimizer: wall-clock to a target accuracy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to train (default: cpu)")
    parser.add_argument("--protocol", choices=["tuned", "defaults"], default="tuned",
                        help="tuned: the settings and lr sweeps above; defaults: every optimizer "
                             "with its defaults, only the lr swept (see above) (default: tuned)")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES],
                        default=None, metavar="CASE",
                        help="cases to run: " + ", ".join(c.name for c in CASES)
                             + " (default: tuned: " + " ".join(DEFAULT_CASES) + "; defaults: "
                             "all)")
    parser.add_argument("--optimizers", nargs="+", choices=[o.name for o in OPTIMIZERS],
                        default=None, metavar="NAME",
                        help="optimizers to run: " + ", ".join(o.name for o in OPTIMIZERS)
                             + " (default: all of the protocol; --protocol defaults adds its "
                               "baselines, " + " and ".join(BASELINES["defaults"]) + ")")
    parser.add_argument("--schedule", choices=["baseline", "all"], default="baseline",
                        help="on the cases that use a schedule (the LM cases): baseline: AdamW alone "
                             "warms up and decays (the protocol's setting); all: every minibatch "
                             "optimizer stepped once a step does (not DRSOM, K-BFGS, ASDL: they "
                             "keep their lr), a separate, labelled variant (default: baseline)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="--protocol defaults with --optimizers: run only the optimizers "
                             "listed, not the baselines (the ratio column stays empty)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                        help="one run per seed and setting (default: 0 1 2)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="minibatch size of the minibatch optimizers (default: 128; "
                             "the LM cases: 16 windows)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help=f"training seconds per run (default {DEFAULTS['budget']:g}; "
                             f"--quick: {QUICK['budget']:g})")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"gradient evaluations per run at most (default "
                             f"{DEFAULTS['max_steps']}; --quick: {QUICK['max_steps']})")
    parser.add_argument("--eval-every", type=int, default=None, metavar="K",
                        help=f"evaluate every K minibatch steps (default "
                             f"{DEFAULTS['eval_every']}; --quick: {QUICK['eval_every']})")
    parser.add_argument("--full-batch-iters", type=int, default=None, metavar="K",
                        help=f"max_iter of the full-batch optimizers: iterations per step() call, "
                             f"evaluated after each call (default {DEFAULTS['full_batch_iters']}; "
                             f"--quick: {QUICK['full_batch_iters']})")
    parser.add_argument("--target", nargs="+", type=parse_target, default=[],
                        metavar="[CASE=]ACC",
                        help="target test accuracy (LM cases: validation loss), for every case "
                             "or for one (default: " + ", ".join(
                                 f"{c.name}={c.target:g}" for c in CASES if c.target)
                             + "; LM cases: the reference optimizer's)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG: loss and accuracy against time and steps per case")
    return parser


def first_crossing(times: Sequence[float], steps: Sequence[int], values: Sequence[float],
                   target: float, lower_is_better: bool = False) -> tuple[float, int] | None:
    """(time, steps) at the first evaluation whose metric reaches the target (accuracy >=
    target, or a loss <= target); None if there is none."""
    for t, step, value in zip(times, steps, values):
        if (value <= target) if lower_is_better else (value >= target):
            return t, step
    return None


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, metric: str = "test_acc",
             train_eval: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy over the training set (the first ``train_eval`` samples, spread
    evenly; None: all), and the metric on the test set: accuracy, or (val_loss) the mean
    cross-entropy.  In eval mode (BatchNorm's running statistics), back to train mode after."""
    was_training = model.training
    model.eval()
    x, y = data.x, data.y
    if train_eval is not None and train_eval < len(x):
        keep = torch.linspace(0, len(x) - 1, train_eval, device=x.device).long()
        x, y = x[keep], y[keep]
    train_loss = F.cross_entropy(model(x), y).item()
    logits = model(data.x_test)
    value = (F.cross_entropy(logits, data.y_test).item() if metric == "val_loss"
             else (logits.argmax(1) == data.y_test).float().mean().item())
    model.train(was_training)
    return train_loss, value


class MinibatchTrainer:
    """``advance()`` takes up to ``eval_every`` minibatch steps (fewer at the step cap)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Data,
                 budget: Budget, seed: int,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        self.model, self.optimizer, self.data, self.budget = model, optimizer, data, budget
        self.scheduler = scheduler
        self.steps = 0
        self.samples = 0  # training samples drawn
        self.generator = torch.Generator(device=data.x.device).manual_seed(seed)
        self.batches: list[torch.Tensor] = []

    def next_batch(self) -> torch.Tensor:
        if not self.batches:
            n = len(self.data.x)
            order = torch.randperm(n, generator=self.generator, device=self.data.x.device)
            whole = n // self.budget.batch_size * self.budget.batch_size
            self.batches = list(order[:whole].split(self.budget.batch_size))[::-1]
        self.samples += self.budget.batch_size
        return self.batches.pop()

    @property
    def grad_evals(self) -> int:
        return self.steps

    forward_evals = 0

    def advance(self) -> None:
        for _ in range(min(self.budget.eval_every, self.budget.max_steps - self.steps)):
            idx = self.next_batch()
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(self.data.x[idx]), self.data.y[idx]).backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.steps += 1


class ClosureMinibatchTrainer(MinibatchTrainer):
    """DRSOM on minibatches: ``advance()`` makes step() calls, each with a closure over one
    minibatch (the loss, no backward), until ``eval_every`` more steps have been counted (or the
    step cap).  Every closure evaluation counts as a step: gradients (grad mode) and forward-only
    trials (no_grad) alike."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts = {"grad": 0, "forward": 0}

    @property
    def grad_evals(self) -> int:
        return self.counts["grad"]

    @property
    def forward_evals(self) -> int:
        return self.counts["forward"]

    def advance(self) -> None:
        stop = min(self.steps + self.budget.eval_every, self.budget.max_steps)
        while self.steps < stop:
            idx = self.next_batch()
            self.optimizer.step(self.closure(self.data.x[idx], self.data.y[idx]))

    def closure(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The loss over the minibatch (x, y), counted as a gradient or a forward evaluation."""
        def closure() -> torch.Tensor:
            self.counts["grad" if torch.is_grad_enabled() else "forward"] += 1
            self.steps += 1
            return F.cross_entropy(self.model(x), y)
        return closure


class BackwardClosureTrainer(ClosureMinibatchTrainer):
    """K-BFGS on minibatches: ``advance()`` makes step() calls, each with torch's closure
    (zero_grad, loss, backward) over one minibatch, until ``eval_every`` more steps have been
    counted (or the step cap); every closure evaluation counts as a step (K-BFGS: 2 a call)."""

    def closure(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            self.counts["grad"] += 1
            self.steps += 1
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            return loss
        return closure


class AsdlTrainer(MinibatchTrainer):
    """ASDL's K-FAC: its grad maker runs forward and backward (capturing the statistics and
    preconditioning the gradients), then the optimizer steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Data,
                 budget: Budget, seed: int, grad_maker) -> None:
        super().__init__(model, optimizer, data, budget, seed)
        self.grad_maker = grad_maker

    def advance(self) -> None:
        for _ in range(min(self.budget.eval_every, self.budget.max_steps - self.steps)):
            idx = self.next_batch()
            self.optimizer.zero_grad()
            dummy = self.grad_maker.setup_model_call(self.model, self.data.x[idx])
            self.grad_maker.setup_loss_call(F.cross_entropy, dummy, self.data.y[idx])
            self.grad_maker.forward_and_backward()
            self.optimizer.step()
            self.steps += 1


class FullBatchTrainer:
    """``advance()`` is one ``step(closure)`` call; every closure call counts as a step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Data) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.steps = 0

    @property
    def samples(self) -> int:
        return self.steps * len(self.data.x)

    @property
    def grad_evals(self) -> int:
        return self.steps

    forward_evals = 0

    def closure(self) -> torch.Tensor:
        self.steps += 1
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(self.data.x), self.data.y)
        loss.backward()
        return loss

    def advance(self) -> None:
        self.optimizer.step(self.closure)


def make_trainer(spec: OptimizerSpec, model: nn.Module, lr: float, data: Data, budget: Budget,
                 seed: int, scheduled: bool = False) -> MinibatchTrainer | FullBatchTrainer:
    """``scheduled``: the case uses a schedule (a scheduled spec then warms up and decays over
    ``budget.max_steps``; the closure-fed and full-batch optimizers never do)."""
    if spec.closure:
        optimizer = spec.make(model.parameters(), lr, budget.full_batch_iters, model)
        return ClosureMinibatchTrainer(model, optimizer, data, budget, seed)
    if spec.backward_closure:
        optimizer = spec.make(model.parameters(), lr, budget.full_batch_iters, model)
        return BackwardClosureTrainer(model, optimizer, data, budget, seed)
    if spec.asdl:
        optimizer, grad_maker = spec.make(model.parameters(), lr, budget.batch_size, model)
        return AsdlTrainer(model, optimizer, data, budget, seed, grad_maker)
    if spec.takes_model:
        optimizer = spec.make(model.parameters(), lr, budget.full_batch_iters, model)
    else:
        optimizer = spec.make(model.parameters(), lr, budget.full_batch_iters)
        if spec.full_batch:
            return FullBatchTrainer(model, optimizer, data)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(budget.max_steps))
                 if scheduled and spec.scheduled else None)
    return MinibatchTrainer(model, optimizer, data, budget, seed, scheduler)


def warm_up(case: Case, spec: OptimizerSpec, data: Data, budget: Budget, device: str) -> str | None:
    """One untimed step on a throwaway model (kernel selection, lazy initialisation); the
    ValueError of an optimizer that does not fit the model (BFGS's n^2 state) as a string."""
    if spec.full_batch and not case.full_batch:
        return "a full-batch optimizer; this case is trained on minibatches only"
    model = case.make_model().to(device)
    one_step = replace(budget, eval_every=1, full_batch_iters=1)
    try:
        trainer = make_trainer(spec, model, spec.lrs[0], data, one_step, seed=0)
        trainer.advance()
    except ValueError as exc:
        return str(exc)
    common.synchronize(device)
    return None


def train_run(case: Case, spec: OptimizerSpec, lr: float, seed: int, data: Data, budget: Budget,
              device: str) -> dict:
    """One training run; its curve (one point per evaluation) and final numbers (the time to
    the target comes from the curve, in summarize)."""
    torch.manual_seed(seed)
    model = case.make_model().to(device)
    trainer = make_trainer(spec, model, lr, data, budget, seed, scheduled=case.schedule)
    keys = CURVE_KEYS + (case.metric,)
    curve = {key: [] for key in keys}
    seconds, diverged, error = 0.0, False, None

    def record() -> bool:
        train_loss, metric = evaluate(model, data, case.metric, case.train_eval)
        for key, value in zip(keys, (seconds, trainer.steps, train_loss, metric)):
            curve[key].append(value)
        return math.isfinite(train_loss)

    record()
    while trainer.steps < budget.max_steps and seconds < budget.seconds:
        common.synchronize(device)
        start = time.perf_counter()
        try:
            trainer.advance()
        except NonFiniteError:  # soo_ext's quasi-Newton optimizers refuse non-finite losses
            diverged = True
        except (torch.linalg.LinAlgError, ValueError) as exc:  # a peer's failed factorisation
            if not spec.peer:                                  # or NaN probabilities
                raise
            diverged, error = True, f"{type(exc).__name__}: {str(exc)[:200]}"
        common.synchronize(device)
        seconds += time.perf_counter() - start
        if not record() or diverged:
            diverged = True
            break

    return {
        "seed": seed, "steps": trainer.steps, "grad_evals": trainer.grad_evals,
        "forward_evals": trainer.forward_evals, "train_seconds": seconds,
        "epochs": trainer.samples / len(data.x),
        "ms_per_step": 1e3 * seconds / trainer.steps if trainer.steps else math.nan,
        "final_train_loss": curve["train_loss"][-1],
        f"final_{case.metric}": curve[case.metric][-1],
        "diverged": diverged, "error": error, "curve": curve,
    }


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for one value); None, None for no values."""
    if not values:
        return None, None
    if not all(math.isfinite(v) for v in values):  # a diverged seed: NaN (null in the JSON)
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(curves: list[dict]) -> dict:
    """Evaluation-by-evaluation mean over seeds, up to the shortest run."""
    length = min(len(c["time"]) for c in curves)
    return {key: [statistics.fmean(c[key][i] for c in curves) for i in range(length)]
            for key in curves[0]}


def summarize(case: Case, spec: OptimizerSpec, lr: float, runs: list[dict], target: float,
              n_params: int, device: str) -> dict:
    """The record of one (case, optimizer, lr): means and stds over its seeds, and each seed's
    (with the time and steps to the target, from its curve)."""
    lower = case.metric == "val_loss"
    final = f"final_{case.metric}"
    runs = [dict(r, **dict(zip(("time_to_target", "steps_to_target"), first_crossing(
        r["curve"]["time"], r["curve"]["step"], r["curve"][case.metric], target, lower)
        or (None, None)))) for r in runs]
    reached = [r for r in runs if r["time_to_target"] is not None]
    row = {"case": case.name, "optimizer": spec.name, "lr": lr, "full_batch": spec.full_batch,
           "closure": spec.closure, "device": device, "n_params": n_params, "metric": case.metric,
           "target": target, "seeds": len(runs), "reached": len(reached),
           "diverged": sum(r["diverged"] for r in runs)}
    for key, values in (("time_to_target", [r["time_to_target"] for r in reached]),
                        ("steps_to_target", [r["steps_to_target"] for r in reached]),
                        ("final_train_loss", [r["final_train_loss"] for r in runs]),
                        (final, [r[final] for r in runs]),
                        ("ms_per_step", [r["ms_per_step"] for r in runs]),
                        ("steps", [r["steps"] for r in runs]),
                        ("epochs", [r["epochs"] for r in runs])):
        row[key], row[key + "_std"] = mean_std(values)
    row["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
    row["best"], row["time_to_target_vs_baseline"] = False, None
    return row


def final_metric(row: dict) -> float:
    """The row's mean final metric, as a score where lower is better (NaN: worst)."""
    value = row[f"final_{row['metric']}"]
    if value is None or not math.isfinite(value):
        return math.inf
    return value if row["metric"] == "val_loss" else -value


def selection_key(row: dict) -> tuple:
    """Most seeds reaching the target, then fastest mean wall-clock, then best final metric."""
    time_to_target = row["time_to_target"] if row["time_to_target"] is not None else math.inf
    return -row["reached"], time_to_target, final_metric(row)


def target_from(runs: list[list[dict]], metric: str) -> float:
    """A case's target when it has none: the best mean final metric over the reference
    optimizer's lrs (``runs``: its seeds' runs per lr)."""
    means = [statistics.fmean(r[f"final_{metric}"] for r in seed_runs) for seed_runs in runs]
    finite = [m for m in means if math.isfinite(m)] or [math.nan]
    return min(finite) if metric == "val_loss" else max(finite)


def mark_best(rows: list[dict], curves: dict[tuple, list[dict]],
              baselines: tuple[str, ...] = (ADAM,)) -> None:
    """Flag the best lr per (case, optimizer), give it its mean curve and its ratio to the
    fastest baseline of the case (by mean wall-clock to the target)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["optimizer"]), []).append(row)
    for (case, optimizer), group in groups.items():
        best = min(group, key=selection_key)
        best["best"] = True
        best["curve"] = mean_curve(curves[(case, optimizer, best["lr"])])
    fastest: dict[str, float] = {}
    for r in rows:
        if r["best"] and r["optimizer"] in baselines and r["time_to_target"] is not None:
            fastest[r["case"]] = min(fastest.get(r["case"], math.inf), r["time_to_target"])
    for row in rows:
        if row["best"] and row["time_to_target"] is not None and fastest.get(row["case"], 0) > 0:
            row["time_to_target_vs_baseline"] = row["time_to_target"] / fastest[row["case"]]


def json_safe(value):
    """Non-finite floats as None (JSON has no NaN), through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def resolve_budget(args: argparse.Namespace, case: Case | None = None) -> Budget:
    """The budget of a case's runs: the command line's options, else --quick's, else the
    case's own (a budget in steps: no time limit), else the defaults."""
    preset = dict(QUICK if args.quick else DEFAULTS, batch_size=128)
    if case is not None and not args.quick:
        if case.max_steps is not None:
            preset.update(max_steps=case.max_steps, budget=math.inf)
        if case.eval_every is not None:
            preset["eval_every"] = case.eval_every
    if case is not None and case.batch_size is not None:
        preset["batch_size"] = case.batch_size
    options = {key: getattr(args, key) if getattr(args, key, None) is not None else preset[key]
               for key in preset}
    return Budget(options["budget"], options["max_steps"], options["eval_every"],
                  options["full_batch_iters"], options["batch_size"])


def resolve_targets(cases: list[Case], given: list[tuple[str | None, float]]) -> dict:
    """Each case's target: --target for the case, else a global --target (accuracy cases),
    else the case's own (None: from the reference optimizer's runs)."""
    targets = {c.name: c.target for c in cases}
    for case_name, value in given:
        for case in cases:
            if case_name == case.name or (case_name is None and case.metric == "test_acc"):
                targets[case.name] = value
    return targets


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device = common.devices(args.device)[0]
    protocol = args.protocol
    specs = protocol_specs(protocol)
    if args.schedule == "all":  # make_trainer schedules only the optimizers stepped once a step
        specs = [replace(spec, scheduled=True) for spec in specs]
    notes = []
    if args.optimizers is not None:
        # the defaults protocol's ratio column is to its baselines: they run unless left out
        added = [] if protocol != "defaults" or args.no_baselines else [
            name for name in BASELINES[protocol] if name not in args.optimizers]
        specs = [spec for spec in specs if spec.name in args.optimizers + added]
        if added:
            notes.append(f"{' and '.join(added)} run as well: the baselines of the ratio column "
                         "(--no-baselines leaves them out)")
    case_names = args.cases or (DEFAULT_CASES if protocol == "tuned" else [c.name for c in CASES])
    cases = [c for c in CASES if c.name in case_names]
    targets = resolve_targets(cases, args.target)
    reference = REFERENCE[protocol]
    for case in cases:
        if targets[case.name] is None and reference not in [s.name for s in specs]:
            specs.append(next(s for s in protocol_specs(protocol) if s.name == reference))
            notes.append(f"{reference} runs as well: it sets the target of {case.name}")

    jobs, case_info, budgets = [], {}, {}
    for case in cases:
        data = case.load().to(device)
        budgets[case.name] = budget = resolve_budget(args, case)
        n_params = sum(p.numel() for p in case.make_model().parameters())
        case_info[case.name] = {"held_out": case.held_out, "n_params": n_params,
                                "n_train": len(data.x),
                                "n_test": len(data.x_test), "metric": case.metric,
                                "budget": asdict(budget)}
        for spec in specs:
            error = warm_up(case, spec, data, budget, device)
            if error:
                notes.append(f"{spec.name} skipped on {case.name} (n = {n_params}): {error}")
                continue
            jobs += [(case, data, n_params, spec, lr, seed)
                     for lr in spec.lrs for seed in args.seeds]
    for note in notes:
        print("note:", note)

    default_budget = resolve_budget(args)
    env = common.environment([device])
    env.update(protocol=protocol, schedule=args.schedule, budget_seconds=default_budget.seconds,
               max_steps=default_budget.max_steps, eval_every=default_budget.eval_every,
               full_batch_iters=default_budget.full_batch_iters,
               batch_size=default_budget.batch_size, seeds=args.seeds,
               mnist1d_seed=MNIST1D_SEED, cases=case_info, reference=reference,
               baselines=list(BASELINES[protocol]),
               lrs={s.name: list(s.lrs) for s in specs}, notes=notes)
    if any(c.name == "stdlib-lm" for c in cases):
        env["stdlib_text"] = tasks.stdlib_text()[2]
    if any(c.name == "docs-lm" for c in cases):
        env["docs_text"] = tasks.docs_text()[2]

    runs: dict[tuple, list[dict]] = {}
    progress = tqdm(jobs, desc="train", unit="run")
    try:
        for case, data, n_params, spec, lr, seed in progress:
            progress.set_postfix_str(f"{case.name} {spec.name}{lr_label(lr)} seed={seed}")
            finished = train_run(case, spec, lr, seed, data, budgets[case.name], device)
            runs.setdefault((case, spec, lr, n_params), []).append(finished)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (python -m bench): report the finished runs
        common.note_interrupted(env, "train")
    for case in cases:
        if targets[case.name] is None:
            targets[case.name] = target_from(
                [seed_runs for (c, spec, _, _), seed_runs in runs.items()
                 if c is case and spec.name == reference], case.metric)
        case_info[case.name]["target"] = targets[case.name]
    rows = [summarize(case, spec, lr, seed_runs, targets[case.name], n_params, device)
            for (case, spec, lr, n_params), seed_runs in runs.items()]
    mark_best(rows, {(case.name, spec.name, lr): [r["curve"] for r in seed_runs]
                     for (case, spec, lr, _), seed_runs in runs.items()}, BASELINES[protocol])
    records = json_safe(rows)
    report(records, env, args)
    return records, env


def lr_label(lr: float | None) -> str:
    """`` lr=0.1``, or nothing for an optimizer without a learning rate (DRSOM)."""
    return "" if lr is None else f" lr={lr:g}"


def plus_minus(row: dict, key: str) -> str | None:
    if row[key] is None:
        return None
    return f"{row[key]:.3g} ± {row[key + '_std']:.2g}"


def mlbfgs_vs_adam(records: list[dict]) -> list[str]:
    """The headline ratio per MNIST-1D case: mL-BFGS's wall-clock to target over Adam's."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in records if r["case"].startswith("mnist1d")):
        best = {r["optimizer"]: r for r in records if r["case"] == case and r["best"]}
        if MLBFGS not in best or ADAM not in best:
            lines.append(f"{case}: mL-BFGS vs Adam not measured (both must run)")
            continue
        ratio = best[MLBFGS]["time_to_target_vs_baseline"]
        measured = (f"{ratio:.2f}x" if ratio is not None
                    else f"n/a (target reached by {best[MLBFGS]['reached']} mL-BFGS and "
                         f"{best[ADAM]['reached']} Adam seeds)")
        lines.append(f"{case}: mL-BFGS / Adam wall-clock to test acc {best[ADAM]['target']:g}: "
                     f"{measured} (goal <= 0.8x)")
    return lines


METRIC_LABELS = {"test_acc": "test accuracy", "val_loss": "validation loss"}


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    held_out = {name for name, info in env["cases"].items() if info.get("held_out")}
    display = [dict(r, case=r["case"] + (" (held out)" if r["case"] in held_out else ""),
                    time_to_target=plus_minus(r, "time_to_target"),
                    steps_to_target=plus_minus(r, "steps_to_target"),
                    final_train_loss=plus_minus(r, "final_train_loss"),
                    final=f"{r['metric'].replace('_', ' ')} {plus_minus(r, 'final_' + r['metric'])}",
                    ms_per_step=plus_minus(r, "ms_per_step"),
                    reached=f"{r['reached']}/{r['seeds']}", best="*" if r["best"] else "")
               for r in records]
    kernels = ("fused kernels" if env["soo_ext"]["extension_loaded"]
               else "pure-PyTorch fallback")
    devices = ", ".join(f"{device} ({name})" for device, name in env["devices"].items())
    common.print_table(
        [r for r in display if r["best"]],
        {"case": "case", "optimizer": "optimizer", "lr": "best lr", "target": "target",
         "reached": "reached", "time_to_target": "s to target", "steps_to_target": "steps to tgt",
         "time_to_target_vs_baseline": "x " + "/".join(
             b.rsplit(".", 1)[-1] for b in env["baselines"]),
         "final_train_loss": "train loss", "final": "final", "ms_per_step": "ms/step",
         "epochs": "epochs", "diverged": "diverged"},
        f"Best lr per optimizer, protocol {env['protocol']}"
        f"{', schedule: all' if env.get('schedule') == 'all' else ''} ({devices}; "
        f"{env['budget_seconds']:g} "
        f"s or {env['max_steps']} steps a run unless the case sets its own, "
        f"{len(env['seeds'])} seeds; soo_ext: {kernels})")
    common.print_table(
        display,
        {"case": "case", "optimizer": "optimizer", "lr": "lr", "best": "best",
         "reached": "reached", "time_to_target": "s to target", "final": "final",
         "ms_per_step": "ms/step", "diverged": "diverged"},
        "Learning-rate sweep (best: most seeds at target, then fastest, then final metric)")
    if env["protocol"] == "tuned":
        for line in mlbfgs_vs_adam(records):
            print(line)
    if args.json:
        common.write_json(args.json, "train", env, records)
    if args.plot:
        plot(records, args.plot)


def plot(records: list[dict], path: str) -> None:
    """A row per case: train loss and the case's metric (test accuracy or validation loss)
    against training seconds and against steps, a line per optimizer (best lr, mean over
    seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    fig, axes = plt.subplots(len(cases), 4, figsize=(22, 4.2 * len(cases)), squeeze=False)
    # 10 colours for 12 optimizers: the optional peers are drawn dashed
    styles = {spec.name: (f"C{i % 10}", "--" if spec.peer else "-")
              for i, spec in enumerate(OPTIMIZERS)}
    for row_axes, case in zip(axes, cases):
        best = [r for r in records if r["case"] == case and r["best"]]
        metric = best[0]["metric"]
        panels = [("time", "train_loss"), ("time", metric),
                  ("step", "train_loss"), ("step", metric)]
        for ax, (x_key, y_key) in zip(row_axes, panels):
            for r in best:
                color, linestyle = styles[r["optimizer"]]
                ax.plot(r["curve"][x_key], r["curve"][y_key], color=color, linestyle=linestyle,
                        label=f"{r['optimizer']}{lr_label(r['lr'])}")
            if y_key == metric:
                ax.axhline(best[0]["target"], color="gray", linestyle="--", label="target")
            if y_key != "test_acc":
                ax.set_yscale("log")
            if x_key == "step":  # full-batch runs take far fewer steps than minibatch ones
                ax.set_xscale("symlog", linthresh=1)
                ax.set_xlim(left=0)
            ax.set(xlabel="training seconds" if x_key == "time" else "steps (gradient evals)",
                   ylabel="train loss" if y_key == "train_loss" else METRIC_LABELS[y_key],
                   title=f"{case} (n={best[0]['n_params']})")
            ax.grid(True, alpha=0.3)
        row_axes[1].legend(fontsize="small")
    common.save_figure(fig, path)
