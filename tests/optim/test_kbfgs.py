"""soo_ext.KBFGS: step for step against a naive float64 transcription of the paper's K-BFGS and
K-BFGS(L) (Goldfarb, Ren & Bahamou 2020, as the authors' code runs it: docs/kbfgs.md), on an MLP
and on a CNN; the closure requirement; layers left out.  What every optimizer promises alike
(resume, schedulers, non-finite steps, host syncs, bad arguments and params) is checked by
tests/optim/test_contract.py; the components by tests/curvature/test_kbfgs_components.py."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from soo_ext import KBFGS

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

OPTS = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, damping=0.3, factor_decay=0.9,
            pair_decay=0.9, powell=0.2, inv_update_steps=3)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 3)).to(torch.float64)


def batch(i, n=16):
    gen = torch.Generator().manual_seed(10 + i)
    x = torch.randn(n, 5, dtype=torch.float64, generator=gen)
    return x, torch.randint(0, 3, (n,), generator=gen)


# ---- the naive transcription ----------------------------------------------------------------

def naive_forward(Ws, x, t):
    """The MLP on augmented weights ``[W | b]``: the activations a (with the 1), the
    pre-activations h (retaining their gradients) and the mean cross entropy."""
    a_s, hs, z = [], [], x
    for i, W in enumerate(Ws):
        a = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
        h = a @ W.T
        h.retain_grad()
        a_s.append(a.detach())
        hs.append(h)
        z = torch.tanh(h) if i < len(Ws) - 1 else h
    return a_s, hs, F.cross_entropy(z, t)


def two_loop(pairs, v):
    """H v by the textbook two-loop recursion (H0 = gamma I, gamma of the newest pair)."""
    if not pairs:
        return v.clone()
    q, alphas = v.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (s @ y)
        q = q - alpha * y
        alphas.append(alpha)
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r = r + (alpha - (y @ r) / (s @ y)) * s
    return r


def naive_kbfgs(Ws, steps, history_size=None, o=OPTS):
    """The paper's algorithm, written out: the weights after ``steps`` steps and how often each
    damping changed a pair."""
    Ws = [W.clone() for W in Ws]
    L = len(Ws)
    A = [torch.eye(W.shape[1], dtype=W.dtype) for W in Ws]
    Ha = [torch.eye(W.shape[1], dtype=W.dtype) for W in Ws]
    Hg = [torch.eye(W.shape[0], dtype=W.dtype) for W in Ws]
    pairs = [[] for _ in Ws]
    s_run = [torch.zeros(W.shape[0], dtype=W.dtype) for W in Ws]
    y_run = [torch.zeros(W.shape[0], dtype=W.dtype) for W in Ws]
    mom = [torch.zeros_like(W) for W in Ws]
    mu2 = math.sqrt(o["damping"])
    damped = {"powell": 0, "lm": 0}
    for k in range(steps):
        x, t = batch(k)
        N = len(x)
        params = [W.clone().requires_grad_(True) for W in Ws]
        a_s, hs, loss = naive_forward(params, x, t)
        loss.backward()
        for l in range(L):
            G = params[l].grad + o["weight_decay"] * Ws[l]
            mom[l] = o["momentum"] * mom[l] + (1 - o["momentum"]) * G
            A[l] = o["factor_decay"] * A[l] + (1 - o["factor_decay"]) * a_s[l].T @ a_s[l] / N
            if k % o["inv_update_steps"] == 0:
                eye = torch.eye(len(A[l]), dtype=A[l].dtype)
                Ha[l] = torch.linalg.inv(A[l] + math.sqrt(o["damping"]) * eye)
        h_mean = [h.detach().mean(0) for h in hs]
        g_mean = [N * h.grad.mean(0) for h in hs]
        for l in range(L):
            Hm = Hg[l] @ mom[l] if history_size is None else torch.stack(
                [two_loop(pairs[l], c) for c in mom[l].T], 1)
            Ws[l] = Ws[l] - o["lr"] * Hm @ Ha[l]
        params = [W.clone().requires_grad_(True) for W in Ws]
        _, hs2, loss2 = naive_forward(params, x, t)
        loss2.backward()
        for l in range(L):
            s = hs2[l].detach().mean(0) - h_mean[l]
            y = N * hs2[l].grad.mean(0) - g_mean[l]
            s_run[l] = o["pair_decay"] * s_run[l] + (1 - o["pair_decay"]) * s
            y_run[l] = o["pair_decay"] * y_run[l] + (1 - o["pair_decay"]) * y
            s, y = s_run[l], y_run[l]
            Hy = Hg[l] @ y if history_size is None else two_loop(pairs[l], y)
            sy, yHy = float(s @ y), float(y @ Hy)
            if sy < o["powell"] * yHy:  # Powell's damping on H
                damped["powell"] += 1
                theta = (1 - o["powell"]) * yHy / (yHy - sy)
                s = theta * s + (1 - theta) * Hy
            sy, ss = float(s @ y), float(s @ s)
            if sy < mu2 * ss:  # Levenberg-Marquardt (Powell's with B = I)
                damped["lm"] += 1
                theta = (1 - mu2) * ss / (ss - sy)
                y = theta * y + (1 - theta) * s
            assert float(s @ y) > 0
            if history_size is None:
                rho = 1 / (s @ y)
                E = torch.eye(len(s), dtype=s.dtype)
                Hg[l] = (E - rho * torch.outer(s, y)) @ Hg[l] @ (E - rho * torch.outer(y, s)) \
                    + rho * torch.outer(s, s)
            else:
                pairs[l] = (pairs[l] + [(s, y)])[-history_size:]
    return Ws, damped


def augmented(model):
    return [torch.cat([m.weight, m.bias[:, None]], 1).detach().clone()
            for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("history_size,powell", [(None, 0.2), (None, 0.95), (2, 0.95)],
                         ids=["bfgs", "bfgs-powell", "lbfgs-2-powell"])
def test_matches_naive_transcription(history_size, powell):
    """Eight steps (H_a refreshed at steps 0, 3, 6; the L-BFGS ring wrapped; with powell=0.95
    both dampings change some pairs): every weight within 1e-10 of the transcription."""
    model = mlp()
    start = augmented(model)
    opts = dict(OPTS, powell=powell)
    opt = KBFGS(model, history_size=history_size, **opts)
    for k in range(8):
        x, t = batch(k)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            return loss
        opt.step(closure)
    expected, damped = naive_kbfgs(start, 8, history_size, opts)
    assert damped["lm"] > 0 and (damped["powell"] > 0) == (powell > 0.5)
    for got, want, was in zip(augmented(model), expected, start):
        assert not torch.allclose(want, was)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_step_requires_a_closure():
    model = mlp()
    opt = KBFGS(model)
    x, t = batch(0)
    F.cross_entropy(model(x), t).backward()
    with pytest.raises(RuntimeError, match=r"requires a closure.*step\(closure\)"):
        opt.step()


def test_closure_runs_twice_and_grads_are_the_second_passes():
    model = mlp()
    opt = KBFGS(model)
    x, t = batch(0)
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        losses.append(loss)
        return loss
    out = opt.step(closure)
    assert len(losses) == 2 and out is losses[0] and losses[1] < losses[0]


def test_no_capture_outside_step():
    """Forward-backward passes between steps (evaluation, a user's own backward) do not enter
    the statistics: the run is the run without them."""
    runs = []
    for extra in (False, True):
        model = mlp()
        opt = KBFGS(model, **OPTS)
        for k in range(4):
            x, t = batch(k)
            if extra:
                F.cross_entropy(model(x * 2), t).backward()

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), t)
                loss.backward()
                return loss
            opt.step(closure)
        runs.append(augmented(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_unsupported_layers_listed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = KBFGS(model)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith("KBFGS") and "LayerNorm" in messages[0]
    assert "docs/kbfgs.md" in messages[0]
    assert [name for name, _ in opt.layers] == ["0", "2"]


def test_conv_layers_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 25, 4)).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 5, 5, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 4, (32,), generator=gen)
    opt = KBFGS(model, lr=0.2)
    assert len(opt.layers) == 2

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        return loss
    first = closure().item()
    for _ in range(15):
        opt.step(closure)
    assert closure().item() < 0.7 * first


def test_history_size_cannot_switch():
    model = mlp()
    opt = KBFGS(model, history_size=None)
    x, t = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        return loss
    opt.step(closure)
    opt.param_groups[0]["history_size"] = 3
    values = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Invalid history_size"):
        opt.step(closure)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))


def test_remove_hooks_takes_the_momentum_step():
    model = mlp()
    opt = KBFGS(model, **OPTS)
    opt.remove_hooks()
    shadow = mlp()
    x, t = batch(0)
    bufs = [torch.zeros_like(p) for p in shadow.parameters()]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
        shadow.zero_grad()
        F.cross_entropy(shadow(x), t).backward()
        with torch.no_grad():
            for p, b in zip(shadow.parameters(), bufs):
                b.mul_(0.9).add_(p.grad + 1e-3 * p, alpha=0.1)
                p.sub_(b, alpha=OPTS["lr"])
    for p, q in zip(model.parameters(), shadow.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_conv_pairs_and_factor_are_the_batch_and_position_means():
    """On a Conv2d (and the Linear after it): with pair_decay=0 the stored pair is the step's
    (s, y): the change of the pre-activations' mean over the batch and the output positions,
    and of the per-sample output gradients' (N times the mean loss's) mean; A is
    0.9 I + 0.1 mean(a a^T) over the unfolded patches."""
    import copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=2, padding=(1, 2)), nn.Tanh(),
                          nn.Flatten(), nn.Linear(45, 4)).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 5, 6, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 4, (6,), generator=gen)

    def outputs(net):
        """Each layer's pre-activation rows and per-sample output-gradient rows."""
        net = copy.deepcopy(net)
        outs = []

        def keep(module, inputs, out):
            out.retain_grad()
            outs.append(out)
        for m in (net[0], net[3]):
            m.register_forward_hook(keep)
        F.cross_entropy(net(x), t).backward()
        rows = []
        for out in outs:
            h, g = out.detach(), len(x) * out.grad
            if h.dim() == 4:
                h, g = h.movedim(1, -1), g.movedim(1, -1)
            rows.append((h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])))
        return rows

    before = outputs(model)
    opt = KBFGS(model, lr=0.2, pair_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        return loss
    opt.step(closure)
    after = outputs(model)
    conv = model[0]
    patches = F.unfold(x, (3, 2), padding=(1, 2), stride=2).transpose(1, 2).reshape(-1, 12)
    patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=patches.dtype)], 1)
    A = 0.9 * torch.eye(13, dtype=torch.float64) + 0.1 * patches.T @ patches / len(patches)
    torch.testing.assert_close(opt.state[conv.weight]["A"], A, rtol=0, atol=1e-13)
    for m, (h0, g0), (h1, g1) in zip((model[0], model[3]), before, after):
        st = opt.state[m.weight]
        torch.testing.assert_close(st["s"], h1.mean(0) - h0.mean(0), rtol=0, atol=1e-13)
        torch.testing.assert_close(st["y"], g1.mean(0) - g0.mean(0), rtol=0, atol=1e-13)
