"""soo_ext.KBFGS: step for step against a naive float64 transcription of the paper's K-BFGS and
K-BFGS(L) (Goldfarb, Ren & Bahamou 2020, as the authors' code runs it: docs/kbfgs.md), on an MLP
(mean and summed loss) and on a CNN; gradient accumulation, autocast and GradScaler; the
closure requirement; layers left out.  What every optimizer promises alike
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


def cross_entropy_closure(opt, model, x, t):
    """torch's closure convention: zero the grads, the loss of ``model(x)`` against ``t``,
    backward, return the loss."""
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        return loss
    return closure


def batch(i, n=16):
    gen = torch.Generator().manual_seed(10 + i)
    x = torch.randn(n, 5, dtype=torch.float64, generator=gen)
    return x, torch.randint(0, 3, (n,), generator=gen)


# ---- the naive transcription ----------------------------------------------------------------

def naive_forward(Ws, x, t, summed=False):
    """The MLP on augmented weights ``[W | b]``: the activations a (with the 1), the
    pre-activations h (retaining their gradients) and the mean (or summed) cross entropy."""
    a_s, hs, z = [], [], x
    for i, W in enumerate(Ws):
        a = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
        h = a @ W.T
        h.retain_grad()
        a_s.append(a.detach())
        hs.append(h)
        z = torch.tanh(h) if i < len(Ws) - 1 else h
    return a_s, hs, F.cross_entropy(z, t, reduction="sum" if summed else "mean")


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


def naive_kbfgs(Ws, steps, history_size=None, o=OPTS, summed=False):
    """The paper's algorithm, written out: the weights after ``steps`` steps and how often each
    damping changed a pair.  ``summed``: the loss is the batch's sum, whose output gradients
    are the per-sample ones (a mean loss's are 1/N of them)."""
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
        per_sample = 1 if summed else N
        params = [W.clone().requires_grad_(True) for W in Ws]
        a_s, hs, loss = naive_forward(params, x, t, summed)
        loss.backward()
        for l in range(L):
            G = params[l].grad + o["weight_decay"] * Ws[l]
            mom[l] = o["momentum"] * mom[l] + (1 - o["momentum"]) * G
            A[l] = o["factor_decay"] * A[l] + (1 - o["factor_decay"]) * a_s[l].T @ a_s[l] / N
            if k % o["inv_update_steps"] == 0:
                eye = torch.eye(len(A[l]), dtype=A[l].dtype)
                Ha[l] = torch.linalg.inv(A[l] + math.sqrt(o["damping"]) * eye)
        h_mean = [h.detach().mean(0) for h in hs]
        g_mean = [per_sample * h.grad.mean(0) for h in hs]
        for l in range(L):
            Hm = Hg[l] @ mom[l] if history_size is None else torch.stack(
                [two_loop(pairs[l], c) for c in mom[l].T], 1)
            Ws[l] = Ws[l] - o["lr"] * Hm @ Ha[l]
        params = [W.clone().requires_grad_(True) for W in Ws]
        _, hs2, loss2 = naive_forward(params, x, t, summed)
        loss2.backward()
        for l in range(L):
            s = hs2[l].detach().mean(0) - h_mean[l]
            y = per_sample * hs2[l].grad.mean(0) - g_mean[l]
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


@pytest.mark.parametrize("history_size,powell,summed", [
    (None, 0.2, False), (None, 0.95, False), (2, 0.95, False), (None, 0.2, True),
    (2, 0.95, True)], ids=["bfgs", "bfgs-powell", "lbfgs-2-powell", "bfgs-summed",
                           "lbfgs-2-powell-summed"])
def test_matches_naive_transcription(history_size, powell, summed):
    """Eight steps (H_a refreshed at steps 0, 3, 6; the L-BFGS ring wrapped; with powell=0.95
    both dampings change some pairs): every weight within 1e-10 of the transcription.  With a
    summed loss (``batch_averaged=False``, lr / N for the N times larger gradient) the output
    gradients are taken as delivered: they are the per-sample ones already."""
    model = mlp()
    start = augmented(model)
    opts = dict(OPTS, powell=powell)
    if summed:
        opts.update(lr=OPTS["lr"] / 16, batch_averaged=False)
    opt = KBFGS(model, history_size=history_size, **opts)
    for k in range(8):
        x, t = batch(k)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t, reduction="sum" if summed else "mean")
            loss.backward()
            return loss
        opt.step(closure)
    expected, damped = naive_kbfgs(start, 8, history_size, opts, summed)
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

            closure = cross_entropy_closure(opt, model, x, t)
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

    closure = cross_entropy_closure(opt, model, x, t)
    first = closure().item()
    for _ in range(15):
        opt.step(closure)
    assert closure().item() < 0.7 * first


