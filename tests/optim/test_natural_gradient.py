"""soo_ext.NaturalGradient against a naive float64 transcription of Ren & Goldfarb's subsampled
natural gradient (and SENG's per-layer variant): per-sample gradients by torch.func, the n x n
damped empirical Fisher formed and solved densely, SGD with momentum; step for step."""
import copy
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


def naive_steps(model, steps, lr, momentum, weight_decay, damping, per_layer, blocks=None,
                batches=data, batch_dim=0, curvature_samples=None):
    """The paper's step written out: theta <- theta - lr buf, buf <- m buf + d,
    d = (damping I + J^T J / S)^{-1} (g + wd theta) on the params of ``blocks`` (lists of param
    names, one a layer: default weight and bias in turn), J the per-sample gradients (rows) of
    the batch's first S = ``curvature_samples`` samples (default all), g the whole batch's
    gradient; d = g + wd theta (SGD) on the others.  ``batch_dim``: the samples' dim of the
    input."""
    names = [n for n, _ in model.named_parameters()]
    blocks = blocks or [names[i:i + 2] for i in range(0, len(names), 2)]
    pre = [n for b in blocks for n in b]
    order = pre + [n for n in names if n not in pre]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = None

    def loss_one(params, x, y):
        out = functional_call(model, params, (x.unsqueeze(batch_dim),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    def flat(d, ns):
        return torch.cat([d[n].reshape(-1) for n in ns]) if ns else torch.zeros(0, dtype=F64)

    for k in range(steps):
        x, y = batches(k)
        per = vmap(grad(loss_one), in_dims=(None, batch_dim, 0))(theta, x, y)
        J = torch.cat([per[n].reshape(y.shape[0], -1) for n in pre], 1)[:curvature_samples]
        g = flat({n: v.mean(0) for n, v in per.items()}, order) + weight_decay * flat(theta, order)
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
        d = torch.cat([torch.linalg.solve(damping * torch.eye(n, dtype=F64) + F, g[:n]), g[n:]])
        buf = d if buf is None else momentum * buf + d
        flat_theta = flat(theta, order) - lr * buf
        theta = {nm: t.view_as(theta[nm]) for nm, t in zip(
            order, flat_theta.split([theta[nm].numel() for nm in order]))}
    return torch.cat([theta[n].reshape(-1) for n in names])


def run_steps(opt, model, steps, batches=data):
    for k in range(steps):
        x, y = batches(k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("curvature_samples", [None, 4, 10, 50])
@pytest.mark.parametrize("per_layer", [False, True])
def test_matches_the_naive_transcription_step_for_step(per_layer, curvature_samples):
    """The MLP on batches of 10: the Fisher of all of them, of the first 4, or of the first 10
    or 50 (all)."""
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-2, damping=5e-2,
              curvature_samples=curvature_samples)
    model = mlp()
    expected = naive_steps(model, 4, per_layer=per_layer, **kw)
    got = run_steps(soo_ext.NaturalGradient(model, per_layer=per_layer, **kw), model, 4)
    # fp64 throughout; Woodbury and the dense solve agree to cond(damping I + F) * eps per step
    # (cond <= 1e4 here) and four steps compound that at most linearly
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()


class Tokens(nn.Module):
    """[N, T, 4] inputs (``batch_first=False``: [T, N, 4]): optionally self-attention
    (nn.MultiheadAttention, residual), Linears on the tokens, mean over them, a Linear head."""

    def __init__(self, batch_first=True, attention=False):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first) if attention else None
        self.l1, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.to(F64)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.tanh(self.l1(x)).mean(1 if self.batch_first else 0))


class Encoder(nn.Module):
    """torch's nn.TransformerEncoderLayer (its LayerNorms: SGD), mean-pooled, a head."""

    def __init__(self, batch_first):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(4, 3)
        self.to(F64)

    def forward(self, x):
        return self.head(self.layer(x).mean(1 if self.batch_first else 0))


def sequences(N, T, batch_first):
    def batches(k):
        g = torch.Generator().manual_seed(200 + k)
        x = torch.randn(N, T, 4, generator=g, dtype=F64)
        return (x if batch_first else x.transpose(0, 1)), torch.randint(0, 3, (N,), generator=g)
    return batches


def weight_bias(*modules):
    """The transcription's blocks: each module's weight and bias."""
    return [[f"{m}.weight", f"{m}.bias"] for m in modules]


