"""SOAP against a naive float64 transcription of the paper's algorithm (the authors' reference
code: per param, loops, torch.linalg.eigh / qr), and against pytorch_optimizer's SOAP."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import soo_ext

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class NaiveSOAP:
    """Algorithm 3 of Vyas et al. as the reference code runs it, one param at a time: the first
    step only gathers statistics and takes the eigenbases; then Adam on the rotated gradient, the
    first moment kept rotated (mapped back to the original space and into the current bases after
    every step), the update mapped back (``normalize_grads``: divided by ``1e-30 + its RMS``),
    weight decay after it; then the factors, and every ``freq`` Adam steps one power iteration
    + QR (columns by the estimated eigenvalues, the second moment permuted alike)."""

    def __init__(self, params, lr, betas, eps, wd, freq, max_dim, precondition_1d=False,
                 shampoo_beta=None, normalize_grads=False, correct_bias=True, one_sided=False):
        self.params = list(params)
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.freq = lr, betas, eps, wd, freq
        self.bs = betas[1] if shampoo_beta is None else shampoo_beta
        self.max_dim, self.p1d, self.one_sided = max_dim, precondition_1d, one_sided
        self.normalize, self.correct_bias = normalize_grads, correct_bias
        self.state = {}

    def _dims(self, p):  # which dims have a factor (None: left unrotated)
        if p.dim() == 1 and not self.p1d:
            return [None]
        dims = [n if n <= self.max_dim else None for n in p.shape]
        rotated = [n for n in dims if n is not None]
        if self.one_sided and len(rotated) > 1:  # the paper's one-sided SOAP: the largest not
            dims[dims.index(max(rotated))] = None
        return dims

    def _project(self, x, Qs, back):
        for Q in Qs:  # contract the leading dim; it goes last
            x = x.movedim(0, -1) if Q is None else torch.tensordot(x, Q, dims=([0], [1 if back
                                                                                else 0]))
        return x

    def _update_factors(self, g, st):
        for k, GG in enumerate(st["GG"]):
            if GG is None:
                continue
            others = [d for d in range(g.dim()) if d != k]
            outer = torch.tensordot(g, g, dims=(others, others)) if others else torch.outer(g, g)
            st["GG"][k] = self.bs * GG + (1 - self.bs) * outer

    def step(self):
        for p in self.params:
            g = p.grad.double()
            if p not in self.state:
                st = self.state[p] = {"t": 0, "M": torch.zeros_like(g), "V": torch.zeros_like(g),
                                      "GG": [None if n is None else g.new_zeros(n, n)
                                             for n in self._dims(p)]}
                self._update_factors(g, st)
                st["Q"] = [None if GG is None else torch.linalg.eigh(GG)[1].flip(1)
                           for GG in st["GG"]]
                continue
            st = self.state[p]
            st["t"] += 1
            t = st["t"]
            gr = self._project(g, st["Q"], back=False)
            st["M"] = self.b1 * st["M"] + (1 - self.b1) * gr
            st["V"] = self.b2 * st["V"] + (1 - self.b2) * gr * gr
            step_size = self.lr
            if self.correct_bias:
                step_size = step_size * (1 - self.b2 ** t) ** 0.5 / (1 - self.b1 ** t)
            u = self._project(st["M"] / (st["V"].sqrt() + self.eps), st["Q"], back=True)
            if self.normalize:
                u = u / (1e-30 + torch.mean(u ** 2) ** 0.5)
            new = p.detach().double() - step_size * u
            new = new - self.lr * self.wd * new
            with torch.no_grad():
                p.copy_(new)
            M = self._project(st["M"], st["Q"], back=True)
            self._update_factors(g, st)
            if t % self.freq == 0:
                for k, (GG, Q) in enumerate(zip(st["GG"], st["Q"])):
                    if GG is None:
                        continue
                    P = GG @ Q
                    order = torch.argsort((Q * P).sum(0), descending=True, stable=True)
                    st["V"] = st["V"].index_select(k, order)
                    st["Q"][k] = torch.linalg.qr(P[:, order]).Q
            st["M"] = self._project(M, st["Q"], back=False)


class Net(nn.Module):
    """A conv weight (order 3), Linear 12 -> 7 and 7 -> 12 (12 > max_dim 10: one dim
    unrotated) and biases (Adam)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 3, 3)
        self.l1 = nn.Linear(12, 7)
        self.l2 = nn.Linear(7, 12)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)  # [N, 3, 4] -> [N, 12]
        return self.l2(torch.tanh(self.l1(h)))


