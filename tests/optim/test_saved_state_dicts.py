"""State dicts saved by the version before the layered-package move (tests/optim/fixtures, made by
make_state_dicts.py with the code of commit 0f96eea) load into this version and continue as that
version continued; and this version, run from the start, reaches the saved state.

On the machine that made the files, with the compiled CPU kernels (same CPU, torch and CPU
capability), both hold bit for bit.  Elsewhere (other BLAS or vector kernels, the pure-PyTorch
fallback, the emulated CUDA kernels) the rounding differs, so results are compared to within
``100 eps A``: ``eps`` of the params' dtype, ``A`` the amplification of a rounding difference
by the case, from its computation: 100 for a few well-conditioned steps of these tiny problems
(measured on the fallback: at most 15 eps); ``eps^(-1/2)`` for DRSOM's forward differences and
``eps^(-1/3)`` for its central ones (rounding divided by the difference step); the condition
``(lambda_max + epsilon) / epsilon`` of Shampoo's roots.  A bfloat16 history may round a stored
pair the other way: 10 bfloat16 ulps.  Eigenvectors are compared through ``Q diag(d) Q^T`` (they
are unique only up to sign and rotations within an eigenspace).

Every run starts from the initial params and batches the files were made from (inputs.pt):
torch's random transforms round differently on other CPUs and CPU capabilities (the models are
initialised in float32, one ulp apart), which the tolerances above do not cover.
"""
import math
import os

import pytest
import torch

import soo_ext

from fixtures import make_state_dicts as cases

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
INPUTS = torch.load(os.path.join(FIXTURES, "inputs.pt"))


def _tolerance(name, saved):
    kwargs, dtype = cases.CASES[name][1], cases.CASES[name][3]
    eps = torch.finfo(dtype).eps
    if kwargs.get("history_dtype") == torch.bfloat16:
        return 10 * torch.finfo(torch.bfloat16).eps
    amplification = 100
    if cases.CASES[name][0] == "DRSOM":
        amplification = eps ** (-1 / 3) if kwargs.get("hvp") == "central" else eps ** -0.5
    elif cases.CASES[name][0] == "Shampoo":
        epsilon = kwargs["epsilon"]
        largest = max(torch.linalg.eigvalsh(F.double()).max().item()
                      for entry in saved["state_dict"]["state"].values()
                      for F in entry.get("factors", []))
        amplification = max(amplification, (largest + epsilon) / epsilon)
    return 100 * eps * amplification


def _compare(a, b, exact, rtol, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if not exact and key in ("QA", "QG"):  # compare the factor they reconstruct
                d = "d" + key[1]
                a_, b_ = [(x[key] * x[d]) @ x[key].T for x in (a, b)]
                _compare(a_, b_, exact, rtol, f"{where}/{key} diag({d}) {key}^T")
            else:
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
            err = ((a.double() - b.double()).abs().max() / scale).item()
            assert err <= rtol, f"{where}: {err:.2e} > {rtol:.2e}"
    elif isinstance(a, float) and not exact:
        assert a == b or math.isclose(a, b, rel_tol=rtol), where
    else:
        assert a == b, where


def _set_params(model, values):
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


# Options added since the files were made, with the default that reproduces the old behaviour.
# Options added since 0f96eea, with their defaults (a loaded state takes them)
ADDED_OPTIONS = {"DRSOM": {"lr": 1.0},
                 "KFAC": {"refresh_budget": 0.25, "fallback": "adamw", "fallback_lr": None,
                          "fallback_betas": (0.9, 0.999), "fallback_eps": 1e-8,
                          "kl_clip_lr": "peak"},
                 "Shampoo": {"refresh_budget": 0.1, "relative_epsilon": 1e-4}}
# ... and the settings of 0f96eea's defaults where the defaults changed since (KFAC's intervals:
# every step, now automatic; Shampoo's roots: no relative_epsilon, now 1e-4), set where a case
# left them to the defaults
OLD_DEFAULTS = {"KFAC": {"refresh_budget": None, "factor_update_steps": 1, "inv_update_steps": 1,
                         "kl_clip_lr": "current", "fallback": "sgd"},
                "Shampoo": {"relative_epsilon": 0.0},
                "MLBFGS": {"normalize": "l2"}}  # 'kl' since issue 17 (docs/mlbfgs.md)


# State entries of those options (the saved state dicts' continuation takes the new default:
# 'peak' at the cases' constant lr is the old clip)
ADDED_STATE = {"KFAC": ("peak_lr",)}


def make_optimizer(name, model):
    opt = cases.make_optimizer(soo_ext, name, model)
    for key, value in OLD_DEFAULTS.get(cases.CASES[name][0], {}).items():
        for group in opt.param_groups:
            if key not in cases.CASES[name][1]:
                group[key] = value
    return opt


def _without_added_options(name, state_dict):
    """``state_dict`` with the options added since 0f96eea taken out of its param groups, after
    checking that they hold their defaults, and their state entries out of its state."""
    added = ADDED_OPTIONS.get(cases.CASES[name][0], {})
    added_state = ADDED_STATE.get(cases.CASES[name][0], ())
    old = OLD_DEFAULTS.get(cases.CASES[name][0], {})  # or what make_optimizer set
    groups = []
    for group in state_dict["param_groups"]:
        for key, value in added.items():
            assert group[key] in (value, old.get(key, value)), key
        groups.append({key: v for key, v in group.items() if key not in added})
    state = {i: {key: v for key, v in entry.items() if key not in added_state}
             for i, entry in state_dict["state"].items()}
    return {**state_dict, "param_groups": groups, "state": state}


def _build(name):
    """The case's model and batches, from the inputs the files were made from."""
    model, _ = cases.build(name)
    params, data = INPUTS[name]
    _set_params(model, params)
    return model, data


@pytest.mark.skipif(INPUTS["machine"] != cases.machine(),
                    reason="inputs.pt was made on another machine or CPU capability")
@pytest.mark.parametrize("name", list(cases.CASES))
def test_inputs_are_what_the_cases_build(name):
    model, data = cases.build(name)
    _compare([[p.detach() for p in model.parameters()], data], INPUTS[name], True, 0)


@pytest.mark.parametrize("name", list(cases.CASES))
def test_saved_state_dict_loads_and_continues(name, request):
    saved = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=False)
    # the files were made with the compiled CPU kernels (not the fallback or the emulated CUDA
    # kernels, which round differently)
    exact = (saved["machine"] == cases.machine() and soo_ext.ops.extension_loaded()
             and not request.config.getoption("--cuda-emu-as-cpu"))
    rtol = _tolerance(name, saved)
    convention, before = cases.CASES[name][6], cases.CASES[name][7]

    # From the start, this version reaches the saved state.
    model, data = _build(name)
    opt = make_optimizer(name, model)
    cases.run_steps(opt, model, data[:before], convention)
    _compare([p.detach() for p in model.parameters()], saved["params"], exact, rtol, "params")
    _compare(_without_added_options(name, opt.state_dict()), saved["state_dict"], exact, rtol,
             "state_dict")

    # From the saved state, it continues as the saved version did.
    model, data = _build(name)
    _set_params(model, saved["params"])
    opt = make_optimizer(name, model)
    opt.load_state_dict(saved["state_dict"])
    cases.run_steps(opt, model, data[before:], convention)
    _compare([p.detach() for p in model.parameters()], saved["continued_params"], exact, rtol,
             "continued params")
    _compare(_without_added_options(name, opt.state_dict()), saved["continued_state_dict"],
             exact, rtol, "continued state")
