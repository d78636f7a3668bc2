"""soo_ext.LBFGS: tracking torch.optim.LBFGS, param groups, resume, bad input, conventions."""
import copy

import pytest
import torch
from torch import nn

import soo_ext
from soo_ext import NonFiniteError
from soo_ext.optim.line_search import LinePoint, cubic_interpolate, strong_wolfe

from conftest import count_host_syncs, saved_copy

LINE_SEARCHES = [(None, 1e-3), ("strong_wolfe", 1.0)]  # (line_search_fn, lr keeping torch stable)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosenbrock_start(n=1000, device="cpu", near_minimum=False):
    if near_minimum:
        gen = torch.Generator().manual_seed(0)
        x = 1 + 0.3 * torch.randn(n, dtype=torch.float64, generator=gen)
    else:
        x = torch.full((n,), -1.2, dtype=torch.float64)
        x[1::2] = 1.0
    return x.to(device).requires_grad_(True)


def make_closure(opt, loss_fn, record=None):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if record is not None:
            record.append(loss.item())
        return loss
    return closure


def run_rosenbrock(cls, steps, device="cpu", near_minimum=False, **kw):
    """Per-step losses, the losses of every closure evaluation, and the final point."""
    x = rosenbrock_start(device=device, near_minimum=near_minimum)
    opt = cls([x], **kw)
    evaluations = []
    closure = make_closure(opt, lambda: rosenbrock(x), evaluations)
    losses = [opt.step(closure).item() for _ in range(steps)]
    return losses, evaluations, x.detach()


def history_of(opt):
    return opt.state[opt.param_groups[0]["params"][0]]["history"]


def assert_rel_close(a, b, rtol):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert abs(u - v) <= rtol * max(abs(u), abs(v)), (u, v)


# ---------------------------------------------------------------------------------------------
# Tracking torch.optim.LBFGS

@pytest.mark.parametrize("line_search_fn,lr", LINE_SEARCHES)
def test_tracks_torch_on_rosenbrock(line_search_fn, lr, device="cpu"):
    kw = dict(lr=lr, line_search_fn=line_search_fn)
    # 20 steps of one iteration: the pairs completed across step() calls.
    ours, ours_evals, _ = run_rosenbrock(soo_ext.LBFGS, 20, device, max_iter=1, **kw)
    ref, ref_evals, _ = run_rosenbrock(torch.optim.LBFGS, 20, device, max_iter=1, **kw)
    assert_rel_close(ours, ref, 1e-6)
    assert_rel_close(ours_evals, ref_evals, 1e-6)
    # One step of 20 iterations: every closure evaluation (loss after each iteration and trial).
    _, ours_evals, _ = run_rosenbrock(soo_ext.LBFGS, 1, device, **kw)
    _, ref_evals, _ = run_rosenbrock(torch.optim.LBFGS, 1, device, **kw)
    assert len(ours_evals) >= 20
    assert_rel_close(ours_evals, ref_evals, 1e-6)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_same_minimiser_as_torch_on_rosenbrock(line_search_fn, device="cpu"):
    kw = dict(line_search_fn=line_search_fn, tolerance_grad=1e-10, tolerance_change=1e-14)
    _, _, ours = run_rosenbrock(soo_ext.LBFGS, 6, device, near_minimum=True, **kw)
    _, _, ref = run_rosenbrock(torch.optim.LBFGS, 6, device, near_minimum=True, **kw)
    ones = torch.ones_like(ours)
    assert torch.allclose(ref, ones, atol=1e-6) and torch.allclose(ours, ones, atol=1e-6)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-9)


def mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    inputs = torch.randn(32, 3, dtype=torch.float64, generator=gen)
    targets = torch.randn(32, 2, dtype=torch.float64, generator=gen)
    return model, lambda: nn.functional.mse_loss(model(inputs), targets)


