"""soo_ext.DRSOM: the step on its model (noise floor, the paper's convention), convergence
(Rosenbrock, logistic regression), fused attention, k-direction and random variants, step-length
limits, non-finite trials and Hessian products, the flat parameter buffer, same randomness.  The
accuracy of the subspace Hessian models (finite differences against double backward) is tested on
the models alone: tests/curvature/test_drsom_models.py; what every optimizer promises alike
(resume, bad arguments and params, closures, maximize, host syncs) by tests/optim/test_contract.py."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import soo_ext
from soo_ext import ops as drsom_ops
from soo_ext._support.closure import same_randomness
from soo_ext.curvature import trust_region
from soo_ext.optim.drsom import DRSOM
from soo_ext import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosenbrock_start(n=20, dtype=torch.float64, device="cpu"):
    x = torch.ones(n, dtype=dtype, device=device)
    x[::2] = -1.2
    return nn.Parameter(x)


def mlp_problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    X = torch.randn(64, 5, dtype=dtype, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    return net, lambda: F.cross_entropy(net(X), y)


# ---------------------------------------------------------------------------------------------
# The step on its model

def test_noise_floor_ends_the_step_after_one_trial():
    """At the loss's rounding level (fp32 quadratic, converged) the ratio test is noise: a step
    stops at its first trial (counted in noise_stops) instead of max_trials rejections, and the
    loss never rises."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 20, generator=gen)
    A = A @ A.T / 20 + torch.eye(20)
    b = torch.randn(20, generator=gen)
    x = nn.Parameter(torch.zeros(20))
    opt = DRSOM([x], hvp="fd")
    losses = []
    for _ in range(40):
        losses.append(opt.step(lambda: 0.5 * x @ A @ x - b @ x + 10.0).item())
    st = opt.state[x]
    assert st["noise_stops"] >= 20
    trials = st["trials"]
    for _ in range(10):
        losses.append(opt.step(lambda: 0.5 * x @ A @ x - b @ x + 10.0).item())
    assert st["trials"] - trials == 10  # one trial per step
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))
    x_star = torch.linalg.solve(A.double(), b.double())
    assert (x.detach().double() - x_star).norm() < 1e-3


