"""soo_ext.EKFAC against a naive float64 transcription of George et al. (2018), step for step,
and its scaling against the exact diagonal of the projected per-sample outer product.  What
EKFAC shares with KFAC (layers, KL clip, accumulation, AMP, hooks) is tested with KFAC; the
contract battery runs the 'ekfac' rows of tests/optim/contract.py."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import soo_ext

F64 = torch.float64


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)).double()


MODELS = {"linear": (linear_model, (4,)), "conv": (conv_model, (2, 6, 6))}


def data(kind: str, step: int, n: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, *MODELS[kind][1], dtype=F64, generator=gen)
    return x, torch.randn(n, 2, dtype=F64, generator=gen)


def loss_fn(out, y):
    return (out - y).square().sum(1).mean()  # a mean over the batch (batch_averaged)


def layers_of(model):
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def matrix(weight_grad, bias_grad):
    """A layer's ``[out, a_dim]`` gradient: the weight's rows, the bias as the last column."""
    return torch.cat([weight_grad.reshape(weight_grad.shape[0], -1), bias_grad[:, None]], 1)


def per_sample_gradients(model, x, y) -> list[torch.Tensor]:
    """Per layer ``[N, out, a_dim]``: the gradients of each sample's own loss (autograd, one
    sample at a time)."""
    out = [[] for _ in layers_of(model)]
    for n in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[n:n + 1]), y[n:n + 1]).backward()
        for i, m in enumerate(layers_of(model)):
            out[i].append(matrix(m.weight.grad, m.bias.grad))
    model.zero_grad()
    return [torch.stack(g) for g in out]


def rows(model, x, y):
    """Per layer ``(a, g)``: the activation rows (with the 1 of the bias; a conv's unfolded
    patches) and the output-gradient rows of the mean loss, from a functional forward."""
    outputs, inputs, h = [], [], x
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            inputs.append(h)
            h = m(h)
            outputs.append(h)
        else:
            h = m(h)
    grads = torch.autograd.grad(loss_fn(h, y), outputs)
    out = []
    for m, inp, g in zip(layers_of(model), inputs, grads):
        if isinstance(m, nn.Conv2d):
            a = F.unfold(inp, m.kernel_size).transpose(1, 2).reshape(-1, m.weight[0].numel())
            g = g.movedim(1, -1).reshape(-1, m.out_channels)
        else:
            a = inp
        out.append((torch.cat([a, a.new_ones(a.shape[0], 1)], 1).detach(), g.detach()))
    return out


class NaiveEKFAC:
    """George et al. (2018), Algorithm 1 with running averages, K-FAC's KL clip and SGD with
    momentum, written out per layer in float64."""

    def __init__(self, model, lr, momentum, weight_decay, damping, factor_decay, scale_decay,
                 kl_clip, factor_update_steps, inv_update_steps, scale_update_steps):
        self.model, self.k = model, 0
        self.o = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                      factor_decay=factor_decay, scale_decay=scale_decay, kl_clip=kl_clip,
                      fus=factor_update_steps, ius=inv_update_steps, sus=scale_update_steps)
        self.st = []
        for m in layers_of(model):
            out, a_dim = m.weight.shape[0], m.weight[0].numel() + 1
            self.st.append(dict(A=torch.eye(a_dim, dtype=F64), G=torch.eye(out, dtype=F64),
                                QA=torch.eye(a_dim, dtype=F64), QG=torch.eye(out, dtype=F64),
                                S=torch.ones(out, a_dim, dtype=F64),
                                buf=torch.zeros(out, a_dim, dtype=F64)))

    def step(self, x, y):
        o, k, N = self.o, self.k, x.shape[0]
        layer_rows = rows(self.model, x, y)
        per_sample = per_sample_gradients(self.model, x, y)
        Vs, grads = [], []
        for m, st, (a, g), gn in zip(layers_of(self.model), self.st, layer_rows, per_sample):
            if k % o["fus"] == 0:
                R = a.shape[0]
                st["A"] = o["factor_decay"] * st["A"] + (1 - o["factor_decay"]) * a.T @ a / R
                st["G"] = (o["factor_decay"] * st["G"]
                           + (1 - o["factor_decay"]) * (N * g).T @ (N * g) / R)
            if k % o["ius"] == 0:  # S carried into the new bases: diag of the old estimate
                QA_old, QG_old = st["QA"], st["QG"]
                st["QA"] = torch.linalg.eigh(st["A"]).eigenvectors
                st["QG"] = torch.linalg.eigh(st["G"]).eigenvectors
                M = torch.kron(QG_old, QA_old) @ torch.diag(st["S"].flatten()) @ torch.kron(
                    QG_old, QA_old).T
                Q = torch.kron(st["QG"], st["QA"])
                st["S"] = torch.diagonal(Q.T @ M @ Q).reshape(st["S"].shape)
            QA, QG = st["QA"], st["QG"]
            if k % o["sus"] == 0:
                new = torch.stack([(QG.T @ gi @ QA) ** 2 for gi in gn]).mean(0)
                st["S"] = o["scale_decay"] * st["S"] + (1 - o["scale_decay"]) * new
            grad = gn.mean(0) + o["weight_decay"] * matrix(m.weight, m.bias).detach()
            Vs.append(QG @ ((QG.T @ grad @ QA) / (st["S"] + o["damping"])) @ QA.T)
            grads.append(grad)
        vg = sum((V * grad).sum() for V, grad in zip(Vs, grads)) * o["lr"] ** 2
        nu = min(1.0, (o["kl_clip"] / abs(vg.item())) ** 0.5)
        with torch.no_grad():
            for m, st, V in zip(layers_of(self.model), self.st, Vs):
                st["buf"] = o["momentum"] * st["buf"] + nu * V
                m.weight -= o["lr"] * st["buf"][:, :-1].reshape(m.weight.shape)
                m.bias -= o["lr"] * st["buf"][:, -1]
        self.k += 1


OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-3, factor_decay=0.9,
               scale_decay=0.8, kl_clip=1e-2, factor_update_steps=2, inv_update_steps=3,
               scale_update_steps=1)


@pytest.mark.parametrize("kind,n", [("linear", 32), ("conv", 64)])
@pytest.mark.parametrize("changes", [{}, {"scale_update_steps": 2, "factor_update_steps": 1}],
                         ids=["scale-every-step", "scale-every-2"])
def test_matches_naive_transcription_step_for_step(kind, n, changes):
    # n rows >= every factor's size: no repeated eigenvalue, so the bases are unique up to signs
    options = {**OPTIONS, **changes}
    model, naive_model = MODELS[kind][0](), MODELS[kind][0]()
    opt = soo_ext.EKFAC(model, factor_dtype=F64, **options)
    naive = NaiveEKFAC(naive_model, **options)
    for step in range(7):
        x, y = data(kind, step, n)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        naive.step(x, y)
        for p, q in zip(model.parameters(), naive_model.parameters()):
            assert (p - q).abs().max() <= 1e-10 * max(1.0, q.abs().max()), (step, p.shape)
    for m, st in zip(layers_of(model), naive.st):
        assert torch.allclose(opt.state[m.weight]["scale"], st["S"], rtol=1e-10, atol=1e-12)


def exact_projected_diagonal(gn, QA, QG):
    """``mean_n diag(U^T vec(grad_n) vec(grad_n)^T U)`` with ``U = Q_A ⊗ Q_G`` (column-major
    vec), as ``[out, a_dim]``: the oracle of EKFAC's scaling, from the full outer products."""
    U = torch.kron(QA, QG)
    diags = []
    for gi in gn:
        v = U.T @ gi.T.reshape(-1)
        diags.append(torch.diagonal(torch.outer(v, v)))
    return torch.stack(diags).mean(0).reshape(QA.shape[0], QG.shape[0]).T


