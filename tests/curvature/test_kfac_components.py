"""K-FAC's components alone: layer discovery and rows (kfac_layers), the layout of the factors in
size buckets, staging and committing statistics, the eigen and inverse decompositions with their
one interface, preconditioning against dense fp64 formulas, the KL clip (kfac_factors)."""
import math
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from soo_ext.curvature.kfac_factors import (EigenFactors, FactorStore, InverseFactors, KFACLayout,
                                            LayerGradients, kl_clip_, load_views)
from soo_ext.curvature.kfac_layers import LayerCapture, find_layers, skip_patterns

F64 = torch.float64


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                         nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(F64)


def layers_of(net, patterns=()):
    return find_layers(net, {id(p): 0 for p in net.parameters()}, patterns)


# ---- discovery ------------------------------------------------------------------------------ #

def test_find_layers_skips_what_it_must():
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(2, 4, 3, groups=2), nn.LazyLinear(2),
                        nn.Linear(3, 2), nn.LayerNorm(3))
    tied = nn.Linear(3, 3)
    tied.weight = net[0].weight
    net.append(tied)
    net.append(nn.Conv1d(2, 2, 3))
    group_of = {id(p): 0 for p in net.parameters()}
    with pytest.warns(UserWarning, match="not preconditioned") as caught:
        found = find_layers(net, group_of, ())
    # net[0] and tied share a weight; the grouped conv, the lazy layer and LayerNorm are left out
    assert [l.name for l in found] == ["3", "6"] and found[1].spatial == 1
    assert [line.split(" (")[0].strip() for line in str(caught[0].message).splitlines()[1:]] \
        == ["0", "1", "2", "4", "5"]
    split = {id(net[3].weight): 0, id(net[3].bias): 1}
    assert find_layers(net, split, (), warn=False) == []  # weight and bias in different groups
    assert [l.name for l in find_layers(model(), {id(p): 0 for p in model().parameters()},
                                        skip_patterns(["2", "Lin.*"]), warn=False)] == []


def test_skip_patterns_refuse_bad_input():
    assert skip_patterns(None) == () and skip_patterns("a")[0].pattern == "a"
    for bad, match in ((3, "skip_layers"), ([1], "not a str"), (["("], "not a valid regex")):
        with pytest.raises(ValueError, match=match):
            skip_patterns(bad)
    assert isinstance(skip_patterns(["a", "b"])[1], re.Pattern)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("padding_mode,padding", [("zeros", 1), ("reflect", 1), ("zeros", "same"),
                                                  ("circular", (1, 2))])
def test_conv_rows_are_the_patches(padding_mode, padding, dims):
    torch.manual_seed(0)
    if dims == 1:
        padding = padding[1] if isinstance(padding, tuple) else padding
        conv = nn.Conv1d(2, 3, 3, padding=padding, padding_mode=padding_mode).to(F64)
    else:
        conv = nn.Conv2d(2, 3, (3, 2), padding=padding, padding_mode=padding_mode).to(F64)
    layer = layers_of(nn.Sequential(conv))[0]
    assert layer.spatial == dims and layer.fan_in == conv.weight[0].numel()
    x = torch.randn(2, 2, 5, 6, dtype=F64)[:, :, 0] if dims == 1 else \
        torch.randn(2, 2, 5, 6, dtype=F64)
    a = layer.a_rows(x)
    # the rows reproduce the convolution: out[n, :, i, j] = W a_row + b (positions last)
    out = conv(x)
    W = torch.cat([conv.weight.reshape(3, -1), conv.bias[:, None]], 1)
    torch.testing.assert_close(a @ W.T, out.movedim(1, -1).reshape(-1, 3))
    g = torch.randn_like(out)
    assert torch.equal(layer.g_rows(g), g.movedim(1, -1).reshape(-1, 3))
    # an unbatched input: the rows of a batch of one
    assert torch.equal(layer.a_rows(x[1]), layer.a_rows(x[1:]))
    assert torch.equal(layer.g_rows(g[1]), layer.g_rows(g[1:]))


