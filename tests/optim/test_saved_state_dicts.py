"""State dicts saved by the version before the layered-package move (tests/optim/fixtures, made by
make_state_dicts.py at commit 0f96eea) load into this version and continue as that version
continued; and this version, run from the start, reaches the saved state.

On the machine that made the files (same CPU, torch and CPU capability) both hold bit for bit.
Elsewhere other BLAS / vector kernels round differently, so results are compared to within a
tolerance: a few steps amplify a rounding difference of ``eps`` by the conditioning of these tiny
problems (well below 1e4 here), hence ``1e4 eps`` of the least precise dtype a case stores (float64,
float32, or bfloat16 for a bfloat16 history).
"""
import math
import os

import pytest
import torch

import soo_ext

from fixtures import make_state_dicts as cases

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _tolerance(name):
    kwargs, dtype = cases.CASES[name][1], cases.CASES[name][3]
    least = kwargs.get("history_dtype") or kwargs.get("factor_dtype") or dtype
    if kwargs.get("factor_dtype") is not None and dtype.itemsize < least.itemsize:
        least = dtype
    return 1e4 * torch.finfo(least).eps


def _compare(a, b, exact, rtol, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _compare(a[key], b[key], exact, rtol, f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, exact, rtol, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), where
        else:
            scale = b.double().abs().max().clamp_min(1e-30)
            assert ((a.double() - b.double()).abs().max() / scale).item() <= rtol, where
    elif isinstance(a, float) and not exact:
        assert a == b or math.isclose(a, b, rel_tol=rtol), where
    else:
        assert a == b, where


def _set_params(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


@pytest.mark.parametrize("name", list(cases.CASES))
def test_saved_state_dict_loads_and_continues(name):
    saved = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=False)
    exact = saved["machine"] == cases.machine()
    rtol = _tolerance(name)
    convention, before = cases.CASES[name][6], cases.CASES[name][7]

    # From the start, this version reaches the saved state.
    model, data = cases.build(name)
    opt = cases.make_optimizer(soo_ext, name, model)
    cases.run_steps(opt, model, data[:before], convention)
    _compare([p.detach() for p in model.parameters()], saved["params"], exact, rtol, "params")
    _compare(opt.state_dict(), saved["state_dict"], exact, rtol, "state_dict")

    # From the saved state, it continues as the saved version did.
    model, data = cases.build(name)
    _set_params(model, saved["params"])
    opt = cases.make_optimizer(soo_ext, name, model)
    opt.load_state_dict(saved["state_dict"])
    cases.run_steps(opt, model, data[before:], convention)
    _compare([p.detach() for p in model.parameters()], saved["continued_params"], exact, rtol,
             "continued params")
    _compare(opt.state_dict(), saved["continued_state_dict"], exact, rtol, "continued state")