@pytest.mark.parametrize("n", [1, 5], ids=["one-sample", "five-samples"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_scaling_is_the_exact_projected_diagonal(kind, n):
    """No running averages (scale_decay=0): the scaling is the batch's; with one sample per
    batch it is the diagonal of that sample's projected gradient outer product (a conv's
    per-sample gradient sums its positions first), with more the mean of those diagonals."""
    model = MODELS[kind][0]()
    opt = soo_ext.EKFAC(model, factor_dtype=F64, scale_decay=0.0, factor_decay=0.5,
                        factor_update_steps=1, inv_update_steps=1, scale_update_steps=1)
    for step in range(3):
        x, y = data(kind, step, n)
        gn = per_sample_gradients(model, x, y)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        for m, g in zip(layers_of(model), gn):
            st = opt.state[m.weight]
            want = exact_projected_diagonal(g, st["QA"], st["QG"])
            assert torch.allclose(st["scale"], want, rtol=1e-10, atol=1e-14), (step, m)


def test_scaling_updates_on_its_schedule_only():
    model = linear_model()
    opt = soo_ext.EKFAC(model, factor_dtype=F64, scale_update_steps=3, inv_update_steps=100)
    w = layers_of(model)[0].weight
    seen = []
    for step in range(7):
        x, y = data("linear", step, 8)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        seen.append(opt.state[w]["scale"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, False, True]  # k = 3 and 6


def test_refresh_carries_the_scaling_into_the_new_bases():
    """At a refresh without a scaling update, S becomes the diagonal of the old estimate
    ``(Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)^T`` in the new bases (dense float64 oracle)."""
    model = linear_model()
    opt = soo_ext.EKFAC(model, factor_dtype=F64, scale_update_steps=100, inv_update_steps=3,
                        scale_decay=0.5)
    w = layers_of(model)[0].weight
    for step in range(4):  # bases at k = 0 and 3, the scaling at k = 0 only
        if step == 3:
            old = {key: opt.state[w][key].clone() for key in ("QA", "QG", "scale")}
        x, y = data("linear", step, 8)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    st = opt.state[w]
    assert not torch.equal(st["QA"], old["QA"]) and not torch.equal(st["scale"], old["scale"])
    K_old, K_new = torch.kron(old["QG"], old["QA"]), torch.kron(st["QG"], st["QA"])
    M = K_old @ torch.diag(old["scale"].flatten()) @ K_old.T
    want = torch.diagonal(K_new.T @ M @ K_new).reshape(old["scale"].shape)
    assert torch.allclose(st["scale"], want, rtol=1e-12, atol=1e-14)


def test_accumulated_halves_equal_the_whole_batch():
    """Two backward passes of half a batch (accumulation_steps=2): the same scaling and step as
    the whole batch in one (both pool the same per-sample gradients)."""
    whole, halves = conv_model(), conv_model()
    opt_w = soo_ext.EKFAC(whole, factor_dtype=F64, inv_update_steps=2)
    opt_h = soo_ext.EKFAC(halves, factor_dtype=F64, inv_update_steps=2, accumulation_steps=2)
    for step in range(4):  # 64 samples: no repeated eigenvalue, unique bases
        x, y = data("conv", step, 64)
        opt_w.zero_grad()
        loss_fn(whole(x), y).backward()
        opt_w.step()
        opt_h.zero_grad()
        for part in (slice(0, 32), slice(32, 64)):
            (loss_fn(halves(x[part]), y[part]) / 2).backward()
        opt_h.step()
    for p, q in zip(whole.parameters(), halves.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)
    for a, b in zip(layers_of(whole), layers_of(halves)):
        assert torch.allclose(opt_w.state[a.weight]["scale"], opt_h.state[b.weight]["scale"],
                              rtol=1e-9, atol=0)


def test_loss_scale_is_undone():
    """grad_scaler: the output gradients are divided by the loss scale before the scaling's
    squares (a scaled loss gives the unscaled run's scaling)."""
    plain, scaled = linear_model(), linear_model()
    opt_p = soo_ext.EKFAC(plain, factor_dtype=F64)
    opt_s = soo_ext.EKFAC(scaled, factor_dtype=F64, grad_scaler=lambda: 1024.0)
    for step in range(3):
        x, y = data("linear", step, 8)
        for model, opt, s in ((plain, opt_p, 1.0), (scaled, opt_s, 1024.0)):
            opt.zero_grad()
            (loss_fn(model(x), y) * s).backward()
            for p in model.parameters():
                p.grad /= s  # as GradScaler.unscale_
            opt.step()
    for a, b in zip(layers_of(plain), layers_of(scaled)):
        assert torch.allclose(opt_p.state[a.weight]["scale"], opt_s.state[b.weight]["scale"],
                              rtol=1e-12, atol=0)


def test_mode_is_not_an_option():
    with pytest.raises(TypeError):
        soo_ext.EKFAC(linear_model(), mode="inverse")
    assert "mode" not in soo_ext.EKFAC(linear_model()).defaults


def test_warns_in_its_own_name_at_the_callers_line():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)).double()
    with pytest.warns(UserWarning, match=r"^EKFAC: (.|\n)*LayerNorm") as record:
        soo_ext.EKFAC(model)
    assert record[0].filename == __file__


def test_usage_errors_name_ekfac():
    model = linear_model()
    opt = soo_ext.EKFAC(model, scale_update_steps=1, factor_update_steps=5)
    x, y = data("linear", 0, 8)
    loss_fn(model(x), y).backward()
    opt.step()
    # k = 1: no factors due, the scaling is: a step without a captured backward pass
    with pytest.raises(RuntimeError, match=r"^EKFAC\.step\(\): .*no backward pass"):
        opt.step()
    with pytest.raises(RuntimeError, match="^EKFAC: layer '0' of this model is hooked"):
        soo_ext.EKFAC(model)
    with pytest.raises(TypeError, match="^EKFAC holds hooks"):
        copy.deepcopy(opt)