def unfold_rows(conv, x):
    """The rows as F.unfold builds them (a_rows before it gathered from a strided view): the
    oracle of the gather, which must give the same bits."""
    x = x.unsqueeze(0) if x.dim() == conv.weight.dim() - 1 else x
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        if any(conv._reversed_padding_repeated_twice):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, dilation, stride, padding = (1, *kernel), (1, *dilation), (1, *stride), \
            (0, *padding)
    a = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    a = a.transpose(1, 2).reshape(-1, conv.weight[0].numel())
    return a if conv.bias is None else torch.cat([a, a.new_ones(a.shape[0], 1)], 1)


def same_bits(a, b):
    bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return a.shape == b.shape and a.dtype == b.dtype \
        and torch.equal(a.view(bits[a.dtype]), b.view(bits[b.dtype]))


# kernel, stride, dilation, padding, padding_mode (2-D; the 1-D cases take the last entries)
CONV_CASES = [((3, 2), 1, 1, 0, "zeros"), ((1, 5), (1, 2), 1, (0, 1), "zeros"),
              ((3, 3), 2, 1, 1, "zeros"), ((2, 3), (2, 1), (1, 2), (1, 2), "zeros"),
              ((3, 2), 1, (2, 3), "same", "zeros"), ((4, 2), 1, 1, "same", "reflect"),
              ((3, 3), (1, 3), 1, "valid", "zeros"), ((3, 2), 2, (2, 1), (2, 1), "reflect"),
              ((2, 2), (3, 2), 1, (1, 2), "circular"), ((3, 1), 1, 2, 1, "replicate"),
              ((1, 1), 1, 1, 0, "zeros"), ((1, 1), 2, 1, 1, "circular")]


def conv_inputs(dims, gen, dtype, device):
    """Batches of 1 and 3 with odd sizes, contiguous, channels_last, strided (a slice of a
    larger tensor, a transposed one), an unbatched one, with -0, inf and NaN among the values."""
    big = torch.randn(4, 6, 11, 13, generator=gen, dtype=F64).to(dtype)
    big.view(-1)[:3] = torch.tensor([-0.0, float("inf"), float("nan")])
    big = big.to(device)
    xs = [big[:1, :3], big[1:, 1:4, 1:10, 2:], big[:, ::2, ::2, 1::2],
          big[:3, :3].contiguous(memory_format=torch.channels_last),
          big[:3, :3].transpose(2, 3), big[0, :3]]
    return [x[..., 0, :] if dims == 1 else x for x in xs]  # 1-D: a row of each


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_rows_gather_the_bits_of_unfold(dims, dtype, device):
    gen = torch.Generator().manual_seed(0)
    for kernel, stride, dilation, padding, mode in CONV_CASES:
        for bias in (True, False):
            args = (kernel, stride, dilation, padding)
            if dims == 1:
                args = tuple(a if isinstance(a, str) else a[-1] if isinstance(a, tuple) else a
                             for a in args)
            cls = nn.Conv1d if dims == 1 else nn.Conv2d
            conv = cls(3, 2, args[0], stride=args[1], dilation=args[2], padding=args[3],
                       padding_mode=mode, bias=bias).to(dtype).to(device)
            layer = layers_of(nn.Sequential(conv))[0]
            for x in conv_inputs(dims, gen, dtype, device):
                case = (args, mode, bias, tuple(x.shape), x.stride())
                assert same_bits(layer.a_rows(x), unfold_rows(conv, x)), case