class ResidualBatchNormCNN(nn.Module):
    """A stem conv-BN-ReLU, then one residual block conv-BN-ReLU-conv-BN plus a stride-2 1x1
    projection conv-BN of its input, ReLU, global average pooling and a linear head: every
    conv feeds a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8),
                                  nn.ReLU())
        self.conv1 = nn.Conv1d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(12)
        self.conv2 = nn.Conv1d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(12)
        self.skip = nn.Sequential(nn.Conv1d(8, 12, 1, stride=2, bias=False), nn.BatchNorm1d(12))
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.conv2(out)) + self.skip(x)))


@pytest.mark.parametrize("seed", range(3))
def test_convs_that_feed_batchnorm_train(seed):
    """float32: the batch mean of a conv's output gradient is 0 where a BatchNorm (train mode)
    follows, so its y is rounding noise (~1e-10) and, after Powell's damping, rho ~ 1e20: the
    BFGS update overflowed float32 and H_g went non-finite in the first step (the MNIST-1D
    ResNet diverged at every lr).  Every H_g stays finite, no step is skipped, the loss falls."""
    torch.manual_seed(seed)
    model = ResidualBatchNormCNN()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 16, generator=gen)
    t = torch.randint(0, 3, (64,), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BatchNorms are listed as left out
        opt = KBFGS(model)
    assert len(opt.layers) == 5

    closure = cross_entropy_closure(opt, model, x, t)
    first = closure().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped step warns
        for _ in range(10):
            opt.step(closure)
    for _, m in opt.layers:
        assert torch.isfinite(opt.state[m.weight]["H_g"]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert closure().item() < 0.95 * first


def test_history_size_cannot_switch():
    model = mlp()
    opt = KBFGS(model, history_size=None)
    x, t = batch(0)

    closure = cross_entropy_closure(opt, model, x, t)
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

    closure = cross_entropy_closure(opt, model, x, t)
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

    closure = cross_entropy_closure(opt, model, x, t)
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


def run(model, opt, steps, loss_of, batches=batch, after_step=None):
    """``steps`` steps of ``opt`` with the closure ``zero_grad(); loss_of(x, t)`` (which calls
    backward) on ``batches(k)``; returns the params."""
    for k in range(steps):
        x, t = batches(k)

        def closure():
            opt.zero_grad()
            return loss_of(x, t)
        opt.step(closure)
        if after_step is not None:
            after_step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("summed", [False, True], ids=["mean", "summed"])
@pytest.mark.parametrize("history_size", [None, 2], ids=["bfgs", "lbfgs-2"])
def test_accumulation_is_the_whole_batch(summed, history_size):
    """A closure that runs backward on the two halves of the batch (``accumulation_steps=2``;
    a mean loss divided by 2, as usual, or a summed one) takes the steps of one backward on the
    whole batch (already checked against the transcription): within float64 rounding."""
    reduction = "sum" if summed else "mean"

    def whole(x, t):
        loss = F.cross_entropy(model(x), t, reduction=reduction)
        loss.backward()
        return loss

    def halves(x, t):
        total = 0
        for xh, th in zip(x.chunk(2), t.chunk(2)):
            loss = F.cross_entropy(model(xh), th, reduction=reduction)
            (loss if summed else loss / 2).backward()
            total = total + loss.detach()
        return total if summed else total / 2

    runs = []
    for loss_of, steps in ((whole, 1), (halves, 2)):
        model = mlp()
        opt = KBFGS(model, history_size=history_size, accumulation_steps=steps,
                    batch_averaged=not summed, **dict(OPTS, lr=OPTS["lr"] / (16 if summed else 1)))
        runs.append(run(model, opt, 6, loss_of))
    for a, b, was in zip(*runs, mlp().parameters()):
        assert not torch.allclose(a, was)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_uneven_accumulation_warns_once():
    model = mlp()
    opt = KBFGS(model, accumulation_steps=2)

    def thirds(x, t):
        for xs, ts in zip(x.chunk(3), t.chunk(3)):
            F.cross_entropy(model(xs), ts).backward()
    with pytest.warns(RuntimeWarning, match="captured 3 backward passes.*accumulation_steps=2") \
            as caught:
        run(model, opt, 2, thirds)
    assert len([w for w in caught if "accumulation_steps" in str(w.message)]) == 1
    assert caught[0].filename == __file__


def test_a_skipped_first_pass_leaves_no_trace():
    """A non-finite first pass (an inf in the input) is skipped, and the steps after it are
    those of the run without it (H_a refreshed at every step: the skip's step count does not
    matter): the pass statistics do not carry the inf into later steps."""
    def poisoned(k):
        x, t = batch(max(k - 1, 0))
        return (x * float("inf"), t) if k == 1 else (x, t)

    runs = []
    for batches, steps in ((batch, 4), (poisoned, 5)):
        model = mlp()
        opt = KBFGS(model, **dict(OPTS, inv_update_steps=1))

        def loss_of(x, t):
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            return loss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            runs.append(run(model, opt, steps, loss_of, batches))
        assert int(opt.state[model[0].weight]["nonfinite_steps"]) == (steps == 5)
    for a, b in zip(*runs):
        assert torch.equal(a, b)



class Branches(nn.Module):
    """The MLP plus a Linear(5, 3) branch on the input that the closure may leave out."""

    def __init__(self):
        super().__init__()
        self.mlp, self.branch, self.use_branch = mlp(), nn.Linear(5, 3).double(), True

    def forward(self, x):
        out = self.mlp(x)
        return out + self.branch(x) if self.use_branch else out


@pytest.mark.parametrize("history_size", [None, 2])
def test_a_layer_left_out_of_the_second_pass_keeps_its_pair(history_size):
    """The four layers (out 7, 6, 3, 3) are one pair group; a second pass without the branch
    updates the others' pairs (a run of the group) and leaves the branch's pair and H_g."""
    model = Branches()
    opt = KBFGS(model, **dict(OPTS, history_size=history_size))
    x, t = batch(0)
    leave_out = False

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        model.use_branch = not leave_out  # for the second call
        return loss
    for _ in range(2):
        opt.step(closure)
    keys = ("s", "y") if history_size else ("s", "y", "H_g")
    kept = [opt.state[model.branch.weight][k].clone() for k in keys]
    moved = opt.state[model.mlp[4].weight]["s"].clone()
    assert kept[0].abs().sum() > 0  # the branch has a pair already
    leave_out = True
    opt.step(closure)
    assert all(torch.equal(a, opt.state[model.branch.weight][k]) for a, k in zip(kept, keys))
    assert not torch.equal(moved, opt.state[model.mlp[4].weight]["s"])


def f32_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def f32_batch(k):
    x, t = batch(k)
    return x.float(), t


def test_autocast_bfloat16_pairs_from_the_low_precision_rows():
    """Under CPU autocast (bfloat16 forward) one step with ``pair_decay=0``: the stored pair is
    (s, y) of the bfloat16 rows the layers saw in the two passes, their means taken in float64
    up to float32 summation (bfloat16 sums would be off by ~1e-3); the step is the float32
    step within a few bfloat16 roundings (2^-8 each) of the forward and backward."""
    import copy
    x, t = f32_batch(0)

    def loss_of(net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), t)
        loss.backward()
        return loss

    def rows(net):
        """Each Linear's bfloat16 input rows and per-sample output gradients (N out.grad)."""
        net, kept = copy.deepcopy(net), []

        def keep(module, inputs, out):
            out.retain_grad()
            kept.append((inputs[0], out))
        for m in (net[0], net[2]):
            m.register_forward_hook(keep)
        loss_of(net)
        assert kept[1][0].dtype == kept[1][1].grad.dtype == torch.bfloat16
        return [(a.double(), len(x) * out.grad.double()) for a, out in kept]

    model = f32_mlp()
    before = rows(model)
    weights = [(m.weight.detach().double(), m.bias.detach().double())
               for m in (model[0], model[2])]
    opt = KBFGS(model, lr=0.2, pair_decay=0.0)
    opt.step(lambda: (opt.zero_grad(), loss_of(model))[1])
    after = rows(model)
    for m, (W, b), (a0, g0), (a1, g1) in zip((model[0], model[2]), weights, before, after):
        st = opt.state[m.weight]
        s = m.weight.double() @ a1.mean(0) + m.bias.double() - (W @ a0.mean(0) + b)
        tol = 16 * 2.0 ** -24 * 8  # float32 sums and products of O(1) values
        torch.testing.assert_close(st["s"].double(), s, rtol=0, atol=tol)
        torch.testing.assert_close(st["y"].double(), g1.mean(0) - g0.mean(0), rtol=0,
                                   atol=tol * g0.abs().max().item())
    reference = f32_mlp()
    ref = KBFGS(reference, lr=0.2, pair_decay=0.0)
    ref.step(lambda: (ref.zero_grad(), F.cross_entropy(reference(x), t).backward())[0])
    for p, q, was in zip(model.parameters(), reference.parameters(), f32_mlp().parameters()):
        assert (p - q).norm() <= 0.03 * (q - was).norm()  # measured: 0.006