def test_step_convention_matches_paper_on_quadratic():
    """On a convex quadratic the first DRSOM step after the line search is the exact minimiser
    of the quadratic over x + span{g, d} (gamma tiny: lambda ~ 1e-8)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, dtype=torch.float64, generator=gen)
    A = A @ A.T + 8 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64, generator=gen)
    x = nn.Parameter(torch.zeros(8, dtype=torch.float64))

    def f(z):
        return 0.5 * z @ A @ z - b @ z
    opt = DRSOM([x], hvp="autograd", gamma=1e-16)
    opt.step(lambda: f(x))  # line search
    x1 = x.detach().clone()
    d = opt.state[x]["directions"][opt.state[x]["order"][0]].clone()
    g = A @ x1 - b
    opt.step(lambda: f(x))
    V = torch.stack([g, d], 1)
    a = torch.linalg.solve(V.T @ A @ V, -V.T @ g)
    torch.testing.assert_close(x.detach(), x1 + V @ a, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Convergence

@pytest.mark.parametrize("hvp", ["fd", "central", "autograd", "interp"])
def test_minimises_rosenbrock(hvp):
    x = rosenbrock_start(20)
    opt = DRSOM([x], hvp=hvp)
    for _ in range(300):
        opt.step(lambda: rosenbrock(x))
    assert rosenbrock(x).item() < 1e-5
    assert (x.detach() - 1).abs().max().item() < 1e-2


def test_rosenbrock_fp32():
    x = rosenbrock_start(20, torch.float32)
    opt = DRSOM([x])
    for _ in range(300):
        opt.step(lambda: rosenbrock(x))
    assert rosenbrock(x).item() < 1e-4


def test_logistic_regression_breast_cancer():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(y, dtype=torch.float64)
    lam = 1e-3
    w = nn.Parameter(torch.zeros(X.shape[1], dtype=torch.float64))
    b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def loss():
        return (F.binary_cross_entropy_with_logits(X @ w + b, y)
                + 0.5 * lam * (w @ w))
    opt = DRSOM([w, b])
    for _ in range(150):
        opt.step(loss)
    # the reference minimiser: Newton's method (strongly convex)
    wb = torch.zeros(X.shape[1] + 1, dtype=torch.float64)
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    reg = torch.diag(torch.cat([torch.full((X.shape[1],), lam, dtype=torch.float64),
                                torch.zeros(1, dtype=torch.float64)]))
    for _ in range(30):
        p = torch.sigmoid(Xa @ wb)
        grad = Xa.T @ (p - y) / len(X) + reg @ wb
        H = Xa.T @ (Xa * (p * (1 - p))[:, None]) / len(X) + reg
        wb = wb - torch.linalg.solve(H, grad)
    with torch.no_grad():
        best = (F.binary_cross_entropy_with_logits(Xa @ wb, y) + 0.5 * lam * wb[:-1] @ wb[:-1])
        assert loss().item() - best.item() < 1e-6
        accuracy = ((X @ w + b > 0).double() == y).double().mean().item()
    assert accuracy > 0.97


class TinyAttention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.out(h.transpose(1, 2).reshape(B, T, D).mean(1)).squeeze(-1)


def test_scaled_dot_product_attention_trains_with_fd():
    torch.manual_seed(0)
    net = TinyAttention().double()
    X = torch.randn(32, 6, 16, dtype=torch.float64)
    y = X[:, :, 0].sum(1).tanh()

    def closure():
        return F.mse_loss(net(X), y)
    opt = DRSOM(net.parameters(), hvp="fd")
    first = closure().item()
    for _ in range(15):
        opt.step(closure)
    assert closure().item() < 0.5 * first


@pytest.mark.parametrize("options", [{"directions": 3}, {"directions": 4}, {"random": True}],
                         ids=["k3", "k4", "random"])
def test_variants_reduce_the_loss(options):
    net, closure = mlp_problem(torch.float64)
    opt = DRSOM(net.parameters(), **options)
    first = closure().item()
    losses = [opt.step(closure).item() for _ in range(30)]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))  # monotone
    assert closure().item() < 0.7 * first
    if not options.get("random"):
        assert opt.state[net[0].weight]["count"] == options["directions"] - 1


def test_k_directions_on_rosenbrock():
    x = rosenbrock_start(20)
    opt = DRSOM([x], directions=3)
    for _ in range(300):
        opt.step(lambda: rosenbrock(x))
    assert rosenbrock(x).item() < 1e-5


class TrialRecorder:
    """Wraps the ops module of soo_ext.curvature.trust_region: records the length ||x - x0|| of
    every trial step."""

    def __init__(self, opt):
        self.opt, self.lengths = opt, []

    def __getattr__(self, name):
        return getattr(drsom_ops, name)

    def drsom_update(self, x, p, V, alpha):
        drsom_ops.drsom_update(x, p, V, alpha)
        self.lengths.append((x - self.opt._scratch.x0).norm().item())


@pytest.mark.parametrize("growth,shrink", [(10.0, 0.5), (math.inf, 0.1)])
def test_step_length_limits(monkeypatch, growth, shrink):
    """A first trial is at most max_step_growth x the last accepted step, a retry at most
    rejection_shrink x the rejected trial; last_length is the accepted step's length."""
    x = rosenbrock_start(20)
    opt = DRSOM([x], hvp="autograd", max_step_growth=growth, rejection_shrink=shrink)
    rec = TrialRecorder(opt)
    monkeypatch.setattr(trust_region, "_ops", rec)
    st = opt.state[x]
    checked = retried = 0
    for _ in range(100):
        x_before = x.detach().clone()
        last = st["last_length"] if st else math.inf
        trials, line_searches = (st["trials"], st["line_searches"]) if st else (0, 0)
        rec.lengths.clear()
        opt.step(lambda: rosenbrock(x))
        moved = (x.detach() - x_before).norm().item()
        if moved > 0:
            assert moved == pytest.approx(st["last_length"], rel=1e-9)
        if st["line_searches"] > line_searches:
            continue
        lengths = rec.lengths
        assert len(lengths) == st["trials"] - trials
        assert lengths[0] <= growth * last * (1 + 1e-9)
        for a, b in zip(lengths, lengths[1:]):
            assert b <= shrink * a * (1 + 1e-9)
        checked += 1
        retried += len(lengths) > 1
    assert checked >= 80 and retried >= 1


