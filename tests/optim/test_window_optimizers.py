"""MFAC and GGT against naive float64 transcriptions of their papers, step for step (dense n x n
matrices, loops), and their window-specific behaviour."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import soo_ext

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
F64 = torch.float64


class NaiveMFAC:
    """The authors' dynamic algorithm as their code runs it: a zero-initialised window of m
    gradients (g + wd p), the newest replacing the oldest; F^{-1} built densely by m Sherman-
    Morrison updates of I / damping with g_i / sqrt(m); then SGD with momentum in torch's form
    (``buf <- momentum buf + d``; the authors' ``(1 - momentum) d`` is an lr rescaling)."""

    def __init__(self, params, lr, momentum, wd, window, damping):
        self.params, self.lr, self.mom, self.wd = list(params), lr, momentum, wd
        n = sum(p.numel() for p in self.params)
        self.G, self.last, self.damping = torch.zeros(window, n, dtype=F64), 0, damping
        self.buf = torch.zeros(n, dtype=F64)

    def step(self):
        g = torch.cat([(p.grad + self.wd * p).reshape(-1) for p in self.params]).double()
        m = self.G.shape[0]
        self.G[self.last] = g
        self.last = (self.last + 1) % m
        H = torch.eye(g.numel(), dtype=F64) / self.damping
        for gi in self.G:
            Hg = H @ gi
            H = H - torch.outer(Hg, Hg) / (m + gi @ Hg)
        self.buf = self.mom * self.buf + H @ g
        with torch.no_grad():
            for p, u in zip(self.params, self.buf.split([p.numel() for p in self.params])):
                p.sub_(self.lr * u.view_as(p))


class NaiveGGT:
    """Algorithm 1 of Agarwal et al.: m <- beta1 m + g; G = [g_t, beta2 g_{t-1}, ...] (r
    columns); thin SVD G = U diag(sigma) V^T; d = U diag(sigma + eps)^-1 U^T m + (m - U U^T m)
    / eps; p <- p - lr d."""

    def __init__(self, params, lr, betas, eps, window):
        self.params, self.lr, (self.b1, self.b2), self.eps, self.r = list(params), lr, betas, eps, window
        self.grads, self.m = [], None

    def step(self):
        g = torch.cat([p.grad.reshape(-1) for p in self.params]).double()
        self.m = g.clone() if self.m is None else self.b1 * self.m + g
        self.grads = [g] + self.grads[:self.r - 1]
        G = torch.stack([self.b2 ** age * gi for age, gi in enumerate(self.grads)], 1)
        U, sigma, _ = torch.linalg.svd(G, full_matrices=False)
        keep = sigma > 1e-7 * sigma[0]
        U, sigma = U[:, keep], sigma[keep]
        Um = U.T @ self.m
        d = U @ (Um / (sigma + self.eps)) + (self.m - U @ Um) / self.eps
        with torch.no_grad():
            for p, u in zip(self.params, d.split([p.numel() for p in self.params])):
                p.sub_(self.lr * u.view_as(p))


def model_and_data(seed=0, dtype=F64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    x, y = torch.randn(32, 5, dtype=dtype), torch.randint(0, 3, (32,))
    return model, x, y


def run_pair(make_ours, make_naive, steps=9):
    model, x, y = model_and_data()
    twin, _, _ = model_and_data()
    ours, naive = make_ours(model.parameters()), make_naive(twin.parameters())
    for _ in range(steps):
        for m, opt in ((model, ours), (twin, naive)):
            for p in m.parameters():
                p.grad = None
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert (p - q).abs().max() <= 1e-10 * max(1.0, q.abs().max()), "params diverged"


@pytest.mark.parametrize("solver", ["cholesky", "update"])
@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 1e-2)])
def test_mfac_matches_the_naive_transcription(momentum, wd, solver):
    """Both solvers; 9 steps of a window of 4: the kept inverse is carried and refreshed."""
    kw = dict(lr=1e-3, momentum=momentum, window=4, damping=1e-2)
    run_pair(lambda ps: soo_ext.MFAC(ps, weight_decay=wd, solver=solver, **kw),
             lambda ps: NaiveMFAC(ps, kw["lr"], momentum, wd, kw["window"], kw["damping"]))


