"""soo_ext.NaturalGradient against a naive float64 transcription of Ren & Goldfarb's subsampled
natural gradient (and SENG's per-layer variant): per-sample gradients by torch.func, the n x n
damped empirical Fisher formed and solved densely, SGD with momentum; step for step."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import soo_ext

F64 = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def data(k, N=10):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(N, 6, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)


def naive_steps(model, steps, lr, momentum, weight_decay, damping, per_layer):
    """The paper's step written out: theta <- theta - lr buf, buf <- m buf + d,
    d = (damping I + J^T J / N)^{-1} (g + wd theta), J the per-sample gradients (rows)."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = None

    def loss_one(params, x, y):
        out = functional_call(model, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    for k in range(steps):
        x, y = data(k)
        per = vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, x, y)
        # blocks: one per layer (weight and bias), in the order of the params
        blocks = [names[i:i + 2] for i in range(0, len(names), 2)]
        flat_theta = torch.cat([theta[n].reshape(-1) for n in names])
        J = torch.cat([per[n].reshape(x.shape[0], -1) for n in names], 1)
        g = J.mean(0) + weight_decay * flat_theta
        N, n = J.shape
        if per_layer:
            F = torch.zeros(n, n, dtype=F64)
            start = 0
            for b in blocks:
                size = sum(theta[nm].numel() for nm in b)
                Jb = J[:, start:start + size]
                F[start:start + size, start:start + size] = Jb.T @ Jb / N
                start += size
        else:
            F = J.T @ J / N
        d = torch.linalg.solve(damping * torch.eye(n, dtype=F64) + F, g)
        buf = d if buf is None else momentum * buf + d
        flat_theta = flat_theta - lr * buf
        theta = dict(zip(names, [t.view_as(theta[n]) for n, t in zip(
            names, flat_theta.split([theta[n].numel() for n in names]))]))
    return torch.cat([theta[n].reshape(-1) for n in names])


@pytest.mark.parametrize("per_layer", [False, True])
def test_matches_the_naive_transcription_step_for_step(per_layer):
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-2, damping=5e-2)
    model = mlp()
    expected = naive_steps(model, 4, per_layer=per_layer, **kw)
    opt = soo_ext.NaturalGradient(model, per_layer=per_layer, **kw)
    for k in range(4):
        x, y = data(k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # fp64 throughout; Woodbury and the dense solve agree to cond(damping I + F) * eps per step
    # (cond <= 1e4 here) and four steps compound that at most linearly
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()


def test_sum_loss_with_batch_averaged_false_is_the_same_step_scaled():
    """A sum loss has N times the gradient of the mean loss and the same per-sample gradients:
    with batch_averaged=False and lr / N the step is the mean loss's."""
    a, b = mlp(), mlp()
    x, y = data(0)
    opt_a = soo_ext.NaturalGradient(a, lr=0.1, momentum=0.0)
    opt_b = soo_ext.NaturalGradient(b, lr=0.1 / x.shape[0], momentum=0.0, batch_averaged=False)
    nn.functional.cross_entropy(a(x), y).backward()
    nn.functional.cross_entropy(b(x), y, reduction="sum").backward()
    opt_a.step()
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_unsupported_layers_are_named_and_take_the_sgd_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).to(F64)
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm: weight, bias\)"):
        opt = soo_ext.NaturalGradient(model, lr=0.1, momentum=0.0)
    assert [n for n, _ in opt.layers] == ["0", "2"]
    ln = model[1]
    before = ln.weight.detach().clone()
    x, y = data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = before - 0.1 * ln.weight.grad
    opt.step()
    torch.testing.assert_close(ln.weight.detach(), expected, rtol=0, atol=0)


def test_a_step_without_a_captured_backward_raises():
    model = mlp()
    opt = soo_ext.NaturalGradient(model)
    x, y = data(0)
    with torch.no_grad():
        out = model(x)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    del out
    with pytest.raises(RuntimeError, match="no backward pass"):
        opt.step()


def test_max_state_bytes_names_the_option():
    model = mlp()
    with pytest.raises(ValueError, match="max_state_bytes"):
        soo_ext.NaturalGradient(model, max_state_bytes=0)
    opt = soo_ext.NaturalGradient(model, max_state_bytes=1000)  # 10 x 83 float64 > 1000 bytes
    x, y = data(0)
    with pytest.raises(ValueError, match="max_state_bytes=1000"):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad()
    opt.param_groups[0]["max_state_bytes"] = 10 * 83 * 8
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_per_sample_rows_not_kept_in_state():
    model = mlp()
    opt = soo_ext.NaturalGradient(model)
    x, y = data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = opt.state_dict()
    keys = {k for st in sd["state"].values() for k in st}
    assert keys == {"step", "nonfinite_steps", "momentum_buffer"}