def scaled_loss_of(model, scaler):
    def loss_of(x, t):
        loss = F.cross_entropy(model(x), t)
        scaler.scale(loss).backward()
        return loss
    return loss_of


@pytest.mark.parametrize("history_size", [None, 2], ids=["bfgs", "lbfgs-2"])
def test_grad_scaler_steps_are_the_unscaled_steps(history_size):
    """``grad_scaler=``: the closure scales its loss (2^10, exact), ``step`` unscales the
    gradients (and the capture the output gradients): the run without the scaler, within
    rounding; ``scaler.update()`` sees no inf, so the scale is kept."""
    runs = []
    for scaled in (False, True):
        model = mlp()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled)
        opt = KBFGS(model, history_size=history_size, grad_scaler=scaler, **OPTS)
        runs.append(run(model, opt, 5, scaled_loss_of(model, scaler), after_step=scaler.update))
    assert scaler.get_scale() == 2.0 ** 10
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-13)


def test_grad_scaler_skips_an_overflow_as_torch_does():
    """A first pass with inf gradients under the scaler: ``step`` takes no step (one closure
    call, no state change, not counted as a non-finite step, even with ``on_nonfinite='raise'``)
    and ``scaler.update()`` halves the scale; the run then goes on as the run without that
    pass."""
    def overflowing(k):
        x, t = batch(max(k - 1, 0))
        return (x * float("inf"), t) if k == 1 else (x, t)

    runs = []
    for batches, steps in ((batch, 4), (overflowing, 5)):
        model = mlp()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt = KBFGS(model, grad_scaler=scaler, on_nonfinite="raise", **OPTS)
        calls, scales = [], []
        loss_of = scaled_loss_of(model, scaler)

        def after():
            scaler.update()
            scales.append(scaler.get_scale())
        runs.append(run(model, opt, steps, lambda x, t: (calls.append(1), loss_of(x, t))[1],
                        batches, after))
        glob = opt.state[model[0].weight]
        assert glob["step"] == 4 and int(glob["nonfinite_steps"]) == 0
    assert len(calls) == 9 and scales == [2.0 ** 10] + [2.0 ** 9] * 4
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-13)