ATTN = [["attn.in_proj_weight", "attn.in_proj_bias"]] + weight_bias("attn.out_proj")
LINEARS = weight_bias("l1", "head")
ENCODER = [["layer.self_attn.in_proj_weight", "layer.self_attn.in_proj_bias"]] + weight_bias(
    "layer.self_attn.out_proj", "layer.linear1", "layer.linear2", "head")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over attention
@pytest.mark.parametrize("curvature_samples", [None, 2])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("case", ["tokens", "tokens-seq_first", "attention",
                                  "attention-seq_first", "attention-skipped",
                                  "encoder-seq_first-T=N", "encoder-T=N"])
def test_sequence_models_match_the_naive_transcription(case, per_layer, curvature_samples):
    """Per-sample gradients of sequence models summed over each sample's tokens, in either
    layout: what is preconditioned (the Linears, an attention's in-projection and out_proj,
    torch's encoder layer's four) and what takes the SGD step (a skipped attention's params,
    the LayerNorms) as the transcription's blocks say; the Fisher of all samples or of the
    first 2 (the layers whose layout is known cut at the capture, the others at the step)."""
    batch_first = "seq_first" not in case
    N, T = (4, 4) if "T=N" in case else (5, 3)
    batches = sequences(N, T, batch_first)
    if case.startswith("encoder"):
        make, blocks, skip = (lambda: Encoder(batch_first)), ENCODER, None
    elif case.startswith("attention"):
        make, skip = (lambda: Tokens(batch_first, attention=True)), None
        blocks = LINEARS if case.endswith("skipped") else ATTN + LINEARS
        skip = ["attn"] if case.endswith("skipped") else None
    else:
        make, blocks, skip = (lambda: Tokens(batch_first)), LINEARS, None
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-2, damping=5e-2, per_layer=per_layer,
              curvature_samples=curvature_samples)
    expected = naive_steps(make(), 3, blocks=blocks, batches=batches,
                           batch_dim=0 if batch_first else 1, **kw)
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = soo_ext.NaturalGradient(model, skip_layers=skip, fallback="sgd", **kw)
    preconditioned = sorted(n for b in blocks for n in b)
    assert sorted(n for n, p in model.named_parameters() if any(
        p is q for _, m in opt.layers for q in m.parameters(recurse=False))) == preconditioned
    if skip:  # the attention's in-projection and its out_proj named in the warning
        message = str(caught[0].message)
        assert "attn (MultiheadAttention: in_proj_weight, in_proj_bias)" in message
        assert "attn.out_proj (NonDynamicallyQuantizableLinear: weight, bias)" in message
    got = run_steps(opt, model, 3, batches)
    # fp64; cond(damping I + F) <= 1e4: as the MLP's
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()


