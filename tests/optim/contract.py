"""The contract every soo_ext optimizer keeps, as a table: one :class:`OptimizerCase` row per
optimizer configuration.  ``tests/optim/test_contract.py`` runs one battery of checks over the rows
(resume, non-finite steps, host syncs, arguments, schedulers, hooks, param groups, copies, ...).

A new optimizer gets the battery by adding its rows to :data:`CASES`: a problem (a module whose
``forward(batch)`` returns the loss, and the batch of each step), its calling convention, and what
its docstring documents where optimizers differ (the non-finite policy and what a skipped step
changes, host syncs per step, invalid arguments, param-group rules, copying, its state).  The
first row of each class (:data:`FAMILIES`) also carries the class-level checks (arguments, params,
param groups).

Only the public API is used (``soo_ext.<Name>``, ``soo_ext.NonFiniteError``): the internals move,
these names do not.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

import soo_ext

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

# ---------------------------------------------------------------------------------------------
# Problems: tiny deterministic modules whose forward(batch) returns the loss.  A module is built
# from a fixed seed, so two builds are bit-identical; batch(i) is the batch of step i.


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


class Rosenbrock(nn.Module):
    """Full batch: Rosenbrock plus a positive diagonal quadratic, over the concatenation of two
    vectors (two params, so that param groups can be formed)."""

    def __init__(self, dtype):
        super().__init__()
        x = torch.linspace(-1.5, 1.5, 60, dtype=dtype)
        self.a = nn.Parameter(x[:40].clone())
        self.b = nn.Parameter(x[40:].clone())
        gen = torch.Generator().manual_seed(3)
        self.register_buffer("w", torch.randn(60, dtype=dtype, generator=gen).abs() + 0.5)

    def forward(self, batch):
        x = torch.cat([self.a, self.b])
        return rosenbrock(x) + (self.w * x ** 2).sum()


def full_batch(i):
    return None


class Regression(nn.Module):
    """An MLP (two Linear layers) under a mean squared error."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)

    def forward(self, batch):
        x, y = batch
        return F.mse_loss(self.net(x), y)


