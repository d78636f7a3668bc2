"""The CUDA kernels of csrc/cuda, run on the CPU by the emulation of tests/cuda_emu, against the
CPU kernels (which the other test modules check against the fp64 references).

This tests what the CUDA sources compute -- indexing, vector and scalar paths, grid-stride loops,
block reductions, warp shuffles, barriers, the last-block elections, the host code's launch
configurations, its batched ATen calls and its host reads -- on a machine without a GPU.  It does
not test the hardware: memory ordering between blocks, timing, or cuBLAS / cuSOLVER (the ATen
calls of the CUDA host code run on the CPU here).  Inputs sit between NaN guard regions (a read
out of bounds poisons the result, a write out of bounds shows in the guard), aligned, misaligned,
or with one buffer misaligned (the emulation faults on a misaligned vector access, as the device
does).  Each kernel runs with 1 and 3 emulated SMs (different grids), the second time with its
blocks, warps and lanes in shuffled orders.
"""
import math

import pytest
import torch

import soo_ext
from soo_ext import ops

from conftest import rel_err
from op_inputs import (ill_conditioned, random_history, random_problem, rank_deficient, spd,
                       subproblem_inputs, vectors)
from test_all_finite_ops import DTYPE_IDS, DTYPES, finite_tensor
from test_window_ops import EPS64, STORAGE, dot_bound, window_inputs

import cuda_emu

pytestmark = [
    pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built"),
    pytest.mark.usefixtures("one_thread_per_module"),
]

# (emulated SMs, order seed): one block per SM for the capped grids, then three SMs with the
# blocks, warps and lanes in shuffled orders
DEVICE_CONFIGS = [(1, 0), (3, 7)]
CONFIG_IDS = ["1sm", "3sm-shuffled"]


@pytest.fixture(scope="module")
def emu():
    # at::empty returns NaN-filled memory (int: the max): a kernel reading a workspace entry
    # nobody wrote poisons its result instead of reading whatever the allocator left there
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield cuda_emu.load()
    torch.use_deterministic_algorithms(False)


@pytest.fixture(params=DEVICE_CONFIGS, ids=CONFIG_IDS)
def device_config(request, emu):
    cuda_emu.configure(*request.param)
    yield request.param
    cuda_emu.configure(2, 0)


PAD = 67  # guard elements on each side


def offsets(misalign: str, count: int) -> list[int]:
    """Element offsets of ``count`` buffers: all aligned, all misaligned, or only the last one
    misaligned (then only a per-buffer alignment test keeps the kernel off 16-byte loads)."""
    return {"none": [0] * count, "all": [1] * count, "last": [0] * (count - 1) + [1]}[misalign]


MISALIGN = ["none", "all", "last"]