def test_gamma_stays_finite_at_the_noise_floor():
    """At the minimiser every trial is rejected (no decrease is measurable): gamma is capped and
    the params stay put."""
    x = nn.Parameter(torch.ones(10, dtype=torch.float32))
    opt = DRSOM([x], max_trials=5)
    with torch.no_grad():
        x.add_(1e-3)
    for _ in range(60):
        opt.step(lambda: rosenbrock(x))
    st = opt.state[x]
    assert st["gamma"] <= 1e16 and math.isfinite(rosenbrock(x).item())
    assert rosenbrock(x).item() < 1e-8


# ---------------------------------------------------------------------------------------------
# Non-finite values

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_trial_is_rejected(value):
    """A trust-region trial whose loss is not finite is a rejected trial (gamma grows, retry from
    the base point), not a crash."""
    x = rosenbrock_start(10)
    poison = [False]

    def closure():
        loss = rosenbrock(x)
        if poison[0] and not torch.is_grad_enabled():  # the next trial point only
            poison[0] = False
            return loss + value
        return loss
    opt = DRSOM([x])
    for _ in range(4):
        opt.step(closure)
    st = opt.state[x]
    before = {k: st[k] for k in ("rejections", "trials", "line_searches", "gamma", "step")}
    f_before = rosenbrock(x).item()
    poison[0] = True
    opt.step(closure)
    assert st["line_searches"] == before["line_searches"]  # a trust-region step
    assert st["rejections"] == before["rejections"] + 1 and st["trials"] >= before["trials"] + 2
    assert st["gamma"] > before["gamma"]
    assert st["step"] == before["step"] + 1
    assert math.isfinite(rosenbrock(x).item()) and rosenbrock(x).item() < f_before


class BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, value):
        ctx.value = value
        return t * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


def test_gradient_whose_squared_norm_overflows_counts_as_nonfinite():
    """float32: a finite gradient entry of 1e20 has a square above float32's range, so ||g||^2
    (summed in float64, returned in float32) is inf: refused like a non-finite gradient."""
    x = rosenbrock_start(10, dtype=torch.float32)
    opt = DRSOM([x])
    opt.step(lambda: rosenbrock(x))
    x_before = x.detach().clone()
    with pytest.raises(NonFiniteError, match="overflows"):
        opt.step(lambda: rosenbrock(x) + BadGrad.apply(x[0], 1e20))
    assert torch.equal(x.detach(), x_before)
    assert opt.state[x]["step"] == 1


def test_nonfinite_hessian_product_falls_back_to_the_line_search():
    x = rosenbrock_start(10)
    grad_calls = [0]
    poison = [False]

    def closure():
        loss = rosenbrock(x)
        if torch.is_grad_enabled():
            grad_calls[0] += 1
            if poison[0] and grad_calls[0] == 2:  # the first finite-difference point
                return loss + BadGrad.apply(x[0], float("nan"))
        return loss
    opt = DRSOM([x])
    for _ in range(4):
        opt.step(closure)
    st = opt.state[x]
    searches, f_before = st["line_searches"], rosenbrock(x).item()
    poison[0], grad_calls[0] = True, 0
    opt.step(closure)
    assert st["line_searches"] == searches + 1
    assert math.isfinite(rosenbrock(x).item()) and rosenbrock(x).item() < f_before


# ---------------------------------------------------------------------------------------------
# Layout

# ---------------------------------------------------------------------------------------------
# torch's conventions: closures that call backward, LR schedulers

@pytest.mark.parametrize("options", [{}, {"hvp": "central", "directions": 3}, {"hvp": "interp"},
                                     {"random": True}, {"maximize": True}],
                         ids=["fd", "central-k3", "interp", "random", "maximize"])