@pytest.mark.parametrize("line_search_fn,lr", [(None, 0.1), ("strong_wolfe", 1.0)])
def test_tracks_torch_on_mlp(line_search_fn, lr):
    runs = []
    for cls in (soo_ext.LBFGS, torch.optim.LBFGS):
        model, loss_fn = mlp_problem()
        opt = cls(model.parameters(), lr=lr, max_iter=5, line_search_fn=line_search_fn)
        evaluations = []
        closure = make_closure(opt, loss_fn, evaluations)
        losses = [opt.step(closure).item() for _ in range(4)]
        runs.append((losses, evaluations, [p.detach() for p in model.parameters()]))
    (ours, ours_evals, ours_p), (ref, ref_evals, ref_p) = runs
    assert_rel_close(ours, ref, 1e-6)
    assert_rel_close(ours_evals, ref_evals, 1e-6)
    assert ours[-1] < 0.7 * ours[0]
    for a, b in zip(ours_p, ref_p):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_maximize_tracks_torch():
    """maximize=True on -f takes torch.optim.LBFGS's steps minimising f (torch's own maximize
    flag is newer than torch 2.11, which this package also supports)."""
    x = rosenbrock_start(n=50)
    opt = soo_ext.LBFGS([x], max_iter=10, line_search_fn="strong_wolfe", maximize=True)
    closure = make_closure(opt, lambda: -rosenbrock(x))
    ours = [-opt.step(closure).item() for _ in range(3)]
    x_torch = rosenbrock_start(n=50)
    opt = torch.optim.LBFGS([x_torch], max_iter=10, line_search_fn="strong_wolfe")
    closure = make_closure(opt, lambda: rosenbrock(x_torch))
    assert_rel_close(ours, [opt.step(closure).item() for _ in range(3)], 1e-6)
    assert_rel_close(x.detach(), x_torch.detach(), 1e-6)


# ---------------------------------------------------------------------------------------------
# Line search core, alone

def test_cubic_interpolate_finds_the_minimiser_of_a_cubic():
    def f(t):
        return t ** 3 - 3 * t  # minimum at t = 1
    t = cubic_interpolate(0.0, f(0.0), -3.0, 2.0, f(2.0), 9.0)
    assert t == pytest.approx(1.0)
    assert cubic_interpolate(0.0, f(0.0), -3.0, 2.0, f(2.0), 9.0, bounds=(1.5, 3.0)) == 1.5
    # No real minimiser: the midpoint of the bounds.
    assert cubic_interpolate(0.0, 0.0, 2.0, 1.0, 1.0, 2.0, bounds=(0.0, 4.0)) == 2.0


@pytest.mark.parametrize("t0", [1e-3, 1.0, 30.0])
def test_strong_wolfe_on_a_quadratic_meets_the_conditions(t0):
    def evaluate(t, keep):
        return LinePoint(t, (t - 2.0) ** 2, 2 * (t - 2.0))
    start = evaluate(0.0, ())
    point, evals = strong_wolfe(evaluate, start, t0, d_norm=1.0)
    assert evals >= 1
    assert point.f <= start.f + 1e-4 * point.t * start.gtd
    assert abs(point.gtd) <= 0.9 * abs(start.gtd)


# ---------------------------------------------------------------------------------------------
# Param groups, history dtype

def quadratic_problem(n=40, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, dtype=dtype, generator=gen)
    h = a @ a.T / n + torch.eye(n, dtype=dtype)
    b = torch.randn(n, dtype=dtype, generator=gen)
    return h, b, lambda x: 0.5 * x @ h @ x - b @ x


def test_groups_with_equal_lr_reduce_exactly_to_one_group():
    _, _, f = quadratic_problem()
    results = []
    for grouped in (False, True):
        x1 = torch.zeros(15, dtype=torch.float64, requires_grad=True)
        x2 = torch.zeros(25, dtype=torch.float64, requires_grad=True)
        params = [{"params": [x1]}, {"params": [x2]}] if grouped else [x1, x2]
        opt = soo_ext.LBFGS(params, lr=0.5, max_iter=5)
        closure = make_closure(opt, lambda: f(torch.cat([x1, x2])))
        for _ in range(3):
            opt.step(closure)
        results.append(torch.cat([x1, x2]).detach())
    assert torch.equal(results[0], results[1])