def batch(i, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + i)
    x = torch.randn(64, 2, 6, dtype=dtype, generator=gen)
    return x, torch.randn(64, 12, dtype=dtype, generator=gen)


def loss_of(model, i):
    x, y = batch(i, next(model.parameters()).dtype)
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("precondition_1d, options", [
    (False, {}), (True, {}), (False, {"normalize_grads": True}), (False, {"correct_bias": False}),
    (True, {"normalize_grads": True, "correct_bias": False}), (False, {"one_sided": True})])
def test_matches_naive_fp64_transcription(precondition_1d, options):
    # refreshes once every factor has full rank (a rank-deficient one's QR is arbitrary in the
    # null space): the 1-D params' factors (rank t + 1 after t Adam steps) need 7 steps
    freq = 7 if precondition_1d else 3
    # one-sided: both dims of the linear weights rotatable, so that the 12 is dropped
    max_dim = 12 if options.get("one_sided") else 10
    kw = dict(lr=0.01, betas=(0.9, 0.95), wd=0.01, eps=1e-8, freq=freq, max_dim=max_dim)
    ours_model, naive_model = Net().double(), Net().double()
    opt = soo_ext.SOAP(ours_model.parameters(), lr=kw["lr"], betas=kw["betas"],
                       weight_decay=kw["wd"], precondition_frequency=kw["freq"], eps=kw["eps"],
                       max_precond_dim=kw["max_dim"], precondition_1d=precondition_1d,
                       factor_dtype=torch.float64, **options)
    naive = NaiveSOAP(naive_model.parameters(), **kw, precondition_1d=precondition_1d,
                      **options)
    for i in range(3 * kw["freq"] + 2):  # three refreshes
        for model, o in ((ours_model, opt), (naive_model, naive)):
            for p in model.parameters():
                p.grad = None
            loss_of(model, i).backward()
            o.step()
        if i == 0:  # a 1-D param's first factor is rank one: its null space has no preferred
            # basis (an eigh takes any), so the transcription starts from soo_ext's
            for p, q in zip(ours_model.parameters(), naive_model.parameters()):
                if p.dim() == 1 and precondition_1d:
                    naive.state[q]["Q"] = [Q.clone() for Q in opt.state[p]["Q"]]
        for a, b in zip(ours_model.parameters(), naive_model.parameters()):
            assert (a - b).abs().max().item() <= 1e-10, i
    for p, q in zip(ours_model.parameters(), naive_model.parameters()):
        ours, ref = opt.state[p], naive.state[q]
        torch.testing.assert_close(ours["exp_avg_sq"], ref["V"], rtol=0, atol=1e-10)
        torch.testing.assert_close(ours["exp_avg"], ref["M"], rtol=0, atol=1e-10)


def test_first_step_gathers_statistics_only():
    model = Net().double()
    opt = soo_ext.SOAP(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 0).backward()
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    st = opt.state[model.l1.weight]
    assert st["GG"][0].abs().sum() > 0
    Q = st["Q"][0]
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=Q.dtype), atol=1e-5, rtol=0)


def test_option_checks_run_when_an_option_changes(monkeypatch):
    model = Net().double()
    opt = soo_ext.SOAP(model.parameters())
    checks = []
    check_groups = opt._checks.specs.check_groups
    monkeypatch.setattr(opt._checks.specs, "check_groups",
                        lambda groups: (checks.append(1), check_groups(groups)))

    def step(i):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    step(0)
    step(1)
    assert len(checks) == 1  # unchanged options pass without being checked again
    opt.param_groups[0]["lr"] = 0.05
    step(2)
    assert len(checks) == 2
    opt.param_groups[0]["eps"] = -1.0
    for i in (3, 4):
        with pytest.raises(ValueError, match="Invalid eps"):
            step(i)
    assert len(checks) == 4


