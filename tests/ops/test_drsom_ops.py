"""The DRSOM ops (soo::drsom_perturb, drsom_reduce, drsom_update, drsom_subproblem) against fp64
oracles."""
import math

import pytest
import torch

from soo_ext import reference

from op_inputs import subproblem_inputs, vectors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    den = ref.norm()
    return (out - ref).norm().item() / (den.item() if den > 0 else 1.0)


def naive_inputs(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, dtype=torch.float64, generator=gen)  # noqa: E731
    return r(), r(), [r() for _ in range(k)]


@pytest.mark.parametrize("n,k", [(0, 1), (1, 2), (17, 3), (1001, 5)])
def test_reference_drsom_against_naive_loops(n, k):
    gp, g, V = naive_inputs(n, k)
    t = torch.tensor(1e-3, dtype=torch.float64)
    q, G, c = reference.drsom_reduce(gp, g, V, t, True)
    for j in range(k):
        assert abs(q[j].item() - sum((gp[i] - g[i]).item() * V[j][i].item() for i in range(n)) / 1e-3) \
            <= 1e-9 * (1 + abs(q[j].item()))
        assert abs(c[j].item() - sum(g[i].item() * V[j][i].item() for i in range(n))) <= 1e-9 * (1 + n)
        for i2 in range(k):
            ref = sum(V[i2][i].item() * V[j][i].item() for i in range(n))
            assert abs(G[i2, j].item() - ref) <= 1e-9 * (1 + n)
    q2, G2, c2 = reference.drsom_reduce(gp, g, V, t, False)
    assert torch.equal(q2, q) and G2.shape == (0, 0) and c2.shape == (0,)

    x = gp.clone()
    x0 = torch.empty_like(x)
    reference.drsom_perturb(x, x0, V[0], t, True)
    assert torch.equal(x0, gp)
    assert torch.allclose(x, gp + 1e-3 * V[0], rtol=0, atol=1e-15)
    reference.drsom_perturb(x, x0, V[0], torch.tensor(0.0, dtype=torch.float64), False)
    assert torch.equal(x, gp)

    alpha = torch.arange(1.0, k + 1, dtype=torch.float64)
    x = g.clone()
    p = V[-1]
    V_copy = [v.clone() for v in V]
    reference.drsom_update(x, p, V, alpha)  # p aliases V[-1]
    step = [sum(alpha[j].item() * V_copy[j][i].item() for j in range(k)) for i in range(n)]
    assert torch.allclose(p, torch.tensor(step, dtype=torch.float64).reshape(n), atol=1e-12)
    assert torch.allclose(x, g + p, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The compiled kernels (or the fallback) through soo_ext.ops, against fp64 oracles.

from soo_ext import ops  # noqa: E402

DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]
DTYPE_IDS = ["fp64", "fp32"]
SIZES = [0, 1, 7, 33, 1001, 100_003, 1_000_000]
KS = [1, 2, 3, 5]
requires_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def scalar(value, dtype, device):
    return torch.tensor(value, dtype=dtype, device=device)


def oracle_reduce(gp, g, V, t, with_gram):
    up = lambda a: a.detach().double().cpu()  # noqa: E731
    return reference.drsom_reduce(up(gp), up(g), [up(v) for v in V], up(t), with_gram)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("with_gram", [False, True])
def test_reduce_matches_fp64_oracle(device, dtype, tol, n, k, with_gram):
    gp, g, *V = vectors(n, k + 2, dtype, device, seed=n + 10 * k)
    t = scalar(1e-3, dtype, device)
    q, G, c = ops.drsom_reduce(gp, g, V, t, with_gram)
    q_ref, G_ref, c_ref = oracle_reduce(gp, g, V, t, with_gram)
    assert q.dtype == dtype and q.shape == (k,) and q.device == g.device
    assert rel_err(q, q_ref) < tol
    if with_gram:
        assert G.shape == (k, k) and c.shape == (k,) and G.dtype == dtype and c.dtype == dtype
        assert rel_err(G, G_ref) < tol and rel_err(c, c_ref) < tol
        assert torch.equal(G, G.T)  # symmetric bit for bit
    else:
        assert G.shape == (0, 0) and c.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