def test_group_lrs_scale_the_first_step_and_lr_zero_freezes():
    _, b, f = quadratic_problem(n=60)
    x = [torch.zeros(20, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    opt = soo_ext.LBFGS([{"params": [x[0]], "lr": 1.0}, {"params": [x[1]], "lr": 0.25},
                         {"params": [x[2]], "lr": 0.0}], max_iter=1)
    opt.step(make_closure(opt, lambda: f(torch.cat(x))))
    g = -b  # gradient at 0
    unit_step = -min(1.0, 1.0 / g.abs().sum().item()) * g
    assert torch.allclose(x[0].detach(), unit_step[:20], rtol=1e-12, atol=0)
    assert torch.allclose(x[1].detach(), 0.25 * unit_step[20:40], rtol=1e-12, atol=0)
    assert torch.equal(x[2].detach(), torch.zeros(20, dtype=torch.float64))


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_groups_with_different_lr_converge(line_search_fn):
    h, b, f = quadratic_problem()
    x1 = torch.zeros(15, dtype=torch.float64, requires_grad=True)
    x2 = torch.zeros(25, dtype=torch.float64, requires_grad=True)
    opt = soo_ext.LBFGS([{"params": [x1], "lr": 1.0}, {"params": [x2], "lr": 0.1}],
                        line_search_fn=line_search_fn, tolerance_grad=1e-12, tolerance_change=0)
    closure = make_closure(opt, lambda: f(torch.cat([x1, x2])))
    for _ in range(20):
        opt.step(closure)
    solution = torch.linalg.solve(h, b)
    assert torch.allclose(torch.cat([x1, x2]).detach(), solution, atol=1e-6)


def logistic_problem(dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(200, 20, generator=gen).to(dtype)
    w_true = torch.randn(20, generator=gen).to(dtype)
    labels = (features @ w_true > 0).to(dtype)
    w = torch.zeros(20, dtype=dtype, requires_grad=True)
    bias = torch.zeros(1, dtype=dtype, requires_grad=True)

    def loss_fn():
        logits = features @ w + bias
        return nn.functional.binary_cross_entropy_with_logits(logits, labels) + 1e-2 * (w @ w)
    return [w, bias], loss_fn


def test_bfloat16_history_converges_on_logistic_regression():
    finals = {}
    for history_dtype in (None, torch.bfloat16):
        params, loss_fn = logistic_problem()
        opt = soo_ext.LBFGS(params, line_search_fn="strong_wolfe", history_dtype=history_dtype,
                            history_size=10)
        closure = make_closure(opt, loss_fn)
        first = opt.step(closure).item()
        for _ in range(4):
            opt.step(closure)
        finals[history_dtype] = loss_fn().item()
        assert history_of(opt)["S"].dtype == (history_dtype or torch.float32)
        assert finals[history_dtype] < 0.5 * first
    assert finals[torch.bfloat16] == pytest.approx(finals[None], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# state_dict resume

def small_problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.linspace(-1.5, 1.5, 60, dtype=dtype).requires_grad_(True)
    w = torch.randn(60, dtype=dtype, generator=gen).abs() + 0.5

    def loss_fn():
        return rosenbrock(x) + (w * x ** 2).sum()
    return x, loss_fn


@pytest.mark.parametrize("line_search_fn,lr,dtype,history_dtype", [
    (None, 1e-3, torch.float64, None),
    ("strong_wolfe", 1.0, torch.float64, None),
    ("strong_wolfe", 1.0, torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("via_bytes", [False, True])
def test_resume_is_bit_identical(line_search_fn, lr, dtype, history_dtype, via_bytes):
    kw = dict(lr=lr, max_iter=4, history_size=5, line_search_fn=line_search_fn,
              history_dtype=history_dtype)
    x, loss_fn = small_problem(dtype)
    opt = soo_ext.LBFGS([x], **kw)
    closure = make_closure(opt, loss_fn)
    for _ in range(3):  # 12 iterations: the 5-slot ring has wrapped
        opt.step(closure)
    saved = saved_copy({"x": x.detach().clone(), "opt": opt.state_dict()}, via_bytes)
    for _ in range(3):
        opt.step(closure)

    y, loss_fn2 = small_problem(dtype)
    with torch.no_grad():
        y.copy_(saved["x"])
    opt2 = soo_ext.LBFGS([y], **kw)
    opt2.load_state_dict(saved["opt"])
    assert history_of(opt2)["S"].dtype == (history_dtype or dtype)
    closure2 = make_closure(opt2, loss_fn2)
    for _ in range(3):
        opt2.step(closure2)
    assert torch.equal(x, y)
    h1, h2 = history_of(opt), history_of(opt2)
    assert h2["S"].dtype == (history_dtype or dtype)
    for key in ("S", "Y", "SY", "YY"):
        assert torch.equal(h1[key], h2[key])
    assert (h1["newest"], h1["count"]) == (h2["newest"], h2["count"])


# ---------------------------------------------------------------------------------------------
# Bad input

def snapshot(opt, params):
    state = copy.deepcopy(opt.state[params[0]])
    return [p.detach().clone() for p in params], state


def assert_untouched(opt, params, before):
    values, state = before
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    now = opt.state[params[0]]
    for key in ("S", "Y", "SY", "YY", "newest", "count"):
        a, b = now["history"][key], state["history"][key]
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    for key in ("d", "prev_flat_grad"):
        assert torch.equal(now[key], state[key])
    for key in ("t", "prev_loss", "n_iter", "func_evals"):
        assert now[key] == state[key]


def poisoned(loss_fn, x, what):
    def bad():
        loss = loss_fn()
        if what == "loss":
            return loss * float("nan")
        if what == "grad":
            return loss + (x * torch.tensor(float("inf"), dtype=x.dtype)).sum() * 0
        return loss * float("inf")
    return bad


@pytest.mark.parametrize("what", ["loss", "grad", "inf"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_nonfinite_first_evaluation_raises_and_leaves_everything(what, line_search_fn):
    x, loss_fn = small_problem()
    opt = soo_ext.LBFGS([x], lr=1e-3 if line_search_fn is None else 1, max_iter=3,
                        line_search_fn=line_search_fn)
    for _ in range(2):
        opt.step(make_closure(opt, loss_fn))
    before = snapshot(opt, [x])
    with pytest.raises(NonFiniteError, match="non-finite"):
        opt.step(make_closure(opt, poisoned(loss_fn, x, what)))
    assert_untouched(opt, [x], before)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_nonfinite_first_evaluation_skipped(line_search_fn):
    runs = []
    for skip_one in (True, False):
        x, loss_fn = small_problem()
        opt = soo_ext.LBFGS([x], lr=1e-3 if line_search_fn is None else 1, max_iter=3,
                            line_search_fn=line_search_fn, on_nonfinite="skip")
        good = make_closure(opt, loss_fn)
        opt.step(good)
        if skip_one:
            before = snapshot(opt, [x])
            loss = opt.step(make_closure(opt, poisoned(loss_fn, x, "grad")))
            assert torch.is_tensor(loss)
            assert_untouched(opt, [x], before)
        for _ in range(2):  # the run goes on as if the bad step never happened
            opt.step(good)
        runs.append(x.detach())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_nonfinite_mid_step_keeps_the_last_finite_iterate(on_nonfinite, line_search_fn):
    x, loss_fn = small_problem()
    opt = soo_ext.LBFGS([x], lr=1e-3 if line_search_fn is None else 1, max_iter=10,
                        line_search_fn=line_search_fn, on_nonfinite=on_nonfinite)
    opt.step(make_closure(opt, loss_fn))
    calls = []

    def flaky():  # finite for 6 evaluations, then NaN
        calls.append(None)
        return loss_fn() * (float("nan") if len(calls) > 6 else 1.0)
    closure = make_closure(opt, flaky)
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteError):
            opt.step(closure)
    else:
        opt.step(closure)
    assert len(calls) == 7  # it did fail within the step
    state = opt.state[x]
    history = state["history"]
    assert all(torch.isfinite(history[k]).all() for k in ("S", "Y", "SY", "YY"))
    assert state["t"] == 0.0  # no pending pair: the params are where prev_flat_grad was taken
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    assert loss.item() == state["prev_loss"]
    assert torch.equal(x.grad, state["prev_flat_grad"])
    for _ in range(3):  # and the run goes on
        opt.step(make_closure(opt, loss_fn))
    assert loss_fn().item() < state["prev_loss"]


def test_failure_in_the_first_iteration_restarts_afresh():
    runs = []
    for fail_once in (True, False):
        x, loss_fn = small_problem()
        opt = soo_ext.LBFGS([x], lr=1e-3, max_iter=4, on_nonfinite="skip")
        if fail_once:
            calls = []

            def flaky():  # the evaluation after the first move is NaN
                calls.append(None)
                return loss_fn() * (float("nan") if len(calls) == 2 else 1.0)
            opt.step(make_closure(opt, flaky))
            assert len(calls) == 2 and opt.state[x]["n_iter"] == 0
        for _ in range(2):
            opt.step(make_closure(opt, loss_fn))
        runs.append(x.detach())
    assert torch.equal(runs[0], runs[1])


def test_closure_error_mid_step_restores_the_last_iterate():
    x, loss_fn = small_problem()
    opt = soo_ext.LBFGS([x], max_iter=10, line_search_fn="strong_wolfe")
    calls = []

    def failing():
        calls.append(None)
        if len(calls) == 5:
            raise KeyError("data loader broke")
        return loss_fn()
    with pytest.raises(KeyError):
        opt.step(make_closure(opt, failing))
    state = opt.state[x]
    assert state["t"] == 0.0
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    assert loss.item() == state["prev_loss"] and torch.equal(x.grad, state["prev_flat_grad"])


def test_pairs_with_nonpositive_curvature_are_not_stored():
    x = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64, requires_grad=True)
    opt = soo_ext.LBFGS([x], lr=0.1, max_iter=5)
    opt.step(make_closure(opt, lambda: -(x ** 2).sum()))  # concave: y.s < 0 on every step
    assert opt.state[x]["n_iter"] == 5 and history_of(opt)["count"] == 0
    x2 = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64, requires_grad=True)
    opt2 = soo_ext.LBFGS([x2], lr=0.1, max_iter=5)
    opt2.step(make_closure(opt2, lambda: (x2 ** 2).sum()))  # convex: every pair is kept
    assert history_of(opt2)["count"] == 4


# ---------------------------------------------------------------------------------------------
# Arguments

def param(dtype=torch.float32):
    return torch.zeros(3, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"), (dict(lr=torch.tensor([1.0, 2.0])), "lr"),
    (dict(max_iter=0), "max_iter"), (dict(max_iter=2.5), "max_iter"),
    (dict(max_eval=0), "max_eval"), (dict(history_size=0), "history_size"),
    (dict(tolerance_grad=-1e-3), "tolerance_grad"),
    (dict(tolerance_change=-1.0), "tolerance_change"),
    (dict(tolerance_change=float("nan")), "tolerance_change"),
    (dict(line_search_fn="backtracking"), "line_search_fn"),
    (dict(history_dtype=torch.float16), "history_dtype"),
    (dict(history_dtype=torch.float64), "history_dtype"),  # float32 params
    (dict(on_nonfinite="ignore"), "on_nonfinite"), (dict(maximize=1), "maximize"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        soo_ext.LBFGS([param()], **kwargs)


def test_bfloat16_history_refused_with_float64_params():
    with pytest.raises(ValueError, match="history_dtype"):
        soo_ext.LBFGS([param(torch.float64)], history_dtype=torch.bfloat16)


def test_invalid_group_options_refused():
    with pytest.raises(ValueError, match="lr"):
        soo_ext.LBFGS([{"params": [param()]}, {"params": [param()], "lr": -1}])
    with pytest.raises(ValueError, match="max_iter"):
        soo_ext.LBFGS([{"params": [param()]}, {"params": [param()], "max_iter": 3}])


def test_complex_sparse_and_mixed_params_refused():
    with pytest.raises(ValueError, match="complex"):
        soo_ext.LBFGS([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="dtype"):
        soo_ext.LBFGS([param(), param(torch.float64)])
    with pytest.raises(ValueError, match="dtype"):
        soo_ext.LBFGS([torch.zeros(3, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(ValueError, match="device"):
        soo_ext.LBFGS([param(), torch.zeros(3, device="meta", requires_grad=True)])
    emb = nn.Embedding(10, 3, sparse=True)
    opt = soo_ext.LBFGS(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(make_closure(opt, lambda: emb(torch.tensor([1, 2])).sum()))


def test_closure_required():
    opt = soo_ext.LBFGS([param()])
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_param_group_cannot_be_added_after_the_first_step():
    x = param()
    opt = soo_ext.LBFGS([x])
    opt.add_param_group({"params": [param()]})  # before: fine
    opt.step(make_closure(opt, lambda: (x - 1).pow(2).sum()))
    with pytest.raises(RuntimeError, match="param group"):
        opt.add_param_group({"params": [param()]})


# ---------------------------------------------------------------------------------------------
# torch.optim conventions

def test_step_hooks_fire():
    x = param()
    opt = soo_ext.LBFGS([x])
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.step(make_closure(opt, lambda: (x - 1).pow(2).sum()))
    assert calls == ["pre", "post"]


def test_lr_scheduler_changes_the_lr_used():
    _, _, f = quadratic_problem()
    finals = []
    for schedule in ("scheduler", "manual", "none"):
        x = torch.zeros(40, dtype=torch.float64, requires_grad=True)
        opt = soo_ext.LBFGS([x], lr=1.0, max_iter=3)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        closure = make_closure(opt, lambda: f(x))
        for k in range(3):
            if schedule == "manual":
                opt.param_groups[0]["lr"] = 0.5 ** k
            opt.step(closure)
            if schedule == "scheduler":
                scheduler.step()
        finals.append(x.detach().clone())
    assert opt.param_groups[0]["lr"] == 1.0  # the "none" run never stepped its scheduler
    assert torch.equal(finals[0], finals[1])
    assert not torch.equal(finals[0], finals[2])


def test_state_layout_and_zero_grad():
    x = param()
    opt = soo_ext.LBFGS([x], history_size=7)
    opt.step(make_closure(opt, lambda: (x - 1).pow(2).sum()))
    state = opt.state[x]
    keys = {"func_evals", "n_iter", "d", "t", "prev_flat_grad", "prev_loss", "history"}
    assert keys <= set(state)
    assert history_of(opt)["S"].shape == (7, 3)
    opt.zero_grad()
    assert x.grad is None


def test_host_syncs_per_iteration(monkeypatch):
    """One host fetch per closure evaluation plus one per direction (one per iteration)."""
    count = count_host_syncs(monkeypatch)
    for line_search_fn, lr in LINE_SEARCHES:
        x = rosenbrock_start(n=100)
        opt = soo_ext.LBFGS([x], lr=lr, max_iter=8, line_search_fn=line_search_fn)
        closure = make_closure(opt, lambda: rosenbrock(x))
        for _ in range(2):
            state = opt.state[x]
            n_iter, func_evals = state.get("n_iter", 0), state.get("func_evals", 0)
            count[0] = 0
            opt.step(closure)
            iterations, evaluations = state["n_iter"] - n_iter, state["func_evals"] - func_evals
            assert iterations == 8
            assert count[0] == iterations + evaluations
            if line_search_fn is None:
                assert count[0] == 2 * iterations  # the last iteration does not reevaluate


# ---------------------------------------------------------------------------------------------
# CUDA

@cuda
@pytest.mark.parametrize("line_search_fn,lr", LINE_SEARCHES)
def test_tracks_torch_on_rosenbrock_cuda(line_search_fn, lr):
    test_tracks_torch_on_rosenbrock(line_search_fn, lr, device="cuda")


@cuda
def test_same_minimiser_as_torch_on_rosenbrock_cuda():
    test_same_minimiser_as_torch_on_rosenbrock("strong_wolfe", device="cuda")


@cuda
def test_mixed_cpu_cuda_params_refused():
    with pytest.raises(ValueError, match="device"):
        soo_ext.LBFGS([param(), param().cuda()])
