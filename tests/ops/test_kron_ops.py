"""The Kronecker-factor ops (soo::kron_factor_update_, kron_damped_inverse, kron_eigh,
kron_inverse_root, kfac_precondition_eigen) against their references and fp64 oracles.

Errors are relative Frobenius norms ``||out - ref|| / ||ref||`` against the reference run in
float64 on the same (rounded) input.  Tolerances per dtype (float32 / float64):

* well-conditioned factors (A = X^T X / N + 0.1 I): 1e-4 / 1e-10 (inverse, root, eigh
  reconstruction, preconditioning);
* ill-conditioned factors (eigenvalues 1e-8..1) with damping / epsilon 1e-3: 2e-3 / 1e-9
  (cond(A + 1e-3 I) ~ 1e3);
* inverse p-th roots: ||X^p (A + eps I) - I||_F / sqrt(n) <= 5e-3 (float32, tol 1e-6 is below its
  rounding floor so the iteration stops on growth) / 1e-7 (float64, tol 1e-10) for Newton, and
  1e-3 / 1e-9 for eigh;
* kron_factor_update_: F exactly symmetric, 1e-6 / 1e-13 from the reference.
"""
import math

import pytest
import torch

from soo_ext import ops, reference

from op_inputs import ill_conditioned, rank_deficient, spd

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]
SMALL = [1, 2, 7, 33]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
ILL_TOL = {torch.float32: 2e-3, torch.float64: 1e-9}
ROOT_TOL = {"newton": {torch.float32: 5e-3, torch.float64: 1e-7},
            "eigh": {torch.float32: 1e-3, torch.float64: 1e-9}}
NEWTON_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def sizes_for_test():
    # the big sizes are sampled (one each) to keep the module fast on a 2-core CPU
    return SMALL + [129]


# ---------------------------------------------------------------------------------------------
# kron_damped_inverse

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", sizes_for_test())
def test_damped_inverse_matches_fp64_oracle(device, dtype, n):
    A = spd((3,), n, dtype, device, seed=n)
    X, status = ops.kron_damped_inverse(A, 1e-3)
    X_ref, st_ref = reference.kron_damped_inverse(A.double(), 1e-3)
    assert X.dtype == dtype and X.shape == A.shape and status.dtype == torch.int32
    assert status.tolist() == [0, 0, 0] and st_ref.tolist() == [0, 0, 0]
    assert rel_err(X, X_ref) <= TOL[dtype]
    # and against the reference in the same dtype (same algorithm)
    assert rel_err(X, reference.kron_damped_inverse(A, 1e-3)[0]) <= TOL[dtype]