def test_reduce_central_difference_of_a_quadratic(device, dtype, tol):
    """g(x) = A x: (g(x + t v) - g(x - t v)) / 2t projected on V is V^T A v exactly (up to rounding)."""
    n, k = 300, 3
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(n, n, dtype=torch.float64, generator=gen) / n ** 0.5
    A = B @ B.T
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    V = [torch.randn(n, dtype=torch.float64, generator=gen) for _ in range(k)]
    t = 1e-2
    gp, gm = A @ (x + t * V[0]), A @ (x - t * V[0])
    q, _, _ = ops.drsom_reduce(gp.to(dtype).to(device), gm.to(dtype).to(device),
                               [v.to(dtype).to(device) for v in V], scalar(2 * t, dtype, device),
                               False)
    exact = torch.stack([v @ (A @ V[0]) for v in V])
    assert rel_err(q, exact) < (1e-10 if dtype == torch.float64 else 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES)
def test_perturb_save_restore(device, dtype, tol, n):
    x, v, junk = vectors(n, 3, dtype, device, seed=n + 1)
    original = x.clone()
    x0 = junk  # garbage before the save
    t = scalar(0.37, dtype, device)
    ops.drsom_perturb(x, x0, v, t, True)
    assert torch.equal(x0, original)  # the base point, bit for bit
    ref = original.double() + 0.37 * v.double()
    assert rel_err(x, ref) < tol
    # a second perturbation from the saved base point (no save), then the exact restore
    ops.drsom_perturb(x, x0, v, scalar(-1.5, dtype, device), False)
    assert rel_err(x, original.double() - 1.5 * v.double()) < tol
    assert torch.equal(x0, original)
    ops.drsom_perturb(x, x0, v, scalar(0.0, dtype, device), False)
    assert torch.equal(x, original)
    ops.drsom_perturb(x, x0, v, t, False)
    x.copy_(x0)
    assert torch.equal(x, original)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("alias", [False, True])
def test_update_matches_fp64_oracle(device, dtype, tol, n, k, alias):
    if alias and k < 2:
        pytest.skip("p aliases V[1]")
    x, p_buf, *V = vectors(n, k + 2, dtype, device, seed=3 * n + k)
    alpha = torch.linspace(-1.0, 2.0, k, dtype=dtype, device=device)
    V_before = [v.double().cpu().clone() for v in V]
    x_before = x.double().cpu().clone()
    p = V[1] if alias else p_buf
    ops.drsom_update(x, p, V, alpha)
    step = sum(a * v for a, v in zip(alpha.double().cpu().tolist(), V_before))
    assert rel_err(p, step) < tol
    assert rel_err(x, x_before + step) < tol
    assert torch.equal(x, (x_before.to(dtype).to(device) + p))  # x <- x + p with the stored p


@requires_ext
@pytest.mark.parametrize("with_gram", [False, True])
def test_cpu_result_independent_of_thread_count(with_gram):
    gp, g, *V = vectors(300_007, 7, torch.float32, "cpu", seed=11)
    t = scalar(1e-2, torch.float32, "cpu")
    alpha = torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0], dtype=torch.float32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, max(2, threads)):
            torch.set_num_threads(nt)
            q, G, c = ops.drsom_reduce(gp, g, V, t, with_gram)
            x, p = gp.clone(), torch.empty_like(gp)
            ops.drsom_update(x, p, V, alpha)
            x0 = torch.empty_like(g)
            y = g.clone()
            ops.drsom_perturb(y, x0, V[0], t, True)
            outs.append((q, G, c, x, p, y))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1001, 100_003, 100_004])
