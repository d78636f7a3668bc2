"""soo_ext.BFGS as an optimizer: convergence (Rosenbrock, logistic regression against
torch.optim.LBFGS), closure evaluations against scipy's BFGS (python -m bench bfgs's problems and
runners), the inverse-Hessian updates with and without the line search, and the memory limit.
The soo::bfgs_direction op is tested in tests/ops/test_bfgs_ops.py, the DenseInverseHessian
component in tests/curvature/test_dense_inverse.py, and what every optimizer promises alike
(resume, bad arguments, non-finite values) in tests/optim/test_contract.py."""
import pytest
import torch

import soo_ext
from bench import bfgs as bench_bfgs

from op_inputs import textbook_update

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    # (soo_ext.BFGS: 36; test_evaluations_against_scipy compares the evaluations)
    assert opt.state[params[0]]["n_iter"] < 100


# Issue 19: to tolerance_grad=1e-10, soo_ext.BFGS took 1044 closure evaluations on the
# breast-cancer logistic regression where scipy's BFGS took 203.  Measured here (scipy 1.17, one
# step() with tolerance_change=0 and max_iter=10000), soo_ext.BFGS / scipy: breast-cancer 71 / 193
# (before the fix: 5001 with max_eval=5000, stalled at max|g| = 4e-9), the logistic regression
# above 40 / 156, Rosenbrock-2 42 / 41, -10 100 / 85, -30 230 / 246, digits softmax 99 / 422.
# Evaluation counts are deterministic in float64 up to rounding, which moves them by a few
# evaluations at most (where the run meets the rounding floor); 1.5x is far from every measured
# ratio.
SCIPY_PROBLEMS = {
    "breast-cancer": bench_bfgs.PROBLEMS["breast-cancer"],
    "breast-cancer-l2-1e-3": lambda: bench_bfgs.logistic_regression(l2=1e-3),  # as above
    "rosenbrock-2": bench_bfgs.PROBLEMS["rosenbrock-2"],
    "rosenbrock-10": bench_bfgs.PROBLEMS["rosenbrock-10"],
    "rosenbrock-30": bench_bfgs.PROBLEMS["rosenbrock-30"],  # test_converges_on_rosenbrock's
    "digits-softmax": bench_bfgs.PROBLEMS["digits-softmax"],
}
CONVEX = ("breast-cancer", "breast-cancer-l2-1e-3", "digits-softmax")


@pytest.mark.parametrize("name", list(SCIPY_PROBLEMS))
def test_evaluations_against_scipy(name, one_thread):
    pytest.importorskip("scipy.optimize")
    problem = SCIPY_PROBLEMS[name]()
    ours = bench_bfgs.run_soo(problem, gtol=1e-10, max_iter=10_000)
    ref = bench_bfgs.run_scipy(problem, gtol=1e-10, max_iter=10_000)
    assert ours.evaluations <= 1.5 * ref.evaluations, (ours, ref.evaluations)
    # Both end at a minimiser, at the float64 floor of max|g| (1e-10 is below it for some): a
    # step that would reduce f by 1/2 g.H^-1.g is invisible once that is below eps |f|, so the
    # search stops where |g| <= sqrt(2 lambda_max eps |f|) (rosenbrock-10: 1.8e-6; measured:
    # 5e-11 with the compiled kernels, 2e-7 with the fallback's rounding).
    loss, grad = bench_bfgs.loss_and_grad(problem, ours.x)
    ref_loss, _ = bench_bfgs.loss_and_grad(problem, ref.x)
    floor = (2 * largest_curvature(problem, ours.x) * torch.finfo(torch.float64).eps
             * abs(loss)) ** 0.5
    assert grad.abs().max().item() <= max(1e-10, floor)
    # Rosenbrock from (-1.2, 1, ...) has a second, local minimiser for n >= 4: scipy ends there
    # for n = 10 and 30, soo_ext.BFGS for n = 10; its loss must not be higher than scipy's.
    assert loss <= ref_loss + 1e-12 * abs(ref_loss) + 1e-20
    if name in CONVEX:  # the unique minimiser, to the rounding of the loss
        assert loss == pytest.approx(ref_loss, rel=1e-13, abs=0)
        assert (ours.x - ref.x).abs().max().item() < 1e-4  # max|g| ~1e-9 with curvature ~1e-3