def guarded(src: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``src`` inside a NaN-filled buffer, ``offset`` elements past an aligned start:
    ``(view, buffer)``."""
    start = (PAD // 8 + 1) * 8 + offset  # 16-byte aligned (bf16 and up) plus offset
    buf = torch.full((start + src.numel() + PAD,), math.nan, dtype=src.dtype)
    view = buf[start:start + src.numel()].view(src.shape)
    view.copy_(src)
    return view, buf


def assert_guards_intact(view: torch.Tensor, buf: torch.Tensor) -> None:
    start = view.storage_offset()
    assert buf[:start].isnan().all(), "written before the start of a buffer"
    assert buf[start + view.numel():].isnan().all(), "written past the end of a buffer"


# ---------------------------------------------------------------------------------------------
# the emulation itself

def test_emulation_runs_blocks_threads_and_shuffles(emu):
    cuda_emu.configure(2, 0)
    sums, order = torch.ops.soo_emu_config.selftest("block_sum")
    assert sums.tolist() == [256 * 255 // 2] * 4
    assert order.tolist() == [0, 1, 2, 3]
    orders = []
    for seed in (5, 6, 7):  # each launch draws its own permutation
        cuda_emu.configure(2, seed)
        sums, order = torch.ops.soo_emu_config.selftest("block_sum")
        assert sums.tolist() == [256 * 255 // 2] * 4 and sorted(order.tolist()) == [0, 1, 2, 3]
        orders.append(order.tolist())
    assert any(o != [0, 1, 2, 3] for o in orders)
    cuda_emu.configure(2, 0)


@pytest.mark.skipif(not soo_ext.build_info()["with_cuda"], reason="module built without CUDA")
def test_every_cuda_kernel_is_emulated(emu):
    """The ops the compiled module registers CUDA kernels for are exactly those the emulation
    builds (and --cuda-emu-as-cpu replaces): none is left out by the rewrite."""
    soo_ops = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
               if n.startswith("soo::")]
    with_cuda = {n for n in soo_ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"soo::{n}",
                                                                                       "CUDA")}
    assert with_cuda and with_cuda == set(cuda_emu.op_names())
    assert all(hasattr(emu, n) for n in with_cuda)


def test_emulation_starts_every_block_with_poisoned_shared_memory(emu):
    (values,) = torch.ops.soo_emu_config.selftest("stale_shared")
    assert values[0] == 1 and values[1:].isnan().all()


def test_emulation_lets_warps_race_through_shuffles(emu):
    """Warps are ordered only by __syncthreads: with shuffled orders, a write by one warp after a
    shuffle is seen, or not, by another warp reading after its shuffle."""
    seen = set()
    for seed in range(1, 9):
        cuda_emu.configure(1, seed)
        seen.add(torch.ops.soo_emu_config.selftest("warp_race")[0].item())
    cuda_emu.configure(2, 0)
    assert seen == {0.0, 1.0}


@pytest.mark.parametrize("case,message", [
    ("misaligned", "misaligned 16-byte vector access"),
    ("early_exit", "__syncthreads reached by some threads while others have left"),
    ("partial_warp", "partial warp"),
    ("uneven_barrier", "deadlock"),
    ("different_barriers", "threads at different __syncthreads"),
    ("shared_overflow", "write outside a __shared__ variable"),
    ("launch_bounds", r"block of 64 threads for __launch_bounds__\(32\)"),
    ("big_block", "block of 2048 threads"),
])
def test_emulation_reports_kernel_errors(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.soo_emu_config.selftest(case)
    # and recovers: the next launch runs normally
    sums, _ = torch.ops.soo_emu_config.selftest("block_sum")
    assert sums.tolist() == [256 * 255 // 2] * 4


# ---------------------------------------------------------------------------------------------
# DRSOM

DRSOM_DTYPES = [(torch.float64, 1e-13), (torch.float32, 1e-6)]
DRSOM_SIZES = [1, 3, 4, 5, 8, 1001, 4096, 65_539]


@pytest.mark.parametrize("dtype,tol", DRSOM_DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", DRSOM_SIZES)
@pytest.mark.parametrize("misalign", MISALIGN)
def test_drsom_perturb(emu, device_config, dtype, tol, n, misalign):
    x, x0, v = vectors(n, 3, dtype, "cpu", seed=n)
    t = torch.tensor(0.37, dtype=dtype)
    ox, ox0, ov = offsets(misalign, 3)
    for save in (True, False):
        xe, xbuf = guarded(x, ox)
        x0e, x0buf = guarded(x0 if not save else torch.zeros_like(x0), ox0)
        ve, _ = guarded(v, ov)
        xc, x0c = x.clone(), x0.clone() if not save else torch.zeros_like(x0)
        emu.drsom_perturb(xe, x0e, ve, t, save)
        torch.ops.soo.drsom_perturb(xc, x0c, v, t, save)
        assert torch.equal(xe, xc) and torch.equal(x0e, x0c)
        assert_guards_intact(xe, xbuf)
        assert_guards_intact(x0e, x0buf)


@pytest.mark.parametrize("dtype,tol", DRSOM_DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", DRSOM_SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("misalign", MISALIGN)
def test_drsom_reduce(emu, device_config, dtype, tol, n, k, misalign):
    gp, g, *V = vectors(n, k + 2, dtype, "cpu", seed=n + k)
    t = torch.tensor(1e-3, dtype=dtype)
    for with_gram in (False, True):
        gpe, ge, *Ve = [guarded(a, o)[0] for a, o in zip([gp, g] + V, offsets(misalign, k + 2))]
        out = emu.drsom_reduce(gpe, ge, Ve, t, with_gram)
        ref = torch.ops.soo.drsom_reduce(gp, g, V, t, with_gram)
        for o, r in zip(out, ref):
            assert o.shape == r.shape and o.dtype == r.dtype
            if r.numel():
                # both sum in float64, in different orders
                assert rel_err(o, r) <= tol, (with_gram, rel_err(o, r))
        if with_gram:
            assert torch.equal(out[1], out[1].T)  # G symmetric bit for bit


@pytest.mark.parametrize("dtype,tol", DRSOM_DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", DRSOM_SIZES)
@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("misalign", MISALIGN)
def test_drsom_update(emu, device_config, dtype, tol, n, k, misalign):
    x, p, *V = vectors(n, k + 2, dtype, "cpu", seed=3 * n + k)
    alpha = torch.linspace(-1.5, 2.0, k, dtype=dtype)
    ox, op, *oV = offsets(misalign, k + 2)
    for alias in (False, True):  # p may be one of the directions
        xe, xbuf = guarded(x, ox)
        Ve = [guarded(v, o)[0] for v, o in zip(V, oV)]
        pe, pbuf = (Ve[0], None) if alias else guarded(p, op)
        xc, Vc = x.clone(), [v.clone() for v in V]
        pc = Vc[0] if alias else p.clone()
        emu.drsom_update(xe, pe, Ve, alpha)
        torch.ops.soo.drsom_update(xc, pc, Vc, alpha)
        assert rel_err(pe, pc) <= tol and rel_err(xe, xc) <= tol
        assert_guards_intact(xe, xbuf)
        if pbuf is not None:
            assert_guards_intact(pe, pbuf)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_drsom_subproblem(emu, dtype, k):
    for seed in range(4):
        Q, G, c = subproblem_inputs(k, dtype, "cpu", seed)
        for gamma, max_length in ((1e-6, math.inf), (0.5, 1e-2)):
            out = emu.drsom_subproblem(Q, G, c, gamma, max_length, 5.0)
            ref = torch.ops.soo.drsom_subproblem(Q, G, c, gamma, max_length, 5.0)
            # the same scalar code (drsom_subproblem.h), here without FMA contraction on either
            # side (nvcc contracts on the device; the GPU tests allow for it)
            torch.testing.assert_close(out, ref, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                                       atol=0)


# ---------------------------------------------------------------------------------------------
# L-BFGS and dense BFGS

LBFGS_DTYPES = [(torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5),
                (torch.float32, torch.bfloat16, 1e-5)]


@pytest.mark.parametrize("dtype,hist_dtype,tol", LBFGS_DTYPES, ids=["fp64", "fp32", "bf16-hist"])
@pytest.mark.parametrize("m,n,count,newest", [
    (1, 1, 1, 0), (5, 1, 5, 2), (4, 7, 2, 1), (10, 33, 10, 3), (10, 1023, 7, 9),
    (3, 4096, 0, 0), (100, 257, 57, 80), (7, 50_001, 4, 5), (6, 65_536, 6, 2),
])
@pytest.mark.parametrize("misalign", ["none", "S", "Y", "g"])
def test_lbfgs_direction(emu, device_config, dtype, hist_dtype, tol, m, n, count, newest,
                         misalign):
    hist, g = random_history(m, n, count, newest, dtype, hist_dtype, "cpu", seed=m + n)
    for update_gram in (False, True):
        SY, YY = hist.SY.clone(), hist.YY.clone()
        if update_gram and count:
            SY[hist.newest].zero_()
            YY[:, hist.newest].zero_()
        SYc, YYc = SY.clone(), YY.clone()
        Se, Sbuf = guarded(hist.S, int(misalign == "S"))
        Ye, Ybuf = guarded(hist.Y, int(misalign == "Y"))
        ge, gbuf = guarded(g, int(misalign == "g"))
        SYe, SYbuf = guarded(SY)
        YYe, YYbuf = guarded(YY)
        d, stats = emu.lbfgs_direction(Se, Ye, SYe, YYe, ge, hist.newest, count, update_gram)
        SY, YY = SYe, YYe
        dc, statsc = torch.ops.soo.lbfgs_direction(hist.S, hist.Y, SYc, YYc, g, hist.newest,
                                                   count, update_gram)
        assert rel_err(d, dc) <= tol
        torch.testing.assert_close(stats, statsc, rtol=tol * 10, atol=tol * 10)
        torch.testing.assert_close(SY, SYc, rtol=tol * 10, atol=tol * 10)
        torch.testing.assert_close(YY, YYc, rtol=tol * 10, atol=tol * 10)
        for view, buf in ((Se, Sbuf), (Ye, Ybuf), (ge, gbuf), (SYe, SYbuf), (YYe, YYbuf)):
            assert_guards_intact(view, buf)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 256, 301])
def test_bfgs_direction(emu, device_config, dtype, tol, n):
    H, s, y, g = (a.to(dtype) for a in random_problem(n, seed=n))
    for update in (False, True):
        (He, Hbuf), Hc = guarded(H), H.clone()
        d, stats = emu.bfgs_direction(He, s, y, g, update)
        assert_guards_intact(He, Hbuf)
        dc, statsc = torch.ops.soo.bfgs_direction(Hc, s, y, g, update)
        assert rel_err(d, dc) <= tol and rel_err(He, Hc) <= tol
        assert torch.equal(He, He.T)  # the update keeps H exactly symmetric
        torch.testing.assert_close(stats, statsc, rtol=tol * 10, atol=tol * 10)


# ---------------------------------------------------------------------------------------------
# Kronecker factors

KRON_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
KRON_EPS = {dt: torch.finfo(dt).eps for dt in KRON_TOL}


def factor_batch(n, dtype, seed):
    """Three well-conditioned, one ill-conditioned and one rank-deficient factor."""
    return torch.cat([spd((3,), n, dtype, "cpu", seed=seed),
                      ill_conditioned((1,), n, dtype, "cpu", seed=seed),
                      rank_deficient((1,), n, dtype, "cpu", seed=seed)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 65])
def test_kron_damped_inverse(emu, device_config, dtype, n):
    A = factor_batch(n, dtype, seed=n)
    A[1, 0, 0] = math.nan  # fails alone
    for damping in (0.0, 1e-3):
        X, status = emu.kron_damped_inverse(A, damping)
        Xc, statusc = torch.ops.soo.kron_damped_inverse(A, damping)
        assert torch.equal(status, statusc), (status, statusc)
        assert status[1] == 2 and (X[1] == 0).all()
        for b in (0, 2, 3, 4):
            # two backward-stable inverses (the CPU op's potrf + potri, the CUDA host code's
            # batched ATen Cholesky) differ by up to ~ cond * eps; a retry (status 1) inverts
            # in float64 with the shift 10 damping + eps32 |tr A| / n
            A64, eps = A[b].double(), KRON_EPS[dtype]
            shift = damping
            if status[b] == 1:
                shift = 10 * damping + KRON_EPS[torch.float32] * A64.trace().abs().item() / n
                eps = KRON_EPS[torch.float64]
            cond = torch.linalg.cond(A64 + shift * torch.eye(n, dtype=torch.float64)).item()
            assert rel_err(X[b], Xc[b]) <= max(KRON_TOL[dtype], 10 * cond * eps), b
        assert torch.equal(X, X.mT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 65])
def test_kron_eigh(emu, device_config, dtype, n):
    A = factor_batch(n, dtype, seed=n)
    A[2, -1, 0] = math.inf
    d, Q, status = emu.kron_eigh(A)
    dc, Qc, statusc = torch.ops.soo.kron_eigh(A)
    assert torch.equal(status, statusc), (status, statusc)
    ok = status < 2
    scale = dc[ok].abs().amax().clamp_min(1e-30)
    assert ((d[ok] - dc[ok]).abs().amax() / scale) <= KRON_TOL[dtype] * 10
    # eigenvectors up to sign / rotation in clusters: compare the reconstructions
    rec = lambda d_, Q_: (Q_ * d_.unsqueeze(-2)) @ Q_.mT  # noqa: E731
    assert rel_err(rec(d[ok], Q[ok]), rec(dc[ok], Qc[ok])) <= KRON_TOL[dtype] * 10
    assert (d[~ok] == 0).all() and torch.equal(Q[~ok], torch.eye(n, dtype=dtype).expand_as(Q[~ok]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["newton", "eigh"])
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("n", [1, 3, 16, 40, 129])
def test_kron_inverse_root(emu, device_config, dtype, method, p, n):
    A = torch.cat([spd((3,), n, dtype, "cpu", seed=n), ill_conditioned((1,), n, dtype, "cpu")])
    A[1].fill_(math.nan)
    X, status = emu.kron_inverse_root(A, p, 1e-4, method, 100, 1e-6)
    Xc, statusc = torch.ops.soo.kron_inverse_root(A, p, 1e-4, method, 100, 1e-6)
    assert torch.equal(status, statusc), (status, statusc)
    ok = status < 2
    tol = 5e-3 if dtype == torch.float32 else (1e-6 if method == "newton" else 1e-9)
    assert rel_err(X[ok], Xc[ok]) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("o,i", [(1, 1), (5, 7), (33, 17)])
def test_kfac_precondition_eigen(emu, device_config, dtype, o, i):
    G, A = spd((2,), o, torch.float64, "cpu", seed=1), spd((2,), i, torch.float64, "cpu", seed=2)
    grad = torch.randn(2, o, i, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dG, QG = torch.linalg.eigh(G)
    dA, QA = torch.linalg.eigh(A)
    args = [t.to(dtype) for t in (grad, QG, dG, QA, dA)]
    V = emu.kfac_precondition_eigen(*args, 1e-2)
    Vc = torch.ops.soo.kfac_precondition_eigen(*args, 1e-2)
    assert rel_err(V, Vc) <= KRON_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("xdtype", ["same", torch.bfloat16])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_kron_factor_update(emu, device_config, dtype, xdtype, batch):
    gen = torch.Generator().manual_seed(0)
    d, N = 33, 20
    F0 = torch.randn(*batch, d, d, generator=gen, dtype=torch.float64)
    F0 = (F0 @ F0.mT).to(dtype)
    X = torch.randn(*batch, N, d, generator=gen, dtype=torch.float64)
    X = X.to(dtype if xdtype == "same" else xdtype)
    F, Fc = F0.clone(), F0.clone()
    emu.kron_factor_update_(F, X, 0.95, 0.05 / N)
    torch.ops.soo.kron_factor_update_(Fc, X, 0.95, 0.05 / N)
    assert torch.equal(F, F.mT)
    assert rel_err(F, Fc) <= KRON_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kron_empty_batches(emu, dtype):
    A = torch.empty(0, 5, 5, dtype=dtype)
    for name, args in (("kron_damped_inverse", (1e-3,)), ("kron_eigh", ()),
                       ("kron_inverse_root", (4, 1e-4, "newton", 100, 1e-6)),
                       ("kron_inverse_root", (4, 1e-4, "eigh", 100, 1e-6))):
        out = getattr(emu, name)(A, *args)
        ref = getattr(torch.ops.soo, name)(A, *args)
        assert [(o.shape, o.dtype) for o in out] == [(r.shape, r.dtype) for r in ref]


# ---------------------------------------------------------------------------------------------
# window ops

WINDOW_GRAM_CASES = [  # m, n, rows, k
    (1, 1, 1, 1), (3, 7, 2, 2), (3, 0, 3, 2), (4, 5, 4, 0),
    (33, 1001, 33, 1),  # odd n: scalar loads
    (33, 1004, 20, 2),  # 16-byte loads; 8-row tiles, the last one partial (20 = 8 + 8 + 4)
    (6, 1004, 6, 3), (5, 1004, 5, 8),  # 4-row tiles (k <= 4, k <= 8), 5 rows = 4 + 1
    (512, 12, 300, 2),  # many tiles, a short row
    (9, 40_000, 9, 2),  # several column blocks, several steps each
]


@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("m,n,rows,k", WINDOW_GRAM_CASES)
@pytest.mark.parametrize("misalign", MISALIGN + ["W"])
def test_window_gram(emu, device_config, storage, m, n, rows, k, misalign):
    W, X = window_inputs(m, n, k, storage, "cpu", seed=m + n + k)
    W[rows:] = math.nan  # rows not filled: never read
    offs = [1] + [0] * k if misalign == "W" else offsets(misalign, k + 1)
    We, *Xe = [guarded(a, o)[0] for a, o in zip([W] + X, offs)]
    full = n <= 1004
    G, D = emu.window_gram(We, Xe, rows, full)
    Gc, Dc = torch.ops.soo.window_gram(W, X, rows, full)
    assert D.shape == Dc.shape == (m, k) and D.dtype == torch.float64
    if k:
        # float64 sums of the same products in two orders (see test_window_ops)
        bound = dot_bound(W[:rows], torch.stack(X), n)
        assert ((D[:rows] - Dc[:rows]).abs() <= bound).all()
    assert not D[rows:].any()
    if full:
        Gv = G[:rows, :rows]
        assert ((Gv - Gc[:rows, :rows]).abs() <= dot_bound(W[:rows], W[:rows], n)).all()
        assert torch.equal(G, G.T) and not G[rows:].any() and not G[:, rows:].any()
    if device_config[1]:  # other block, warp and lane orders: the same bits
        assert torch.equal(emu.window_gram(We, Xe, rows, False)[1], D)


@pytest.mark.parametrize("storage", ["fp32", "fp64"])
@pytest.mark.parametrize("n", [200_000, 200_003])
def test_window_gram_sums_many_blocks(emu, storage, n):
    """More than 32 column blocks (160 on 40 emulated SMs): each lane of the warp that sums a
    dot's partials takes several."""
    W, X = window_inputs(3, n, 2, storage, "cpu", seed=n)
    cuda_emu.configure(40, 5)
    try:
        _, D = emu.window_gram(W, X, 3, False)
    finally:
        cuda_emu.configure(2, 0)
    _, Dc = torch.ops.soo.window_gram(W, X, 3, False)
    assert ((D - Dc).abs() <= dot_bound(W, torch.stack(X), n)).all()


WINDOW_COMBINE_CASES = [  # m, n, rows, with_base, out is base
    (1, 1, 1, True, False), (3, 7, 2, False, False), (3, 0, 3, True, False),
    (4, 1001, 0, True, True),  # no rows: base_coef base
    (6, 1001, 6, True, True),  # odd n: scalar loads; rows 4 + 2
    (33, 1004, 33, True, False), (33, 1004, 31, False, False),  # 16-byte loads
    (512, 12, 509, True, True),
    (7, 40_000, 7, True, False),  # several blocks, several steps each
]


@pytest.mark.parametrize("storage", list(STORAGE))
@pytest.mark.parametrize("m,n,rows,with_base,alias", WINDOW_COMBINE_CASES)
@pytest.mark.parametrize("misalign", ["none", "all", "W", "out", "base"])
def test_window_combine(emu, device_config, storage, m, n, rows, with_base, alias, misalign):
    W, (base,) = window_inputs(m, n, 1, storage, "cpu", seed=m + n + 1)
    W[rows:] = math.nan  # rows not filled: never read
    coef = torch.randn(m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    base_coef = torch.tensor(-0.75, dtype=torch.float64)
    oW, oout, obase = (int(misalign in ("all", name)) for name in ("W", "out", "base"))
    We, _ = guarded(W, oW)
    be, bbuf = guarded(base, obase)
    oute, obuf = (be, bbuf) if alias else guarded(torch.full_like(base, math.nan), oout)
    args, args_e = ((base, base_coef), (be, base_coef)) if with_base else ((None, None),) * 2
    want = torch.empty_like(base)
    torch.ops.soo.window_combine(want, W, coef, rows, *args)
    emu.window_combine(oute, We, coef, rows, *args_e)
    # float64 sums of rows + 1 products, rounded once to out's dtype (see test_window_ops)
    magnitude = coef[:rows].abs() @ W[:rows].double().abs()
    if with_base:
        magnitude = magnitude + 0.75 * base.double().abs()
    bound = torch.finfo(base.dtype).eps * want.double().abs() + 4 * (m + 3) * EPS64 * magnitude
    assert ((oute.double() - want.double()).abs() <= bound).all()
    assert_guards_intact(oute, obuf)
    if not alias:
        assert torch.equal(be, base)
        assert_guards_intact(be, bbuf)


# ---------------------------------------------------------------------------------------------
# all_finite

def check_all_finite(emu, tensors, want):
    """The emulated op's answer is the CPU op's and ``want``."""
    out = emu.all_finite(tensors)
    assert out.dtype == torch.bool and out.shape == ()
    assert bool(out) == bool(torch.ops.soo.all_finite(tensors)) == want


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 33, 1001, 40_000])
@pytest.mark.parametrize("offset", [0, 1, 3, 7])
def test_all_finite(emu, device_config, dtype, n, offset):
    """Tensors between NaN guards (a read out of bounds turns a finite list non-finite), ``offset``
    elements past 16 bytes (every head length for the 16-bit formats), a second tensor of
    another dtype one element further; a non-finite value at every position of a short tensor
    (head, vector units, tail), at the first, the last and a random one of a long one."""
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    a, _ = guarded(finite_tensor(n, dtype, seed=n), offset)
    b, _ = guarded(finite_tensor(n + 3, other, seed=n + 1), offset + 1)
    check_all_finite(emu, [a, b], True)
    positions = range(n) if n <= 33 else [0, n - 1, n // 3 + offset]
    for i in positions:
        for t in (a, b):
            kept = t[i].clone()
            t[i] = (math.nan, math.inf, -math.inf)[i % 3]
            check_all_finite(emu, [a, b], False)
            t[i] = kept


def test_all_finite_batches_and_strides(emu, device_config):
    """More tensors of one dtype than a launch takes (48), empty ones, and strided ones (dense
    ones read in place, the others copied first)."""
    tensors = [guarded(finite_tensor(n % 41, DTYPES[n % 4], seed=n), n % 5)[0]
               for n in range(110)]
    check_all_finite(emu, tensors, True)
    for i in (0, 47, 48, 105):
        if tensors[i].numel():
            kept = tensors[i][-1].clone()
            tensors[i][-1] = math.inf
            check_all_finite(emu, tensors, False)
            tensors[i][-1] = kept
    M = finite_tensor(33 * 17, torch.float32, seed=1).view(33, 17)
    check_all_finite(emu, [M.t(), M[:, ::2], M[0].expand(4, 17)], True)
    M[5, 1] = math.nan
    check_all_finite(emu, [M.t()], False)
    check_all_finite(emu, [M[:, ::2]], True)
    check_all_finite(emu, [M[5].expand(4, 17)], False)


# ---------------------------------------------------------------------------------------------
# host synchronisation of the CUDA host code

# ATen ops that read device memory on the host (a host sync on a GPU)
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero",
              "aten::masked_select", "aten::equal", "aten::_assert_async")