def test_grad_scaler_misuse_and_bad_scaler():
    model = mlp()
    with pytest.raises(ValueError, match="Invalid grad_scaler"):
        KBFGS(model, grad_scaler=lambda: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    opt = KBFGS(model, grad_scaler=scaler)
    loss_of = scaled_loss_of(model, scaler)
    x, t = batch(0)

    def closure():
        opt.zero_grad()
        return loss_of(x, t)
    opt.step(closure)
    scaler.update()
    with pytest.raises(RuntimeError, match=r"call opt.step\(closure\) and then scaler.update"):
        scaler.step(opt, closure)


class SelfAttention(nn.Module):
    """Self-attention on the input (batch first) and a head; ``explicit``: the same model with
    the in-projection an nn.Linear(E, 3E) and the attention written out."""

    def __init__(self, explicit, E=4, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, heads, batch_first=True)
        nn.init.normal_(self.attn.in_proj_bias)
        self.head, self.explicit, self.heads = nn.Linear(E, 3), explicit, heads
        if explicit:
            self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
            with torch.no_grad():
                for mine, its in ((self.qkv.weight, self.attn.in_proj_weight),
                                  (self.qkv.bias, self.attn.in_proj_bias),
                                  (self.out.weight, self.attn.out_proj.weight),
                                  (self.out.bias, self.attn.out_proj.bias)):
                    mine.copy_(its)
            del self.attn

    def forward(self, x):
        if self.explicit:
            B, L, E = x.shape
            q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            w = (q @ k.transpose(-1, -2) / math.sqrt(E // self.heads)).softmax(-1)
            a = self.out((w @ v).transpose(1, 2).reshape(B, L, E))
        else:
            a = self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.tanh(a).mean(1))

    def projections(self):
        """The in-projection's weight and bias, the out-projection's and the head's weights."""
        ps = (self.qkv.weight, self.qkv.bias, self.out.weight) if self.explicit else (
            self.attn.in_proj_weight, self.attn.in_proj_bias, self.attn.out_proj.weight)
        return [p.detach().clone().double() for p in ps + (self.head.weight,)]


@pytest.mark.parametrize("history_size", [None, 2], ids=["bfgs", "lbfgs-2"])
def test_attention_in_projection_is_a_linear_layer(history_size):
    """nn.MultiheadAttention's in-projection is a K-BFGS layer (K-FAC's capture): the run is
    that of the same model with an nn.Linear(E, 3E) in-projection, within float64 rounding."""
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(6, 5, 4, dtype=torch.float64, generator=gen),
             torch.randint(0, 3, (6,), generator=gen)) for _ in range(6)]
    runs = []
    for explicit in (False, True):
        model = SelfAttention(explicit).double()
        opt = KBFGS(model, history_size=history_size, **OPTS)
        assert len(opt.layers) == 3

        def loss_of(x, t):
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            return loss
        run(model, opt, 6, loss_of, lambda k: data[k])
        runs.append(model.projections())
    for a, b, was in zip(*runs, SelfAttention(True).projections()):
        assert not torch.allclose(a, was)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
