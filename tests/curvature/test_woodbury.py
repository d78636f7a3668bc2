"""soo_ext.curvature.woodbury alone: the per-sample gradients captured by K-FAC's hooks against a
loop of per-sample backward passes, and the Woodbury directions against the dense fp64 solve of
(lambda I + J^T J / N) d = g."""
import pytest
import torch
from torch import nn

from soo_ext.curvature.kfac_layers import LayerCapture, find_layers
from soo_ext.curvature.woodbury import (PerSampleGradients, WoodburyNaturalGradient,
                                        layer_vector, woodbury_coefficients)

F64 = torch.float64


def net():
    """Conv2d -> Conv1d (over the flattened rows) -> Linear x2, float64."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c2 = nn.Conv2d(2, 3, 3, padding=1)
            self.c1 = nn.Conv1d(3, 2, 2, bias=False)
            self.l1 = nn.Linear(2 * 15, 5)
            self.l2 = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.relu(self.c2(x)).flatten(2)  # [N, 3, 16]
            h = self.c1(h).flatten(1)  # [N, 2 * 15]
            return self.l2(torch.tanh(self.l1(h)))

    return Net().to(F64)


def batch(N=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 2, 4, 4, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)


def captured(m, x, y, reduction="mean"):
    layers = find_layers(m, {id(p): 0 for p in m.parameters()}, ())
    sink = PerSampleGradients(layers, F64, 2 ** 30)
    cap = LayerCapture(layers, lambda: sink)
    cap.configure(True, reduction == "mean", 1)
    nn.functional.cross_entropy(m(x), y, reduction=reduction).backward()
    cap.remove()
    return layers, sink


def per_sample_loop(m, layers, x, y):
    """Row i: the gradient of sample i's loss, layer by layer in layer_vector order."""
    rows = []
    for i in range(x.shape[0]):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append([layer_vector(l, l.weight.grad, l.bias.grad if l.bias is not None else None)
                     for l in layers])
    return [torch.stack([r[j] for r in rows]) for j in range(len(layers))]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_gradients_match_a_loop_of_backward_passes(reduction):
    m = net()
    x, y = batch()
    layers, sink = captured(m, x, y, reduction)
    assert [l.name for l in layers] == ["c2", "c1", "l1", "l2"]
    expected = per_sample_loop(m, layers, x, y)
    for l, J in zip(layers, expected):
        # fp64, a handful of products and sums per entry: agreement to rounding
        torch.testing.assert_close(sink.windows[l.index], J, rtol=1e-12, atol=1e-14)


def dense_oracle(J: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    N, n = J.shape
    A = damping * torch.eye(n, dtype=F64) + J.T @ J / N
    return torch.linalg.solve(A, g)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("damping", [1e-1, 1e-3])
def test_directions_match_the_dense_solve(per_layer, damping):
    m = net()
    x, y = batch()
    layers, sink = captured(m, x, y)
    grads = [layer_vector(l, l.weight.grad, l.bias.grad if l.bias is not None else None)
             for l in layers]
    ds = WoodburyNaturalGradient(sink).directions(layers, grads, damping, per_layer)
    Js = [sink.windows[l.index] for l in layers]
    if per_layer:
        expected = [dense_oracle(J, g, damping) for J, g in zip(Js, grads)]
    else:
        d = dense_oracle(torch.cat(Js, 1), torch.cat(grads), damping)
        expected = list(d.split([g.numel() for g in grads]))
    for d, e in zip(ds, expected):
        # both solves are backward stable: relative error ~ cond(lambda I + F) * eps, cond <= 1e5
        assert (d - e).abs().max() <= 1e-9 * e.abs().max()


def test_coefficients_batched_match_each_system():
    g = torch.Generator().manual_seed(2)
    J = torch.randn(3, 5, 7, generator=g, dtype=F64)
    K = J @ J.transpose(1, 2)
    Jg = torch.randn(3, 5, generator=g, dtype=F64)
    c = woodbury_coefficients(K, Jg, 0.1)
    for i in range(3):
        e = torch.linalg.solve(K[i] + 0.5 * torch.eye(5, dtype=F64), Jg[i])
        torch.testing.assert_close(c[i], e, rtol=1e-12, atol=0)


def test_one_sample_float32_matches_float64():
    m = net()
    x, y = batch(1)
    layers, sink = captured(m, x, y)
    assert sink.samples == 1
    grads = [layer_vector(l, l.weight.grad, None if l.bias is None else l.bias.grad)
             for l in layers]
    d64 = WoodburyNaturalGradient(sink).directions(layers, grads, 1e-2, False)
    sink.windows = {k: v.float() for k, v in sink.windows.items()}
    d32 = WoodburyNaturalGradient(sink).directions(layers, [g.float() for g in grads], 1e-2,
                                                  False)
    for a, b in zip(d32, d64):
        # float32 windows and gradients, float64 sums: the inputs' rounding (2^-24) times
        # cond(lambda N + |J|^2 / lambda ...) stays below 1e-4 relative here
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()


def test_max_state_bytes_refuses_before_allocating():
    m = net()
    x, y = batch()
    layers = find_layers(m, {id(p): 0 for p in m.parameters()}, ())
    n = sum(l.out * l.a_dim for l in layers)
    sink = PerSampleGradients(layers, F64, 6 * n * 8 - 1)
    cap = LayerCapture(layers, lambda: sink)
    with pytest.raises(ValueError, match="max_state_bytes"):
        nn.functional.cross_entropy(m(x), y).backward()
    cap.remove()
    sink.max_state_bytes = 6 * n * 8
    cap = LayerCapture(layers, lambda: sink)
    nn.functional.cross_entropy(m(x), y).backward()
    assert sink.samples == 6
    cap.remove()


def test_a_second_backward_before_the_step_raises():
    m = net()
    x, y = batch()
    layers = find_layers(m, {id(p): 0 for p in m.parameters()}, ())
    sink = PerSampleGradients(layers, F64, 2 ** 30)
    cap = LayerCapture(layers, lambda: sink)
    nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="one backward pass per step"):
        nn.functional.cross_entropy(m(x), y).backward()
    cap.remove()