def host_reads(fn) -> dict[str, int]:
    """The ATen host reads made while ``fn`` runs, from the profiler's record of every dispatcher
    call (also those the C++ host code makes)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key in HOST_READS}


def test_sync_free_ops_read_nothing_on_the_host(emu):
    """The ops documented as sync-free make no host read in their CUDA host code, also when a
    factor fails (the damped inverse's failures and float64 retry are handled on the device).
    Only what this code calls is seen: ATen's own CUDA linear algebra is not emulated."""
    A = factor_batch(17, torch.float32, seed=1)
    A[1, 0, 0] = math.nan
    hist, g = random_history(6, 1001, 4, 2, torch.float32, torch.float32, "cpu")
    x, x0, gp, *V = vectors(1001, 6, torch.float32, "cpu", seed=2)
    t, alpha = torch.tensor(1e-3), torch.tensor([0.5, -1.0])
    n = 9
    H = torch.eye(n) * 2
    s, y, gb = vectors(n, 3, torch.float32, "cpu", seed=3)
    G, QG = torch.linalg.eigh(spd((), 5, torch.float64, "cpu", seed=1))
    Dd, QA = torch.linalg.eigh(spd((), 7, torch.float64, "cpu", seed=2))
    grad = torch.randn(5, 7, dtype=torch.float64)
    F, X = spd((2,), 7, torch.float32, "cpu"), torch.randn(2, 11, 7)
    Q, Gs, c = subproblem_inputs(3, torch.float64, "cpu", seed=0)
    calls = {
        "kron_damped_inverse": lambda: emu.kron_damped_inverse(A, 0.0),
        "kfac_precondition_eigen": lambda: emu.kfac_precondition_eigen(grad, QG, G, QA, Dd, 1e-2),
        "kron_factor_update_": lambda: emu.kron_factor_update_(F, X, 0.9, 0.1),
        "lbfgs_direction": lambda: emu.lbfgs_direction(hist.S, hist.Y, hist.SY, hist.YY, g,
                                                       hist.newest, hist.count, True),
        "bfgs_direction": lambda: emu.bfgs_direction(H, s, y, gb, True),
        "drsom_perturb": lambda: emu.drsom_perturb(x, x0, V[0], t, True),
        "drsom_reduce": lambda: emu.drsom_reduce(gp, x0, V[:2], t, True),
        "drsom_update": lambda: emu.drsom_update(x, V[2], V[:2], alpha),
        "drsom_subproblem": lambda: emu.drsom_subproblem(Q, Gs, c, 1e-3, 1.0, 5.0),
        "window_gram": lambda: emu.window_gram(torch.stack(V), [x, x0], 2, True),
        "window_combine": lambda: emu.window_combine(gp, torch.stack(V), torch.ones(3).double(),
                                                     3, x, torch.tensor(0.5).double()),
        "all_finite": lambda: emu.all_finite([x, V[0].double(), gp[::2]]),
    }
    assert sorted(calls) == sorted(set(cuda_emu.op_names()) - {"kron_eigh", "kron_inverse_root"})
    for name, call in calls.items():
        assert host_reads(call) == {}, name
    # the documented syncs: eigh (ATen's linalg_eigh checks its errors on the host; one
    # nonzero() compacts the float64 retry), Newton (one read every kNewtonCheckEvery steps)
    reads = host_reads(lambda: emu.kron_eigh(A))
    assert reads.get("aten::nonzero") == 1 and set(reads) <= {"aten::nonzero",
                                                               "aten::_local_scalar_dense"}
    reads = host_reads(lambda: emu.kron_inverse_root(A, 4, 1e-4, "newton", 100, 1e-6))
    assert set(reads) == {"aten::_local_scalar_dense"}
    assert reads["aten::_local_scalar_dense"] <= math.ceil(100 / 4)