def test_bases_stay_orthonormal_and_sorted():
    model = Net()
    opt = soo_ext.SOAP(model.parameters(), precondition_frequency=2, lr=1e-3)
    for i in range(9):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    for GG, Q in zip(opt.state[model.l1.weight]["GG"], opt.state[model.l1.weight]["Q"]):
        eye = torch.eye(Q.shape[0])
        torch.testing.assert_close(Q.T @ Q, eye, atol=1e-5, rtol=0)
        estimate = torch.diagonal(Q.T @ GG @ Q)
        assert (estimate[:-1] + 1e-6 >= estimate[1:]).all()  # ordered by the last refresh


def test_oversized_dims_and_1d_params_take_adam():
    """With no dim up to max_precond_dim SOAP is Adam (after its statistics-only step)."""
    torch.manual_seed(0)
    model, twin = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    twin.load_state_dict(model.state_dict())
    # no weight decay (AdamW decays before its update, SOAP after) and a negligible eps (SOAP
    # adds it to sqrt(V), AdamW to the bias-corrected sqrt(V))
    opt = soo_ext.SOAP(model.parameters(), lr=0.01, max_precond_dim=3, weight_decay=0,
                       eps=1e-30)
    adamw = torch.optim.AdamW(twin.parameters(), lr=0.01, betas=(0.95, 0.95), eps=1e-30,
                              weight_decay=0)
    assert opt.state_dict()["state"] == {}
    x = torch.randn(8, 6, dtype=torch.float64)
    for i in range(6):
        for m, o in ((model, opt), (twin, adamw)):
            o.zero_grad()
            m(x * (1 + i)).square().mean().backward()
            if not (o is adamw and i == 0):
                o.step()
    assert opt.state[model.weight]["GG"] == []
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_matches_pytorch_optimizer_soap():
    """pytorch_optimizer's SOAP (defaults, max_precondition_dim 10) on the same model: equal up
    to float32 rounding (it keeps the first moment unrotated and rotates it every step, ours
    rotates it when the basis changes: the same in exact arithmetic)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ours_model, peer_model = Net(), Net()
    opt = soo_ext.SOAP(ours_model.parameters(), precondition_frequency=3, max_precond_dim=10)
    peer = pytorch_optimizer.SOAP(peer_model.parameters(), precondition_frequency=3,
                                  max_precondition_dim=10)
    for i in range(12):
        for model, o in ((ours_model, opt), (peer_model, peer)):
            o.zero_grad()
            loss_of(model, i).backward()
            o.step()
    for a, b in zip(ours_model.parameters(), peer_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_skipped_first_step_keeps_identity_bases():
    model = Net()
    opt = soo_ext.SOAP(model.parameters())
    loss_of(model, 0).backward()
    model.l1.weight.grad[0, 0] = float("nan")
    opt.step()
    st = opt.state[model.l1.weight]
    assert torch.equal(st["Q"][0], torch.eye(7)) and not st["GG"][0].any()
    opt.zero_grad()
    loss_of(model, 1).backward()
    with pytest.warns(RuntimeWarning, match="SOAP"):  # read from the counter at the next step
        opt.step()
    assert opt.state[model.conv.weight]["nonfinite_steps"].item() == 1


def test_one_sided_leaves_the_larger_dim_unrotated():
    model = Net()
    opt = soo_ext.SOAP(model.parameters(), one_sided=True, max_precond_dim=12)
    loss_of(model, 0).backward()
    opt.step()
    assert [Q.shape for Q in opt.state[model.l1.weight]["Q"]] == [(7, 7)]  # of [7, 12]
    assert [Q.shape for Q in opt.state[model.conv.weight]["Q"]] == [(2, 2), (3, 3)]  # [3, 2, 3]


def test_state_dict_from_before_one_sided_loads():
    model = Net()
    opt = soo_ext.SOAP(model.parameters())
    for i in range(2):
        opt.zero_grad()
        loss_of(model, i).backward()
        opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["one_sided"]
    resumed = soo_ext.SOAP(model.parameters())
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["one_sided"] is False
    resumed.step()  # the saved layout is the two-sided one