def test_mfac_solvers_auto_choice_and_a_switch_midway():
    """'auto' keeps the inverse from window 128 on; switching the solver (or the damping)
    between steps drops or rebuilds the kept inverse, never uses a stale one."""
    model, x, y = model_and_data()
    for window, kept in ((8, False), (128, True)):
        opt = soo_ext.MFAC(model.parameters(), window=window)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert ("gram_inverse" in opt.state[next(model.parameters())]) == kept
    kw = dict(lr=1e-3, window=4, damping=1e-2)
    model, x, y = model_and_data()
    twin, _, _ = model_and_data()
    ours, naive = soo_ext.MFAC(model.parameters(), **kw), NaiveMFAC(twin.parameters(), 1e-3, 0.0,
                                                                     0.0, 4, 1e-2)
    # step 3 (not a refresh step: every 4) follows a Cholesky step, step 5 a damping change
    for step, (solver, damping) in enumerate([("update", 1e-2)] * 2 + [("cholesky", 1e-2)]
                                             + [("update", 1e-2)] * 2 + [("update", 3e-2)]):
        ours.param_groups[0].update(solver=solver, damping=damping)
        naive.damping = damping
        for m, opt in ((model, ours), (twin, naive)):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert (p - q).abs().max() <= 1e-10 * max(1.0, q.abs().max()), step


@pytest.mark.filterwarnings("ignore:GGT. window=4 is short")
@pytest.mark.parametrize("betas", [(0.9, 1.0), (0.5, 0.8)])
def test_ggt_matches_the_naive_transcription(betas):
    run_pair(lambda ps: soo_ext.GGT(ps, lr=0.01, betas=betas, eps=1e-2, window=4),
             lambda ps: NaiveGGT(ps, 0.01, betas, 1e-2, 4))


@pytest.mark.parametrize("cls, kwargs", [(soo_ext.MFAC, dict(lr=1e-3, window=8)),
                                         (soo_ext.GGT, dict(lr=1e-3, window=32, betas=(0.5, 1.0)))])
def test_a_bfloat16_window_trains_close_to_a_float32_one(cls, kwargs):
    losses = {}
    for window_dtype in (None, torch.bfloat16):
        model, x, y = model_and_data(dtype=torch.float32)
        opt = cls(model.parameters(), window_dtype=window_dtype, **kwargs)
        for _ in range(30):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses[window_dtype] = loss.item()
        assert opt.state[next(model.parameters())]["window"].dtype == (window_dtype
                                                                       or torch.float32)
    first = model_and_data(dtype=torch.float32)[0]
    initial = F.cross_entropy(first(x), y).item()
    assert losses[None] < initial and losses[torch.bfloat16] < initial
    assert abs(losses[None] - losses[torch.bfloat16]) < 0.05 * initial


def test_a_window_that_does_not_fit_is_refused_naming_the_option():
    big = nn.Linear(1000, 1000)
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.MFAC(big.parameters(), window=300)  # 300 x 1M floats: 1.1 GiB
    soo_ext.MFAC(big.parameters(), window=300, window_dtype=torch.bfloat16)  # 0.56 GiB fits


def test_the_window_cannot_change_after_the_first_step():
    model, x, y = model_and_data()
    opt = soo_ext.GGT(model.parameters(), window=3, betas=(0.0, 1.0))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.param_groups[0]["window"] = 4
    with pytest.raises(ValueError, match="window"):
        opt.step()


def test_ggt_warns_of_a_window_shorter_than_its_momentum():
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.warns(RuntimeWarning, match="window=32 is short for beta1=0.9"):
        soo_ext.GGT(params, window=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soo_ext.GGT(params)  # the default window, 100: 0.9^100 / 1e-4 < 1
        soo_ext.GGT(params, window=32, betas=(0.5, 1.0))
