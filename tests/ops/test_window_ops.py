"""The window ops (soo::window_gram, window_combine) against their float64 references.

Bounds from rounding analysis, the same on every CPU: window and vector entries are widened
exactly to float64 (float32 and bfloat16 products are exact there), so a dot product of n terms
differs from the reference's (another float64 summation order) by at most 2 gamma_n of the sum
of the terms' magnitudes, gamma_n = n eps / (1 - n eps) <= 2 n eps; float64 inputs add one
rounding per product.  A combination is a float64 sum of rows + 1 products rounded once to the
output's dtype: one ulp of the output plus the float64 bound."""
import pytest
import torch

from soo_ext import ops, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS64 = torch.finfo(torch.float64).eps
requires_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")

# (window dtype, vector dtype)
STORAGE = {"fp64": (torch.float64, torch.float64), "fp32": (torch.float32, torch.float32),
           "bf16": (torch.bfloat16, torch.float32)}


def window_inputs(m, n, k, storage, device, seed=0):
    wt, xt = STORAGE[storage]
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64).to(wt).to(device)
    X = [torch.randn(n, generator=gen, dtype=torch.float64).to(xt).to(device) for _ in range(k)]
    return W, X


def dot_bound(A, B, n):
    """4 (n + 2) eps |A| |B|^T: twice gamma_(n+1) of the magnitudes (both sides' roundings)."""
    return 4 * (n + 2) * EPS64 * (A.double().abs() @ B.double().abs().T) + 1e-300