class _WrittenStorages(TorchDispatchMode):
    """Records the storages that ops return (what a_rows allocates)."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("bias", [True, False])
def test_conv_rows_take_one_copy(bias):
    """The patches are gathered into the rows once: no rows-sized intermediate (F.unfold's
    patches, their transposed copy, the concatenation with the 1s took three)."""
    conv = nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=1, bias=bias)
    layer = layers_of(nn.Sequential(conv))[0]
    x = torch.randn(5, 3, 9, 12)
    with _WrittenStorages() as seen:
        a = layer.a_rows(x)
    patches = a.shape[0] * layer.fan_in * a.element_size()  # bytes (the padded input: fewer)
    big = [ptr for ptr, n in seen.storages.items() if n >= patches]
    assert big == [a.untyped_storage().data_ptr()]
    assert same_bits(a, unfold_rows(conv, x))


# ---- layout --------------------------------------------------------------------------------- #

def test_layout_keeps_shape_groups_contiguous_in_both_buckets():
    layers = layers_of(model())
    layout = KFACLayout(layers)
    assert layout.buckets.sizes == {3: 3, 4: 4, 5: 5, 6: 6}
    assert layout.buckets.counts == {3: 1, 4: 4, 5: 2, 6: 1}  # A of (3, 4) + G of the three out=4
    shapes = [[(l.out, l.a_dim) for l in g] for g in layout.shape_groups]
    assert shapes == [[(3, 4)], [(4, 5), (4, 5)], [(4, 6)]]
    for group in layout.shape_groups:
        assert [l.a_pos for l in group] == list(range(group[0].a_pos, group[0].a_pos + len(group)))
        assert [l.g_pos for l in group] == list(range(group[0].g_pos, group[0].g_pos + len(group)))
    slots = {(l.a_dim, l.a_pos) for l in layers} | {(l.out, l.g_pos) for l in layers}
    assert len(slots) == 2 * len(layers)  # every factor has its own slot
    assert sum(layout.buckets.counts.values()) == 2 * len(layers)


# ---- statistics, decompositions, preconditioning -------------------------------------------- #

def factors_with_statistics(cls, damping=1e-2, seed=0):
    layers = layers_of(model())
    layout = KFACLayout(layers)
    factors = cls(layout, F64, torch.device("cpu"), damping)
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for l in layers:
        a = torch.randn(7, l.a_dim, generator=gen, dtype=F64)
        g = torch.randn(7, l.out, generator=gen, dtype=F64)
        factors.stage(l, a[:3], g[:3], 0.0, 1 / 3, 4.0, 3)
        factors.stage(l, a[3:], g[3:], 3 / 7, 1 / 7, 4.0, 4)  # pooled with the first 3 rows
        l.captures = 2
        rows[l.name] = (a, g)
    return layers, factors, rows


@pytest.mark.parametrize("cls", [EigenFactors, InverseFactors])
def test_staged_statistics_are_row_means_and_commit_decays(cls):
    layers, factors, rows = factors_with_statistics(cls)
    assert factors.staged_statistics(None)
    for l in layers:
        a, g = rows[l.name]
        torch.testing.assert_close(factors.views(l)["A"], torch.eye(l.a_dim, dtype=F64))
        factors_P = factors.P[l.a_dim][l.a_pos]
        torch.testing.assert_close(factors_P, a.T @ a / 7)
        torch.testing.assert_close(factors.P[l.out][l.g_pos], 4 * g.T @ g / 7)
    factors.commit(0.9, torch.tensor(False))  # a skipped step: nothing changes
    assert all(torch.equal(factors.views(l)["A"], torch.eye(l.a_dim, dtype=F64)) for l in layers)
    factors.commit(0.9, None)
    for l in layers:
        a, _ = rows[l.name]
        torch.testing.assert_close(factors.views(l)["A"],
                                   0.9 * torch.eye(l.a_dim, dtype=F64) + 0.1 * a.T @ a / 7)
    factors.reset_staged()
    assert not factors.staged.any() and factors.staged_statistics(None) == []


def dense_preconditioned(cls, A, G, grad, damping):
    """The dense fp64 formulas of the two modes."""
    if cls is InverseFactors:
        r = math.sqrt(damping)
        return torch.linalg.solve(G + r * torch.eye(len(G), dtype=F64),
                                  grad) @ torch.linalg.inv(A + r * torch.eye(len(A), dtype=F64))
    dA, QA = torch.linalg.eigh(A)
    dG, QG = torch.linalg.eigh(G)
    return QG @ ((QG.T @ grad @ QA) / (dG[:, None] * dA[None, :] + damping)) @ QA.T


@pytest.mark.parametrize("cls", [EigenFactors, InverseFactors])
def test_refresh_and_precondition_match_dense_formulas(cls):
    damping = 1e-2
    layers, factors, _ = factors_with_statistics(cls, damping)
    factors.staged_statistics(None)
    factors.commit(0.5, None)
    factors.refresh(damping, None)
    for name, view in factors.views(layers[0]).items():
        assert view.dtype in (F64, torch.int64), name
    group = factors.groups[1]  # three layers of one shape
    gen = torch.Generator().manual_seed(1)
    group.grad.copy_(torch.randn(group.grad.shape, generator=gen, dtype=F64))
    V, grad = factors.precondition(group, group.layers, damping)
    V2, grad2 = factors.precondition(group, group.layers[1:], damping)  # a subset
    for r, l in enumerate(group.layers):
        views = factors.views(l)
        ref = dense_preconditioned(cls, views["A"], views["G"], group.grad[r], damping)
        torch.testing.assert_close(V[r], ref, rtol=1e-10, atol=1e-12)
        if r:
            torch.testing.assert_close(V2[r - 1], ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(grad, group.grad) and torch.equal(grad2, group.grad[1:])


@pytest.mark.parametrize("cls", [EigenFactors, InverseFactors])
def test_failed_decomposition_or_skipped_step_keeps_the_previous_one(cls):
    damping = 1e-2
    layers, factors, _ = factors_with_statistics(cls, damping)
    factors.staged_statistics(None)
    factors.commit(0.5, None)
    factors.refresh(damping, None)
    l = layers[0]
    before = {k: v.clone() for k, v in factors.views(l).items()}
    factors.F[l.a_dim][l.a_pos].fill_(float("nan"))
    factors.refresh(damping, None)
    after = factors.views(l)
    for key in cls.KEYS:
        if key.endswith("A") or key == "A_inv":
            assert torch.equal(after[key], before[key]), key
    assert after["A_inverse_failures"] == 1 and after["G_inverse_failures"] == 0
    other = factors.views(layers[1])
    kept = {k: v.clone() for k, v in other.items() if k not in ("A", "G")}
    factors.F[layers[1].a_dim][layers[1].a_pos].mul_(2)
    factors.refresh(damping, torch.tensor(False))  # skipped: nothing changes, nothing counted
    assert all(torch.equal(other[k], kept[k]) for k in kept)
    assert factors.views(l)["A_inverse_failures"] == 1


def test_kl_clip_scales_by_the_formula():
    gen = torch.Generator().manual_seed(0)
    V = [torch.randn(2, 3, 4, generator=gen, dtype=F64) for _ in range(2)]
    grads = [torch.randn(2, 3, 4, generator=gen, dtype=F64) for _ in range(2)]
    lrs = [[0.1, 0.1], [0.1, 0.3]]
    s = abs(sum(float((v[r] * g[r]).sum()) * lr[r] ** 2 for v, g, lr in zip(V, grads, lrs)
                for r in range(2)))
    for kappa in (1e-6, 1e3):
        nu = min(1.0, math.sqrt(kappa / s))
        results = [(v.clone(), g, lr) for v, g, lr in zip(V, grads, lrs)]
        kl_clip_(results, kappa)
        for (out, _, _), v in zip(results, V):
            torch.testing.assert_close(out, nu * v)
    zero = [(torch.zeros(1, 2, 2, dtype=F64), torch.ones(1, 2, 2, dtype=F64), [1.0])]
    kl_clip_(zero, 1.0)
    assert not zero[0][0].any()


def test_layer_gradients_gather_decay_and_mask():
    net = model()
    layers = layers_of(net)
    EigenFactors(KFACLayout(layers), F64, torch.device("cpu"), 1e-2)  # the gradient buffers
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    chosen = [layers[1], layers[3]]  # one of the two (4, 5) layers, and the (3, 4) one
    grads = LayerGradients(chosen, lambda l: 0.5 if l.index == 1 else 0.0)
    grads.gather()
    assert grads.param_ids == {id(p) for l in chosen for p in l.params()}
    assert sorted(t.dim() for t in grads.tensors()) == [2, 3]  # a row, a whole group
    grads.add_weight_decay_()
    for l in chosen:
        g = l.group.grad[l.row]
        want = l.weight.grad + (0.5 * l.weight if l.index == 1 else 0)
        torch.testing.assert_close(g[:, :l.fan_in], want)
    grads.zero_where_(torch.tensor(True))
    assert all(not g.grad.any() for g in grads.active)


@pytest.mark.parametrize("factor_dtype", [F64, torch.float32])
def test_layer_gradients_cut_V_as_indexing_does(factor_dtype):
    # conv weights [out, C, k] and [out, C, kh, kw] with and without bias, two layers of one
    # shape (one or both active), a strided V; cast to the params' dtype when it differs
    net = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Conv2d(3, 3, (1, 2), bias=False), nn.Flatten(),
                        nn.Linear(4, 4), nn.Linear(4, 4)).to(F64)
    layers = layers_of(net)
    factors = EigenFactors(KFACLayout(layers), factor_dtype, torch.device("cpu"), 1e-2)
    for chosen in (layers, layers[:2] + layers[3:]):  # all, and the second (4, 4) alone
        grads = factors.gradients(chosen, [0.0] * len(chosen))
        Vs = [torch.randn(len(m), m[0].a_dim, m[0].out, dtype=factor_dtype).mT
              for m in grads.active.values()]  # not contiguous
        want = []
        for V, members in zip(Vs, grads.active.values()):
            for r, l in enumerate(members):
                want.append((l.weight, V[r, :, :l.fan_in].reshape(l.weight.shape).to(F64)))
                if l.bias is not None:
                    want.append((l.bias, V[r, :, l.fan_in].to(F64)))
        got = grads.directions(Vs)
        assert [p for p, _ in got] == [p for p, _ in want]
        assert all(d.shape == p.shape and d.dtype == F64 and torch.equal(d, w)
                   for (p, d), (_, w) in zip(got, want))
        if factor_dtype == F64:  # views of V, no copies
            storages = {V.untyped_storage().data_ptr() for V in Vs}
            assert all(d.untyped_storage().data_ptr() in storages for _, d in got)


def test_factors_keep_the_gradients_of_the_same_layers_and_weight_decays():
    layers = layers_of(model())
    factors = EigenFactors(KFACLayout(layers), F64, torch.device("cpu"), 1e-2)
    grads = factors.gradients(layers, [0.0] * 4)
    assert factors.gradients(layers, [0.0] * 4) is grads
    decayed = factors.gradients(layers, [0.0, 0.5, 0.0, 0.0])
    assert decayed is not grads and list(decayed._decay) == [0.5]
    assert factors.gradients(layers[1:], [0.0] * 3).param_ids == {
        id(p) for l in layers[1:] for p in l.params()}


def test_store_makes_factors_once_and_refuses_changes():
    layers = layers_of(model())
    store = FactorStore(KFACLayout(layers))
    store.configure("inverse", F64, 0.01)
    factors = store.get()
    assert isinstance(factors, InverseFactors) and store.get() is factors
    torch.testing.assert_close(factors.views(layers[0])["A_inv"],
                               torch.eye(6, dtype=F64) / (1 + 0.1))
    with pytest.raises(ValueError, match="mode"):
        store.configure("eigen", F64, 0.01)
    with pytest.raises(ValueError, match="factor_dtype"):
        store.configure("inverse", torch.float32, 0.01)
    with pytest.raises(ValueError, match="not a K-FAC layer"):
        load_views(factors, layers, {torch.zeros(1): {"A": torch.zeros(1)}}, {})
    with pytest.raises(ValueError, match="shape"):
        load_views(factors, layers, {layers[0].weight: {"A": torch.zeros(2, 2)}}, {})


def test_capture_stages_only_when_due_and_training():
    net = model()
    layers = layers_of(net)
    store = FactorStore(KFACLayout(layers))
    store.configure("eigen", F64, 0.01)
    capture = LayerCapture(layers, store.get)
    x = torch.randn(4, 5, dtype=F64)
    capture.configure(False, True, 1)
    net(x).sum().backward()
    assert not any(l.captures for l in layers)
    with pytest.raises(RuntimeError, match="no backward pass"):
        capture.check(True, True)
    capture.configure(True, True, 1)
    net.eval()
    net(x).sum().backward()
    assert not any(l.captures for l in layers)
    net.train()
    net(x).sum().backward()
    assert all(l.captures == 1 and l.rows == 4 for l in layers)
    # batch_averaged: the output gradients of a mean loss times the batch size
    l = layers[-1]
    h = net[:-1](x)
    torch.testing.assert_close(store.factors.P[l.a_dim][l.a_pos], h.T.detach() @ h.detach() / 4)
    capture.reset()
    assert not any(l.captures for l in layers)
    # each layer's forward is wrapped (an instance attribute) while the capture is attached
    assert all("forward" in vars(l.module) for l in layers)
    with pytest.raises(RuntimeError, match="remove_hooks"):
        LayerCapture(layers[1:2], store.get)
    capture.remove()
    assert not any("forward" in vars(l.module) for l in layers)
    net(x).sum().backward()
    assert not any(l.captures for l in layers)
    LayerCapture(layers[1:2], store.get).remove()  # fine now
    with pytest.raises(ValueError, match="grad_scaler"):
        LayerCapture(layers, store.get, grad_scaler=3)
