"""soo_ext.PSGDKron: step for step against a naive float64 transcription of PSGD-Kron (Li 2022,
as kron-torch runs it) fed the same probes, against kron-torch itself where it is installed, the
update-probability schedule and its draws, and a decrease of the MNIST-1D training loss.  What
every optimizer promises alike is checked by tests/optim/test_contract.py."""
import math
import random

import pytest
import torch
from torch import nn

import soo_ext
import soo_ext.optim.psgd_kron as psgd_optim
from soo_ext.curvature.psgd_kron import start_precond_lr, update_probability

from conftest import mnist1d_mlp, train_mnist1d

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ---------------------------------------------------------------------------------------------
# The algorithm written out per param, with every factor a full matrix (a diagonal factor is a
# diagonal matrix whose Gram terms keep only their diagonals).

def mode_product(T, M, i):
    """T x_i M: M applied to the mode-i fibres."""
    return torch.tensordot(M, T, dims=([1], [i])).movedim(0, i)


def gram(T, i):
    """T_(i) T_(i)^T."""
    unfolded = T.movedim(i, 0).reshape(T.shape[i], -1)
    return unfolded @ unfolded.T


def reference_lower_bound(S):
    """The reference's cheap lower bound of ||S||_2, one matrix at a time."""
    scale = S.abs().max()
    if scale == 0:
        return scale
    A = S / scale
    j = int((A * A).sum(0).argmax())
    x = A[:, j] @ A
    x = x / x.norm()
    return (A @ x).norm() * scale


class NaiveParam:
    """One param's preconditioner and momentum, in float64."""

    def __init__(self, shape, kinds):
        self.shape, self.kinds = shape, kinds
        self.Q = [torch.eye(n, dtype=F64) for n in shape]
        self.m = torch.zeros(shape, dtype=F64)
        self.t = 0

    def fit(self, G, V, lr_P):
        A, B = G, V
        for i, Q in enumerate(self.Q):
            A = mode_product(A, Q, i)
            B = mode_product(B, torch.linalg.inv(Q).T, i)  # Q^T B = V, mode by mode
        for i, (Q, kind) in enumerate(zip(self.Q, self.kinds)):
            T1, T2 = gram(A, i), gram(B, i)
            if kind == "diag":
                T1, T2 = torch.diag(T1.diagonal()), torch.diag(T2.diagonal())
                norm = (T1 + T2).abs().max()
            else:
                norm = reference_lower_bound(T1 + T2)
            self.Q[i] = Q - lr_P * torch.triu(T1 - T2) @ Q / norm

    def balance(self):
        if len(self.Q) < 2:
            return
        norms = [Q.abs().max() for Q in self.Q]
        mean = torch.stack(norms).log().mean().exp()
        self.Q = [Q * (mean / n) for Q, n in zip(self.Q, norms)]

    def precondition(self, M):
        for i, Q in enumerate(self.Q):
            M = mode_product(M, Q.T @ Q, i)
        return M


def naive_step(naive, params, grads, probes, k, o, seed):
    """One PSGD-Kron step over ``params`` (float64 copies, updated in place)."""
    r = random.Random(seed * 1_000_003 + k)
    update = r.random() < o["update_probability"]
    balance = r.random() < 0.01 and update
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        st = naive[i]
        G = g.reshape(st.shape).to(F64)
        st.m = o["momentum"] * st.m + (1 - o["momentum"]) * G
        st.t += 1
        m_hat = st.m / (1 - o["momentum"] ** st.t)
        if balance:
            st.balance()
        if update:
            V = probes[i].to(F64)
            fit_on = m_hat if o["momentum_into_precond_update"] else G.clone()
            fit_on = fit_on + math.sqrt(EPS32) * fit_on.abs().mean() * V  # the reference's jitter
            if o["momentum_into_precond_update"]:
                m_hat = fit_on  # the reference preconditions the jittered momentum
            st.fit(fit_on, V, o["precond_lr"])
        U = st.precondition(m_hat)
        rms = U.square().mean().sqrt()
        U = U * min(1.0, o["max_update_rms"] / (float(rms) + 1e-12))
        wd = o["weight_decay"] if p.dim() >= 2 else 0.0
        p -= o["lr"] * (U.reshape(p.shape) + wd * p)
    return update, balance