CASES = [  # m, n, rows, k, full, storage
    (1, 0, 1, 1, True, "fp32"), (1, 1, 1, 2, True, "fp64"), (3, 7, 2, 3, True, "bf16"),
    (4, 1001, 4, 0, True, "fp32"), (4, 1001, 0, 2, True, "fp32"), (5, 2049, 3, 8, False, "fp32"),
    (6, 4097, 6, 1, True, "fp64"), (33, 1001, 20, 2, True, "bf16"), (33, 100_003, 33, 2, False, "fp32"),
    (129, 65, 129, 1, True, "fp32"), (512, 33, 300, 2, True, "fp64"), (2, 1_000_000, 2, 2, True, "fp32"),
    (7, 2053, 5, 5, False, "bf16"),  # odd k against odd rows: vector pairs, row pairs, a last row
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,rows,k,full,storage", CASES)
def test_window_gram_against_the_reference(device, m, n, rows, k, full, storage):
    W, X = window_inputs(m, n, k, storage, device, seed=m + n)
    G, D = ops.window_gram(W, X, rows, full)
    Gr, Dr = reference.window_gram(W.cpu(), [x.cpu() for x in X], rows, full)
    assert G.dtype == D.dtype == torch.float64
    assert G.shape == ((m, m) if full else (0, 0)) and D.shape == (m, k)
    Wv = W.cpu()[:rows]
    if k:
        Xs = torch.stack([x.cpu() for x in X])
        assert ((D.cpu()[:rows] - Dr[:rows]).abs() <= dot_bound(Wv, Xs, n)).all()
    assert not D.cpu()[rows:].any()  # rows not filled: zero
    if full:
        assert ((G.cpu()[:rows, :rows] - Gr[:rows, :rows]).abs() <= dot_bound(Wv, Wv, n)).all()
        assert torch.equal(G, G.T)  # exactly symmetric
        assert not G.cpu()[rows:].any() and not G.cpu()[:, rows:].any()


COMBINE_CASES = [  # m, n, rows, with_base, storage, out is base
    (1, 0, 1, True, "fp32", False), (1, 1, 1, True, "fp64", True), (3, 7, 2, False, "bf16", False),
    (4, 1001, 0, True, "fp32", True), (33, 4097, 20, True, "bf16", False),
    (33, 4097, 20, True, "bf16", True), (64, 100_003, 64, True, "fp32", False),
    (512, 65, 512, True, "fp64", True), (2, 1_000_000, 2, True, "fp32", True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,rows,with_base,storage,alias", COMBINE_CASES)
def test_window_combine_against_the_reference(device, m, n, rows, with_base, storage, alias):
    W, (base,) = window_inputs(m, n, 1, storage, device, seed=m + n + 1)
    gen = torch.Generator().manual_seed(7)
    coef = torch.randn(m, generator=gen, dtype=torch.float64).to(device)
    base_coef = torch.tensor(-0.75, dtype=torch.float64, device=device)
    args = (base, base_coef) if with_base else (None, None)
    want = torch.empty(n, dtype=base.dtype)
    reference.window_combine(want, W.cpu(), coef.cpu(), rows,
                             *(a.cpu() if a is not None else None for a in args))
    magnitude = coef.cpu()[:rows].abs() @ W.cpu()[:rows].double().abs()
    if with_base:
        magnitude = magnitude + 0.75 * base.cpu().double().abs()  # before out overwrites it
    out = base if alias else torch.full_like(base, float("nan"))
    ops.window_combine(out, W, coef, rows, *args)
    bound = torch.finfo(want.dtype).eps * want.double().abs() + 4 * (m + 3) * EPS64 * magnitude
    assert ((out.cpu().double() - want.double()).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_window_combine_refuses_an_out_inside_the_window(device):
    W, _ = window_inputs(3, 10, 0, "fp32", device)
    coef = torch.ones(3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="overlap"):
        ops.window_combine(W[1], W, coef, 3)


@pytest.mark.parametrize("bad, match", [
    (lambda W, X, c, o: ops.window_gram(W[0], X, 1), "W must be an"),
    (lambda W, X, c, o: ops.window_gram(W, X * 5, 1), "0 to 8 vectors"),
    (lambda W, X, c, o: ops.window_gram(W, X, 4), "rows must be in"),
    (lambda W, X, c, o: ops.window_gram(W, [x.double() for x in X], 1), "not allowed"),
    (lambda W, X, c, o: ops.window_gram(W, [X[0][:-1]], 1), "length"),
    (lambda W, X, c, o: ops.window_combine(o, W, c.float(), 1), "float64"),
    (lambda W, X, c, o: ops.window_combine(o, W, c, 1, X[0], None), "go together"),
    (lambda W, X, c, o: ops.window_combine(o.double(), W, c, 1), "not allowed"),
    # one flaw in an otherwise common call (the wrappers' fast path must not let it through)
    (lambda W, X, c, o: ops.window_gram(W, [X[0], X[1].double()], 1), "dtype"),
    (lambda W, X, c, o: ops.window_gram(W, [X[0], torch.randn(20)[::2]], 1), "contiguous"),
    (lambda W, X, c, o: ops.window_gram(W.T.contiguous().T, X, 1), "contiguous"),
    (lambda W, X, c, o: ops.window_gram(W.double(), X, 1), "not allowed"),
    (lambda W, X, c, o: ops.window_gram(W, X, -1), "rows must be in"),
    (lambda W, X, c, o: ops.window_combine(o, W, c, 4), "rows must be in"),
    (lambda W, X, c, o: ops.window_combine(o, W, c[:2], 1), "float64"),
    (lambda W, X, c, o: ops.window_combine(o[:9], W, c, 1), "length"),
    (lambda W, X, c, o: ops.window_combine(o, W, c, 1, X[0].double(), c[0]), "dtype"),
    (lambda W, X, c, o: ops.window_combine(o, W, c, 1, X[0], c[:1]), "0-dim"),
    (lambda W, X, c, o: ops.window_combine(o, W, c, 1, X[0], c[0].float()), "0-dim"),
])
def test_bad_arguments_are_refused(bad, match):
    W, X = window_inputs(3, 10, 2, "fp32", "cpu")
    coef, out = torch.ones(3, dtype=torch.float64), torch.empty(10)
    with pytest.raises(RuntimeError, match=match):
        bad(W, X, coef, out)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", list(STORAGE))
def test_opcheck(device, storage):
    W, X = window_inputs(5, 37, 2, storage, device, seed=3)
    coef = torch.randn(5, dtype=torch.float64, device=device)
    bc = torch.tensor(2.0, dtype=torch.float64, device=device)
    out = torch.empty_like(X[0])
    torch.library.opcheck(torch.ops.soo.window_gram.default, (W, X, 4, True))
    torch.library.opcheck(torch.ops.soo.window_combine.default, (out, W, coef, 4, X[1], bc))
    torch.library.opcheck(torch.ops.soo.window_combine.default, (out, W, coef, 5, None, None))