@pytest.mark.parametrize("case", ["same_length", "no_batch_size"])
def test_layouts_that_cannot_be_told_are_refused_at_the_step(case):
    """A Linear on [T, N, in] with T == N (no attention to say the layout), or with nothing
    giving the batch size (a per-token loss): ValueError naming the layers and skip_layers,
    nothing changed; with those layers skipped the step is taken."""
    if case == "same_length":
        model, (x, y) = Tokens(False), sequences(4, 4, False)(0)

        def loss():
            return nn.functional.cross_entropy(model(x), y)
    else:  # a per-token loss on [N, T, 3]
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
        x, y = sequences(5, 3, True)(0)

        def loss():
            return nn.functional.cross_entropy(model(x).transpose(1, 2), y[:, None].expand(5, 3))
    opt = soo_ext.NaturalGradient(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss().backward()
    names = "'l1'" if case == "same_length" else "'0', '2'"
    with pytest.raises(ValueError, match=rf"skip_layers=\[{names}\]"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not any("momentum_buffer" in st for st in opt.state.values())
    opt.zero_grad()
    loss().backward()  # the captured rows were dropped: a new pass is accepted
    opt.remove_hooks()
    skip = ["l1"] if case == "same_length" else ["0", "2"]
    with pytest.warns(UserWarning, match="matched by skip_layers"):
        opt = soo_ext.NaturalGradient(model, lr=0.1, skip_layers=skip)
    opt.zero_grad()
    loss().backward()
    opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


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


@pytest.mark.parametrize("fallback_lr", [None, 0.3])
def test_unsupported_layers_are_named_and_take_the_sgd_step(fallback_lr):
    """fallback='sgd': SGD at ``fallback_lr``, None: the group's lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).to(F64)
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm: weight, bias\)"):
        opt = soo_ext.NaturalGradient(model, lr=0.1, momentum=0.0, fallback="sgd",
                                      fallback_lr=fallback_lr)
    assert [n for n, _ in opt.layers] == ["0", "2"]
    ln = model[1]
    before = ln.weight.detach().clone()
    x, y = data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = before - (fallback_lr or 0.1) * ln.weight.grad
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


def layer_norm_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def norm_apart(model, **norm_options):
    """Two param groups: the Linears', and the LayerNorm's with ``norm_options``."""
    linears = [p for i in (0, 3) for p in model[i].parameters()]
    return [dict(params=linears), dict(params=list(model[1].parameters()), **norm_options)]


@pytest.mark.filterwarnings("ignore:NaturalGradient. a step was skipped:RuntimeWarning")
@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("settings", ["given", "default"])
def test_adamw_fallback_is_torch_adamw_and_leaves_the_preconditioned_step(on_nonfinite,
                                                                          settings):
    """fallback='adamw' (the default): the LayerNorm's params take torch.optim.AdamW's step
    (their group's fallback_lr, by default 1e-2, fallback_betas and weight_decay, decoupled;
    fallback_eps); the Linears' step is bit for bit the one fallback='sgd' takes at the same
    params. 'skip': a step with a NaN in the LayerNorm's gradient changes nothing (no AdamW
    step, count or moment)."""
    given = settings == "given"
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, damping=5e-2, curvature_samples=4,
              on_nonfinite=on_nonfinite)
    norm_kw = dict(weight_decay=1e-2, **(dict(fallback_lr=3e-3, fallback_betas=(0.8, 0.99))
                                         if given else {}))
    model, twin = layer_norm_mlp(), layer_norm_mlp()
    with pytest.warns(UserWarning, match=r"fallback step \(adamw\)"):
        opt = soo_ext.NaturalGradient(model, params=norm_apart(model, **norm_kw),
                                      **(dict(fallback="adamw", fallback_eps=1e-6) if given
                                         else {}), **kw)
    with pytest.warns(UserWarning, match=r"fallback step \(sgd\)"):
        sgd = soo_ext.NaturalGradient(twin, params=norm_apart(twin, weight_decay=1e-2),
                                      fallback="sgd", **kw)
    norm, twin_norm = list(model[1].parameters()), list(twin[1].parameters())
    shadow = [p.detach().clone().requires_grad_() for p in norm]
    adamw = torch.optim.AdamW(shadow, weight_decay=1e-2, **(
        dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6) if given else dict(lr=1e-2)))
    poisoned = 2 if on_nonfinite == "skip" else None
    for k in range(5):
        x, y = data(k)
        with torch.no_grad():  # both runs at the same params: the LayerNorm's are AdamW's
            torch._foreach_copy_(twin_norm, norm)
        for m, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            if k == poisoned:
                m[1].weight.grad[0] = float("nan")
        opt.step()
        sgd.step()
        if k != poisoned:
            for s, p in zip(shadow, norm):
                s.grad = p.grad.clone()
            adamw.step()
        for p, s in zip(norm, shadow):  # fp64 steps of ~1e-2: a few roundings of p (~1) each
            torch.testing.assert_close(p, s.detach(), rtol=0, atol=1e-14)
        for i in (0, 3):
            assert all(torch.equal(p, q) for p, q in zip(model[i].parameters(),
                                                         twin[i].parameters()))
    st = opt.state[model[1].weight]
    assert "momentum_buffer" not in st and "momentum_buffer" in opt.state[model[0].weight]
    assert float(st["fallback_step"]) == (4 if poisoned else 5)
    assert int(opt.state[model[0].weight]["nonfinite_steps"]) == (1 if poisoned else 0)


def test_adamw_fallback_state_resumes_bit_identically():
    """The AdamW moments and the float32 step count go through state_dict (the count uncast by
    a float64 model's load) and a resumed run is the uninterrupted one bit for bit."""
    kw = dict(lr=0.1, fallback="adamw", fallback_lr=1e-2)
    model, twin = layer_norm_mlp(), layer_norm_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LayerNorm named
        opt = soo_ext.NaturalGradient(model, **kw)
        resumed = soo_ext.NaturalGradient(twin, **kw)
    run_steps(opt, model, 3)
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # (else it shares the buffers)
    st = resumed.state[twin[1].weight]
    assert st["fallback_step"].dtype == torch.float32 and float(st["fallback_step"]) == 3
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == F64

    def later(k):
        return data(k + 3)
    assert torch.equal(run_steps(opt, model, 3, later), run_steps(resumed, twin, 3, later))
