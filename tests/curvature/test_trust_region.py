"""DRSOM's step from its model alone (soo_ext.curvature.trust_region): the gamma ladder, the noise
floor, the acceptance bookkeeping, the trust-region trials (accept, reject, retry shorter, noise
stop, non-finite model) and the Armijo line search along -g, on a quadratic whose model is exact."""
import math

import pytest
import torch

from soo_ext.curvature.trust_region import (GAMMA_MAX, NOISE_ULPS, TrustRegion, grown_gamma,
                                            noise_floor, shrunk_gamma)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

OPTIONS = {"max_trials": 20, "gamma_increase": 5.0, "gamma_min": 1e-16, "eta_accept": 0.05,
           "eta_low": 0.1, "eta_high": 0.5, "max_step_growth": 10.0, "rejection_shrink": 0.5,
           "armijo": 1e-4, "random": False, "lr": 1.0}


def new_state(n, k=2, dtype=torch.float64, gamma=1e-6):
    """DRSOM's state entries as they are before the first step."""
    return {"step": 0, "gamma": gamma, "directions": torch.zeros((k, n), dtype=dtype),
            "order": list(range(k)), "count": 0, "ls_step": None, "last_length": math.inf,
            "func_evals": 0, "grad_evals": 0, "trials": 0, "rejections": 0,
            "line_searches": 0, "noise_stops": 0}


class Quadratic:
    """f(x) = x^T A x / 2 - b^T x (+ offset), with the trial losses it is asked for counted."""

    def __init__(self, n=6, seed=0, offset=0.0, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed)
        M = torch.randn(n, n, dtype=dtype, generator=gen)
        self.A = M @ M.T / n + torch.eye(n, dtype=dtype)
        self.b = torch.randn(n, dtype=dtype, generator=gen)
        self.offset, self.calls = offset, 0
        self.x = torch.zeros(n, dtype=dtype)
        self.poison = []  # values added to the next trial losses

    def f(self, z):
        return 0.5 * z @ self.A @ z - self.b @ z + self.offset

    def trial_loss(self):
        self.calls += 1
        value = self.f(self.x)
        return value + self.poison.pop(0) if self.poison else value

    def model(self, V):
        """The exact model on span V at x: (Q, G, c), g, f."""
        g = self.A @ self.x - self.b
        Vm = torch.stack(V, 1)
        return Vm.T @ self.A @ Vm, Vm.T @ Vm, Vm.T @ g, g, self.f(self.x).item()


def region(q, st, **options):
    x0 = torch.empty_like(q.x)
    return TrustRegion(q.x, x0, st, {**OPTIONS, **options}, q.trial_loss)


# ---------------------------------------------------------------------------------------------
# Constants and the gamma ladder

def test_gamma_ladder():
    assert grown_gamma(1e-6, 5.0) == 5.0 * 1e-6
    assert grown_gamma(0.5 * GAMMA_MAX, 5.0) == GAMMA_MAX == 1e16  # capped: never inf
    assert shrunk_gamma(100.0, 1e-16) == math.log10(101.0)  # log10(1 + g) < sqrt(g)
    assert shrunk_gamma(1e-4, 1e-16) == math.log10(1 + 1e-4)  # the smaller of the two
    assert shrunk_gamma(1e-4, 1e-3) == 1e-3
    assert shrunk_gamma(1e-40, 1e-16) == 1e-16  # floored at gamma_min


def test_noise_floor():
    assert NOISE_ULPS == 16
    assert noise_floor(-3.0, torch.float32) == 16 * torch.finfo(torch.float32).eps * 3.0
    assert noise_floor(2.0, torch.float64) == 16 * torch.finfo(torch.float64).eps * 2.0


@pytest.mark.parametrize("random", [False, True])
def test_accept_makes_the_step_d1(random):
    st = new_state(4, k=3)
    st["order"], st["count"] = [2, 0, 1], 1
    q = Quadratic(4)
    r = region(q, st, random=random)
    assert r.row == (0 if random else 1)  # the scratch row: order[1] (random) or order[-1]
    r.accept(0.25)
    assert st["last_length"] == 0.25
    if random:
        assert st["order"] == [2, 0, 1] and st["count"] == 1
    else:
        assert st["order"] == [1, 2, 0] and st["count"] == 2
        r2 = region(q, st)
        r2.accept(0.5)
        r3 = region(q, st)
        r3.accept(0.5)
        assert st["order"] == [2, 0, 1]
        assert st["count"] == 2  # at most k - 1 stored: one row is the scratch