def recording_probes(monkeypatch):
    """The probes PSGDKron draws, by (shape group, member) order."""
    drawn = []
    original = psgd_optim.draw_probes

    def draw(*args):
        V = original(*args)
        drawn.append(V)
        return V
    monkeypatch.setattr(psgd_optim, "draw_probes", draw)
    return drawn


def balancing_seed(steps, p):
    """A seed whose run balances the factors within ``steps`` steps."""
    for seed in range(10_000):
        for k in range(1, steps + 1):
            r = random.Random(seed * 1_000_003 + k)
            if r.random() < p and r.random() < 0.01:
                return seed
    raise AssertionError


SHAPES = [(5, 4), (5,), (6, 2, 3), (1, 7), (3, 2, 2), ()]


@pytest.mark.parametrize("variant", ["default", "grad-fit-diag", "unmerged"])
def test_matches_naive_float64_step_for_step(monkeypatch, variant):
    steps, p_update = 14, 0.6
    o = dict(lr=0.05, momentum=0.9, weight_decay=0.01, precond_lr=0.1,
             update_probability=p_update, max_update_rms=1.1,
             momentum_into_precond_update=variant != "grad-fit-diag")
    extra = dict(precond_dtype=F64, seed=balancing_seed(steps, p_update))
    if variant == "grad-fit-diag":
        extra.update(max_size_triangular=4, memory_save_mode="smart_one_diag")
    if variant == "unmerged":  # order-3 factors, triangular 1-D factors, the clip active
        extra.update(merge_dims=False, min_ndim_triangular=1)
        o["max_update_rms"] = 0.05
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=F64, generator=gen)) for s in SHAPES]
    copies = [p.detach().clone() for p in params]
    opt = soo_ext.PSGDKron(params, **o, **extra)
    drawn = recording_probes(monkeypatch)
    naive, updates, balances = None, 0, 0
    for k in range(1, steps + 1):
        grads = [torch.randn(s, dtype=F64, generator=gen) for s in SHAPES]
        if k == 5:
            grads[1] = None  # a param without a gradient is left alone
        for p, g in zip(params, grads):
            p.grad = g
        drawn.clear()
        opt.step()
        layout = opt._run[1]
        if naive is None:  # the layout (the naive's shapes and kinds) comes with step 1
            naive = [NaiveParam(layout.merged[i], layout.kinds[i]) for i in range(len(params))]
        probes = [drawn[layout.place[i][0]][layout.place[i][1]] if drawn else None
                  for i in range(len(params))]
        update, balance = naive_step(naive, copies, grads, probes, k, o, extra["seed"])
        updates, balances = updates + update, balances + balance
        for i, (p, c) in enumerate(zip(params, copies)):
            assert (p.detach() - c).abs().max() <= 1e-10, (k, i)
            for q, Q in zip(opt.state[p]["Q"], naive[i].Q):
                dense = torch.diag(q) if q.dim() == 1 else q
                assert (dense - Q).abs().max() <= 1e-10, (k, i)
    assert 0 < updates < steps and balances >= 1
    assert opt.state[params[0]]["precond_updates"] == updates
    if variant == "grad-fit-diag":  # 5 > max_size_triangular (and the larger dim): diagonal
        assert [q.dim() for q in opt.state[params[0]]["Q"]] == [1, 2]


def test_probability_schedule_is_the_references():
    assert update_probability(0) == update_probability(500) == 1.0
    assert update_probability(1500) == pytest.approx(math.exp(-1.0))
    assert update_probability(4007) == pytest.approx(0.03, abs=1e-4)
    assert update_probability(10 ** 6) == 0.03
    kron = pytest.importorskip("kron_torch.kron")
    schedule = kron.ProbScheduler()
    for n in (0, 499, 700, 2000, 3900, 5000):
        assert float(schedule._schedule_fn(torch.tensor(float(n)))) == pytest.approx(
            update_probability(n), rel=1e-6)