@pytest.mark.parametrize("n", [256, 512])
def test_damped_inverse_big(n):
    A = spd((2,), n, torch.float32, "cpu", seed=n)
    X, status = ops.kron_damped_inverse(A, 1e-3)
    assert status.tolist() == [0, 0]
    assert rel_err(X, reference.kron_damped_inverse(A.double(), 1e-3)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_damped_inverse_ill_conditioned(device, dtype):
    A = ill_conditioned((4,), 33, dtype, device)
    X, status = ops.kron_damped_inverse(A, 1e-3)
    assert status.tolist() == [0] * 4
    assert rel_err(X, reference.kron_damped_inverse(A.double(), 1e-3)[0]) <= ILL_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_damped_inverse_rank_deficient_undamped_falls_back(device, dtype):
    """Undamped rank-deficient factors: Cholesky fails (or not) exactly as in the reference; a
    failed one is retried in float64 with the scale-aware damping and gets status 1."""
    A = rank_deficient((3,), 33, dtype, device)
    X, status = ops.kron_damped_inverse(A, 0.0)
    X_ref, st_ref = reference.kron_damped_inverse(A, 0.0)
    assert torch.equal(status.cpu(), st_ref.cpu())
    assert set(status.tolist()) <= {0, 1}
    A64 = A.double().cpu()
    eps64 = torch.finfo(torch.float64).eps
    for b in range(3):
        if status[b] == 1:  # the float64 retry: finite, as accurate as its condition allows
            shift = torch.finfo(torch.float32).eps * A64[b].trace().abs() / A64.shape[-1]
            cond = torch.linalg.cond(A64[b] + shift * torch.eye(A64.shape[-1], dtype=torch.float64))
            assert torch.isfinite(X[b]).all()
            assert rel_err(X[b], X_ref[b]) <= TOL[dtype] + 10 * eps64 * cond.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_damped_inverse_nan_matrix_fails_alone(device, dtype):
    A = spd((4,), 7, dtype, device)
    A[2, 3, 1] = float("nan")
    X, status = ops.kron_damped_inverse(A, 1e-3)
    assert status.tolist() == [0, 0, 2, 0]
    assert torch.equal(X[2], torch.zeros_like(X[2]))
    keep = [0, 1, 3]
    X_alone, _ = ops.kron_damped_inverse(A[keep], 1e-3)
    assert rel_err(X[keep], X_alone) <= TOL[dtype]


# ---------------------------------------------------------------------------------------------
# kron_eigh

def check_eigh(A, d, Q, tol):
    n = A.shape[-1]
    recon = (Q * d[..., None, :]) @ Q.mT
    assert rel_err(recon, A.clamp_min(-math.inf)) <= tol
    eye = torch.eye(n, dtype=torch.float64)
    assert rel_err(Q.mT.double().cpu() @ Q.double().cpu(), eye.expand(Q.shape)) <= tol
    assert bool((d >= 0).all()) and bool((d[..., 1:] >= d[..., :-1]).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", sizes_for_test())
def test_eigh_matches_reference(device, dtype, n):
    A = spd((3,), n, dtype, device, seed=n)
    d, Q, status = ops.kron_eigh(A)
    assert d.shape == A.shape[:-1] and Q.shape == A.shape and status.tolist() == [0, 0, 0]
    check_eigh(A, d, Q, TOL[dtype])
    d_ref, _, _ = reference.kron_eigh(A.double())
    assert rel_err(d, d_ref) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_ill_conditioned_and_rank_deficient(device, dtype):
    for A in (ill_conditioned((3,), 33, dtype, device), rank_deficient((3,), 33, dtype, device)):
        d, Q, status = ops.kron_eigh(A)
        assert status.tolist() == [0, 0, 0]
        check_eigh(A, d, Q, ILL_TOL[dtype])
        d_ref = reference.kron_eigh(A.double())[0]
        assert (d.double().cpu() - d_ref.cpu()).abs().max() <= ILL_TOL[dtype] * d_ref.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_eigh_nan_matrix_fails_alone(device, dtype):
    A = spd((3,), 9, dtype, device)
    A[0, 0, 0] = float("nan")
    d, Q, status = ops.kron_eigh(A)
    assert status.tolist() == [2, 0, 0]
    assert torch.equal(d[0], torch.zeros_like(d[0]))
    assert torch.equal(Q[0], torch.eye(9, dtype=dtype, device=device))
    check_eigh(A[1:], d[1:], Q[1:], TOL[dtype])
    _, _, st_ref = reference.kron_eigh(A)
    assert st_ref.tolist() == [2, 0, 0]


# ---------------------------------------------------------------------------------------------
# kron_inverse_root

def root_residual(X, A, p, eps):
    """max over matrices of ||X^p (A + eps I) - I||_F / sqrt(n), in float64."""
    X, A = X.double().cpu(), A.double().cpu()
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    R = torch.linalg.matrix_power(X, p) @ (A + eps * eye) - eye
    return (torch.linalg.matrix_norm(R) / math.sqrt(n)).max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["newton", "eigh"])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 129])
def test_inverse_root_residual_and_reference(device, dtype, method, p, n):
    if n == 129 and p != 4:
        pytest.skip("sampled: the big size with p = 4 only")
    A = spd((3,), n, dtype, device, seed=n + p)
    tol = NEWTON_TOL[dtype]
    X, status = ops.kron_inverse_root(A, p, 1e-3, method, 100, tol)
    assert X.shape == A.shape and status.dtype == torch.int32
    assert set(status.tolist()) <= {0, 1}  # 1: float32 stopped at its rounding floor
    if method == "eigh" or dtype == torch.float64:
        assert status.tolist() == [0, 0, 0]
    assert root_residual(X, A, p, 1e-3) <= ROOT_TOL[method][dtype]
    X_ref, _ = reference.kron_inverse_root(A.double(), p, 1e-3, "eigh")
    assert rel_err(X, X_ref) <= ROOT_TOL[method][dtype]
    X_same, st_same = reference.kron_inverse_root(A, p, 1e-3, method, 100, tol)
    assert rel_err(X, X_same) <= ROOT_TOL[method][dtype]


