"""soo_ext.BFGS as an optimizer: convergence (Rosenbrock, logistic regression against
torch.optim.LBFGS) and the memory limit.  The soo::bfgs_direction op is tested in
tests/ops/test_bfgs_ops.py, the DenseInverseHessian component in
tests/curvature/test_dense_inverse.py, and what every optimizer promises alike (resume, bad
arguments, non-finite values) in tests/optim/test_contract.py."""
import pytest
import torch

import soo_ext

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
    assert opt.state[params[0]]["n_iter"] < 300


def test_refuses_models_whose_inverse_hessian_does_not_fit():
    big = torch.zeros(20_000, requires_grad=True)  # 20000^2 * 4 bytes = 1.5 GiB
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.BFGS([big])
    small = torch.zeros(100, requires_grad=True)
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.BFGS([small], max_state_bytes=100 * 100 * 4 - 1)
    soo_ext.BFGS([small], max_state_bytes=100 * 100 * 4)