# ---------------------------------------------------------------------------------------------
# Trust-region trials

def quadratic_step(q, st, **options):
    """One subspace step on V = [g, d] with the exact model; returns (region, V, x before)."""
    g = q.A @ q.x - q.b
    d = torch.linspace(-1, 1, q.x.numel(), dtype=q.x.dtype)
    V = [g, d]
    Q, G, c, _, f = q.model(V)
    r = region(q, st, **options)
    r.x0.copy_(q.x)  # the Hessian model leaves x0 holding the base point
    x_before = q.x.clone()
    return r, r.subspace_step(V, Q, G, c, f), V, x_before


@pytest.mark.parametrize("gamma", [1e-6, 1e-16])
def test_exact_model_is_accepted_at_once_and_gamma_shrinks(gamma):
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    st = new_state(8, gamma=gamma)
    r, done, V, x_before = quadratic_step(q, st)
    assert done and st["trials"] == 1 and st["rejections"] == 0 and st["step"] == 1
    assert q.calls == 1 and st["func_evals"] == 1
    # rho ~ 1 >= eta_high: gamma shrinks to max(min(sqrt, log10(1 + .)), gamma_min)
    assert st["gamma"] == shrunk_gamma(gamma, 1e-16)
    if gamma == 1e-16:  # lambda ~ 1e-8: the step is the minimiser of the model over span V
        Vm = torch.stack(V, 1)
        a = torch.linalg.solve(Vm.T @ q.A @ Vm, -Vm.T @ (q.A @ x_before - q.b))
        torch.testing.assert_close(q.x, x_before + Vm @ a, rtol=1e-6, atol=1e-9)
    # the accepted step is d_1, its length recorded
    assert st["order"][0] == r.row and st["count"] == 1
    torch.testing.assert_close(st["directions"][r.row], q.x - x_before, rtol=1e-12, atol=1e-15)
    assert st["last_length"] == pytest.approx((q.x - x_before).norm().item(), rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_rejected_trial_grows_gamma_and_retries_shorter(bad):
    """A trial whose loss is not finite or rose is rejected: gamma grows by gamma_increase, the
    retry is at most rejection_shrink times as long, from x0."""
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    q.poison = [bad]
    lengths = []
    original = q.trial_loss

    def recorded():
        lengths.append((q.x - x0[0]).norm().item())
        return original()
    q.trial_loss = recorded
    st = new_state(8, gamma=1e-6)
    st["last_length"] = 1e3  # no growth limit in play
    x0 = [q.x.clone()]
    r, done, _, x_before = quadratic_step(q, st)
    assert done and st["trials"] == 2 and st["rejections"] == 1 and st["step"] == 1
    assert lengths[1] <= 0.5 * lengths[0] * (1 + 1e-12)
    assert q.f(q.x) < q.f(x_before)


def test_every_trial_rejected_restores_x_exactly():
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    q.poison = [float("nan")] * 3
    st = new_state(8, gamma=1e-3)
    r, done, _, x_before = quadratic_step(q, st, max_trials=3)
    assert done and torch.equal(q.x, x_before)
    assert st["trials"] == 3 and st["rejections"] == 3 and st["step"] == 1
    assert st["count"] == 0 and st["last_length"] == math.inf
    assert st["gamma"] > 1e-3 * 5 ** 2  # grown at each rejection (and by the op's climb)


def test_first_trial_is_limited_by_the_last_step():
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    st = new_state(8)
    st["last_length"] = 1e-3
    r, done, _, x_before = quadratic_step(q, st, max_step_growth=10.0)
    assert done and (q.x - x_before).norm().item() <= 1e-2 * (1 + 1e-9)


def test_noise_stop_ends_the_step():
    """A predicted decrease within 16 ulps of |f| stops the step at its first trial, kept if the
    loss did not rise, else undone."""
    for poison, kept in ((0.0, True), (1.0, False)):
        q = Quadratic(8, offset=1e12)  # 16 eps |f| ~ 3.6e-3: above what this step predicts
        q.x = torch.linalg.solve(q.A, q.b) + 1e-4
        q.poison = [poison]
        st = new_state(8)
        r, done, _, x_before = quadratic_step(q, st)
        assert done and st["noise_stops"] == 1 and st["trials"] == 1 and st["rejections"] == 0
        assert st["step"] == 1
        assert (st["count"] == 1) == kept
        assert torch.equal(q.x, x_before) != kept


def test_nonfinite_model_returns_false_and_restores_x():
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    g = q.A @ q.x - q.b
    V = [g, torch.ones(8, dtype=torch.float64)]
    Q, G, c, _, f = q.model(V)
    Q[0, 1] = Q[1, 0] = float("nan")
    st = new_state(8)
    r = region(q, st)
    r.x0.copy_(q.x)
    x_before = q.x.clone()
    assert not r.subspace_step(V, Q, G, c, f)
    assert torch.equal(q.x, x_before) and st["step"] == 0 and st["trials"] == 1


# ---------------------------------------------------------------------------------------------
# Line search

def test_line_search_armijo_and_its_step_memory():
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    g = q.A @ q.x - q.b
    gg = (g @ g).item()
    f = q.f(q.x).item()
    st = new_state(8)
    x_before = q.x.clone()
    region(q, st).line_search(g, f, gg)
    t = min(1.0, 1.0 / math.sqrt(gg))
    while not q.f(x_before - t * g).item() <= f - 1e-4 * t * gg:
        t *= 0.5
    torch.testing.assert_close(q.x, x_before - t * g, rtol=1e-14, atol=1e-14)
    assert st["line_searches"] == 1 and st["step"] == 1 and st["count"] == 1
    assert st["last_length"] == pytest.approx(t * math.sqrt(gg))
    accepted_at_once = st["trials"] == 1
    assert st["ls_step"] == (2 * t if accepted_at_once else t)
    assert st["rejections"] == st["trials"] - 1


def test_line_search_that_fails_restores_x():
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    q.poison = [float("inf")] * 4
    g = q.A @ q.x - q.b
    st = new_state(8)
    st["ls_step"] = 0.8
    x_before = q.x.clone()
    region(q, st, max_trials=4).line_search(g, q.f(q.x).item(), (g @ g).item())
    assert torch.equal(q.x, x_before)
    assert st["ls_step"] == 0.8 / 16 and st["rejections"] == 4 and st["count"] == 0
    assert st["step"] == 1 and st["func_evals"] == 4


def test_scratch_row_holds_the_step():
    """The step is written into the scratch row only: the stored directions stay."""
    q = Quadratic(8)
    q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
    st = new_state(8, k=3)
    st["directions"][0] = 1.0
    st["order"], st["count"] = [0, 1, 2], 1
    before = st["directions"][0].clone()
    g = q.A @ q.x - q.b
    V = [g, st["directions"][0]]
    Q, G, c, _, f = q.model(V)
    r = region(q, st)
    r.x0.copy_(q.x)
    x_before = q.x.clone()
    assert r.subspace_step(V, Q, G, c, f)
    assert r.row == 2 and torch.equal(st["directions"][0], before)
    torch.testing.assert_close(st["directions"][2], q.x - x_before, rtol=1e-12, atol=1e-15)
    assert st["order"] == [2, 0, 1] and st["count"] == 2


# ---------------------------------------------------------------------------------------------
# lr: a scale of every step (what LR schedulers drive)

@pytest.mark.parametrize("lr", [0.5, 0.1])
def test_lr_scales_the_trial_and_the_models_decrease(lr):
    """On a quadratic the model is exact at every scale: the scaled trial is accepted at once
    (rho = 1), lr times the unscaled step; gamma and the step-length memory follow the model's
    step."""
    runs = []
    for scale in (1.0, lr):
        q = Quadratic(8)
        q.x = torch.linspace(1, 2, 8, dtype=torch.float64)
        st = new_state(8, gamma=1e-16)
        r, done, _, x_before = quadratic_step(q, st, lr=scale)
        assert done and st["trials"] == 1 and st["rejections"] == 0
        runs.append((q.x - x_before, st))
    (full, st1), (scaled, st2) = runs
    torch.testing.assert_close(scaled, lr * full, rtol=1e-12, atol=1e-15)
    assert st2["gamma"] == st1["gamma"] and st2["last_length"] == st1["last_length"]


def test_lr_scales_the_line_search():
    q = Quadratic(6)
    q.x = torch.ones(6, dtype=torch.float64)
    g = q.A @ q.x - q.b
    gg = g.dot(g).item()
    f = q.f(q.x).item()
    x_start = q.x.clone()
    st = new_state(6)
    region(q, st, lr=0.25).line_search(g, f, gg)
    t = min(1.0, 1.0 / math.sqrt(gg))  # accepted at once: a short step on a convex quadratic
    assert st["trials"] == 1 and st["ls_step"] == 2 * t
    torch.testing.assert_close(q.x, x_start - 0.25 * t * g, rtol=1e-14, atol=1e-15)