@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_inverse_root_big(method):
    A = spd((1,), 512 if method == "eigh" else 256, torch.float64, "cpu", seed=5)
    X, status = ops.kron_inverse_root(A, 4, 1e-3, method, 100, 1e-10)
    assert status.tolist() == [0]
    assert root_residual(X, A, 4, 1e-3) <= ROOT_TOL[method][torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_inverse_root_ill_conditioned(device, dtype, method):
    A = ill_conditioned((3,), 33, dtype, device)
    X, status = ops.kron_inverse_root(A, 4, 1e-3, method, 100, NEWTON_TOL[dtype])
    assert set(status.tolist()) <= {0, 1}
    assert root_residual(X, A, 4, 1e-3) <= ROOT_TOL[method][dtype]
    X_ref, _ = reference.kron_inverse_root(A.double(), 4, 1e-3, "eigh")
    assert rel_err(X, X_ref) <= ILL_TOL[dtype] * 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["newton", "eigh"])
def test_inverse_root_nan_matrix_fails_alone(device, method):
    A = spd((3,), 7, torch.float64, device)
    A[1] = float("nan")
    X, status = ops.kron_inverse_root(A, 4, 1e-3, method, 100, 1e-10)
    X_ref, st_ref = reference.kron_inverse_root(A, 4, 1e-3, method, 100, 1e-10)
    assert status.tolist() == st_ref.tolist() == [0, 2, 0]
    assert torch.equal(X[1], torch.zeros_like(X[1]))
    assert rel_err(X[[0, 2]], X_ref[[0, 2]]) <= 1e-10


def test_inverse_root_newton_budget_gives_fallback():
    A = spd((2,), 7, torch.float64, "cpu")
    X, status = ops.kron_inverse_root(A, 4, 1e-3, "newton", 2, 1e-12)
    X_ref, st_ref = reference.kron_inverse_root(A, 4, 1e-3, "newton", 2, 1e-12)
    assert status.tolist() == st_ref.tolist() == [1, 1]
    assert rel_err(X, X_ref) <= 1e-12