def test_torch_closure_that_calls_backward_takes_the_same_steps(options):
    """A closure in torch.optim's convention (zero_grad, loss, backward, return the loss): the
    gradient comes from the params' .grad, the trial losses are evaluated with grad (the
    closure's backward needs it); the steps are the loss-only closure's, bit for bit."""
    finals = []
    for torch_style in (False, True):
        net, loss_fn = mlp_problem(torch.float64)
        opt = DRSOM(net.parameters(), **options)

        def closure():
            if not torch_style:
                return loss_fn()
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        losses = [opt.step(closure).item() for _ in range(6)]
        finals.append(([p.detach().clone() for p in net.parameters()], losses,
                       opt.state[next(net.parameters())]["trials"]))
    (p1, l1, t1), (p2, l2, t2) = finals
    assert l1 == l2 and t1 == t2 and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert (l1[-1] > l1[0]) if options.get("maximize") else (l1[-1] < l1[0])


def test_autograd_hvp_refuses_a_closure_that_calls_backward():
    net, loss_fn = mlp_problem(torch.float64)
    opt = DRSOM(net.parameters(), hvp="autograd")
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="hvp='fd', 'central' or 'interp'"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_lr_scheduler_scales_the_steps():
    """lr scales every step (the trust region judges the scaled step by its model); StepLR
    drives it like any torch optimizer's lr."""
    net, loss_fn = mlp_problem(torch.float64)
    opt = DRSOM(net.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = [p.detach().clone() for p in net.parameters()]
    for k in range(4):
        assert opt.param_groups[0]["lr"] == 0.5 ** k
        opt.step(loss_fn)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5 ** 4
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), x))
    # lr = 0: the base evaluation only, nothing moves
    opt.param_groups[0]["lr"] = 0.0
    x, trials = [p.detach().clone() for p in net.parameters()], opt.state[net[0].weight]["trials"]
    opt.step(loss_fn)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), x))
    assert opt.state[net[0].weight]["trials"] == trials


def test_params_are_views_of_one_flat_buffer():
    net, closure = mlp_problem(torch.float64)
    values = [p.detach().clone() for p in net.parameters()]
    opt = DRSOM(net.parameters())
    for p, v in zip(net.parameters(), values):
        assert torch.equal(p, v) and p.is_leaf
    assert opt._x.data_ptr() == net[0].weight.data_ptr()
    with torch.no_grad():
        net[2].bias.fill_(0.5)  # in-place changes are seen
    assert torch.equal(opt._x[-3:], torch.full((3,), 0.5, dtype=torch.float64))
    opt.step(closure)
    net[0].weight.data = net[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="replaced"):
        opt.step(closure)


def test_exported():
    assert soo_ext.DRSOM is DRSOM and "DRSOM" in soo_ext.__all__


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


def test_same_randomness_replays_dropout_and_freezes_batchnorm():
    net, X, y = noisy_problem()
    bn = net.body[1]
    stats = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    with same_randomness(net) as ctx:
        l1 = F.cross_entropy(net(X), y)
        ctx.replay()
        l2 = F.cross_entropy(net(X), y)
    assert torch.equal(l1, l2)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    assert bn.track_running_stats
    l3 = F.cross_entropy(net(X), y)  # outside: a new mask, stats update
    assert not torch.equal(l1, l3) and bn.num_batches_tracked.item() == 1


def test_drsom_with_model_replays_randomness():
    net, X, y = noisy_problem()
    bn = net.body[1]
    rng = torch.get_rng_state()

    def closure():
        return F.cross_entropy(net(X), y)
    opt = DRSOM(net.parameters(), model=net)
    losses = [opt.step(closure).item() for _ in range(10)]
    assert bn.num_batches_tracked.item() == 10  # one update per step
    # the global stream advanced as if the closure had been evaluated once per step
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    for _ in range(10):
        closure()
    assert torch.equal(torch.get_rng_state(), after)
    assert losses[-1] < losses[0]
    assert opt.state[net.body[0].weight]["rejections"] < opt.state[net.body[0].weight]["trials"]


# ---------------------------------------------------------------------------------------------
# Devices

@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("options", [{}, {"hvp": "central"}, {"random": True}],
                         ids=["fd", "central", "random"])
def test_rosenbrock_on_every_device(options, device):
    x = rosenbrock_start(20, device=device)
    start = rosenbrock(x).item()
    opt = DRSOM([x], **options)
    steps = 60 if options.get("random") else 300
    for _ in range(steps):
        opt.step(lambda: rosenbrock(x))
    if options.get("random"):  # a random subspace has no momentum: slower
        assert rosenbrock(x).item() < 0.5 * start
    else:
        assert rosenbrock(x).item() < 1e-5
