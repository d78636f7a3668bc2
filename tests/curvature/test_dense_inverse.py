"""DenseInverseHessian alone: the first pair rescales the identity (unless told not to), h_scale
enlarges H before an update, and the state_dict round trip (also between a push and the
direction that applies its update).  The soo::bfgs_direction op under it is tested in
tests/ops/test_bfgs_ops.py."""
import pytest
import torch

from soo_ext.curvature.dense_inverse import DenseInverseHessian

from conftest import rel_err, saved_copy
from op_inputs import random_problem, textbook_update


def test_first_pair_rescales_the_identity():
    H, s, y, g = random_problem(9)
    model = DenseInverseHessian(9, torch.float64)
    d, _ = model.direction(g)
    assert torch.equal(d, -g)  # H = I before any pair
    model.push(s, y)
    d, _ = model.direction(g)
    H0 = (y.dot(s) / y.dot(y)) * torch.eye(9, dtype=torch.float64)
    expected = textbook_update(H0, s, y)
    assert rel_err(model.H, expected) < 1e-12 and rel_err(d, -(expected @ g)) < 1e-12


def test_without_the_first_rescaling_h_scale_multiplies_h_before_each_update():
    n = 9
    (_, s1, y1, g), (_, s2, y2, _) = random_problem(n, seed=1), random_problem(n, seed=2)
    model = DenseInverseHessian(n, torch.float64)
    model.push(s1, y1, rescale_first=False)  # H = I is updated as it is
    d, _ = model.direction(g)
    H1 = textbook_update(torch.eye(n, dtype=torch.float64), s1, y1)
    assert rel_err(model.H, H1) < 1e-12 and rel_err(d, -(H1 @ g)) < 1e-12
    model.push(s2, y2, 0.5, rescale_first=False, h_scale=2.5)
    d, _ = model.direction(g)
    H2 = textbook_update(2.5 * H1, 0.5 * s2, y2)
    assert rel_err(model.H, H2) < 1e-12 and rel_err(d, -(H2 @ g)) < 1e-12
    # once a pair was pushed, rescale_first does not reset H
    model.push(s1, y1, rescale_first=True)
    model.direction(g)
    assert rel_err(model.H, textbook_update(H2, s1, y1)) < 1e-12


def test_h_scale_also_applies_to_the_first_pair():
    n = 9
    _, s, y, g = random_problem(n, seed=3)
    model = DenseInverseHessian(n, torch.float64)
    model.push(s, y, rescale_first=False, h_scale=4.0)
    model.direction(g)
    expected = textbook_update(4.0 * torch.eye(n, dtype=torch.float64), s, y)
    assert rel_err(model.H, expected) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("when", ["first-push", "pending", "complete"])
@pytest.mark.parametrize("via_bytes", [False, True], ids=["deepcopy", "bytes"])
def test_state_dict_round_trip_gives_the_same_directions(dtype, when, via_bytes):
    n = 37
    g = random_problem(n, seed=0)[3].to(dtype)
    pairs = [tuple(t.to(dtype) for t in random_problem(n, seed=k)[1:3]) for k in range(1, 6)]
    model = DenseInverseHessian(n, dtype)
    model.push(*pairs[0])  # H rescaled, its update pending
    if when != "first-push":
        model.direction(g)
        model.push(*pairs[1])
        if when == "complete":
            model.direction(g)
    saved = saved_copy(model.state_dict(), via_bytes)
    loaded = DenseInverseHessian(n, dtype)
    loaded.load_state_dict(saved)
    for key in ("H", "s", "y"):  # loaded into its own buffers, not aliasing the dict
        saved[key].fill_(float("nan"))

    def run(m):
        out = list(m.direction(g))
        for s, y in pairs[2:]:  # later pushes: a lost rescaling or pending update would show
            m.push(s, y)
            out += m.direction(g)
        return out + [m.H, m.s, m.y]
    for a, b in zip(run(model), run(loaded), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_load_state_dict_refuses_a_shape_mismatch():
    model = DenseInverseHessian(5, torch.float64)
    with pytest.raises(ValueError, match="inverse Hessian H has shape"):
        DenseInverseHessian(6, torch.float64).load_state_dict(model.state_dict())