def test_update_decisions_draw_the_probability():
    p = nn.Parameter(torch.zeros(4, 3))
    opt = soo_ext.PSGDKron([p], update_probability=0.25, seed=3)
    for _ in range(400):
        p.grad = torch.ones(4, 3)
        opt.step()
    assert 70 <= opt.state[p]["precond_updates"] <= 130
    reference = soo_ext.PSGDKron([p2 := nn.Parameter(torch.zeros(3))], refresh_budget=None)
    for _ in range(20):
        p2.grad = torch.ones(3)
        reference.step()
    assert reference.state[p2]["precond_updates"] == 20  # probability 1 for 500 steps


def test_default_start_fits_every_second_step_with_a_larger_step():
    """The default's first 500 steps: exactly the explicit schedule 'every 2nd step' with
    4 precond_lr (bit for bit: the same probes and draws); the reference's step after them."""
    torch.manual_seed(0)
    W, b = torch.randn(5, 4, dtype=F64), torch.randn(5, dtype=F64)
    runs = []
    for kw in (dict(), dict(update_probability=lambda n: float(n % 2 == 0), precond_lr=0.4)):
        params = [nn.Parameter(W.clone()), nn.Parameter(b.clone())]
        opt = soo_ext.PSGDKron(params, lr=0.01, refresh_timer=lambda: 0.0, **kw)
        for t in range(12):
            for p in params:
                p.grad = torch.sin(p.detach() * (t + 1))
            opt.step()
        runs.append((params, opt.state[params[0]]))
    (p1, s1), (p2, s2) = runs
    assert s1["precond_updates"] == s2["precond_updates"] == 6
    for a, c in zip(p1 + s1["Q"], p2 + s2["Q"]):
        assert torch.equal(a, c)
    assert start_precond_lr(0.1) == 0.4 and start_precond_lr(0.2) == 0.5  # below 1: Q invertible
    assert start_precond_lr(0.7) == 0.7


def test_annealing_continues_from_the_start_rate():
    """After the default's start (a fit at every 2nd step) the annealed probability starts at
    the start's rate 1/2, as the references' annealing starts at their flat start's rate (1):
    ``max(floor, exp(-0.001 (n - 500)) / 2)``, no jump back to a fit at every step."""
    from soo_ext.curvature.refresh_schedule import RefreshSchedule
    record = {**RefreshSchedule.new_record(), "measuring": False, "interval": 5, "anchor": 506}
    due = psgd_optim._fit_due
    assert [due(None, n, 0.99, record) for n in range(496, 500)] == [True, False] * 2
    for n, p in ((507, 0.5 * math.exp(-0.007)), (1000, 0.5 * math.exp(-0.5)), (1500, 0.2)):
        assert due(None, n, p * (1 - 1e-9), record) and not due(None, n, p * (1 + 1e-9), record)
    assert due(None, 507, 0.99, None)  # refresh_budget=None: the reference's, from 1
    cheap = {**record, "interval": 1}  # a floor above the start's rate: the floor (1) holds
    assert due(None, 507, 0.99, cheap)


