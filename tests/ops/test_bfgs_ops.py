"""soo::bfgs_direction against the textbook BFGS update and its pure-PyTorch reference."""
import pytest
import torch

from soo_ext import ops, reference

from conftest import rel_err
from op_inputs import random_problem, textbook_update

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]
requires_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", [1, 2, 7, 33, 300, 1025])
@pytest.mark.parametrize("update", [False, True])
def test_direction_matches_textbook(device, dtype, tol, n, update):
    H, s, y, g = random_problem(n, seed=n)
    H_ref = textbook_update(H, s, y) if update else H
    d_ref = -(H_ref @ g)
    H_op = H.to(device=device, dtype=dtype)
    d, stats = ops.bfgs_direction(H_op, s.to(H_op), y.to(H_op), g.to(H_op), update)
    assert d.dtype == dtype and d.device.type == device
    assert rel_err(d, d_ref) < tol
    assert rel_err(H_op, H_ref) < tol
    assert torch.equal(H_op, H_op.T), "the update must keep H exactly symmetric"
    assert stats[0].item() == pytest.approx(g.dot(d_ref).item(), rel=10 * tol)
    assert stats[1].item() == pytest.approx(d_ref.abs().max().item(), rel=10 * tol)


@requires_ext
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("update", [False, True])
def test_kernel_matches_reference_op(dtype, tol, update):
    H, s, y, g = (t.to(dtype) for t in random_problem(129, seed=3))
    H_ref = H.clone()
    d, stats = ops.bfgs_direction(H, s, y, g, update)
    d_ref, stats_ref = reference.bfgs_direction(H_ref, s, y, g, update)
    assert rel_err(d, d_ref) < tol and rel_err(H, H_ref) < tol
    torch.testing.assert_close(stats, stats_ref, rtol=10 * tol, atol=10 * tol)


@requires_ext
def test_cpu_result_independent_of_thread_count():
    H, s, y, g = (t.float() for t in random_problem(517, seed=5))
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            H_run = H.clone()
            outs.append((H_run, *ops.bfgs_direction(H_run, s, y, g, True)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["fp64", "fp32"])
def test_cuda_matches_cpu(dtype, tol):
    H, s, y, g = (t.to(dtype) for t in random_problem(1000, seed=7))
    H_cuda = H.cuda()
    d_cuda, stats_cuda = ops.bfgs_direction(H_cuda, s.cuda(), y.cuda(), g.cuda(), True)
    d, stats = ops.bfgs_direction(H, s, y, g, True)
    assert rel_err(d_cuda, d) < tol and rel_err(H_cuda, H) < tol
    assert torch.equal(H_cuda, H_cuda.T)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("update", [False, True])
def test_opcheck(device, update):
    H, s, y, g = (t.to(device=device, dtype=torch.float32) for t in random_problem(37, seed=2))
    torch.library.opcheck(torch.ops.soo.bfgs_direction.default, (H, s, y, g, update))


@pytest.mark.parametrize("bad, match", [
    (lambda H, s, y, g: (H[:, :-1], s, y, g), "must be"),
    (lambda H, s, y, g: (H, s[:-1], y, g), "must be"),
    (lambda H, s, y, g: (H.float(), s, y, g), "dtype"),
    (lambda H, s, y, g: (H.T.contiguous().T, s, y, g), "contiguous"),
    (lambda H, s, y, g: (H, s, y, g.half()), "float32 or float64"),
])
def test_bad_arguments_are_refused(bad, match):
    H, s, y, g = random_problem(6)
    H = H.t().contiguous().t() if match == "contiguous" else H
    with pytest.raises((RuntimeError, ValueError), match=match):
        ops.bfgs_direction(*bad(H, s, y, g), True)
