"""DRSOM's Hessian models alone (soo_ext.curvature.drsom_models): each hvp mode's Q = V^T H V
against dense float64 Hessians and against double backward, the params restored bit-exactly, the
evaluations each model makes, the same randomness they need, the subspace (Gram, directions kept,
random direction), and the closure evaluator they are handed (soo_ext._support.closure)."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from soo_ext._support.closure import ClosureEvaluator
from soo_ext._support.flat import FlatLayout
from soo_ext.curvature.drsom_models import (HESSIAN_MODELS, AutogradProducts,
                                            CentralDifferences, ForwardDifferences,
                                            Interpolation, fd_perturbation_length,
                                            independent_directions, interp_perturbation_length,
                                            interpolated_model, interpolation_values,
                                            random_direction, subspace_gram)

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

HVPS = ["fd", "central", "autograd", "interp"]


def flat_params(params):
    """One flat buffer holding the params, each ``p.data`` a view of it (DRSOM's layout)."""
    x = torch.cat([p.detach().reshape(-1) for p in params])
    for p, v in zip(params, x.split([p.numel() for p in params])):
        p.data = v.view_as(p)
    return x


def hessian_model(hvp, evaluator, x):
    """The model of ``hvp`` with its vectors (the base gradient g, x0, scratch)."""
    cls = HESSIAN_MODELS[hvp]
    g = evaluator.gradient_vector()
    scratch = [evaluator.gradient_vector() for _ in range(cls.scratch_vectors)]
    return cls(evaluator, x, torch.empty_like(x), g, scratch), g


def base_point(hvp, params, closure, model=None):
    """(x, evaluator, Hessian model, g, f, grads) at the params' point, as a DRSOM step has them
    after its base evaluation."""
    x = flat_params(params)
    evaluator = ClosureEvaluator(params, "DRSOM", model=model)
    hessian, g = hessian_model(hvp, evaluator, x)
    evaluator.begin(closure)
    _, f, grads = evaluator.gradient(g, create_graph=hessian.create_graph)
    return x, evaluator, hessian, g, f, grads


def one(x):
    return torch.ones((), dtype=x.dtype, device=x.device)


def mlp_problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    X = torch.randn(64, 5, dtype=dtype, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    return net, lambda: F.cross_entropy(net(X), y)


def subspace_hessian(hvp, dtype, seed=0):
    """Q = V^T H V for V = [g, d] (d fixed, random) at an MLP's initial point, scaled to unit
    directions, by the model DRSOM's step uses."""
    net, closure = mlp_problem(dtype, seed)
    x, _, hessian, g, f, grads = base_point(hvp, list(net.parameters()), closure)
    d = torch.randn(x.numel(), dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    V = [g, 0.01 * d]
    G, c = subspace_gram(g, V, one(x))
    x_before = x.clone()
    Q = hessian.products(V, G, c, f, grads)
    assert torch.equal(x, x_before)  # restored bit-exactly
    s = torch.rsqrt(torch.diagonal(G))
    return Q * s[:, None] * s[None, :]


# ---------------------------------------------------------------------------------------------
# Accuracy

@pytest.mark.parametrize("dtype,tol_fd,tol_central,tol_interp",
                         [(torch.float32, 1e-3, 1e-4, 2e-2), (torch.float64, 1e-6, 1e-6, 1e-4)],
                         ids=["fp32", "fp64"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_finite_difference_hessian_matches_autograd(dtype, tol_fd, tol_central, tol_interp,
                                                     seed):
    exact = subspace_hessian("autograd", dtype, seed)
    torch.testing.assert_close(exact, exact.T)
    assert rel_err(subspace_hessian("fd", dtype, seed), exact) < tol_fd
    assert rel_err(subspace_hessian("central", dtype, seed), exact) < tol_central
    interp = subspace_hessian("interp", dtype, seed)
    torch.testing.assert_close(interp, interp.T)  # built symmetric
    assert rel_err(interp, exact) < tol_interp


def test_interpolated_hessian_is_exact_on_a_quadratic():
    """On a quadratic the second differences have no truncation error: Q = V^T A V up to
    rounding, from function values only (k = 3 directions: 6 forwards, no extra gradient).

    Rounding: each value f carries an error of at most ``n eps F`` (``F`` the sum of the
    magnitudes of the terms of f, for a dot product of length n); ``Q_ij`` combines four values
    and divides by ``t_i t_j``, ``Q_ii = 2 (f_i - f - t_i c_i) / t_i^2`` combines two values and
    ``t_i c_i`` (itself rounded by ``n eps |g| |v_i| t_i``), so the error bound of each entry is
    known; the values are at most ``t ||v|| = eps^(1/4) (1 + mean|x|)`` from x, which changes F
    by a negligible fraction (a factor 2 covers it)."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(9, 9, dtype=torch.float64, generator=gen)
    A, b = M @ M.T - 2 * torch.eye(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64,
                                                                          generator=gen)
    x = nn.Parameter(torch.randn(9, dtype=torch.float64, generator=gen))
    calls = [0]

    def closure():
        calls[0] += 1
        return 0.5 * x @ A @ x - b @ x
    flat, _, hessian, g, f, _ = base_point("interp", [x], closure)
    V = [g] + [torch.randn(9, dtype=torch.float64, generator=gen) for _ in range(2)]
    G, c = subspace_gram(g, V, one(flat))
    calls[0] = 0
    Q = hessian.products(V, G, c, f, None)
    Vm = torch.stack(V, 1)
    assert calls[0] == 6
    n, eps = 9, torch.finfo(torch.float64).eps
    with torch.no_grad():
        F_mag = 0.5 * x.abs() @ A.abs() @ x.abs() + b.abs() @ x.abs()
        t = interp_perturbation_length(flat) / torch.sqrt(torch.diagonal(G))
        df = 2 * n * eps * F_mag
        bound = 4 * df / (t[:, None] * t[None, :])
        dc = n * eps * g.norm() * torch.stack([v.norm() for v in V]) * t
        bound.diagonal().copy_(2 * (2 * df + dc) / t ** 2)
    error = (Q - Vm.T @ A @ Vm).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert (bound / (Vm.T @ A @ Vm).abs().max()).max() < 1e-5  # the bound is not vacuous


def dense_mlp_hessian(net, X, y):
    """The float64 Hessian of the MLP's loss in its flat params (torch.autograd.functional)."""
    params = list(net.parameters())
    layout, names = FlatLayout(params), [name for name, _ in net.named_parameters()]
    x = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(flat):
        out = torch.func.functional_call(net, dict(zip(names, layout.views(flat))), (X,))
        return F.cross_entropy(out, y)
    return torch.autograd.functional.hessian(loss, x)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("hvp,tol", [("fd", 1e-6), ("central", 1e-8), ("autograd", 1e-12),
                                     ("interp", 1e-3)])
def test_q_matches_the_dense_hessian(hvp, tol, k):
    """Q (symmetrised) against V^T H V with H the dense float64 Hessian, on a tanh MLP in float64,
    for V = [g, d_1, ..., d_{k-1}] of unit-scaled random directions."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(24, 4, dtype=torch.float64, generator=gen)
    y = torch.arange(24) % 3
    H = dense_mlp_hessian(net, X, y)
    x, _, hessian, g, f, grads = base_point(hvp, list(net.parameters()),
                                            lambda: F.cross_entropy(net(X), y))
    V = [g] + [0.1 * torch.randn(x.numel(), dtype=torch.float64, generator=gen)
               for _ in range(k - 1)]
    G, c = subspace_gram(g, V, one(x))
    Q = hessian.products(V, G, c, f, grads)
    Vm = torch.stack(V, 1)
    exact = Vm.T @ H @ Vm
    s = torch.rsqrt(torch.diagonal(G))
    assert rel_err((Q + Q.T) / 2 * s[:, None] * s[None, :], exact * s[:, None] * s[None, :]) < tol
    torch.testing.assert_close(G, Vm.T @ Vm, rtol=1e-13, atol=1e-13 * G.abs().max().item())
    torch.testing.assert_close(c, Vm.T @ g, rtol=1e-13, atol=1e-13 * c.abs().max().item())


@pytest.mark.parametrize("hvp", ["fd", "central", "interp"])
def test_finite_differences_are_exact_on_a_quadratic(hvp):
    """Gradients of a quadratic are linear: the difference quotients have no truncation error
    (rounding only), in float64."""
    gen = torch.Generator().manual_seed(2)
    M = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    A, b = M @ M.T + torch.eye(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64,
                                                                       generator=gen)
    x = nn.Parameter(torch.randn(12, dtype=torch.float64, generator=gen))
    flat, _, hessian, g, f, grads = base_point(hvp, [x], lambda: 0.5 * x @ A @ x - b @ x)
    V = [g, torch.randn(12, dtype=torch.float64, generator=gen)]
    G, c = subspace_gram(g, V, one(flat))
    Q = hessian.products(V, G, c, f, grads)
    Vm = torch.stack(V, 1)
    assert rel_err((Q + Q.T) / 2, Vm.T @ A @ Vm) < 1e-7


# ---------------------------------------------------------------------------------------------
# The interface: x restored, x0 holding the base point, evaluations counted

@pytest.mark.parametrize("hvp", HVPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_products_restore_x_and_leave_x0_at_the_base_point(hvp, dtype):
    net, closure = mlp_problem(dtype, seed=5)
    calls = {"grad": 0, "forward": 0}

    def counted():
        calls["grad" if torch.is_grad_enabled() else "forward"] += 1
        return closure()
    params = list(net.parameters())
    x, _, hessian, g, f, grads = base_point(hvp, params, counted)
    x_before = x.clone()
    d = torch.randn(x.numel(), dtype=dtype, generator=torch.Generator().manual_seed(3))
    V = [g, d, d.flip(0)]
    G, c = subspace_gram(g, V, one(x))
    calls.update(grad=0, forward=0)
    Q = hessian.products(V, G, c, f, grads)
    assert Q.shape == (3, 3) and Q.dtype == dtype and bool(torch.isfinite(Q).all())
    assert torch.equal(x, x_before) and torch.equal(hessian.x0, x_before)
    assert all(p.data_ptr() == v.data_ptr() for p, v in zip(params, x.split(
        [p.numel() for p in params])))  # the params are still views of x
    assert hessian.evaluations(3) == (calls["forward"] + calls["grad"], calls["grad"])


def test_the_models_and_their_needs():
    assert list(HESSIAN_MODELS) == HVPS
    assert [HESSIAN_MODELS[h] for h in HVPS] == [ForwardDifferences, CentralDifferences,
                                                 AutogradProducts, Interpolation]
    assert [HESSIAN_MODELS[h].create_graph for h in HVPS] == [False, False, True, False]
    assert [HESSIAN_MODELS[h].scratch_vectors for h in HVPS] == [1, 2, 1, 1]
    models = [HESSIAN_MODELS[h](None, None, None, None, []) for h in HVPS]
    assert [m.evaluations(3) for m in models] == [(3, 3), (6, 6), (0, 0), (6, 0)]


def test_perturbation_lengths():
    x = torch.tensor([1.0, -3.0, 2.0], dtype=torch.float32)  # 1 + mean|x_i| = 3
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    assert fd_perturbation_length(x, False).item() == pytest.approx(3 * 0.25 * math.sqrt(eps32))
    assert fd_perturbation_length(x, True).item() == pytest.approx(3 * eps32 ** (1 / 3))
    assert interp_perturbation_length(x).item() == pytest.approx(3 * eps32 ** 0.25)
    assert fd_perturbation_length(x.double(), False).item() == pytest.approx(3 * math.sqrt(eps64))


def test_interpolation_values_visit_the_pairs_and_return_to_x0():
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x = x0.clone()
    V = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
         torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)]
    ts = torch.tensor([0.1, 0.2], dtype=torch.float64)
    points = []
    values = interpolation_values(x, x0, torch.empty_like(x), V, ts,
                                  lambda: (points.append(x.clone()), x.sum())[1])
    expected = [x0 + 0.1 * V[0], x0 + 0.1 * V[0] + 0.2 * V[1], x0 + 0.2 * V[1]]  # (0,0) (0,1) (1,1)
    for p, e in zip(points, expected):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-15)
    assert len(values) == 3 and torch.equal(x, x0)
    # f(z) = (z - x0)^T B (z - x0) / 2 + a^T (z - x0) + 1: Q = B exactly (first order in t only
    # through the cubic terms, none here), f and c from the same function
    B = torch.tensor([[2.0, 0.5], [0.5, 3.0]], dtype=torch.float64)
    a = torch.tensor([0.3, -0.7], dtype=torch.float64)

    def m(s):
        return s @ B @ s / 2 + a @ s + 1
    vals = [m(torch.stack([ts[0], 0 * ts[1]])), m(ts), m(torch.stack([0 * ts[0], ts[1]]))]
    Q = interpolated_model(torch.tensor(1.0, dtype=torch.float64), vals, ts, a)
    torch.testing.assert_close(Q, B, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# Same randomness

class NoisyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(12, 2))

    def forward(self, x):
        return self.body(x)


def noisy_problem():
    torch.manual_seed(0)
    net = NoisyNet().double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(48, 6, dtype=torch.float64, generator=gen)
    y = (X[:, 0] > 0).long()
    return net, X, y


@pytest.mark.parametrize("replayed", [True, False])
def test_finite_differences_need_the_same_randomness(replayed):
    """With dropout replayed and BatchNorm frozen (the evaluator given the model), the fd Hessian
    matches double backward (same masks); without, it does not."""
    def hessian(hvp):
        net, X, y = noisy_problem()
        x, evaluator, model, g, _, grads = base_point(
            hvp, list(net.parameters()), lambda: F.cross_entropy(net(X), y),
            model=net if replayed else None)
        d = torch.randn(x.numel(), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3))
        V = [g, d]
        G, _ = subspace_gram(g, V, one(x))
        with evaluator.extra_evaluations():
            Q = model.products(V, G, None, None, grads)
        s = torch.rsqrt(torch.diagonal(G))
        return Q * s[:, None] * s[None, :]
    err = rel_err(hessian("fd"), hessian("autograd"))
    assert (err < 1e-5) if replayed else (err > 1e-2)


def test_extra_evaluations_replay_and_put_the_stream_back():
    """Inside extra_evaluations every evaluation sees the base evaluation's dropout masks and
    leaves BatchNorm's running statistics alone; after it, the RNG stream is where one
    evaluation left it."""
    net, X, y = noisy_problem()
    bn = net.body[1]
    params = list(net.parameters())
    evaluator = ClosureEvaluator(params, "DRSOM", model=net)
    g, gp = evaluator.gradient_vector(), evaluator.gradient_vector()
    evaluator.begin(lambda: F.cross_entropy(net(X), y))
    _, f, _ = evaluator.gradient(g)
    after_base, tracked = torch.get_rng_state(), bn.num_batches_tracked.clone()
    with evaluator.extra_evaluations():
        assert not bn.track_running_stats
        _, f2, _ = evaluator.gradient(gp)
        f3 = evaluator.loss()
    assert torch.equal(f, f2) and torch.equal(f, f3) and torch.equal(g, gp)
    assert torch.equal(torch.get_rng_state(), after_base) and bn.track_running_stats
    assert torch.equal(bn.num_batches_tracked, tracked)


# ---------------------------------------------------------------------------------------------
# The subspace

def test_independent_directions():
    """g always; a direction of zero length or |cos| >= collinearity with one kept is left out."""
    vecs = [torch.tensor(v, dtype=torch.float64) for v in
            ([1.0, 0, 0], [0, 1.0, 0], [0, 0, 0], [1.0, 1.0, 0], [0.01, 1.0, 0.0], [0, 0.1, 1.0])]
    M = torch.stack(vecs)
    G = (M @ M.T).tolist()
    assert independent_directions(G, 0.97) == [0, 1, 3, 5]  # 4: |cos| with 1 is 0.99995
    assert independent_directions(G, 0.5) == [0, 1, 5]  # 3 at 45 degrees to 0 and 1
    assert independent_directions(G, 1.0) == [0, 1, 3, 4, 5]


def test_random_direction_is_orthogonal_to_g_and_reproducible():
    g = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    u, u2 = torch.empty_like(g), torch.empty_like(g)
    after = random_direction(u, g, (g @ g).item(), state)
    assert abs((u @ g).item()) < 1e-12 * u.norm().item() * g.norm().item()
    assert not torch.equal(after, state)
    assert torch.equal(random_direction(u2, g, (g @ g).item(), state), after)
    assert torch.equal(u, u2)
    draw = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(u, draw - (g @ draw) / (g @ g) * g)


# ---------------------------------------------------------------------------------------------
# The closure evaluator

def test_evaluator_objective_gradient_and_trial_loss():
    """The objective is negated when maximising, its gradient lands in the flat vector (an unused
    param: zeros), the trial loss is taken under no_grad; the closure's own loss is returned."""
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    flat_params([w, unused])
    evaluator = ClosureEvaluator([w, unused], "DRSOM")
    out = evaluator.gradient_vector()
    assert out.shape == (5,)
    modes = []

    def closure():
        modes.append(torch.is_grad_enabled())
        return (w ** 2).sum()
    for maximize, sign in ((False, 1), (True, -1)):
        evaluator.begin(closure, maximize)
        loss, f, grads = evaluator.gradient(out)
        assert loss.item() == 5.0 and f.item() == sign * 5.0 and grads is None
        assert out.tolist() == [sign * 2.0, sign * 4.0, 0.0, 0.0, 0.0]
        assert evaluator.loss().item() == sign * 5.0
    assert modes == [True, False, True, False]
    _, _, grads = evaluator.gradient(out, create_graph=True)
    assert grads[0].requires_grad and grads[1] is None


@pytest.mark.parametrize("closure,match", [
    (lambda w: None, "one-element tensor"), (lambda w: w * 2, "one-element tensor"),
    (lambda w: w.detach().sum(), "does not require grad")])
def test_evaluator_refuses_a_bad_closure(closure, match):
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    evaluator = ClosureEvaluator([w], "DRSOM")
    evaluator.begin(lambda: closure(w))
    with pytest.raises(RuntimeError, match=f"DRSOM: the .*{match}"):
        evaluator.gradient(evaluator.gradient_vector())