def test_cuda_matches_cpu(dtype, tol, n):
    cpu = vectors(n, 7, dtype, "cpu", seed=5)
    gpu = [v.cuda() for v in cpu]
    t = scalar(1e-2, dtype, "cpu")
    out_cpu = ops.drsom_reduce(cpu[0], cpu[1], cpu[2:], t, True)
    out_gpu = ops.drsom_reduce(gpu[0], gpu[1], gpu[2:], t.cuda(), True)
    for a, b in zip(out_gpu, out_cpu):
        assert rel_err(a.cpu(), b) < tol
    # the CUDA reduction is deterministic (fixed tree, partials summed in block order)
    again = ops.drsom_reduce(gpu[0], gpu[1], gpu[2:], t.cuda(), True)
    for a, b in zip(out_gpu, again):
        assert torch.equal(a, b)


@requires_cuda
def test_cuda_unaligned_views_use_the_scalar_path():
    base = vectors(4 * 1001 + 1, 4, torch.float32, "cuda", seed=9)
    views = [b[1:] for b in base]  # offset by 4 bytes: not 16-byte aligned, n % 4 == 0
    q, G, c = ops.drsom_reduce(views[0], views[1], views[2:], scalar(0.5, torch.float32, "cuda"), True)
    q_ref, G_ref, c_ref = oracle_reduce(views[0], views[1], views[2:],
                                        scalar(0.5, torch.float32, "cpu"), True)
    assert rel_err(q.cpu(), q_ref) < 1e-5 and rel_err(G.cpu(), G_ref) < 1e-5
    x = views[0]
    orig = x.clone()
    x0 = torch.empty_like(x)
    ops.drsom_perturb(x, x0, views[1], scalar(2.0, torch.float32, "cuda"), True)
    assert torch.equal(x0, orig)
    assert rel_err(x.cpu(), orig.double().cpu() + 2 * views[1].double().cpu()) < 1e-6


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS)
@pytest.mark.parametrize("with_gram", [False, True])
def test_opcheck(device, dtype, with_gram):
    n, k = 103, 3
    gp, g, x, x0, p, *V = vectors(n, 5 + k, dtype, device, seed=1)
    t = scalar(0.1, dtype, device)
    alpha = torch.tensor([1.0, -2.0, 0.5], dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.soo.drsom_reduce.default, (gp, g, V, t, with_gram))
    torch.library.opcheck(torch.ops.soo.drsom_perturb.default, (x, x0, V[0], t, with_gram))
    torch.library.opcheck(torch.ops.soo.drsom_update.default, (x, p, V, alpha))


@requires_ext
def test_torch_compile_traces_the_ops():
    n, k = 64, 2
    gp, g, x, *V = vectors(n, 3 + k, torch.float32, "cpu", seed=2)
    t = scalar(0.01, torch.float32, "cpu")

    def step(x, gp, g, V0, V1, t):
        x0 = torch.empty_like(x)
        torch.ops.soo.drsom_perturb(x, x0, V0, t, True)
        q, G, c = torch.ops.soo.drsom_reduce(gp, g, [V0, V1], t, True)
        alpha = torch.linalg.solve(G + torch.eye(2), -c) + 0 * q
        p = torch.empty_like(x)
        torch.ops.soo.drsom_update(x0, p, [V0, V1], alpha)
        return x0, p, q

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x_c, x_e = x.clone(), x.clone()
    out_c = compiled(x_c, gp, g, V[0], V[1], t)
    out_e = step(x_e, gp, g, V[0], V[1], t)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x_c, x_e)


def _bad_case(bad):
    n, k = 10, 2
    x, x0, v, g, gp = (torch.zeros(n) for _ in range(5))
    V = [torch.zeros(n) for _ in range(k)]
    t = torch.tensor(0.1)
    alpha = torch.zeros(k)
    if bad == "dims":
        g = torch.zeros(2, 5)
    elif bad == "dtype-mix":
        gp = gp.double()
    elif bad == "dtype-mix-t":
        t = t.double()
    elif bad == "fp16":
        g, gp, V, t = g.half(), gp.half(), [vj.half() for vj in V], t.half()
    elif bad == "device-mix":
        t = torch.tensor(0.1, device="meta")
    elif bad == "length":
        V = [torch.zeros(n), torch.zeros(n + 1)]
    elif bad == "k0":
        V = []
    elif bad == "k9":
        V = [torch.zeros(n) for _ in range(9)]
    elif bad == "t-not-0-dim":
        t = torch.tensor([0.1])
    elif bad == "noncontiguous":
        V = [torch.zeros(2 * n)[::2], torch.zeros(n)]
    return g, gp, V, t, x, x0, v, alpha