def largest_curvature(problem, x, iterations=100):
    """The largest Hessian eigenvalue at x, by power iteration on Hessian-vector products (an
    estimate from below, raised by 10 % for its convergence)."""
    v = torch.ones_like(x) / x.numel() ** 0.5
    for _ in range(iterations):
        _, hv = torch.autograd.functional.hvp(problem.loss, x, v)
        lam = hv.norm().item()
        v = hv / lam
    return 1.1 * lam


def test_bench_bfgs_quick(tmp_path, one_thread):
    """python -m bench bfgs --quick: the records and the JSON."""
    from bench import __main__ as cli

    out = tmp_path / "bfgs.json"
    records, env = cli.main(["bfgs", "--quick", "--json", str(out)])
    assert out.stat().st_size > 0 and env["gtol"] == 1e-10
    solvers = {bench_bfgs.SOO, bench_bfgs.TORCH} | (
        {bench_bfgs.SCIPY} if bench_bfgs.scipy_available() else set())
    assert {(r["problem"], r["solver"]) for r in records} == {
        (p, s) for p in bench_bfgs.QUICK_PROBLEMS for s in solvers}
    for r in records:
        assert r["evaluations"] > r["iterations"] > 0 and r["grad_max"] <= 1e-8
        assert r["loss_above_best"] >= 0 and r["seconds"] > 0


@pytest.mark.parametrize("line_search_fn,curvature", [
    (None, 1.0), ("strong_wolfe", 1.0), ("strong_wolfe", 0.2)])
def test_first_update_of_the_inverse_hessian(line_search_fn, curvature):
    """A fixed step keeps torch's rules: H = (y.s / y.y) I before the first update.  With the
    line search H = I is scaled by max(1, s.B.s / y.s) (here B = I: s.s / y.s), never shrunk:
    s.s / y.s is 0.44 with the first A (H stays I), 2.19 with A / 5."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    A = curvature * (A @ A.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64))  # eigs 0.12 .. 2.7
    x = torch.randn(6, dtype=torch.float64, generator=gen).requires_grad_(True)
    opt = soo_ext.BFGS([x], lr=0.1 if line_search_fn is None else 1, max_iter=2, max_eval=10,
                       line_search_fn=line_search_fn)
    opt.step(make_closure(opt, lambda: 0.5 * x @ (A @ x)))
    model = opt.state[x]["inverse_hessian"]
    s, y = model["s"], model["y"]
    assert not model["pending"] and y.dot(s) > 0
    eye = torch.eye(6, dtype=torch.float64)
    if line_search_fn is None:
        H0 = (y.dot(s) / y.dot(y)) * eye
    else:
        H0 = max(1.0, (s.dot(s) / y.dot(s)).item()) * eye
    assert torch.allclose(model["H"], textbook_update(H0, s, y), rtol=1e-12, atol=1e-14)


def test_stops_at_the_rounding_floor_in_float32(one_thread):
    """With tolerance_change=0 and a large max_eval, the run ends where float32 stops making
    progress; a line search there takes at most 26 evaluations (it took all of max_eval)."""
    problem = bench_bfgs.PROBLEMS["breast-cancer"]()
    x = problem.x0.float().requires_grad_(True)
    opt = soo_ext.BFGS([x], line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                       tolerance_change=0.0, max_iter=5000)
    evaluations = []

    def closure():
        opt.zero_grad()
        loss = problem.loss(x.double()).float()
        loss.backward()
        evaluations.append(loss.item())
        return loss
    opt.step(closure)
    assert len(evaluations) < 100 and opt.state[x]["n_iter"] < 60
    assert x.grad.abs().max().item() < 1e-5  # the float32 floor: ~1e-7 |f| / step


def test_refuses_models_whose_inverse_hessian_does_not_fit():
    big = torch.zeros(20_000, requires_grad=True)  # 20000^2 * 4 bytes = 1.5 GiB
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.BFGS([big])
    small = torch.zeros(100, requires_grad=True)
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.BFGS([small], max_state_bytes=100 * 100 * 4 - 1)
    soo_ext.BFGS([small], max_state_bytes=100 * 100 * 4)
