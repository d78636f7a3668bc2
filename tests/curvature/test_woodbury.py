"""soo_ext.curvature.woodbury alone: the per-sample gradients captured by K-FAC's hooks (convs,
Linears on [N, in], [N, T, in] and [T, N, in], attention in both layouts) against a loop of
per-sample backward passes; the layouts that cannot be split into samples refused; both routes
(the formed window, the token rows) against the dense J; the Woodbury directions against the
dense fp64 solve of (lambda I + J^T J / N) d = g."""
import pytest
import torch
from torch import nn

from soo_ext.curvature import woodbury
from soo_ext.curvature.kfac_layers import find_layers
from soo_ext.curvature.woodbury import (PerSampleCapture, PerSampleGradients, SampleWindow,
                                        TokenRows, WoodburyNaturalGradient, layer_vector,
                                        tokens_cheaper, woodbury_coefficients)

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


class Tokens(nn.Module):
    """Linears on the tokens ([N, T, 4] or, ``batch_first=False``, [T, N, 4]), mean-pooled, a
    head on [N, 5] (with ``head=False`` the per-token outputs, pooled without a Linear)."""

    def __init__(self, batch_first=True, head=True, attention=False):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first) if attention else None
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 5)
        self.head = nn.Linear(5, 3) if head else None
        self.to(F64)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(x, x, x, need_weights=False)[0]
        h = torch.tanh(self.l2(torch.tanh(self.l1(x)))).mean(1 if self.batch_first else 0)
        return self.head(h) if self.head is not None else h[:, :3]


def batch(N=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 2, 4, 4, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)


def tokens_batch(N, T, batch_first=True):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, T, 4, generator=g, dtype=F64)
    return (x if batch_first else x.transpose(0, 1)), torch.randint(0, 3, (N,), generator=g)


def captured(m, x, y, reduction="mean", max_state_bytes=2 ** 30, samples=None):
    layers = find_layers(m, {id(p): 0 for p in m.parameters()}, (), warn=False)
    sink = PerSampleGradients(layers, F64, max_state_bytes)
    sink.batch_averaged = reduction == "mean"
    sink.curvature_samples = samples
    cap = PerSampleCapture(layers, sink)
    cap.configure(True, reduction == "mean", 1)
    try:
        nn.functional.cross_entropy(m(x), y, reduction=reduction).backward()
    finally:
        cap.remove()
    return layers, sink


def per_sample_loop(m, layers, x, y, batch_dim=0):
    """Row i: the gradient of sample i's loss, layer by layer in layer_vector order."""
    rows = []
    for i in range(y.shape[0]):
        m.zero_grad()
        nn.functional.cross_entropy(m(x.narrow(batch_dim, i, 1)), y[i:i + 1]).backward()
        rows.append([layer_vector(l, l.weight.grad, l.bias.grad if l.bias is not None else None)
                     for l in layers])
    return [torch.stack([r[j] for r in rows]) for j in range(len(layers))]