def test_matches_kron_torch(monkeypatch):
    """kron-torch's Kron with the same probes, in float64 (its triangular solve, done in float32
    there, in float64), its merge of dims, the update every step (its decisions are a counter,
    ours draws) and no balancing: the same params within 1e-13."""
    kron = pytest.importorskip("kron_torch.kron")
    for name in ("_update_precond", "_precond_grad", "_clip_update_rms"):
        f = getattr(kron, name)
        monkeypatch.setattr(kron, name, getattr(f, "_torchdynamo_orig_callable", f))
    monkeypatch.setattr(kron, "_solve_triangular_right", lambda X, A: torch.linalg.solve_triangular(
        A, X.reshape(-1, X.size(-1)), upper=True, left=False).reshape_as(X))
    queue = []

    def a_and_conj_b(exprA, G, Q):  # kron-torch's, with our probe
        V, order = queue.pop(0), G.dim()
        G += math.sqrt(EPS32) * G.abs().mean() * V
        conjB = V.permute(*range(1, order), 0)
        for i, q in enumerate(Q):
            conjB = conjB / q if q.dim() < 2 else kron._solve_triangular_right(conjB, q)
            if i < order - 1:
                conjB = torch.transpose(conjB, i, order - 1)
        return torch.einsum(exprA, *Q, G), conjB
    monkeypatch.setattr(kron, "_calc_A_and_conjB", a_and_conj_b)
    drawn = recording_probes(monkeypatch)
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv1d(2, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 5),
                            nn.Tanh(), nn.Linear(5, 3)).to(F64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = soo_ext.PSGDKron(models[0].parameters(), lr=0.01, weight_decay=0.01,
                            update_probability=1.0, precond_dtype=F64, seed=1,
                            merge_dims="reference")
    theirs = kron.Kron(models[1].parameters(), lr=0.01, weight_decay=0.01,
                       preconditioner_update_probability=1.0, precond_dtype=F64)
    theirs.rng.random = lambda: 1.0  # no balancing (seed 1 balances in none of our 20 steps)
    x = torch.randn(32, 2, 8, dtype=F64)
    y = torch.randn(32, 3, dtype=F64)
    for _ in range(20):
        drawn.clear()
        for model, opt in zip(models, (ours, theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if opt is theirs:
                layout = ours._run[1]
                queue.extend(drawn[layout.place[i][0]][layout.place[i][1]]
                             for i in range(len(layout.params)))
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert (a - b).abs().max() <= 1e-13


def test_trains_mnist1d(mnist1d):
    before, after, _ = train_mnist1d(mnist1d, mnist1d_mlp,
                                     lambda m: soo_ext.PSGDKron(m.parameters(), lr=1e-2), 60)
    assert after < 0.8 * before


def test_momentum_per_param_group(monkeypatch):
    """``momentum`` (and ``lr``) per param group, as torch.optim reads them: two groups whose
    params share shape groups (one stack, two betas) follow the float64 transcription with each
    group's own momentum and bias correction, step for step; a run with one momentum for all
    differs (the groups' values are used)."""
    steps, p_update = 10, 0.6
    shapes = [(5, 4), (5, 4), (6,), (6,), (3, 2, 2)]
    o = dict(weight_decay=0.01, precond_lr=0.1, update_probability=p_update,
             max_update_rms=1.1, momentum_into_precond_update=True)
    per_group = [dict(lr=0.05, momentum=0.9), dict(lr=0.02, momentum=0.5)]
    seed = balancing_seed(steps, p_update)
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=F64, generator=gen)) for s in shapes]
    start = [p.detach().clone() for p in params]
    copies = [p.detach().clone() for p in params]
    groups = [{"params": params[g::2], **per_group[g]} for g in (0, 1)]
    opt = soo_ext.PSGDKron(groups, **o, precond_dtype=F64, seed=seed)
    same = [nn.Parameter(p.clone()) for p in start]  # one momentum for all
    single = soo_ext.PSGDKron([{"params": same[g::2], "lr": per_group[g]["lr"]} for g in (0, 1)],
                              **o, momentum=0.9, precond_dtype=F64, seed=seed)
    drawn = recording_probes(monkeypatch)
    naive = None
    for k in range(1, steps + 1):
        grads = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
        for p, q, g in zip(params, same, grads):
            p.grad, q.grad = g, g.clone()
        drawn.clear()
        opt.step()
        layout = opt._run[1]
        at = [[id(q) for q in layout.params].index(id(p)) for p in params]  # group 0 first
        if naive is None:
            naive = [NaiveParam(layout.merged[i], layout.kinds[i]) for i in at]
            assert len(layout.shape_groups) == 3  # (5, 4) and (6,) stacks hold both groups
        probes = [drawn[layout.place[i][0]][layout.place[i][1]] if drawn else None for i in at]
        for g in (0, 1):
            naive_step(naive[g::2], copies[g::2], grads[g::2], probes[g::2], k,
                       dict(o, **per_group[g]), seed)
        for i, (p, c) in enumerate(zip(params, copies)):
            assert (p.detach() - c).abs().max() <= 1e-10, (k, i)
        single.step()
    assert torch.equal(same[0], params[0]) and not torch.equal(same[1], params[1])