BAD = ["dims", "dtype-mix", "dtype-mix-t", "fp16", "device-mix", "length", "k0", "k9",
       "t-not-0-dim", "noncontiguous"]
MESSAGES = {"dims": "1-D", "dtype-mix": "dtype", "dtype-mix-t": "dtype", "fp16": "float32 or float64",
            "device-mix": "one device", "length": "length", "k0": "1 to 8", "k9": "1 to 8",
            "t-not-0-dim": "0-dim", "noncontiguous": "contiguous"}


@pytest.mark.parametrize("bad", BAD)
def test_bad_arguments_are_refused_by_the_wrappers(bad):
    g, gp, V, t, x, x0, v, alpha = _bad_case(bad)
    with pytest.raises(RuntimeError, match=MESSAGES[bad]):
        ops.drsom_reduce(gp, g, V, t, True)


@pytest.mark.parametrize("bad", ["dims", "dtype-mix-t", "device-mix", "t-not-0-dim", "length"])
def test_bad_perturb_arguments_are_refused(bad):
    n = 10
    x, x0, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    t = torch.tensor(0.1)
    if bad == "dims":
        v = torch.zeros(2, 5)
    elif bad == "dtype-mix-t":
        t = t.double()
    elif bad == "device-mix":
        t = torch.tensor(0.1, device="meta")
    elif bad == "t-not-0-dim":
        t = torch.tensor([0.1])
    elif bad == "length":
        x0 = torch.zeros(n + 1)
    with pytest.raises(RuntimeError, match=MESSAGES[bad]):
        ops.drsom_perturb(x, x0, v, t, True)


@pytest.mark.parametrize("bad", ["k0", "k9", "alpha-len", "dtype-mix", "dims"])
def test_bad_update_arguments_are_refused(bad):
    n = 10
    x, p = torch.zeros(n), torch.zeros(n)
    V = [torch.zeros(n), torch.zeros(n)]
    alpha = torch.zeros(2)
    if bad == "k0":
        V, alpha = [], torch.zeros(0)
    elif bad == "k9":
        V, alpha = [torch.zeros(n) for _ in range(9)], torch.zeros(9)
    elif bad == "alpha-len":
        alpha = torch.zeros(3)
    elif bad == "dtype-mix":
        p = p.double()
    elif bad == "dims":
        x = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match={"alpha-len": "alpha"}.get(bad, MESSAGES.get(bad))):
        ops.drsom_update(x, p, V, alpha)


@requires_ext
@pytest.mark.parametrize("bad", ["dims", "dtype-mix", "dtype-mix-t", "fp16", "length", "k0", "k9",
                                 "t-not-0-dim", "noncontiguous"])
def test_bad_arguments_are_refused_by_the_kernels(bad):
    """The C++ checks, bypassing the Python wrapper."""
    g, gp, V, t, x, x0, v, alpha = _bad_case(bad)
    with pytest.raises(RuntimeError, match=MESSAGES[bad]):
        torch.ops.soo.drsom_reduce.default(gp, g, V, t, True)
    if bad in ("k0", "k9"):
        with pytest.raises(RuntimeError, match=MESSAGES[bad]):
            torch.ops.soo.drsom_update.default(x, torch.zeros(10), V, torch.zeros(len(V)))
    if bad == "t-not-0-dim":
        with pytest.raises(RuntimeError, match="0-dim"):
            torch.ops.soo.drsom_perturb.default(x, x0, v, t, True)


# ---------------------------------------------------------------------------------------------
# drsom_subproblem: the k x k trust-region step

