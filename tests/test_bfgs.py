"""soo::bfgs_direction against the textbook BFGS update, and soo_ext.BFGS as an optimizer."""
import copy
import math

import pytest
import torch

import soo_ext
from soo_ext import ops, reference
from soo_ext.curvature.dense_inverse import DenseInverseHessian
from soo_ext import NonFiniteError

from conftest import rel_err, saved_copy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]
requires_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")


def random_problem(n, seed=0):
    """A symmetric positive-definite H, a pair with y.s > 0, and a gradient (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, generator=gen)
    H = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    H = (H + H.T) / 2
    s = torch.randn(n, dtype=torch.float64, generator=gen)
    y = 0.8 * s + 0.1 * torch.randn(n, dtype=torch.float64, generator=gen)
    if y.dot(s) <= 0:
        y = -y
    g = torch.randn(n, dtype=torch.float64, generator=gen)
    return H, s, y, g


def textbook_update(H, s, y):
    """(I - rho s y^T) H (I - rho y s^T) + rho s s^T, as matrices."""
    rho = 1.0 / y.dot(s)
    V = torch.eye(len(s), dtype=H.dtype) - rho * torch.outer(y, s)
    return V.T @ H @ V + rho * torch.outer(s, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 300, 1025])
@pytest.mark.parametrize("update", [False, True])
def test_direction_matches_textbook(device, dtype, tol, n, update):
    H, s, y, g = random_problem(n, seed=n)
    H_ref = textbook_update(H, s, y) if update else H
    d_ref = -(H_ref @ g)
    H_op = H.to(device=device, dtype=dtype)
    d, stats = ops.bfgs_direction(H_op, s.to(H_op), y.to(H_op), g.to(H_op), update)
    assert d.dtype == dtype and d.device.type == device
    assert rel_err(d, d_ref) < tol
    assert rel_err(H_op, H_ref) < tol
    assert torch.equal(H_op, H_op.T), "the update must keep H exactly symmetric"
    assert stats[0].item() == pytest.approx(g.dot(d_ref).item(), rel=10 * tol)
    assert stats[1].item() == pytest.approx(d_ref.abs().max().item(), rel=10 * tol)


@requires_ext
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("update", [False, True])
def test_kernel_matches_reference_op(dtype, tol, update):
    H, s, y, g = (t.to(dtype) for t in random_problem(129, seed=3))
    H_ref = H.clone()
    d, stats = ops.bfgs_direction(H, s, y, g, update)
    d_ref, stats_ref = reference.bfgs_direction(H_ref, s, y, g, update)
    assert rel_err(d, d_ref) < tol and rel_err(H, H_ref) < tol
    torch.testing.assert_close(stats, stats_ref, rtol=10 * tol, atol=10 * tol)


@requires_ext
def test_cpu_result_independent_of_thread_count():
    H, s, y, g = (t.float() for t in random_problem(517, seed=5))
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            H_run = H.clone()
            outs.append((H_run, *ops.bfgs_direction(H_run, s, y, g, True)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32"])
def test_cuda_matches_cpu(dtype, tol):
    H, s, y, g = (t.to(dtype) for t in random_problem(1000, seed=7))
    H_cuda = H.cuda()
    d_cuda, stats_cuda = ops.bfgs_direction(H_cuda, s.cuda(), y.cuda(), g.cuda(), True)
    d, stats = ops.bfgs_direction(H, s, y, g, True)
    assert rel_err(d_cuda, d) < tol and rel_err(H_cuda, H) < tol
    assert torch.equal(H_cuda, H_cuda.T)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("update", [False, True])
def test_opcheck(device, update):
    H, s, y, g = (t.to(device=device, dtype=torch.float32) for t in random_problem(37, seed=2))
    torch.library.opcheck(torch.ops.soo.bfgs_direction.default, (H, s, y, g, update))


@pytest.mark.parametrize("bad, match", [
    (lambda H, s, y, g: (H[:, :-1], s, y, g), "must be"),
    (lambda H, s, y, g: (H, s[:-1], y, g), "must be"),
    (lambda H, s, y, g: (H.float(), s, y, g), "dtype"),
    (lambda H, s, y, g: (H.T.contiguous().T, s, y, g), "contiguous"),
    (lambda H, s, y, g: (H, s, y, g.half()), "float32 or float64"),
])
def test_bad_arguments_are_refused(bad, match):
    H, s, y, g = random_problem(6)
    H = H.t().contiguous().t() if match == "contiguous" else H
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.bfgs_direction(*bad(H, s, y, g), True)


# ---------------------------------------------------------------------------------------------
# DenseInverseHessian

def test_first_pair_rescales_the_identity():
    H, s, y, g = random_problem(9)
    model = DenseInverseHessian(9, torch.float64)
    d, _ = model.direction(g)
    assert torch.equal(d, -g)  # H = I before any pair
    model.push(s, y)
    d, _ = model.direction(g)
    H0 = (y.dot(s) / y.dot(y)) * torch.eye(9, dtype=torch.float64)
    expected = textbook_update(H0, s, y)
    assert rel_err(model.H, expected) < 1e-12 and rel_err(d, -(expected @ g)) < 1e-12


# ---------------------------------------------------------------------------------------------
# The optimizer

def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def make_closure(opt, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("device", DEVICES)
def test_converges_on_rosenbrock(device):
    x = torch.full((30,), -1.2, dtype=torch.float64, device=device)
    x[1::2] = 1.0
    x.requires_grad_(True)
    opt = soo_ext.BFGS([x], line_search_fn="strong_wolfe", max_iter=100, tolerance_grad=1e-10,
                       tolerance_change=1e-14)
    closure = make_closure(opt, lambda: rosenbrock(x))
    for _ in range(5):
        opt.step(closure)
    assert rosenbrock(x).item() < 1e-14
    assert torch.allclose(x.detach().cpu(), torch.ones(30, dtype=torch.float64), atol=1e-7)


def logistic_problem(dtype=torch.float64):
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    X = torch.tensor(features, dtype=dtype)
    X = (X - X.mean(0)) / X.std(0)
    t = torch.tensor(labels, dtype=dtype)
    w = torch.zeros(X.shape[1], dtype=dtype, requires_grad=True)
    b = torch.zeros(1, dtype=dtype, requires_grad=True)

    def loss_fn():  # L2-regularised: a unique minimiser
        logits = X @ w + b
        return (torch.nn.functional.binary_cross_entropy_with_logits(logits, t)
                + 1e-3 * w.pow(2).sum())
    return [w, b], loss_fn


def test_converges_on_logistic_regression():
    params, loss_fn = logistic_problem()
    opt = soo_ext.BFGS(params, line_search_fn="strong_wolfe", max_iter=400,
                       tolerance_grad=1e-7, tolerance_change=0.0)
    closure = make_closure(opt, loss_fn)
    opt.step(closure)
    closure()
    grad = torch.cat([p.grad.flatten() for p in params])
    assert grad.abs().max().item() <= 1e-7  # stopped by tolerance_grad, not by a budget
    # Same minimiser as torch.optim.LBFGS run to convergence.
    ref_params, ref_loss_fn = logistic_problem()
    ref = torch.optim.LBFGS(ref_params, line_search_fn="strong_wolfe", max_iter=500,
                            tolerance_grad=1e-10, tolerance_change=1e-15)
    ref.step(make_closure(ref, ref_loss_fn))
    assert loss_fn().item() == pytest.approx(ref_loss_fn().item(), rel=1e-9)
    for p, q in zip(params, ref_params):  # ill-conditioned: |g| = 1e-7 leaves ~1e-4 in x
        assert torch.allclose(p, q, atol=1e-3)
    # scipy.optimize.minimize(method="BFGS") needs 163 iterations for gtol=1e-9 on this problem
    assert opt.state[params[0]]["n_iter"] < 300


def test_refuses_models_whose_inverse_hessian_does_not_fit():
    big = torch.zeros(20_000, requires_grad=True)  # 20000^2 * 4 bytes = 1.5 GiB
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.BFGS([big])
    small = torch.zeros(100, requires_grad=True)
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.BFGS([small], max_state_bytes=100 * 100 * 4 - 1)
    soo_ext.BFGS([small], max_state_bytes=100 * 100 * 4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_state_bytes=0), "max_state_bytes"), (dict(max_state_bytes=1.5), "max_state_bytes"),
    (dict(lr=-1.0), "lr"), (dict(max_iter=0), "max_iter"),
    (dict(line_search_fn="armijo"), "line_search_fn"), (dict(on_nonfinite="ignore"), "on_nonfinite"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        soo_ext.BFGS([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("via_bytes", [False, True])
def test_resume_is_bit_identical(line_search_fn, via_bytes):
    def run(steps_before, steps_after):
        params, loss_fn = logistic_problem(torch.float32)
        opt = soo_ext.BFGS(params, lr=1 if line_search_fn else 0.2, max_iter=3,
                           line_search_fn=line_search_fn)
        closure = make_closure(opt, loss_fn)
        for _ in range(steps_before):
            opt.step(closure)
        if steps_after is None:
            return params, opt
        saved_params = [p.detach().clone() for p in params]
        saved = saved_copy(opt.state_dict(), via_bytes)
        params2, loss_fn2 = logistic_problem(torch.float32)
        with torch.no_grad():
            for p, q in zip(params2, saved_params):
                p.copy_(q)
        opt2 = soo_ext.BFGS(params2, lr=1 if line_search_fn else 0.2, max_iter=3,
                            line_search_fn=line_search_fn)
        opt2.load_state_dict(saved)
        closure2 = make_closure(opt2, loss_fn2)
        for _ in range(steps_after):
            opt2.step(closure2)
        return params2, opt2

    straight, _ = run(5, None)
    resumed, opt = run(2, 3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert "inverse_hessian" in opt.state[resumed[0]]


def test_nonfinite_loss_raises_and_leaves_everything():
    params, loss_fn = logistic_problem()
    opt = soo_ext.BFGS(params, line_search_fn="strong_wolfe", max_iter=4)
    closure = make_closure(opt, loss_fn)
    opt.step(closure)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    with pytest.raises(NonFiniteError):
        opt.step(make_closure(opt, lambda: loss_fn() * math.nan))
    state, values = before
    for p, q in zip(params, values):
        assert torch.equal(p, q)
    H_now = opt.state[params[0]]["inverse_hessian"]["H"]
    assert torch.equal(H_now, state["state"][0]["inverse_hessian"]["H"])
