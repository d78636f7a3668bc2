"""soo::lbfgs_direction against the textbook two-loop recursion and its pure-PyTorch reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soo_ext import LBFGSHistory, ops, reference

from conftest import rel_err
from op_inputs import random_history

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (gradient dtype, history storage dtype, tolerance on ||d - d_ref|| / ||d_ref||)
DTYPES = [(torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5),
          (torch.float32, torch.bfloat16, 1e-5)]
DTYPE_IDS = ["fp64", "fp32", "bf16-history"]

requires_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,n,count,newest", [
    (1, 1, 1, 0), (5, 1, 5, 2), (4, 7, 2, 1), (10, 33, 10, 3), (10, 1023, 7, 9),
    (3, 4096, 3, 0), (10, 100_003, 10, 6), (100, 257, 57, 80), (7, 1_000_001, 4, 5),
])
def test_direction_matches_textbook(device, dtype, hist_dtype, tol, m, n, count, newest):
    hist, g = random_history(m, n, count, newest, dtype, hist_dtype, device)
    d, stats = hist.direction(g)
    if not ops.extension_loaded() and dtype == torch.float32:
        # the pure-PyTorch fallback sums fp32 dot products in fp32 (BLAS): error ~ sqrt(n) eps
        tol = max(tol, n ** 0.5 * torch.finfo(torch.float32).eps)
    # Oracle in fp64 on the stored (possibly bf16-rounded) pairs.
    ref = reference.lbfgs_two_loop_textbook(hist.S.double().cpu(), hist.Y.double().cpu(),
                                            g.double().cpu(), newest, count)
    assert d.dtype == dtype and d.shape == g.shape and d.device == g.device
    assert rel_err(d, ref) < tol
    g_dot_d = torch.dot(g.double().cpu(), ref).item()
    assert stats[0].item() == pytest.approx(g_dot_d, rel=tol * 10)
    assert stats[1].item() == pytest.approx(ref.abs().max().item(), rel=tol * 10)
    assert stats[0].item() < 0  # a descent direction


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
def test_gram_blocks_match_direct_products(device, dtype, hist_dtype, tol):
    m, n = 6, 513
    hist, _ = random_history(m, n, m, 2, dtype, hist_dtype, device)  # wrapped: 9 pushes
    acc = reference.accumulation_dtype(dtype)
    S, Y = hist.S.to(acc), hist.Y.to(acc)
    torch.testing.assert_close(hist.SY, S @ Y.T, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(hist.YY, Y @ Y.T, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
def test_empty_history_is_steepest_descent(device, dtype, hist_dtype, tol):
    hist = LBFGSHistory(11, 4, dtype=dtype, device=device, history_dtype=hist_dtype)
    g = torch.randn(11, dtype=dtype, device=device)
    d, stats = hist.direction(g)
    assert torch.equal(d, -g)
    assert stats[0].item() == pytest.approx(-g.double().square().sum().item(), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_vector(device):
    hist = LBFGSHistory(0, 3, dtype=torch.float32, device=device)
    hist.push(torch.zeros(0, device=device), torch.zeros(0, device=device))
    d, stats = hist.direction(torch.zeros(0, device=device))
    assert d.shape == (0,) and stats.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("update_gram", [False, True])
def test_kernel_matches_reference_op(device, dtype, hist_dtype, tol, update_gram):
    hist, g = random_history(10, 20_001, 8, 4, dtype, hist_dtype, device, seed=3)
    SY, YY = hist.SY.clone(), hist.YY.clone()
    if update_gram:  # stale entries of the newest pair must be recomputed identically
        SY[hist.newest].zero_()
        YY[:, hist.newest].zero_()
    SY_ref, YY_ref = SY.clone(), YY.clone()
    d, stats = ops.lbfgs_direction(hist.S, hist.Y, SY, YY, g, hist.newest, hist.count, update_gram)
    d_ref, stats_ref = reference.lbfgs_direction(hist.S, hist.Y, SY_ref, YY_ref, g, hist.newest,
                                                 hist.count, update_gram)
    assert rel_err(d, d_ref) < tol
    torch.testing.assert_close(SY, SY_ref, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(YY, YY_ref, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(stats, stats_ref, rtol=tol * 10, atol=tol * 10)


@requires_ext
def test_cpu_result_independent_of_thread_count():
    hist, g = random_history(10, 300_007, 10, 5, torch.float32, torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d1, s1 = hist.direction(g)
        torch.set_num_threads(max(2, threads))
        d2, s2 = hist.direction(g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(d1, d2) and torch.equal(s1, s2)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_cpu(dtype, hist_dtype, tol):
    hist_cpu, g_cpu = random_history(10, 123_457, 9, 1, dtype, hist_dtype, "cpu", seed=7)
    hist_gpu, g_gpu = random_history(10, 123_457, 9, 1, dtype, hist_dtype, "cuda", seed=7)
    d_cpu, _ = hist_cpu.direction(g_cpu)
    d_gpu, _ = hist_gpu.direction(g_gpu)
    assert rel_err(d_gpu, d_cpu) < tol


@given(m=st.integers(1, 12), n=st.integers(1, 3000), data=st.data(),
       which=st.sampled_from(range(len(DTYPES))), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_fuzz_against_textbook(m, n, data, which, seed):
    dtype, hist_dtype, tol = DTYPES[which]
    count = data.draw(st.integers(0, m))
    newest = data.draw(st.integers(0, m - 1))
    hist, g = random_history(m, n, count, newest if count else m - 1, dtype, hist_dtype, "cpu", seed)
    d, _ = hist.direction(g)
    ref = reference.lbfgs_two_loop_textbook(hist.S.double(), hist.Y.double(), g.double(),
                                            hist.newest, count)
    assert rel_err(d, ref) < tol


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,hist_dtype,tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("update_gram", [False, True])
def test_opcheck(device, dtype, hist_dtype, tol, update_gram):
    hist, g = random_history(5, 101, 4, 3, dtype, hist_dtype, device)
    args = (hist.S, hist.Y, hist.SY.clone(), hist.YY.clone(), g, hist.newest, hist.count, update_gram)
    torch.library.opcheck(torch.ops.soo.lbfgs_direction.default, args)


@requires_ext
def test_torch_compile_traces_the_op():
    hist, g = random_history(4, 64, 4, 3, torch.float32, torch.float32, "cpu")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def direction(S, Y, SY, YY, g):
        return torch.ops.soo.lbfgs_direction(S, Y, SY, YY, g, 3, 4, False)

    d, _ = direction(hist.S, hist.Y, hist.SY, hist.YY, g)
    d_eager, _ = hist.direction(g)
    torch.testing.assert_close(d, d_eager)


@pytest.mark.parametrize("bad", ["fp16-grad", "bf16-with-fp64", "wrong-n", "count", "newest",
                                 "gram-dtype"])
def test_bad_arguments_are_refused(bad):
    m, n = 4, 10
    S = torch.zeros(m, n)
    Y = torch.zeros(m, n)
    SY = torch.zeros(m, m)
    YY = torch.zeros(m, m)
    g = torch.zeros(n)
    newest, count = 0, 1
    if bad == "fp16-grad":
        g = g.half()
    elif bad == "bf16-with-fp64":
        S, Y, SY, YY, g = S.bfloat16(), Y.bfloat16(), SY.double(), YY.double(), g.double()
    elif bad == "wrong-n":
        g = torch.zeros(n + 1)
    elif bad == "count":
        count = m + 1
    elif bad == "newest":
        newest = m
    elif bad == "gram-dtype":
        SY, YY = SY.double(), YY.double()
    with pytest.raises(RuntimeError):
        ops.lbfgs_direction(S, Y, SY, YY, g, newest, count)