def subproblem_oracle(Q, G, c, gamma):
    """The same step in the unscaled metric: the scaled Gram matrix plus sqrt(eps) I is
    G + sqrt(eps) diag(G); the generalized eigenvalues of (Q, that) by eig of its inverse times
    Q; alpha = -(Q + lambda G_reg)^-1 c."""
    dt = Q.dtype
    Q, G, c = Q.double().cpu(), G.double().cpu(), c.double().cpu()
    Q = (Q + Q.T) / 2
    G_reg = G + torch.finfo(dt).eps ** 0.5 * torch.diag(torch.diagonal(G))
    ev = torch.linalg.eigvals(torch.linalg.solve(G_reg, Q)).real
    lmin, lmax = ev.min().item(), ev.max().item()
    lb = max(-lmin, 1e-8)
    lam = gamma * (max(lb, lmax) + max(abs(lmin), abs(lmax))) + (1 - gamma) * lb
    alpha = -torch.linalg.solve(Q + lam * G_reg, c)
    pred = -(c @ alpha + 0.5 * alpha @ Q @ alpha)
    return torch.cat([alpha, pred.reshape(1)])


GAMMAS = [1e-6, 0.3, 5.0, 1e8]


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("gamma", GAMMAS)
def test_reference_subproblem_against_unscaled_oracle(k, gamma):
    for seed in range(3):
        Q, G, c = subproblem_inputs(k, torch.float64, "cpu", seed)
        out = reference.drsom_subproblem(Q, G, c, gamma)
        assert out.shape == (k + 4,)
        assert out[k + 1].item() == 1.0
        assert rel_err(out[:k + 1], subproblem_oracle(Q, G, c, gamma)) < 1e-8
        assert out[k].item() > 0  # lambda > lb: Q + lambda G is positive definite
        assert out[k + 2].item() == gamma  # no length limit: gamma as given
        alpha = out[:k]
        assert abs(out[k + 3].item() - math.sqrt(alpha @ G @ alpha)) <= 1e-10 * out[k + 3].item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-6)],
                         ids=DTYPE_IDS)
@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("gamma", GAMMAS)
def test_subproblem_matches_reference(device, dtype, tol, k, gamma):
    for seed in range(4):
        Q, G, c = subproblem_inputs(k, dtype, device, seed + 10)
        Q[0, -1] += 0.25 * Q[0, -1].abs()  # an unsymmetric Q is symmetrised
        out = ops.drsom_subproblem(Q, G, c, gamma)
        ref = reference.drsom_subproblem(Q.cpu(), G.cpu(), c.cpu(), gamma)
        assert out.shape == (k + 4,) and out.dtype == dtype and out.device == Q.device
        assert out[k + 1].item() == 1.0 and out[k + 2].item() == ref[k + 2].item()
        # (Q + lambda G) has condition ~1/gamma when Q is indefinite: rounding grows with it
        assert rel_err(out[:k + 1].cpu(), ref[:k + 1]) < tol * max(1.0, 1e-3 / gamma)
        assert rel_err(out[k + 3:].cpu(), ref[k + 3:]) < tol * max(1.0, 1e-3 / gamma)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-6)],
                         ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("gamma", [0.0, 1e-12, 0.3])
@pytest.mark.parametrize("fraction", [0.9, 1e-3, 0.0])
def test_subproblem_climbs_gamma_to_a_length_limit(device, dtype, tol, k, gamma, fraction):
    """gamma climbs by gamma_increase (from 1e-16 when it is 0) until the step is at most
    max_length: the first rung that fits (or the cap 1e16, for a limit of 0)."""
    for seed in range(3):
        Q, G, c = subproblem_inputs(k, dtype, device, seed + 20)
        # (at gamma = 0 an indefinite Q makes the system singular: the limit comes from 1e-12)
        free = reference.drsom_subproblem(Q.cpu(), G.cpu(), c.cpu(), gamma or 1e-12)
        limit = fraction * free[k + 3].item()
        out = ops.drsom_subproblem(Q, G, c, gamma, limit, 4.0)
        ref = reference.drsom_subproblem(Q.cpu(), G.cpu(), c.cpu(), gamma, limit, 4.0)
        used, length = ref[k + 2].item(), ref[k + 3].item()
        assert rel_err(out.cpu(), ref) < 10 * tol * max(1.0, 1e-3 / used)
        if fraction == 0.0:
            assert used == pytest.approx(1e16, rel=1e-7)
            continue
        assert length <= limit * (1 + 1e-12)
        rungs = 0 if used == gamma else round(math.log(used / max(gamma, 1e-16), 4)) + (gamma == 0)
        assert used == pytest.approx(max(gamma, 1e-16) * 4.0 ** (rungs - (gamma == 0)),
                                     rel=1e-12 if dtype == torch.float64 else 1e-6)
        if rungs:  # the rung below did not fit
            below = reference.drsom_subproblem(Q.cpu(), G.cpu(), c.cpu(),
                                               used / 4 if used / 4 >= 1e-16 else 0.0)
            assert below[k + 3].item() > limit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", ["nan-Q", "inf-c", "zero-direction", "inf-G"])