# ---------------------------------------------------------------------------------------------
# kfac_precondition_eigen

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("o,i", [(1, 1), (5, 7), (33, 17)])
def test_kfac_precondition_equals_explicit_formula(device, dtype, o, i):
    """V = (G (x) A + damping I)^{-1} vec(grad) (row-major vec), by the eigenbasis formula."""
    G, A = spd((2,), o, torch.float64, "cpu", seed=1), spd((2,), i, torch.float64, "cpu", seed=2)
    grad = torch.randn(2, o, i, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dG, QG = torch.linalg.eigh(G)
    dA, QA = torch.linalg.eigh(A)
    damping = 1e-2
    args = [t.to(dtype=dtype, device=device) for t in (grad, QG, dG, QA, dA)]
    V = ops.kfac_precondition_eigen(*args, damping)
    assert V.shape == grad.shape and V.dtype == dtype
    explicit = torch.stack([
        torch.linalg.solve(torch.kron(G[b], A[b]) + damping * torch.eye(o * i, dtype=torch.float64),
                           grad[b].reshape(-1)).reshape(o, i) for b in range(2)])
    assert rel_err(V, explicit) <= TOL[dtype] * 10
    assert rel_err(V, reference.kfac_precondition_eigen(*[a.double() for a in args], damping)) \
        <= TOL[dtype]
    # unbatched
    V0 = ops.kfac_precondition_eigen(*[a[0] for a in args], damping)
    assert rel_err(V0, explicit[0]) <= TOL[dtype] * 10


# ---------------------------------------------------------------------------------------------
# kron_factor_update_

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xdtype", ["same", torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_factor_update_symmetric_and_matches_reference(device, dtype, xdtype, batch):
    gen = torch.Generator().manual_seed(0)
    d, N = 33, 20
    F0 = torch.randn(*batch, d, d, generator=gen, dtype=torch.float64)
    F0 = (F0 @ F0.mT).to(dtype=dtype, device=device)
    X = torch.randn(*batch, N, d, generator=gen, dtype=torch.float64)
    X = X.to(dtype=dtype if xdtype == "same" else xdtype, device=device)
    F, F_ref = F0.clone(), F0.clone()
    ops.kron_factor_update_(F, X, 0.95, 0.05 / N)
    reference.kron_factor_update_(F_ref, X, 0.95, 0.05 / N)
    assert torch.equal(F, F.mT)
    tol = {torch.float32: 1e-6, torch.float64: 1e-13}[dtype]
    assert rel_err(F, F_ref) <= tol
    oracle = 0.95 * F0.double() + (0.05 / N) * X.double().mT @ X.double()
    assert rel_err(F, oracle) <= tol


def test_factor_update_non_contiguous_F():
    F_big = torch.randn(7, 14, dtype=torch.float64)
    F_big = F_big.mT @ F_big
    F = F_big[::2, ::2]  # non-contiguous [7, 7]
    F_ref = F.clone()
    X = torch.randn(5, 7, dtype=torch.float64)
    ops.kron_factor_update_(F, X, 0.5, 2.0)
    reference.kron_factor_update_(F_ref, X, 0.5, 2.0)
    assert rel_err(F, F_ref) <= 1e-14 and torch.equal(F, F.mT)


# ---------------------------------------------------------------------------------------------
# shapes, opcheck, argument checks

@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_and_multi_batch_shapes(device):
    A2 = spd((), 5, torch.float64, device)
    X, st = ops.kron_damped_inverse(A2, 1e-3)
    assert X.shape == (5, 5) and st.shape == () and st.item() == 0
    d, Q, st = ops.kron_eigh(A2)
    assert d.shape == (5,) and Q.shape == (5, 5) and st.shape == ()
    X, st = ops.kron_inverse_root(A2, 2, 1e-3)
    assert X.shape == (5, 5) and st.shape == ()
    A4 = spd((2, 3), 4, torch.float64, device)
    X, st = ops.kron_damped_inverse(A4, 1e-3)
    assert X.shape == (2, 3, 4, 4) and st.shape == (2, 3)
    assert rel_err(X, reference.kron_damped_inverse(A4, 1e-3)[0]) <= 1e-12
    d, Q, st = ops.kron_eigh(A4)
    assert d.shape == (2, 3, 4) and st.shape == (2, 3)
    X, st = ops.kron_inverse_root(A4, 4, 1e-3, "eigh")
    assert rel_err(X, reference.kron_inverse_root(A4, 4, 1e-3, "eigh")[0]) <= 1e-12
    # an empty bucket, and 0 x 0 matrices
    X, st = ops.kron_damped_inverse(A4[:0], 1e-3)
    assert X.shape == (0, 3, 4, 4) and st.shape == (0, 3)
    A0 = A4[:, :, :0, :0]
    for impl in (ops, reference):
        X, st = impl.kron_damped_inverse(A0, 1e-3)
        assert X.shape == (2, 3, 0, 0) and st.tolist() == [[0] * 3] * 2
        d, Q, st = impl.kron_eigh(A0)
        assert d.shape == (2, 3, 0) and Q.shape == (2, 3, 0, 0) and st.tolist() == [[0] * 3] * 2
        X, st = impl.kron_inverse_root(A0, 4, 1e-3, "eigh")
        assert X.shape == (2, 3, 0, 0) and st.tolist() == [[0] * 3] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_cholesky_and_eigh_read_the_lower_triangle(device):
    """As torch.linalg (and the references): finite garbage above the diagonal changes nothing
    in the damped inverse, eigh and the eigh root."""
    A = spd((3,), 17, torch.float64, device)
    gen = torch.Generator().manual_seed(1)
    junk = torch.triu(torch.randn(A.shape, generator=gen, dtype=A.dtype), diagonal=1)
    B = A + 5 * junk.to(device)
    for impl in (ops, reference):
        X_A = ops.kron_damped_inverse(A, 1e-3)[0]
        assert rel_err(impl.kron_damped_inverse(B, 1e-3)[0], X_A) <= 1e-12
        d, Q, st = impl.kron_eigh(B)
        assert st.tolist() == [0, 0, 0]
        check_eigh(A, d, Q, 1e-12)
        X = impl.kron_inverse_root(B, 4, 1e-3, "eigh")[0]
        assert rel_err(X, reference.kron_inverse_root(A, 4, 1e-3, "eigh")[0]) <= 1e-12


def test_thread_count_does_not_change_results():
    """A bucket is spread over the threads (LAPACK single-threaded in each), a lone matrix lets
    LAPACK thread: both agree with one thread."""
    A = spd((5,), 65, torch.float64, "cpu")
    A[3, 2, 1] = float("nan")

    def run():
        out = {}
        for name, stack in (("bucket", A), ("lone", A[:1])):
            X, st_inv = ops.kron_damped_inverse(stack, 1e-3)
            d, Q, st_eigh = ops.kron_eigh(stack)
            R, st_root = ops.kron_inverse_root(stack, 4, 1e-6, "eigh")
            out[name] = (X, (Q * d[..., None, :]) @ Q.mT, R, st_inv, st_eigh, st_root)
        return out

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(old)
    assert one["bucket"][3].tolist() == [0, 0, 0, 2, 0]
    for name in one:
        for a, b in zip(one[name][:3], two[name][:3]):
            assert rel_err(torch.nan_to_num(a), torch.nan_to_num(b)) <= 1e-12
        for a, b in zip(one[name][3:], two[name][3:]):
            assert torch.equal(a, b)


requires_ext = pytest.mark.skipif(not ops.extension_loaded(),
                                  reason="the compiled extension is not loaded")


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    A = spd((2,), 6, torch.float64, device)
    G = spd((2,), 4, torch.float64, device)
    dG, QG = torch.linalg.eigh(G)
    dA, QA = torch.linalg.eigh(A)
    grad = torch.randn(2, 4, 6, dtype=torch.float64, device=device)
    X = torch.randn(2, 3, 6, dtype=torch.float64, device=device)
    cases = [
        (torch.ops.soo.kron_factor_update_.default, (A.clone(), X, 0.9, 0.1)),
        (torch.ops.soo.kron_damped_inverse.default, (A, 1e-3)),
        (torch.ops.soo.kron_eigh.default, (A,)),
        (torch.ops.soo.kron_inverse_root.default, (A, 4, 1e-3, "newton", 50, 1e-10)),
        (torch.ops.soo.kron_inverse_root.default, (A, 2, 1e-3, "eigh", 50, 1e-10)),
        (torch.ops.soo.kfac_precondition_eigen.default, (grad, QG, dG, QA, dA, 1e-3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_bad_arguments_raise():
    A = spd((2,), 4, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="square"):
        ops.kron_damped_inverse(torch.zeros(3, 4, dtype=torch.float64), 1e-3)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.kron_eigh(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="damping must be >= 0"):
        ops.kron_damped_inverse(A, -1.0)
    with pytest.raises(RuntimeError, match="method must be 'newton' or 'eigh'"):
        ops.kron_inverse_root(A, 4, 1e-3, "qr")
    with pytest.raises(RuntimeError, match="p must be >= 1"):
        ops.kron_inverse_root(A, 0, 1e-3)
    with pytest.raises(RuntimeError, match="epsilon"):
        ops.kron_inverse_root(A, 2, -1.0)
    with pytest.raises(RuntimeError, match="X must be"):
        ops.kron_factor_update_(A.clone(), torch.zeros(2, 3, 5, dtype=torch.float64), 0.9, 0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.kron_factor_update_(A.float(), torch.zeros(2, 3, 4, dtype=torch.float64), 0.9, 0.1)
    grad = torch.zeros(2, 3, 4, dtype=torch.float64)
    d, Q, _ = ops.kron_eigh(A)
    with pytest.raises(RuntimeError, match="QG must be"):
        ops.kfac_precondition_eigen(grad, Q, d, Q, d, 1e-3)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.kfac_precondition_eigen(grad.float(), Q[:, :3, :3].float(), d[:, :3].float(), Q,
                                    d, 1e-3)
    if ops.extension_loaded():  # the C++ checks behind the wrappers say the same
        with pytest.raises(RuntimeError, match="method must be 'newton' or 'eigh'"):
            torch.ops.soo.kron_inverse_root(A, 4, 1e-3, "qr", 10, 1e-6)
        with pytest.raises(RuntimeError, match="square"):
            torch.ops.soo.kron_eigh(torch.zeros(3, 4, dtype=torch.float64))