def windows(sink, layers):
    sink.resolve(layers)
    return [sink.window(l) for l in layers]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_gradients_match_a_loop_of_backward_passes(reduction):
    m = net()
    x, y = batch()
    layers, sink = captured(m, x, y, reduction)
    assert [l.name for l in layers] == ["c2", "c1", "l1", "l2"]
    expected = per_sample_loop(m, layers, x, y)
    for J, e in zip(windows(sink, layers), expected):
        # fp64, a handful of products and sums per entry: agreement to rounding
        torch.testing.assert_close(J, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("attention", [False, True], ids=["linear", "attention"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_sequence_inputs_sum_over_the_tokens_of_each_sample(batch_first, attention):
    """[N, T, in] and [T, N, in] (T != N): the batch dim is the head's batch size (or the
    attention's batch_first), a sample's gradient the sum over its tokens."""
    m = Tokens(batch_first, attention=attention)
    x, y = tokens_batch(5, 3, batch_first)
    layers, sink = captured(m, x, y)
    assert [l.name for l in layers] == ["attn", "attn.out_proj", "l1", "l2", "head"][
        0 if attention else 2:]
    expected = per_sample_loop(m, layers, x, y, 0 if batch_first else 1)
    for J, e in zip(windows(sink, layers), expected):
        torch.testing.assert_close(J, e, rtol=1e-12, atol=1e-14)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_attention_gives_the_layout_when_the_sequence_is_as_long_as_the_batch(batch_first):
    """T == N: a Linear's own input cannot say where the batch is; torch's transformer layer
    states it (its attention's batch_first), for its attention, out_proj, linear1 and linear2."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first),
                      nn.Flatten(), nn.Linear(16, 3)).to(F64)
    x, y = tokens_batch(4, 4, batch_first)
    if not batch_first:  # Flatten([T, N, E]) would mix the samples: the head on [N, T E]
        m[1] = nn.Sequential(Transpose(), nn.Flatten())
    layers, sink = captured(m, x, y)
    assert [l.name for l in layers] == ["0.self_attn", "0.self_attn.out_proj", "0.linear1",
                                        "0.linear2", "2"]
    expected = per_sample_loop(m, layers, x, y, 0 if batch_first else 1)
    for J, e in zip(windows(sink, layers), expected):
        torch.testing.assert_close(J, e, rtol=1e-12, atol=1e-14)


class Flattened(nn.Module):
    """A Linear on the tokens flattened with the samples ([N T, 4]) and a head on [N, 5]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.to(F64)

    def forward(self, x):
        N, T, E = x.shape
        return self.head(torch.tanh(self.l1(x.reshape(N * T, E))).view(N, T, 5).mean(1))


class Regrouped(Tokens):
    """l1 on the rows regrouped as [N T / 2, 2, 4]: no dim of its input is the batch."""

    def forward(self, x):
        N, T, E = x.shape
        h = torch.tanh(self.l1(x.reshape(N * T // 2, 2, E))).reshape(N, T, 6)
        return self.head(torch.tanh(self.l2(h)).mean(1))


@pytest.mark.parametrize("case, match", [
    ("same_length", r"batch size is 4.*'l1' \(input \[4, 4, 4\]\): dims \[0, 1\].*"
                    r"skip_layers=\['l1', 'l2'\]"),
    ("no_head", r"cannot tell which dim.*'l1' \(input \[5, 3, 4\]\).*"
                r"skip_layers=\['l1', 'l2'\]"),
    ("flattened", r"disagree on the batch size: 5 samples: Linear 'head' \(input \[5, 5\]\); "
                  r"15 samples: Linear 'l1' \(input \[15, 4\]\).*skip_layers"),
    ("regrouped", r"batch size is 4.*'l1' \(input \[6, 2, 4\]\): dims \[\].*"
                  r"skip_layers=\['l1'\]"),
])
def test_rows_that_cannot_be_split_into_samples_are_refused(case, match):
    if case == "same_length":  # [T, N, in] or [N, T, in] with T == N: either would fit
        m, (x, y) = Tokens(False), tokens_batch(4, 4, False)
    elif case == "no_head":  # nothing gives the batch size
        m, (x, y) = Tokens(head=False), tokens_batch(5, 3)
    elif case == "flattened":
        m, (x, y) = Flattened(), tokens_batch(5, 3)
    else:
        m, (x, y) = Regrouped(), tokens_batch(4, 3)
    layers, sink = captured(m, x, y)
    with pytest.raises(ValueError, match=match):
        sink.resolve(layers)


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_token_rows_match_the_formed_window(P, dtype):
    g = torch.Generator().manual_seed(3)
    N, out, a = 5, 4, 6
    A = torch.randn(N, P, a, generator=g, dtype=F64)
    G = torch.randn(N, P, out, generator=g, dtype=F64)
    J = torch.einsum("npo,npa->noa", G, A).reshape(N, -1)
    v = torch.randn(out * a, generator=g, dtype=F64)
    c = torch.randn(N, generator=g, dtype=F64)
    rows = TokenRows(A.to(dtype), G.to(dtype))
    window = SampleWindow(J.to(dtype))
    tol = 1e-12 if dtype == F64 else 1e-5  # float32 inputs: J's own rounding, 2^-24 a term
    for route in (rows, window):
        K, Jg = route.gram(v.to(dtype))
        assert K.dtype == Jg.dtype == F64
        assert (K - J @ J.T).abs().max() <= tol * (J @ J.T).abs().max()
        assert (Jg - J @ v).abs().max() <= tol * (J.abs() @ v.abs()).max()
        d = torch.empty(out * a, dtype=dtype)
        route.combine(v.to(dtype), c, 0.7, d)
        e = (v - J.T @ c) / 0.7
        assert (d.double() - e).abs().max() <= tol * (v.abs() + J.abs().T @ c.abs()).max() / 0.7


def test_routes_by_flops():
    """The MNIST-1D MLP's Linears (one row a sample) skip forming J; the MNIST-1D CNN's convs
    (19, 10, 5 positions) form it."""
    assert all(tokens_cheaper(128, 1, o, a) for o, a in ((100, 41), (100, 101), (10, 101)))
    assert not any(tokens_cheaper(128, P, 25, a) for P, a in ((19, 6), (10, 76), (5, 76)))
    assert tokens_cheaper(128, 1, 10, 126)


def dense_oracle(J: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    N, n = J.shape
    A = damping * torch.eye(n, dtype=F64) + J.T @ J / N
    return torch.linalg.solve(A, g)


@pytest.mark.parametrize("route", ["auto", "window", "tokens"])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("damping", [1e-1, 1e-3])
@pytest.mark.parametrize("samples", [None, 4], ids=["all", "S=4"])
@pytest.mark.parametrize("model", ["conv", "attention-seq_first", "attention-batch_first"])
def test_directions_match_the_dense_solve(model, samples, damping, per_layer, route,
                                          monkeypatch):
    """(lambda I + J_S^T J_S / S)^{-1} g, J_S the first S samples' per-sample gradients (by a
    loop of backward passes) and g the whole batch's gradient, formed and solved densely."""
    if route != "auto":
        monkeypatch.setattr(woodbury, "tokens_cheaper", lambda *args: route == "tokens")
    batch_first = model != "attention-seq_first"
    if model == "conv":
        m, (x, y) = net(), batch()
    else:
        m, (x, y) = Tokens(batch_first, attention=True), tokens_batch(5, 3, batch_first)
    layers, sink = captured(m, x, y, samples=samples)
    grads = [layer_vector(l, l.weight.grad, l.bias.grad if l.bias is not None else None)
             for l in layers]
    ds = WoodburyNaturalGradient(sink).directions(layers, grads, damping, per_layer)
    Js = [J[:samples] for J in per_sample_loop(m, layers, x, y, 0 if batch_first else 1)]
    if per_layer:
        expected = [dense_oracle(J, g, damping) for J, g in zip(Js, grads)]
    else:
        d = dense_oracle(torch.cat(Js, 1), torch.cat(grads), damping)
        expected = list(d.split([g.numel() for g in grads]))
    for d, e in zip(ds, expected):
        # both solves are backward stable: relative error ~ cond(lambda I + F) * eps, cond <= 1e5
        assert (d - e).abs().max() <= 1e-9 * e.abs().max()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_only_the_first_samples_rows_are_kept_where_the_batch_dim_is_known(batch_first):
    """curvature_samples S: a conv on [N, C, ...], a Linear on [N, in] and an attention
    (batch-first or not: the capture hands it on batch-major) keep the rows of their first S
    samples from the capture on; Linears on tokens whose layout is told at the step keep all of
    them (cut there); S >= N keeps all."""
    m = net()
    x, y = batch()
    layers, sink = captured(m, x, y, samples=4)
    assert [len(sink.captured[l.index].a) for l in layers] == [4 * 16, 4 * 15, 4, 4]
    layers, sink = captured(m, x, y, samples=6)
    assert [len(sink.captured[l.index].a) for l in layers] == [6 * 16, 6 * 15, 6, 6]
    m = Tokens(batch_first, attention=True)
    x, y = tokens_batch(5, 3, batch_first)
    layers, sink = captured(m, x, y, samples=2)
    assert [len(sink.captured[l.index].a) for l in layers] == [2 * 3, 2 * 3, 5 * 3, 5 * 3, 2]
    assert sink.resolve(layers) == 5
    J = [sink.window(l, 2) for l in layers]
    expected = per_sample_loop(m, layers, x, y, 0 if batch_first else 1)
    for a, e in zip(J, expected):
        torch.testing.assert_close(a, e[:2], rtol=1e-12, atol=1e-14)


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
    grads = [layer_vector(l, l.weight.grad, None if l.bias is None else l.bias.grad)
             for l in layers]
    d64 = WoodburyNaturalGradient(sink).directions(layers, grads, 1e-2, False)
    sink.dtype = torch.float32
    for r in sink.captured.values():
        r.a, r.g = r.a.float(), r.g.float()
    d32 = WoodburyNaturalGradient(sink).directions(layers, [g.float() for g in grads], 1e-2,
                                                  False)
    for a, b in zip(d32, d64):
        # float32 rows and gradients, float64 sums: the inputs' rounding (2^-24) times
        # cond(lambda N + |J|^2 / lambda ...) stays below 1e-4 relative here
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()


def test_max_state_bytes_refuses_before_allocating(monkeypatch):
    """At the capture: the rows of the pass; at the step: the whole batch's per-sample data
    (the formed windows where they are the route)."""
    m = net()
    x, y = batch()
    layers = find_layers(m, {id(p): 0 for p in m.parameters()}, ())
    rows = 8 * sum(r * (l.a_dim + l.out) for l, r in zip(layers, (6 * 16, 6 * 15, 6, 6)))
    with pytest.raises(ValueError, match=f"max_state_bytes={rows - 1}"):
        captured(m, x, y, max_state_bytes=rows - 1)
    layers, sink = captured(m, x, y, max_state_bytes=rows)
    monkeypatch.setattr(woodbury, "tokens_cheaper", lambda *args: False)
    need = 6 * 8 * sum(l.out * l.a_dim for l in layers)  # the windows J
    grads = [torch.zeros(l.out * l.a_dim, dtype=F64) for l in layers]
    sink.max_state_bytes = need - 1
    with pytest.raises(ValueError, match=f"6 samples take {need} bytes, above "
                                         f"max_state_bytes={need - 1}"):
        WoodburyNaturalGradient(sink).directions(layers, grads, 1e-2, False)
    sink.max_state_bytes = need
    WoodburyNaturalGradient(sink).directions(layers, grads, 1e-2, False)


def test_a_second_backward_before_the_step_raises():
    m = net()
    x, y = batch()
    layers = find_layers(m, {id(p): 0 for p in m.parameters()}, ())
    sink = PerSampleGradients(layers, F64, 2 ** 30)
    cap = PerSampleCapture(layers, sink)
    nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="one backward pass per step"):
        nn.functional.cross_entropy(m(x), y).backward()
    cap.remove()