def test_subproblem_flags_a_non_finite_model(device, dtype, bad):
    Q, G, c = subproblem_inputs(3, dtype, device, seed=3)
    if bad == "nan-Q":
        Q[1, 2] = float("nan")
    elif bad == "inf-c":
        c[0] = float("inf")
    elif bad == "zero-direction":
        G[2, :] = 0
        G[:, 2] = 0
    else:
        G[1, 1] = float("inf")
    assert ops.drsom_subproblem(Q, G, c, 0.5)[4].item() == 0.0
    assert reference.drsom_subproblem(Q.cpu(), G.cpu(), c.cpu(), 0.5)[4].item() == 0.0


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_subproblem_opcheck(device, dtype, k):
    Q, G, c = subproblem_inputs(k, dtype, device, seed=4)
    for max_length in (math.inf, 1e-3):
        torch.library.opcheck(torch.ops.soo.drsom_subproblem.default,
                              (Q, G, c, 0.1, max_length, 5.0))


SUBPROBLEM_BAD = {"k0": "1 <= k <= 8", "k9": "1 <= k <= 8", "not-square": "1 <= k <= 8",
                  "G-shape": "G must have", "c-length": "c must be", "fp16": "float32 or float64",
                  "dtype-mix": "no dtype mix", "gamma-negative": "gamma", "gamma-nan": "gamma",
                  "max_length-negative": "max_length", "max_length-nan": "max_length",
                  "gamma_increase-1": "gamma_increase", "gamma_increase-inf": "gamma_increase"}


def _subproblem_bad_case(bad):
    Q, G, c, gamma, max_length, increase = torch.eye(3), torch.eye(3), torch.ones(3), 0.5, 1.0, 5.0
    if bad == "k0":
        Q, G, c = torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0)
    elif bad == "k9":
        Q, G, c = torch.eye(9), torch.eye(9), torch.ones(9)
    elif bad == "not-square":
        Q = torch.zeros(3, 2)
    elif bad == "G-shape":
        G = torch.eye(2)
    elif bad == "c-length":
        c = torch.ones(2)
    elif bad == "fp16":
        Q, G, c = Q.half(), G.half(), c.half()
    elif bad == "dtype-mix":
        G = G.double()
    elif bad == "gamma-negative":
        gamma = -1.0
    elif bad == "gamma-nan":
        gamma = float("nan")
    elif bad == "max_length-negative":
        max_length = -1.0
    elif bad == "max_length-nan":
        max_length = float("nan")
    elif bad == "gamma_increase-1":
        increase = 1.0
    else:
        increase = math.inf
    return Q, G, c, gamma, max_length, increase


@pytest.mark.parametrize("bad", SUBPROBLEM_BAD)
def test_bad_subproblem_arguments_are_refused(bad):
    args = _subproblem_bad_case(bad)
    with pytest.raises(RuntimeError, match=SUBPROBLEM_BAD[bad]):
        ops.drsom_subproblem(*args)
    if ops.extension_loaded():  # the C++ checks, bypassing the wrapper
        with pytest.raises(RuntimeError, match=SUBPROBLEM_BAD[bad]):
            torch.ops.soo.drsom_subproblem.default(*args)
