"""soo_ext.LBFGS: tracking torch.optim.LBFGS, param groups, history dtype, non-finite values and
errors mid-step, curvature pairs.  What every optimizer promises alike (resume, bad arguments,
the torch.optim conventions, host syncs) is checked by tests/optim/test_contract.py."""
import pytest
import torch
from torch import nn

import soo_ext
from soo_ext import NonFiniteError

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
# Bad input

def small_problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.linspace(-1.5, 1.5, 60, dtype=dtype).requires_grad_(True)
    w = torch.randn(60, dtype=dtype, generator=gen).abs() + 0.5

    def loss_fn():
        return rosenbrock(x) + (w * x ** 2).sum()
    return x, loss_fn


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
# CUDA

def param(dtype=torch.float32, device="cpu"):
    return torch.zeros(3, dtype=dtype, device=device, requires_grad=True)


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
        soo_ext.LBFGS([param(), param(device="cuda")])