@functools.lru_cache(maxsize=None)
def regression_batch(dtype, i):
    """Minibatch i (16 of 64 samples) of a fixed regression data set."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 4, dtype=dtype, generator=gen)
    targets = torch.sin(inputs @ torch.randn(4, 3, dtype=dtype, generator=gen))
    idx = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(100 + i))
    return inputs[idx], targets[idx]


class ConvClassifier(nn.Module):
    """Conv2d (strided, padded, non-square kernel) and Linear under a cross entropy: K-FAC's
    two kinds of layers."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=2, padding=(1, 2)), nn.Tanh(),
                                 nn.Flatten(), nn.Linear(45, 4)).to(dtype)

    def forward(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@functools.lru_cache(maxsize=None)
def image_batch(dtype, i):
    gen = torch.Generator().manual_seed(1000 + i)
    return (torch.randn(4, 2, 5, 6, dtype=dtype, generator=gen),
            torch.randint(0, 4, (4,), generator=gen))


class ConvRegression(nn.Module):
    """Conv1d (an order-3 weight), Linear (36 x 5: blocked) and biases, for Shampoo."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv1d(2, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 6, 5),
                                 nn.Tanh(), nn.Linear(5, 3)).to(dtype)

    def forward(self, batch):
        x, y = batch
        return F.mse_loss(self.net(x), y)


@functools.lru_cache(maxsize=None)
def sequence_batch(dtype, i):
    x = torch.randn(16, 2, 8, dtype=dtype, generator=torch.Generator().manual_seed(2000 + i))
    return x, x[:, :, :3].sum(-1).sin().mul(2).matmul(torch.ones(2, 3, dtype=dtype))


class Classifier(nn.Module):
    """An MLP under a cross entropy on one fixed batch (DRSOM re-evaluates the loss)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("x", torch.randn(64, 5, dtype=dtype, generator=gen))
        self.register_buffer("y", torch.randint(0, 3, (64,), generator=gen))

    def forward(self, batch):
        return F.cross_entropy(self.net(self.x), self.y)


class WithUnused(nn.Module):
    """A problem with one more param, last in parameters(), that the loss does not use (its
    gradient stays None)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        dtype = next(inner.parameters()).dtype
        self.extra = nn.ParameterDict({"unused": nn.Parameter(torch.linspace(-1, 1, 5,
                                                                             dtype=dtype))})

    @property
    def unused(self):
        return self.extra["unused"]

    def forward(self, batch):
        return self.inner(batch)


# ---------------------------------------------------------------------------------------------
# Poisons: what makes a step non-finite.  'loss-*' give a non-finite loss with a finite gradient,
# 'grad-*' a finite loss with a non-finite gradient (one entry of the first param), 'stat-inf'
# finite gradients whose K-FAC output-gradient statistics overflow (factors of the params' dtype).

class BadGrad(torch.autograd.Function):
    """0 forwards; backwards ``value`` into ``t`` (NaN or inf: a non-finite gradient)."""

    @staticmethod
    def forward(ctx, t, value):
        ctx.value = value
        return t * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


def poisoned(loss, model, poison):
    if poison is None:
        return loss
    kind, value = poison.split("-")
    value = {"nan": math.nan, "inf": math.inf}[value]
    if kind == "loss":
        return loss + value
    if kind == "grad":
        return loss + BadGrad.apply(next(model.parameters()).reshape(-1)[0], value)
    if kind == "stat":  # finite gradients ~ 10 sqrt(max), statistics of their squares overflow
        return loss * (100 * torch.finfo(loss.dtype).max ** 0.5)
    raise ValueError(poison)


# ---------------------------------------------------------------------------------------------
# The rows


@dataclass(frozen=True, eq=False)
class Invalid:
    """A constructor call that raises ValueError naming ``name`` (``'Invalid <name>'``)."""
    name: str
    kwargs: dict = field(default_factory=dict)
    dtype: torch.dtype = F32  # of the param the optimizer is given
    build: Callable | None = None  # builds the optimizer itself (arguments other than kwargs)


@dataclass(frozen=True, eq=False)
class OptimizerCase:
    name: str  # the pytest id
    cls: str  # soo_ext.<cls>
    kwargs: dict  # constructor arguments besides the params (or the model)
    model: Callable[[], nn.Module]  # the problem: forward(batch) -> loss
    batch: Callable[[int], Any]  # the batch of step i
    # 'closure': a torch closure (zeroes the grads, calls backward, returns the loss),
    #   step(closure)
    # 'backward': loss.backward(); step() (a closure is optional)
    # 'loss': closure that returns the loss without calling backward, step(closure) (DRSOM)
    convention: str
    takes_model: bool = False  # KFAC(model, ...)
    layout: Callable | None = None  # params -> (params or param groups, extra kwargs)

    # Non-finite losses / gradients.  on_nonfinite: the default.  skip: 'noop' (a skipped step
    # changes nothing at all, the run goes on as if it never happened) or 'counted' (params and
    # state unchanged except the counters in skip_counts, which advance as at a finite step, and
    # state['nonfinite_steps'] (int64, under the first param) which is incremented).
    on_nonfinite: str = "raise"
    skip: str = "noop"
    poisons: tuple = ("loss-nan", "loss-inf", "grad-nan", "grad-inf")
    positions: dict = field(default_factory=lambda: {"first": (2, False)})  # name -> (good
    # steps before the poisoned one, whether it is a scheduled step: pair / root / factor update)
    skip_counts: tuple = ()
    schedule_counter: str | None = None  # not advanced by a skipped scheduled step
    continue_steps: int = 3
    ready: Callable[[dict], bool] = lambda st: True  # the state (first param) is non-trivial
    statistics_steps: int = 0  # first steps that only gather statistics (the params stay: SOAP)

    # Resume: steps before saving and after; a skipped step (index) before saving; state entries
    # documented as live views of the optimizer's buffers (state_dict() returns references).
    resume_steps: tuple = (3, 3)
    resume_skip_at: int | None = None
    live_state_keys: tuple = ()

    # Host syncs per step: expected(kwargs, policy, k, state before, state after) (it may assert
    # on the state too); the policies checked, the steps, the steps poisoned under 'skip'.
    host_syncs: Callable | None = None
    sync_kwargs: dict = field(default_factory=dict)
    sync_steps: int = 2
    sync_policies: tuple = ("raise",)
    sync_poison: tuple = ()

    # Conventions
    has_lr: bool = True  # an 'lr' per param group (LR schedulers)
    maximize: bool = False  # supports maximize=True
    add_group: str = "before-first-step"  # 'before-first-step' | 'any-time' | 'never'
    add_group_check: Callable | None = None  # (opt, new param) after a step with it
    added_param_is_sgd: bool = False  # a param added later takes torch.optim.SGD's update
    copyable: bool = True  # deepcopy / pickle (else TypeError)
    empty_group: bool = True  # [{'params': []}] is allowed (step returns the closure's loss)
    state_keys: tuple = ()  # documented global state, under the first param
    state_check: Callable | None = None  # (opt, model) -> asserts the documented layout

    # Arguments (the same for every row of a class)
    invalid: tuple = ()
    group_options: dict = field(default_factory=dict)  # may differ between groups (valid values)
    bad_group_option: tuple = ()  # (key, invalid value) in a second group
    global_option: tuple = ()  # (key, value): must agree in all groups
    global_checked_at_step: bool = False  # the agreement is checked at step(), not in __init__
    options_checked_at_step: tuple = ()  # (key, invalid value) set in param_groups after a step

    def __repr__(self):
        return self.name


def first_param(opt):
    return opt.param_groups[0]["params"][0]


def global_state(opt):
    """The global state: under the first param (every optimizer documents it there)."""
    return opt.state[first_param(opt)]


# ---- building and stepping ------------------------------------------------------------------

def build(case: OptimizerCase, model: nn.Module, **overrides):
    cls = getattr(soo_ext, case.cls)
    params = list(model.parameters())
    spec, extra = case.layout(params) if case.layout else (params, {})
    kwargs = {**case.kwargs, **extra, **overrides}
    if case.takes_model:
        return cls(model, **kwargs) if case.layout is None else cls(model, params=spec, **kwargs)
    return cls(spec, **kwargs)


def problem(case: OptimizerCase, unused=False, **overrides):
    """A fresh model and its optimizer."""
    model = case.model()
    if unused:
        model = WithUnused(model)
    return model, build(case, model, **overrides)


def take_step(case, opt, model, i, poison=None, extra_loss=None, after_backward=None,
              negate=False):
    """One step on batch i by the row's convention (the loss negated with ``negate``); returns
    what step() returned."""
    batch = case.batch(i)

    def loss_now():
        loss = model(batch)
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss = poisoned(loss, model, poison)
        return -loss if negate else loss

    if case.convention == "closure":
        def closure():
            opt.zero_grad()
            loss = loss_now()
            loss.backward()
            return loss
        return opt.step(closure)
    if case.convention == "backward":
        opt.zero_grad()
        loss_now().backward()
        if after_backward is not None:
            after_backward()
        return opt.step()
    assert case.convention == "loss"
    return opt.step(loss_now)


def run(case, opt, model, steps, start=0, **kw):
    for i in range(start, start + steps):
        take_step(case, opt, model, i, **kw)


# ---------------------------------------------------------------------------------------------
# Per-optimizer facts (from the docstrings)

def quasi_newton_syncs(kw, policy, k, before, after):
    """One sync per closure evaluation and one per direction (one per iteration)."""
    iterations = after["n_iter"] - before.get("n_iter", 0)
    evaluations = after["func_evals"] - before.get("func_evals", 0)
    # the step ran to one of its budgets (no early stop hides syncs)
    assert iterations == kw["max_iter"] or evaluations >= kw["max_eval"]
    if kw.get("line_search_fn") is None:
        assert evaluations == iterations  # the last iteration does not reevaluate
    return iterations + evaluations


def mlbfgs_syncs(kw, policy, k, before, after):
    """None between pair updates (one per step with 'raise'), one at a pair-update step."""
    return int(after["step"] % kw["update_freq"] == 0 or policy == "raise")


def kfac_syncs(kw, policy, k, before, after):
    """None in step() (one with 'raise'), skipped steps included."""
    return int(policy == "raise")


def shampoo_syncs(kw, policy, k, before, after):
    """One at a root step, one more per step with 'raise'."""
    start, freq = kw["start_preconditioning_step"], kw["precondition_frequency"]
    step = after["step"]
    return int(step >= start and (step - start) % freq == 0) + int(policy == "raise")


def kbfgs_syncs(kw, policy, k, before, after):
    """None in step() (one with 'raise'); K-BFGS(L): one more, which layers push their pair."""
    return int(policy == "raise") + int(kw["history_size"] is not None)


def psgd_kron_syncs(kw, policy, k, before, after):
    """None (the update decisions are host draws), one per step with 'raise'."""
    return int(policy == "raise")


def soap_syncs(kw, policy, k, before, after):
    """None in step() (the basis refreshes are masked on the device), one with 'raise'."""
    return int(policy == "raise")


def window_syncs(kw, policy, k, before, after):
    """None in step() (one with 'raise'): the ring position lives on the device."""
    return int(policy == "raise")


def drsom_syncs(kw, policy, k, before, after):
    """One at the base point plus one per trial (trust-region or line-search)."""
    return 1 + after["trials"] - before.get("trials", 0)


QUASI_NEWTON_STATE = ("func_evals", "n_iter", "d", "t", "prev_flat_grad", "prev_loss")


def lbfgs_history_shape(opt, model):
    n = sum(p.numel() for p in model.parameters())
    history = global_state(opt)["history"]
    assert history["S"].shape == history["Y"].shape == (opt.param_groups[0]["history_size"], n)
    dtype = opt.param_groups[0]["history_dtype"] or next(model.parameters()).dtype
    assert history["S"].dtype == dtype


def mlbfgs_block_state(opt, model):
    # The first block, [w1, w2] (mlbfgs_layout), under w1: flat buffers and its own history.
    w1, _, w2, _ = model.parameters()
    n = w1.numel() + w2.numel()
    st = global_state(opt)
    for key in ("momentum_buffer", "p_bar", "p_bar_prev", "g_bar", "g_bar_prev"):
        assert st[key].shape == (n,) and st[key].dtype == w1.dtype
    history = st["history"]
    assert history["S"].shape == (opt.param_groups[0]["history_size"], n)
    assert history["S"].dtype == (opt.param_groups[0]["history_dtype"] or w1.dtype)


def bfgs_inverse_hessian_shape(opt, model):
    n = sum(p.numel() for p in model.parameters())
    assert global_state(opt)["inverse_hessian"]["H"].shape == (n, n)


def kfac_layer_state(opt, model):
    eigen = opt.param_groups[0]["mode"] == "eigen"
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            st = opt.state[module.weight]
            keys = {"A", "G", "factor_updates", "momentum_buffer", "A_inverse_failures",
                    "G_inverse_failures", "A_inverse_fallbacks", "G_inverse_fallbacks"}
            keys |= {"QA", "dA", "QG", "dG"} if eigen else {"A_inv", "G_inv"}
            assert keys <= set(st)
            assert st["A"].dtype == opt.param_groups[0]["factor_dtype"]


def kbfgs_layer_state(opt, model):
    lbfgs = opt.param_groups[0]["history_size"] is not None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            st = opt.state[module.weight]
            assert {"A", "H_a", "s", "y", "momentum_buffer"} <= set(st)
            assert ("history" if lbfgs else "H_g") in st
            assert st["H_a"].shape == (module.weight[0].numel() + 1,) * 2
            if lbfgs:
                assert st["history"]["S"].shape == (opt.param_groups[0]["history_size"],
                                                    module.weight.shape[0])


def shampoo_param_state(opt, model):
    for p in model.parameters():
        st = opt.state[p]
        assert {"momentum_buffer", "graft_state"} <= set(st)
        if p.dim() >= 2 or opt.param_groups[0]["precondition_1d"]:
            assert len(st["factors"]) == len(st["roots"]) == len(st["root_failures"]) > 0
            assert st["factors"][0].dtype == opt.param_groups[0]["factor_dtype"]


def shampoo_added_matrix(opt, p):
    # (7, 4) with max_preconditioner_dim 16: 28 > 16, not merged: two factors.
    assert len(opt.state[p]["factors"]) == 2


def psgd_kron_param_state(opt, model):
    dtype = opt.param_groups[0]["precond_dtype"]
    for p in model.parameters():
        st = opt.state[p]
        assert {"momentum_buffer", "momentum_steps", "Q"} <= set(st)
        assert st["momentum_buffer"].shape == p.shape and st["momentum_steps"].dtype == torch.int64
        assert 1 <= len(st["Q"]) <= max(p.dim(), 1) and all(q.dtype == dtype for q in st["Q"])


def psgd_kron_layout(params):
    """Two groups (lr and weight decay differ)."""
    cw, cb, l1w, l1b, l2w, l2b, *rest = params
    return ([{"params": [cw, cb, l2w, l2b, *rest]},
             {"params": [l1w, l1b], "lr": 0.02, "weight_decay": 0.01}], {})


def soap_param_state(opt, model):
    fdtype = opt.param_groups[0]["factor_dtype"]
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape
        assert len(st["GG"]) == len(st["Q"]) and all(q.dtype == fdtype for q in st["Q"])
        if p.dim() >= 2:  # Linear 36 x 5 with max_precond_dim 16: the 36 dim stays unrotated
            assert len(st["GG"]) == sum(1 < n <= 16 for n in p.shape) > 0


def soap_added_matrix(opt, p):
    # (7, 4) with max_precond_dim 16: a factor and a basis per dim.
    assert len(opt.state[p]["GG"]) == len(opt.state[p]["Q"]) == 2


def mlbfgs_layout(params):
    """Two groups (lr and momentum differ), two blocks and a param left out of every block
    (b2, and any param after it): every kind of state."""
    w1, b1, w2, b2, *rest = params
    return ([{"params": [w1, b1]}, {"params": [w2, b2, *rest], "lr": 0.02, "momentum": 0.5}],
            {"blocks": [[w1, w2], [b1]]})


def shampoo_layout(params):
    """Two groups (lr, betas and weight decay differ)."""
    cw, cb, l1w, l1b, l2w, l2b, *rest = params
    return ([{"params": [cw, cb, l2w, l2b, *rest]},
             {"params": [l1w, l1b], "lr": 0.02, "betas": (0.5, 0.9), "weight_decay": 0.01}], {})


def window_state(opt, model):
    n = sum(p.numel() for p in model.parameters())
    st, group = global_state(opt), opt.param_groups[0]
    dtype = next(model.parameters()).dtype
    assert st["window"].shape == (group["window"], n)
    assert st["window"].dtype == (group["window_dtype"] or dtype)
    assert st["gram"].shape == (group["window"],) * 2 and st["gram"].dtype == F64
    assert st["momentum_buffer"].shape == (n,) and st["slot"].dtype == torch.int64


def window_layout(params):
    """Two groups (lr, momentum and weight decay differ)."""
    w1, b1, *rest = params
    return ([{"params": [w1, b1]}, {"params": rest, "lr": 0.02, "momentum": 0.5,
                                    "weight_decay": 0.01}], {})


def kfac_invalid_model():
    return soo_ext.KFAC([nn.Parameter(torch.zeros(2))])


# ---- invalid arguments (every case the per-optimizer tests had) ------------------------------

LBFGS_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=torch.tensor([1.0, 2.0]))),
    Invalid("max_iter", dict(max_iter=0)), Invalid("max_iter", dict(max_iter=2.5)),
    Invalid("max_eval", dict(max_eval=0)), Invalid("history_size", dict(history_size=0)),
    Invalid("tolerance_grad", dict(tolerance_grad=-1e-3)),
    Invalid("tolerance_change", dict(tolerance_change=-1.0)),
    Invalid("tolerance_change", dict(tolerance_change=float("nan"))),
    Invalid("line_search_fn", dict(line_search_fn="backtracking")),
    Invalid("history_dtype", dict(history_dtype=torch.float16)),
    Invalid("history_dtype", dict(history_dtype=F64)),  # float32 params
    Invalid("history_dtype", dict(history_dtype=BF16), dtype=F64),  # bfloat16: float32 only
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")), Invalid("maximize", dict(maximize=1)),
)
BFGS_INVALID = (
    Invalid("max_state_bytes", dict(max_state_bytes=0)),
    Invalid("max_state_bytes", dict(max_state_bytes=1.5)),
    Invalid("lr", dict(lr=-1.0)), Invalid("max_iter", dict(max_iter=0)),
    Invalid("line_search_fn", dict(line_search_fn="armijo")),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
)
MLBFGS_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("lr", dict(lr=torch.tensor(0.1))),
    Invalid("momentum", dict(momentum=1.0)), Invalid("momentum", dict(momentum=-0.1)),
    Invalid("weight_decay", dict(weight_decay=-1e-4)),
    Invalid("history_size", dict(history_size=0)), Invalid("history_size", dict(history_size=2.5)),
    Invalid("update_freq", dict(update_freq=0)), Invalid("update_freq", dict(update_freq=True)),
    Invalid("param_momentum", dict(param_momentum=1.5)),
    Invalid("grad_momentum", dict(grad_momentum=-0.1)),
    Invalid("pair_momentum", dict(pair_momentum=1.0)),
    Invalid("sigma_low", dict(sigma_low=0.0)), Invalid("sigma_low", dict(sigma_low=1.0)),
    Invalid("sigma_high", dict(sigma_high=1.0)),
    Invalid("sigma_high", dict(sigma_high=float("inf"))),
    Invalid("damping_delta", dict(damping_delta=1.0)),
    Invalid("damping_delta", dict(damping_delta=-0.01)),
    Invalid("normalize", dict(normalize="l1")), Invalid("kl_clip", dict(kl_clip=0.0)),
    Invalid("history_dtype", dict(history_dtype=torch.float16)),
    Invalid("history_dtype", dict(history_dtype=F64)),  # float32 params
    Invalid("history_dtype", dict(history_dtype=BF16), dtype=F64),  # bfloat16: float32 only
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")), Invalid("maximize", dict(maximize=1)),
)
KFAC_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("momentum", dict(momentum=1.0)), Invalid("weight_decay", dict(weight_decay=-1e-3)),
    Invalid("damping", dict(damping=0.0)), Invalid("factor_decay", dict(factor_decay=1.5)),
    Invalid("kl_clip", dict(kl_clip=0.0)), Invalid("kl_clip", dict(kl_clip="big")),
    Invalid("kl_clip_lr", dict(kl_clip_lr="max")),
    Invalid("factor_update_steps", dict(factor_update_steps=0)),
    Invalid("inv_update_steps", dict(inv_update_steps=1.5)), Invalid("mode", dict(mode="svd")),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
    Invalid("factor_dtype", dict(factor_dtype=torch.float16)),
    Invalid("accumulation_steps", dict(accumulation_steps=0)),
    Invalid("skip_layers", dict(skip_layers=["("])),
    Invalid("batch_averaged", dict(batch_averaged=1)),
    Invalid("spread_inverses", dict(spread_inverses=None)),
    Invalid("skip_layers", dict(skip_layers=[3])), Invalid("grad_scaler", dict(grad_scaler=3)),
    Invalid("model", build=kfac_invalid_model),  # params instead of a module
)
SHAMPOO_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("lr", dict(lr=torch.tensor(0.1))),
    Invalid("betas", dict(betas=(1.0, 0.9))), Invalid("betas", dict(betas=(0.9, 0.0))),
    Invalid("betas", dict(betas=(0.9, 1.1))), Invalid("betas", dict(betas=0.9)),
    Invalid("betas", dict(betas=(0.9,))),
    Invalid("epsilon", dict(epsilon=0.0)), Invalid("epsilon", dict(epsilon=-1e-12)),
    Invalid("relative_epsilon", dict(relative_epsilon=-1e-4)),
    Invalid("relative_epsilon", dict(relative_epsilon=math.inf)),
    Invalid("relative_epsilon", dict(relative_epsilon=float("nan"))),
    Invalid("weight_decay", dict(weight_decay=-1e-4)),
    Invalid("decoupled_weight_decay", dict(decoupled_weight_decay=1)),
    Invalid("max_preconditioner_dim", dict(max_preconditioner_dim=0)),
    Invalid("max_preconditioner_dim", dict(max_preconditioner_dim=8.0)),
    Invalid("merge_dims", dict(merge_dims="yes")),
    Invalid("precondition_1d", dict(precondition_1d=None)),
    Invalid("precondition_frequency", dict(precondition_frequency=0)),
    Invalid("precondition_frequency", dict(precondition_frequency=True)),
    Invalid("start_preconditioning_step", dict(start_preconditioning_step=0)),
    Invalid("grafting", dict(grafting="rmsprop")),
    Invalid("grafting_epsilon", dict(grafting_epsilon=0.0)),
    Invalid("grafting_beta2", dict(grafting_beta2=1.0)),
    Invalid("grafting_beta2", dict(grafting_beta2=0.0)),
    Invalid("root_method", dict(root_method="svd")),
    Invalid("factor_dtype", dict(factor_dtype=torch.float16)),
    Invalid("factor_dtype", dict(factor_dtype="float32")),
    Invalid("max_root_failures", dict(max_root_failures=0)),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
)
WINDOW_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("momentum", dict(momentum=1.0)), Invalid("weight_decay", dict(weight_decay=-1e-4)),
    Invalid("window", dict(window=0)), Invalid("window", dict(window=2.5)),
    Invalid("window_dtype", dict(window_dtype=torch.float16)),
    Invalid("window_dtype", dict(window_dtype=BF16), dtype=F64),  # bfloat16: float32 only
    Invalid("max_state_bytes", dict(max_state_bytes=0)),
    Invalid("window", dict(window=4, max_state_bytes=100)),  # the window does not fit
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")), Invalid("maximize", dict(maximize=1)),
)
MFAC_INVALID = WINDOW_INVALID + (
    Invalid("damping", dict(damping=0.0)), Invalid("damping", dict(damping=float("inf"))),
    Invalid("solver", dict(solver="lu")),
)
GGT_INVALID = WINDOW_INVALID + (
    Invalid("betas", dict(betas=(1.0, 0.9))), Invalid("betas", dict(betas=(0.9, 0.0))),
    Invalid("betas", dict(betas=0.9)), Invalid("eps", dict(eps=0.0)),
)
DRSOM_INVALID = (
    Invalid("hvp", {"hvp": "exact"}), Invalid("directions", {"directions": 1}),
    Invalid("directions", {"directions": 9}), Invalid("directions", {"directions": 2.0}),
    Invalid("random", {"random": 1}),
    Invalid("directions", {"random": True, "directions": 3}),
    Invalid("gamma", {"gamma": 0.0}), Invalid("gamma", {"gamma": float("nan")}),
    Invalid("gamma_increase", {"gamma_increase": 1.0}), Invalid("gamma_min", {"gamma_min": -1.0}),
    Invalid("eta_accept", {"eta_accept": 1.0}), Invalid("eta_low", {"eta_low": 0.6}),
    Invalid("eta_high", {"eta_high": 1.5}), Invalid("max_trials", {"max_trials": 0}),
    Invalid("max_trials", {"max_trials": True}), Invalid("collinearity", {"collinearity": 0.0}),
    Invalid("armijo", {"armijo": 1.0}), Invalid("seed", {"seed": 1.5}),
    Invalid("max_step_growth", {"max_step_growth": 0.5}),
    Invalid("max_step_growth", {"max_step_growth": float("nan")}),
    Invalid("rejection_shrink", {"rejection_shrink": 1.0}),
    Invalid("rejection_shrink", {"rejection_shrink": 0}),
    Invalid("on_nonfinite", {"on_nonfinite": "ignore"}),
    Invalid("maximize", {"maximize": 1}), Invalid("model", {"model": "net"}),
    Invalid("lr", {"lr": -1.0}), Invalid("lr", {"lr": float("inf")}),
)

KBFGS_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("momentum", dict(momentum=1.0)), Invalid("weight_decay", dict(weight_decay=-1e-3)),
    Invalid("damping", dict(damping=0.0)), Invalid("damping", dict(damping=1.0)),
    Invalid("factor_decay", dict(factor_decay=1.5)), Invalid("pair_decay", dict(pair_decay=1.0)),
    Invalid("powell", dict(powell=0.0)), Invalid("powell", dict(powell=1.0)),
    Invalid("inv_update_steps", dict(inv_update_steps=0)),
    Invalid("history_size", dict(history_size=0)), Invalid("history_size", dict(history_size=2.5)),
    Invalid("history_size", dict(history_size=True)),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
    Invalid("skip_layers", dict(skip_layers=["("])),
    Invalid("process_group", dict(process_group="world")),
    Invalid("model", build=lambda: soo_ext.KBFGS([nn.Parameter(torch.zeros(2))])),
    Invalid("batch_averaged", dict(batch_averaged=1)),
    Invalid("accumulation_steps", dict(accumulation_steps=0)),
    Invalid("grad_scaler", dict(grad_scaler=lambda: 1.0)),
)

PSGD_KRON_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("momentum", dict(momentum=1.0)), Invalid("momentum", dict(momentum=-0.1)),
    Invalid("weight_decay", dict(weight_decay=-1e-4)),
    Invalid("precond_lr", dict(precond_lr=0.0)),
    Invalid("update_probability", dict(update_probability=0.0)),
    Invalid("update_probability", dict(update_probability=1.5)),
    Invalid("update_probability", dict(update_probability="always")),
    Invalid("max_size_triangular", dict(max_size_triangular=0)),
    Invalid("max_size_triangular", dict(max_size_triangular=8.0)),
    Invalid("min_ndim_triangular", dict(min_ndim_triangular=-1)),
    Invalid("memory_save_mode", dict(memory_save_mode="some_diag")),
    Invalid("momentum_into_precond_update", dict(momentum_into_precond_update=1)),
    Invalid("precond_init_scale", dict(precond_init_scale=0.0)),
    Invalid("merge_dims", dict(merge_dims="yes")),
    Invalid("precond_dtype", dict(precond_dtype=torch.float16)),
    Invalid("max_update_rms", dict(max_update_rms=0.0)),
    Invalid("seed", dict(seed=-1)), Invalid("seed", dict(seed=1.5)),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
    Invalid("refresh_budget", dict(refresh_budget=0.0)),
)

SOAP_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("betas", dict(betas=(1.0, 0.9))), Invalid("betas", dict(betas=(0.9, 1.0))),
    Invalid("betas", dict(betas=0.9)), Invalid("eps", dict(eps=0.0)),
    Invalid("weight_decay", dict(weight_decay=-1e-4)),
    Invalid("shampoo_beta", dict(shampoo_beta=1.0)),
    Invalid("shampoo_beta", dict(shampoo_beta="x")),
    Invalid("precondition_frequency", dict(precondition_frequency=0)),
    Invalid("precondition_frequency", dict(precondition_frequency=2.0)),
    Invalid("max_precond_dim", dict(max_precond_dim=0)),
    Invalid("merge_dims", dict(merge_dims="yes")),
    Invalid("precondition_1d", dict(precondition_1d=None)),
    Invalid("factor_dtype", dict(factor_dtype=torch.float16)),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
    Invalid("refresh_budget", dict(refresh_budget=1.0)),
    Invalid("normalize_grads", dict(normalize_grads="yes")),
    Invalid("correct_bias", dict(correct_bias=None)),
)

# ---- the rows, by class ---------------------------------------------------------------------

QUASI_NEWTON = dict(  # LBFGS and BFGS: closure, 'raise', a skipped step is a no-op
    convention="closure", on_nonfinite="raise", skip="noop", continue_steps=2,
    resume_steps=(3, 3), host_syncs=quasi_newton_syncs, sync_kwargs={"max_iter": 8},
    sync_steps=2, maximize=True, add_group="before-first-step",
    group_options={"lr": 0.5}, bad_group_option=("lr", -1), global_option=("max_iter", 7),
)


def lbfgs(name, dtype, line_search_fn, lr, history_dtype=None):
    return OptimizerCase(
        name=name, cls="LBFGS",
        kwargs=dict(lr=lr, max_iter=4, history_size=5, line_search_fn=line_search_fn,
                    history_dtype=history_dtype),
        model=functools.partial(Rosenbrock, dtype), batch=full_batch,
        ready=lambda st: st["history"]["count"] >= 1,
        state_keys=QUASI_NEWTON_STATE + ("history",), state_check=lbfgs_history_shape,
        invalid=LBFGS_INVALID, **QUASI_NEWTON)


def bfgs(name, dtype, line_search_fn, lr):
    return OptimizerCase(
        name=name, cls="BFGS", kwargs=dict(lr=lr, max_iter=3, line_search_fn=line_search_fn),
        model=functools.partial(Rosenbrock, dtype), batch=full_batch,
        ready=lambda st: st["inverse_hessian"]["scaled"],
        state_keys=QUASI_NEWTON_STATE + ("inverse_hessian",),
        state_check=bfgs_inverse_hessian_shape, invalid=BFGS_INVALID, **QUASI_NEWTON)


def mlbfgs(name, dtype, history_dtype=None):
    return OptimizerCase(
        name=name, cls="MLBFGS",
        kwargs=dict(lr=0.05, update_freq=3, history_size=2, history_dtype=history_dtype),
        model=functools.partial(Regression, dtype),
        batch=functools.partial(regression_batch, dtype), layout=mlbfgs_layout,
        convention="backward", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"),
        positions={"plain": (7, False), "pair_step": (8, True)},  # steps 8 and 9 (T = 3)
        skip_counts=("step",), schedule_counter="pair_updates", continue_steps=6,
        ready=lambda st: st["history"]["count"] >= 1,
        resume_steps=(11, 7), resume_skip_at=7,  # 11 steps: the ring has wrapped
        host_syncs=mlbfgs_syncs, sync_kwargs={"update_freq": 4}, sync_steps=14,
        sync_policies=("skip", "raise"), sync_poison=(11,),
        maximize=True, add_group="before-first-step",
        state_keys=("step", "pair_updates", "nonfinite_steps", "momentum_buffer", "p_bar",
                    "p_bar_prev", "g_bar", "g_bar_prev", "history"),
        state_check=mlbfgs_block_state, invalid=MLBFGS_INVALID,
        group_options={"lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
        bad_group_option=("lr", -1), global_option=("update_freq", 5))


def kfac(name, dtype, mode, factor_dtype, poisons=("grad-nan", "grad-inf")):
    eigen = ("QA", "dA", "QG", "dG")
    return OptimizerCase(
        name=name, cls="KFAC",
        kwargs=dict(lr=0.05, weight_decay=1e-3, mode=mode, factor_dtype=factor_dtype,
                    factor_update_steps=2, inv_update_steps=3, fallback="sgd"),
        model=functools.partial(ConvClassifier, dtype),
        batch=functools.partial(image_batch, dtype), takes_model=True,
        convention="backward", on_nonfinite="skip", skip="counted", poisons=poisons,
        # k (steps done) = 5: nothing due; 6: factors and inverses due
        positions={"plain": (5, False), "factor_step": (6, True)},
        skip_counts=("step", "factor_updates"), continue_steps=4,
        ready=lambda st: st["factor_updates"] >= 1,
        resume_steps=(5, 6), resume_skip_at=3,
        live_state_keys=("A", "G") + (eigen if mode == "eigen" else ("A_inv", "G_inv")),
        host_syncs=kfac_syncs, sync_steps=7, sync_policies=("skip", "raise"), sync_poison=(5,),
        add_group="any-time", added_param_is_sgd=True, copyable=False,
        state_keys=("step", "nonfinite_steps"),
        state_check=kfac_layer_state, invalid=KFAC_INVALID,
        group_options={"lr": 0.5, "momentum": 0.0, "weight_decay": 0.1},
        bad_group_option=("lr", -1), global_option=("damping", 0.1),
        global_checked_at_step=True)


def shampoo(name, factor_dtype):
    return OptimizerCase(
        name=name, cls="Shampoo",
        kwargs=dict(lr=0.01, precondition_frequency=3, start_preconditioning_step=2,
                    max_preconditioner_dim=16, precondition_1d=True, grafting="adam",
                    factor_dtype=factor_dtype),
        model=functools.partial(ConvRegression, F32),
        batch=functools.partial(sequence_batch, F32), layout=shampoo_layout,
        convention="backward", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"),
        positions={"plain": (6, False), "root_step": (7, True)},  # steps 7 and 8 (roots: 2, 5, 8)
        skip_counts=("step",), schedule_counter="root_updates", continue_steps=4,
        ready=lambda st: st["root_updates"] >= 1,
        resume_steps=(8, 7), resume_skip_at=5, live_state_keys=("factors", "roots"),
        host_syncs=shampoo_syncs, sync_steps=12, sync_policies=("skip", "raise"),
        sync_poison=(6, 8), add_group="any-time", add_group_check=shampoo_added_matrix,
        state_keys=("step", "root_updates", "nonfinite_steps", "failed_roots"),
        state_check=shampoo_param_state, invalid=SHAMPOO_INVALID,
        group_options={"lr": 0.5, "betas": (0.5, 0.9), "weight_decay": 0.1},
        bad_group_option=("betas", (0.9, 2.0)), global_option=("precondition_frequency", 4))


def psgd_kron(name, precond_dtype, **kwargs):
    # update_probability 0.5, seed 0: the factors are fitted at steps 1, 3, 4, 7, 8, 9, 11, ...
    return OptimizerCase(
        name=name, cls="PSGDKron",
        kwargs=dict(lr=0.01, weight_decay=1e-3, update_probability=0.5,
                    precond_dtype=precond_dtype, **kwargs),
        model=functools.partial(ConvRegression, F32),
        batch=functools.partial(sequence_batch, F32), layout=psgd_kron_layout,
        convention="backward", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"),
        positions={"plain": (5, False), "update_step": (6, True)},  # steps 6 and 7
        skip_counts=("step", "precond_updates"), continue_steps=4,
        ready=lambda st: st["precond_updates"] >= 1,
        resume_steps=(8, 7), resume_skip_at=5, live_state_keys=("Q", "momentum_buffer"),
        host_syncs=psgd_kron_syncs, sync_steps=8, sync_policies=("skip", "raise"),
        sync_poison=(3, 6), add_group="any-time",
        state_keys=("step", "seed", "precond_updates", "nonfinite_steps"),
        state_check=psgd_kron_param_state, invalid=PSGD_KRON_INVALID,
        group_options={"lr": 0.5, "momentum": 0.5, "weight_decay": 0.1},
        bad_group_option=("weight_decay", -1.0), global_option=("precond_lr", 0.2))


def soap(name, factor_dtype):
    return OptimizerCase(
        name=name, cls="SOAP",
        kwargs=dict(lr=0.01, precondition_frequency=3, max_precond_dim=16, precondition_1d=True,
                    factor_dtype=factor_dtype),
        model=functools.partial(ConvRegression, F32),
        batch=functools.partial(sequence_batch, F32), layout=shampoo_layout,
        convention="backward", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"),
        positions={"plain": (4, False), "refresh_step": (6, True)},  # refreshes at k = 4, 7, 10
        skip_counts=("step",), continue_steps=4, statistics_steps=1,
        ready=lambda st: st["step"] >= 2,
        resume_steps=(8, 7), resume_skip_at=5,
        live_state_keys=("GG", "Q", "exp_avg", "exp_avg_sq"),
        host_syncs=soap_syncs, sync_steps=12, sync_policies=("skip", "raise"),
        sync_poison=(6, 8), add_group="any-time", add_group_check=soap_added_matrix,
        state_keys=("step", "adam_steps", "nonfinite_steps"),
        state_check=soap_param_state, invalid=SOAP_INVALID,
        group_options={"lr": 0.5, "betas": (0.5, 0.9), "weight_decay": 0.1},
        bad_group_option=("betas", (0.9, 1.0)), global_option=("precondition_frequency", 4))


def drsom(name, dtype, **kwargs):
    random = kwargs.get("random", False)
    return OptimizerCase(
        name=name, cls="DRSOM", kwargs=kwargs, model=functools.partial(Classifier, dtype),
        batch=full_batch, convention="loss", on_nonfinite="raise", skip="noop",
        positions={"base": (3, False)},
        ready=lambda st: st["step"] >= 1 and (random or st["count"] >= 1),
        resume_steps=(4, 4), host_syncs=drsom_syncs, sync_steps=12,
        maximize=True, add_group="never", empty_group=False,
        state_keys=("step", "gamma", "directions", "order", "count", "ls_step", "last_length",
                    "generator", "func_evals", "grad_evals", "trials", "rejections",
                    "line_searches", "noise_stops"),
        invalid=DRSOM_INVALID,
        options_checked_at_step=(("gamma", -1.0), ("random", 0), ("max_trials", 2.0),
                                 ("hvp", "exact")))


def kbfgs(name, dtype, history_size=None):
    return OptimizerCase(
        name=name, cls="KBFGS",
        kwargs=dict(lr=0.05, weight_decay=1e-3, inv_update_steps=3, history_size=history_size),
        model=functools.partial(ConvClassifier, dtype),
        batch=functools.partial(image_batch, dtype), takes_model=True,
        convention="closure", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"),
        positions={"plain": (4, False), "inverse_step": (6, True)},  # H_a at k = 0, 3, 6
        skip_counts=("step",), continue_steps=4,
        ready=lambda st: st.get("step", 0) >= 2 and "H_a" in st,
        resume_steps=(5, 6), resume_skip_at=3,
        host_syncs=kbfgs_syncs, sync_steps=7, sync_policies=("skip", "raise"), sync_poison=(5,),
        add_group="any-time", copyable=False, state_keys=("step", "nonfinite_steps"),
        state_check=kbfgs_layer_state, invalid=KBFGS_INVALID,
        group_options={"lr": 0.5, "momentum": 0.0, "weight_decay": 0.1},
        bad_group_option=("lr", -1), global_option=("damping", 0.1),
        global_checked_at_step=True)


def ekfac_layer_state(opt, model):
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            st = opt.state[module.weight]
            assert {"A", "G", "QA", "dA", "QG", "dG", "scale", "factor_updates",
                    "momentum_buffer"} <= set(st)
            assert st["scale"].shape == (module.weight.shape[0], module.weight[0].numel() + 1)
            assert st["scale"].dtype == opt.param_groups[0]["factor_dtype"]


EKFAC_INVALID = tuple(c for c in KFAC_INVALID if c.name not in ("mode", "model")) + (
    Invalid("scale_update_steps", dict(scale_update_steps=0)),
    Invalid("scale_update_steps", dict(scale_update_steps=1.5)),
    Invalid("scale_decay", dict(scale_decay=1.5)), Invalid("scale_decay", dict(scale_decay=-0.1)),
    Invalid("model", build=lambda: soo_ext.EKFAC([nn.Parameter(torch.zeros(2))])),
)


def ekfac(name, dtype, factor_dtype, poisons=("grad-nan", "grad-inf")):
    """KFAC's row with EKFAC's options: factors every 2 steps, bases every 3, scaling every 2
    (k = 5: nothing due; 6: all of it)."""
    from dataclasses import replace  # (the imports above are shared by every row's author)
    return replace(
        kfac(name, dtype, "eigen", factor_dtype, poisons), cls="EKFAC",
        kwargs=dict(lr=0.05, weight_decay=1e-3, factor_dtype=factor_dtype, factor_update_steps=2,
                    inv_update_steps=3, scale_update_steps=2, scale_decay=0.5, fallback="sgd"),
        live_state_keys=("A", "G", "QA", "dA", "QG", "dG", "scale"),
        state_check=ekfac_layer_state, invalid=EKFAC_INVALID)


def kfac_adamw_fallback(name, dtype):
    """KFAC's row at its default fallback, AdamW, with its Linear left out (skip_layers) to
    it, and the default KL clip at the peak lr (its state: a float per layer)."""
    from dataclasses import replace
    base = kfac(name, dtype, "eigen", dtype)

    def state_check(opt, model):
        conv, linear = model.net[0], model.net[3]
        assert {"A", "G", "factor_updates", "momentum_buffer", "peak_lr"} <= set(
            opt.state[conv.weight])
        assert {"exp_avg", "exp_avg_sq", "fallback_step"} <= set(opt.state[linear.weight])
        assert "momentum_buffer" not in opt.state[linear.weight]

    kwargs = {k: v for k, v in base.kwargs.items() if k != "fallback"}  # the default, 'adamw'
    return replace(base, kwargs={**kwargs, "skip_layers": ["net.3"], "fallback_lr": 3e-3},
                   added_param_is_sgd=False, state_check=state_check)


def window_optimizer(name, cls, dtype, **kwargs):
    """MFAC and GGT: a window of 4 (it wraps within the resume run)."""
    return OptimizerCase(
        name=name, cls=cls, kwargs=dict(lr=0.01, window=4, **kwargs),
        model=functools.partial(Regression, dtype),
        batch=functools.partial(regression_batch, dtype), layout=window_layout,
        convention="backward", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"), skip_counts=("step",), continue_steps=4,
        ready=lambda st: int((st["gram"].diagonal() > 0).sum()) >= 2,
        resume_steps=(6, 5), resume_skip_at=3,
        host_syncs=window_syncs, sync_steps=6, sync_policies=("skip", "raise"), sync_poison=(3,),
        maximize=True, add_group="before-first-step",
        state_keys=("step", "nonfinite_steps", "momentum_buffer", "window", "gram", "slot")
        + (("exp_avg",) if cls == "GGT" else ())
        + (("gram_inverse", "gram_inverse_damping") if kwargs.get("solver") == "update" else ()),
        state_check=window_state, invalid=MFAC_INVALID if cls == "MFAC" else GGT_INVALID,
        group_options={"lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
        bad_group_option=("lr", -1), global_option=("window", 5))


NATURAL_GRADIENT_INVALID = (
    Invalid("lr", dict(lr=-1.0)), Invalid("lr", dict(lr=float("nan"))),
    Invalid("momentum", dict(momentum=1.0)), Invalid("weight_decay", dict(weight_decay=-1e-3)),
    Invalid("damping", dict(damping=0.0)), Invalid("damping", dict(damping=float("inf"))),
    Invalid("per_layer", dict(per_layer=1)), Invalid("max_state_bytes", dict(max_state_bytes=0)),
    Invalid("curvature_samples", dict(curvature_samples=0)),
    Invalid("curvature_samples", dict(curvature_samples=2.0)),
    Invalid("max_state_bytes", dict(max_state_bytes=1.5)),
    Invalid("on_nonfinite", dict(on_nonfinite="ignore")),
    Invalid("batch_averaged", dict(batch_averaged=1)),
    Invalid("skip_layers", dict(skip_layers=["("])), Invalid("grad_scaler", dict(grad_scaler=3)),
    Invalid("fallback", dict(fallback="adam")), Invalid("fallback_lr", dict(fallback_lr=-1.0)),
    Invalid("fallback_betas", dict(fallback_betas=(1.0, 0.9))),
    Invalid("fallback_eps", dict(fallback_eps=0.0)),
    Invalid("model", build=lambda: soo_ext.NaturalGradient([nn.Parameter(torch.zeros(2))])),
)


def natural_gradient_state(opt, model):
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert set(opt.state[module.weight]) <= {"step", "nonfinite_steps", "momentum_buffer"}
            assert "momentum_buffer" in opt.state[module.weight]


def natural_gradient(name, dtype, **kwargs):
    """NaturalGradient (Woodbury): nothing scheduled, every step solves its batch's system."""
    return OptimizerCase(
        name=name, cls="NaturalGradient",
        kwargs=dict(lr=0.05, weight_decay=1e-3, damping=1e-2, fallback="sgd", **kwargs),
        model=functools.partial(ConvClassifier, dtype),
        batch=functools.partial(image_batch, dtype), takes_model=True,
        convention="backward", on_nonfinite="skip", skip="counted",
        poisons=("grad-nan", "grad-inf"), positions={"plain": (3, False)},
        skip_counts=("step",), continue_steps=3, ready=lambda st: st.get("step", 0) >= 1,
        resume_steps=(3, 3), resume_skip_at=2,
        host_syncs=window_syncs, sync_steps=4, sync_policies=("skip", "raise"), sync_poison=(2,),
        add_group="any-time", added_param_is_sgd=True, copyable=False,
        state_keys=("step", "nonfinite_steps"), state_check=natural_gradient_state,
        invalid=NATURAL_GRADIENT_INVALID,
        group_options={"lr": 0.5, "momentum": 0.0, "weight_decay": 0.1},
        bad_group_option=("lr", -1), global_option=("damping", 0.1))


def natural_gradient_adamw_fallback(name, dtype):
    """NaturalGradient's row at its default fallback, AdamW, with its Linear left out
    (skip_layers) to it."""
    from dataclasses import replace
    base = natural_gradient(name, dtype)

    def state_check(opt, model):
        conv, linear = model.net[0], model.net[3]
        assert "momentum_buffer" in opt.state[conv.weight]
        assert {"exp_avg", "exp_avg_sq", "fallback_step"} <= set(opt.state[linear.weight])
        assert "momentum_buffer" not in opt.state[linear.weight]

    kwargs = {k: v for k, v in base.kwargs.items() if k != "fallback"}  # the default, 'adamw'
    return replace(base, kwargs={**kwargs, "skip_layers": ["net.3"]},
                   added_param_is_sgd=False, state_check=state_check)


# Names: the variant, then the params' dtype where it is not float64 (and the storage dtype of
# the curvature where it is not the params').
STAT = ("grad-nan", "grad-inf", "stat-inf")
CASES = [
    lbfgs("lbfgs", F64, None, 1e-3),
    lbfgs("lbfgs-strong_wolfe", F64, "strong_wolfe", 1.0),
    lbfgs("lbfgs-strong_wolfe-f32-bf16history", F32, "strong_wolfe", 1.0, history_dtype=BF16),
    bfgs("bfgs-f32", F32, None, 1e-3),
    bfgs("bfgs-strong_wolfe-f32", F32, "strong_wolfe", 1.0),
    bfgs("bfgs-strong_wolfe", F64, "strong_wolfe", 1.0),
    mlbfgs("mlbfgs", F64),
    mlbfgs("mlbfgs-f32-bf16history", F32, history_dtype=BF16),
    kfac("kfac-eigen", F64, "eigen", F64, poisons=STAT),
    kfac("kfac-eigen-f32", F32, "eigen", F32, poisons=STAT),
    kfac("kfac-inverse-f32-f64factors", F32, "inverse", F64),
    kfac_adamw_fallback("kfac-adamw-fallback-f32", F32),
    ekfac("ekfac", F64, F64, poisons=STAT),
    ekfac("ekfac-f32", F32, F32, poisons=STAT),
    shampoo("shampoo-f32", F32),
    shampoo("shampoo-f32-f64factors", F64),
    soap("soap-f32", F32),
    soap("soap-f32-f64factors", F64),
    drsom("drsom-fd", F64),
    drsom("drsom-fd-f32", F32),
    drsom("drsom-random-f32", F32, random=True),
    drsom("drsom-central-k3-f32", F32, hvp="central", directions=3),
    drsom("drsom-interp-f32", F32, hvp="interp"),
    drsom("drsom-autograd-f32", F32, hvp="autograd"),
    drsom("drsom-interp-k3-f32", F32, hvp="interp", directions=3),
    kbfgs("kbfgs", F64),
    kbfgs("kbfgs-f32", F32),
    kbfgs("kbfgs-lbfgs-f32", F32, history_size=2),
    psgd_kron("psgd_kron-f32", F32),
    psgd_kron("psgd_kron-f32-f64precond-onediag", F64, memory_save_mode="one_diag",
              momentum_into_precond_update=False),
    window_optimizer("mfac", "MFAC", F64, damping=1e-3),
    window_optimizer("mfac-f32-bf16window", "MFAC", F32, damping=1e-3, window_dtype=BF16),
    window_optimizer("mfac-update", "MFAC", F64, damping=1e-3, solver="update"),
    # beta1^window / eps < 1: no short-window warning
    window_optimizer("ggt", "GGT", F64, betas=(0.5, 1.0), eps=0.1),
    window_optimizer("ggt-f32", "GGT", F32, momentum=0.5, betas=(0.5, 0.9), eps=0.1),
    natural_gradient("natural_gradient", F64),
    natural_gradient("natural_gradient-per_layer-f32", F32, per_layer=True),
    natural_gradient("natural_gradient-S2-f32", F32, curvature_samples=2),  # of 4 samples
    natural_gradient_adamw_fallback("natural_gradient-adamw-fallback-f32", F32),
]

# One row per class, for the checks that depend on the class only (arguments, param groups).
FAMILIES = list({case.cls: case for case in reversed(CASES)}.values())[::-1]
