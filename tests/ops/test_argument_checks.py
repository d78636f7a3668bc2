"""The ops' argument checks (soo_ext/ops.py) and their fast path.

* Every bad argument, in an otherwise valid call (the common case that the fast path lets
  through without the torch._check calls), gets its error word for word: the messages are
  pinned as the checks gave them before the fast path existed.
* Valid calls in the common cases make no torch._check call (the fast path holds on them).
* Symbolic sizes (a symbolic trace's fake tensors) take the torch._check calls, as before the fast
  path: ``bool()`` on a symbolic condition would guard (or fail, unbacked) where torch._check
  defers to a runtime assert.
"""
import sys

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from soo_ext import ops

F32, F64, F16 = torch.float32, torch.float64, torch.float16


def _randn(*shape, dtype=F32):
    return torch.randn(*shape, dtype=dtype)


def _strided(n, dtype=F32):
    """A non-contiguous [n] vector."""
    return torch.zeros(2 * n, dtype=dtype)[::2]


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _eye_stack(b, n, dtype=F32):
    return torch.eye(n, dtype=dtype).repeat(b, 1, 1)


# A valid call of every wrapper: the keyword arguments, float32 tensors on the CPU.
VALID = {
    "lbfgs_direction": lambda: dict(S=_randn(3, 6), Y=_randn(3, 6), SY=torch.eye(3),
                                    YY=torch.eye(3), g=_randn(6), newest=1, count=2),
    "bfgs_direction": lambda: dict(H=torch.eye(6), s=_randn(6), y=_randn(6), g=_randn(6),
                                   update=True),
    "drsom_perturb": lambda: dict(x=_randn(6), x0=_randn(6), v=_randn(6), t=torch.tensor(0.1),
                                  save=True),
    "drsom_reduce": lambda: dict(g_pert=_randn(6), g=_randn(6), V=[_randn(6), _randn(6)],
                                 t=torch.tensor(0.1), with_gram=True),
    "drsom_update": lambda: dict(x=_randn(6), p=_randn(6), V=[_randn(6), _randn(6)],
                                 alpha=torch.zeros(2)),
    "drsom_subproblem": lambda: dict(Q=torch.eye(3), G=torch.eye(3), c=torch.ones(3), gamma=0.5,
                                     max_length=1.0, gamma_increase=5.0),
    "window_gram": lambda: dict(W=_randn(3, 6), X=[_randn(6), _randn(6)], rows=2, full=True),
    "window_combine": lambda: dict(out=torch.zeros(6), W=_randn(3, 6),
                                   coef=torch.ones(3, dtype=F64), rows=2, base=_randn(6),
                                   base_coef=torch.tensor(1.0, dtype=F64)),
    "kron_factor_update_": lambda: dict(F=_eye_stack(2, 4), X=_randn(2, 5, 4), decay=0.9,
                                        scale=0.1),
    "kron_damped_inverse": lambda: dict(A=_eye_stack(2, 4), damping=1e-3),
    "kron_eigh": lambda: dict(A=_eye_stack(2, 4)),
    "kron_inverse_root": lambda: dict(A=_eye_stack(2, 4), p=2, epsilon=1e-3, method="eigh",
                                      max_iters=10, tol=1e-6),
    "kfac_precondition_eigen": lambda: dict(grad=_randn(2, 3, 4), QG=_eye_stack(2, 3),
                                            dG=torch.ones(2, 3), QA=_eye_stack(2, 4),
                                            dA=torch.ones(2, 4), damping=1e-3),
    "all_finite": lambda: dict(tensors=[_randn(6), _randn(3, 2).bfloat16(), _randn(4, dtype=F16)]),
}


def _double(*names):
    """Changes that make the named arguments float64."""
    return {k: (lambda k: lambda a: a[k].double())(k) for k in names}


# Other common valid calls: (op, changes to VALID[op]'s arguments, each a function of them).
VALID_VARIANTS = [
    ("lbfgs_direction", {}),
    ("lbfgs_direction", dict(S=lambda a: a["S"].bfloat16(), Y=lambda a: a["Y"].bfloat16())),
    ("lbfgs_direction", _double("S", "Y", "SY", "YY", "g")),
    ("lbfgs_direction", dict(newest=lambda a: 0, count=lambda a: 0)),
    ("bfgs_direction", {}),
    ("bfgs_direction", _double("H", "s", "y", "g")),
    ("drsom_perturb", {}),
    ("drsom_reduce", {}),
    ("drsom_reduce", dict(V=lambda a: [_randn(6) for _ in range(8)])),
    ("drsom_update", {}),
    ("drsom_update", dict(p=lambda a: a["V"][0])),
    ("drsom_subproblem", {}),
    ("drsom_subproblem", dict(max_length=lambda a: float("inf"))),
    ("window_gram", {}),
    ("window_gram", dict(W=lambda a: a["W"].bfloat16(), rows=lambda a: 3)),
    ("window_combine", {}),
    ("window_combine", dict(base=lambda a: None, base_coef=lambda a: None)),
    ("window_combine", dict(base=lambda a: a["out"])),
    ("kron_factor_update_", {}),
    ("kron_factor_update_", dict(X=lambda a: a["X"].bfloat16())),
    ("kron_factor_update_", dict(F=lambda a: torch.eye(4, dtype=F64), X=lambda a: _randn(5, 4))),
    ("kron_damped_inverse", {}),
    ("kron_damped_inverse", dict(damping=lambda a: 0.0)),
    ("kron_eigh", {}),
    ("kron_inverse_root", {}),
    ("kron_inverse_root", dict(method=lambda a: "newton", p=lambda a: 4)),
    ("kfac_precondition_eigen", {}),
    ("kfac_precondition_eigen", dict(grad=lambda a: a["grad"][0], QG=lambda a: a["QG"][0],
                                     dG=lambda a: a["dG"][0], QA=lambda a: a["QA"][0],
                                     dA=lambda a: a["dA"][0])),
    ("all_finite", {}),
    ("all_finite", dict(tensors=lambda a: [_strided(6, F64), torch.empty(0)])),
]


# (op, changes to VALID[op]'s arguments, the error message word for word); every error is a
# RuntimeError.
BAD = [
    # lbfgs_direction
    ("lbfgs_direction", dict(g=lambda a: a["g"].reshape(2, 3)), "g must be 1-D, got shape (2, 3)"),
    ("lbfgs_direction", dict(g=lambda a: a["g"].half()),
     "g must be float32 or float64, got torch.float16"),
    ("lbfgs_direction", dict(S=lambda a: a["S"][0]),
     "S and Y must be [m, n] of one shape, got (6,), (3, 6)"),
    ("lbfgs_direction", dict(Y=lambda a: a["Y"][:2]),
     "S and Y must be [m, n] of one shape, got (3, 6), (2, 6)"),
    ("lbfgs_direction", dict(g=lambda a: _randn(7)), "history length 6 != gradient length 7"),
    ("lbfgs_direction", _double("S", "Y"),
     "history dtype torch.float64 not allowed with a torch.float32 gradient"),
    ("lbfgs_direction", dict(Y=lambda a: a["Y"].bfloat16()),
     "history dtype torch.float32 not allowed with a torch.float32 gradient"),
    ("lbfgs_direction", {**_double("SY", "YY", "g"), "S": lambda a: a["S"].bfloat16(),
                         "Y": lambda a: a["Y"].bfloat16()},
     "history dtype torch.bfloat16 not allowed with a torch.float64 gradient"),
    ("lbfgs_direction", dict(SY=lambda a: torch.eye(2)), "SY and YY must be [3, 3] torch.float32"),
    ("lbfgs_direction", _double("YY"), "SY and YY must be [3, 3] torch.float32"),
    ("lbfgs_direction", dict(count=lambda a: 4), "count must be in [0, 3], got 4"),
    ("lbfgs_direction", dict(count=lambda a: -1), "count must be in [0, 3], got -1"),
    ("lbfgs_direction", dict(newest=lambda a: 3), "newest must be in [0, 3), got 3"),
    ("lbfgs_direction", dict(newest=lambda a: -1), "newest must be in [0, 3), got -1"),
    ("lbfgs_direction", dict(SY=lambda a: _meta(a["SY"])), "all tensors must be on one device"),
    ("lbfgs_direction", dict(S=lambda a: _meta(a["S"])), "all tensors must be on one device"),
    # bfgs_direction
    ("bfgs_direction", dict(g=lambda a: a["g"].reshape(2, 3)), "g must be 1-D, got shape (2, 3)"),
    ("bfgs_direction", dict(g=lambda a: a["g"].half()),
     "g must be float32 or float64, got torch.float16"),
    ("bfgs_direction", dict(H=lambda a: a["H"][:, :5]),
     "H must be [6, 6] and s, y [6], got (6, 5), (6,), (6,)"),
    ("bfgs_direction", dict(s=lambda a: a["s"][:5]),
     "H must be [6, 6] and s, y [6], got (6, 6), (5,), (6,)"),
    ("bfgs_direction", dict(y=lambda a: a["y"].reshape(6, 1)),
     "H must be [6, 6] and s, y [6], got (6, 6), (6,), (6, 1)"),
    ("bfgs_direction", _double("H"), "H, s, y must have g's dtype torch.float32"),
    ("bfgs_direction", _double("y"), "H, s, y must have g's dtype torch.float32"),
    ("bfgs_direction", dict(H=lambda a: _randn(6, 6).t()),
     "H must be contiguous (it is updated in place)"),
    ("bfgs_direction", dict(s=lambda a: _meta(a["s"])), "all tensors must be on one device"),
    # drsom_perturb
    ("drsom_perturb", dict(x=lambda a: a["x"].reshape(2, 3)),
     "drsom_perturb: x must be 1-D, got shape (2, 3)"),
    ("drsom_perturb", dict(x=lambda a: a["x"].half()),
     "drsom_perturb: x must be float32 or float64, got torch.float16"),
    ("drsom_perturb", dict(x=lambda a: _strided(6)), "drsom_perturb: x must be contiguous"),
    ("drsom_perturb", dict(x0=lambda a: a["x0"].reshape(2, 3)),
     "drsom_perturb: x0 must be 1-D, got shape (2, 3)"),
    ("drsom_perturb", _double("x0"),
     "drsom_perturb: x0 has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_perturb", dict(x0=lambda a: _meta(a["x0"])),
     "drsom_perturb: x0 is on meta, expected cpu (all tensors on one device)"),
    ("drsom_perturb", dict(v=lambda a: _randn(5)), "drsom_perturb: v has length 5, expected 6"),
    ("drsom_perturb", dict(v=lambda a: _strided(6)), "drsom_perturb: v must be contiguous"),
    ("drsom_perturb", dict(t=lambda a: torch.tensor([0.1])),
     "drsom_perturb: t must be a 0-dim tensor, got shape (1,)"),
    ("drsom_perturb", _double("t"),
     "drsom_perturb: t has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_perturb", dict(t=lambda a: _meta(a["t"])),
     "drsom_perturb: t is on meta, expected cpu (all tensors on one device)"),
    # drsom_reduce
    ("drsom_reduce", dict(g=lambda a: a["g"].reshape(2, 3)),
     "drsom_reduce: g must be 1-D, got shape (2, 3)"),
    ("drsom_reduce", dict(g=lambda a: a["g"].half()),
     "drsom_reduce: g must be float32 or float64, got torch.float16"),
    ("drsom_reduce", dict(g_pert=lambda a: _randn(7)),
     "drsom_reduce: g_pert has length 7, expected 6"),
    ("drsom_reduce", _double("g_pert"),
     "drsom_reduce: g_pert has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_reduce", dict(V=lambda a: []), "drsom_reduce: V must hold 1 to 8 directions, got 0"),
    ("drsom_reduce", dict(V=lambda a: [_randn(6) for _ in range(9)]),
     "drsom_reduce: V must hold 1 to 8 directions, got 9"),
    ("drsom_reduce", dict(V=lambda a: a["V"][0]),
     "drsom_reduce: V must hold 1 to 8 directions, got Tensor"),
    ("drsom_reduce", dict(V=lambda a: [a["V"][0], a["V"][1].double()]),
     "drsom_reduce: every V[j] has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_reduce", dict(V=lambda a: [a["V"][0], _randn(5)]),
     "drsom_reduce: every V[j] has length 5, expected 6"),
    ("drsom_reduce", dict(V=lambda a: [a["V"][0], _strided(6)]),
     "drsom_reduce: every V[j] must be contiguous"),
    ("drsom_reduce", dict(V=lambda a: [a["V"][0], _meta(a["V"][1])]),
     "drsom_reduce: every V[j] is on meta, expected cpu (all tensors on one device)"),
    ("drsom_reduce", dict(t=lambda a: torch.tensor([0.1])),
     "drsom_reduce: t must be a 0-dim tensor, got shape (1,)"),
    ("drsom_reduce", _double("t"),
     "drsom_reduce: t has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    # drsom_update
    ("drsom_update", dict(x=lambda a: a["x"].reshape(2, 3)),
     "drsom_update: x must be 1-D, got shape (2, 3)"),
    ("drsom_update", _double("p"),
     "drsom_update: p has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_update", dict(p=lambda a: _strided(6)), "drsom_update: p must be contiguous"),
    ("drsom_update", dict(V=lambda a: [], alpha=lambda a: torch.zeros(0)),
     "drsom_update: V must hold 1 to 8 directions, got 0"),
    ("drsom_update", dict(V=lambda a: [a["V"][0], _randn(7)]),
     "drsom_update: every V[j] has length 7, expected 6"),
    ("drsom_update", dict(alpha=lambda a: torch.zeros(3)),
     "drsom_update: alpha must be 1-D with len(V) = 2 entries, got shape (3,)"),
    ("drsom_update", dict(alpha=lambda a: torch.zeros(1, 2)),
     "drsom_update: alpha must be 1-D with len(V) = 2 entries, got shape (1, 2)"),
    ("drsom_update", _double("alpha"),
     "drsom_update: alpha has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_update", dict(alpha=lambda a: _meta(a["alpha"])),
     "drsom_update: alpha is on meta, expected cpu (all tensors on one device)"),
    ("drsom_update", dict(alpha=lambda a: _strided(2)), "drsom_update: alpha must be contiguous"),
    # drsom_subproblem
    ("drsom_subproblem", dict(Q=lambda a: torch.zeros(0, 0), G=lambda a: torch.zeros(0, 0),
                              c=lambda a: torch.zeros(0)),
     "drsom_subproblem: Q must be k x k with 1 <= k <= 8, got shape (0, 0)"),
    ("drsom_subproblem", dict(Q=lambda a: torch.eye(9), G=lambda a: torch.eye(9),
                              c=lambda a: torch.ones(9)),
     "drsom_subproblem: Q must be k x k with 1 <= k <= 8, got shape (9, 9)"),
    ("drsom_subproblem", dict(Q=lambda a: torch.zeros(3, 2)),
     "drsom_subproblem: Q must be k x k with 1 <= k <= 8, got shape (3, 2)"),
    ("drsom_subproblem", dict(Q=lambda a: torch.ones(3)),
     "drsom_subproblem: Q must be k x k with 1 <= k <= 8, got shape (3,)"),
    ("drsom_subproblem", dict(Q=lambda a: a["Q"].half(), G=lambda a: a["G"].half(),
                              c=lambda a: a["c"].half()),
     "drsom_subproblem: Q must be float32 or float64, got torch.float16"),
    ("drsom_subproblem", dict(G=lambda a: torch.eye(2)),
     "drsom_subproblem: G must have Q's shape (3, 3), got (2, 2)"),
    ("drsom_subproblem", dict(c=lambda a: torch.ones(2)),
     "drsom_subproblem: c must be 1-D with 3 entries, got shape (2,)"),
    ("drsom_subproblem", dict(c=lambda a: torch.ones(3, 1)),
     "drsom_subproblem: c must be 1-D with 3 entries, got shape (3, 1)"),
    ("drsom_subproblem", _double("G"),
     "drsom_subproblem: G has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_subproblem", _double("c"),
     "drsom_subproblem: c has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("drsom_subproblem", dict(G=lambda a: _meta(a["G"])),
     "drsom_subproblem: G is on meta, expected cpu (all tensors on one device)"),
    ("drsom_subproblem", dict(gamma=lambda a: -1.0),
     "drsom_subproblem: gamma must be finite and >= 0, got -1.0"),
    ("drsom_subproblem", dict(gamma=lambda a: float("nan")),
     "drsom_subproblem: gamma must be finite and >= 0, got nan"),
    ("drsom_subproblem", dict(gamma=lambda a: float("inf")),
     "drsom_subproblem: gamma must be finite and >= 0, got inf"),
    ("drsom_subproblem", dict(max_length=lambda a: -1.0),
     "drsom_subproblem: max_length must be >= 0 (inf: no limit), got -1.0"),
    ("drsom_subproblem", dict(max_length=lambda a: float("nan")),
     "drsom_subproblem: max_length must be >= 0 (inf: no limit), got nan"),
    ("drsom_subproblem", dict(gamma_increase=lambda a: 1.0),
     "drsom_subproblem: gamma_increase must be finite and > 1, got 1.0"),
    ("drsom_subproblem", dict(gamma_increase=lambda a: float("inf")),
     "drsom_subproblem: gamma_increase must be finite and > 1, got inf"),
    ("drsom_subproblem", dict(gamma_increase=lambda a: float("nan")),
     "drsom_subproblem: gamma_increase must be finite and > 1, got nan"),
    # window_gram
    ("window_gram", dict(W=lambda a: a["W"][0]),
     "window_gram: W must be an [m, n] window, got shape (6,)"),
    ("window_gram", _double("W"),
     "window_gram: window dtype torch.float64 not allowed with torch.float32 vectors"),
    ("window_gram", dict(W=lambda a: _randn(6, 3).t()), "window_gram: W must be contiguous"),
    ("window_gram", dict(rows=lambda a: 4), "window_gram: rows must be in [0, 3], got 4"),
    ("window_gram", dict(rows=lambda a: -1), "window_gram: rows must be in [0, 3], got -1"),
    ("window_gram", dict(X=lambda a: [_randn(6) for _ in range(9)]),
     "window_gram: X must be a list of 0 to 8 vectors"),
    ("window_gram", dict(X=lambda a: [x.half() for x in a["X"]]),
     "window_gram: X must be float32 or float64, got torch.float16"),
    ("window_gram", dict(X=lambda a: [a["X"][0], a["X"][1].double()]),
     "window_gram: every X[j] has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("window_gram", dict(X=lambda a: [a["X"][0], _randn(5)]),
     "window_gram: every X[j] has length 5, expected 6"),
    ("window_gram", dict(X=lambda a: [_randn(5), _randn(5)]),
     "window_gram: vector length 5 != window length 6"),
    ("window_gram", dict(X=lambda a: [a["X"][0], _strided(6)]),
     "window_gram: every X[j] must be contiguous"),
    ("window_gram", dict(X=lambda a: [a["X"][0], _meta(a["X"][1])]),
     "window_gram: every X[j] is on meta, expected cpu (all tensors on one device)"),
    ("window_gram", dict(W=lambda a: _meta(a["W"])),
     "window_gram: all tensors must be on one device"),
    # window_combine
    ("window_combine", dict(out=lambda a: torch.zeros(2, 3)),
     "window_combine: out must be 1-D, got shape (2, 3)"),
    ("window_combine", dict(out=lambda a: torch.zeros(6, dtype=F16)),
     "window_combine: out must be float32 or float64, got torch.float16"),
    ("window_combine", dict(out=lambda a: _strided(6)), "window_combine: out must be contiguous"),
    ("window_combine", dict(out=lambda a: torch.zeros(5)),
     "window_combine: out has length 5, window length 6"),
    ("window_combine", dict(W=lambda a: a["W"][0]),
     "window_combine: W must be an [m, n] window, got shape (6,)"),
    ("window_combine", _double("W"),
     "window_combine: window dtype torch.float64 not allowed with torch.float32 vectors"),
    ("window_combine", dict(W=lambda a: _randn(6, 3).t()), "window_combine: W must be contiguous"),
    ("window_combine", dict(W=lambda a: _meta(a["W"])),
     "window_combine: all tensors must be on one device"),
    ("window_combine", dict(rows=lambda a: 4), "window_combine: rows must be in [0, 3], got 4"),
    ("window_combine", dict(rows=lambda a: -1), "window_combine: rows must be in [0, 3], got -1"),
    ("window_combine", dict(coef=lambda a: a["coef"].float()),
     "window_combine: coef must be [3] float64, got (3,) torch.float32"),
    ("window_combine", dict(coef=lambda a: a["coef"][:2]),
     "window_combine: coef must be [3] float64, got (2,) torch.float64"),
    ("window_combine", dict(coef=lambda a: a["coef"].reshape(3, 1)),
     "window_combine: coef must be [3] float64, got (3, 1) torch.float64"),
    ("window_combine", dict(coef=lambda a: _meta(a["coef"])),
     "window_combine: all tensors must be on one device"),
    ("window_combine", dict(base_coef=lambda a: None),
     "window_combine: base and base_coef go together"),
    ("window_combine", dict(base=lambda a: None), "window_combine: base and base_coef go together"),
    ("window_combine", _double("base"),
     "window_combine: base has dtype torch.float64, expected torch.float32 (no dtype mix)"),
    ("window_combine", dict(base=lambda a: _randn(5)),
     "window_combine: base has length 5, expected 6"),
    ("window_combine", dict(base=lambda a: _strided(6)), "window_combine: base must be contiguous"),
    ("window_combine", dict(base=lambda a: _meta(a["base"])),
     "window_combine: base is on meta, expected cpu (all tensors on one device)"),
    ("window_combine", dict(base_coef=lambda a: a["base_coef"].reshape(1)),
     "window_combine: base_coef must be a 0-dim float64 tensor"),
    ("window_combine", dict(base_coef=lambda a: a["base_coef"].float()),
     "window_combine: base_coef must be a 0-dim float64 tensor"),
    ("window_combine", dict(base_coef=lambda a: _meta(a["base_coef"])),
     "window_combine: all tensors must be on one device"),
    ("window_combine", dict(out=lambda a: a["W"][1]),
     "window_combine: out must not overlap the window W"),
    # kron_factor_update_
    ("kron_factor_update_", dict(F=lambda a: a["F"][..., :3]),
     "kron_factor_update_: F must be a [..., n, n] stack of square matrices, got shape (2, 4, 3)"),
    ("kron_factor_update_", dict(F=lambda a: torch.ones(4)),
     "kron_factor_update_: F must be a [..., n, n] stack of square matrices, got shape (4,)"),
    ("kron_factor_update_", dict(F=lambda a: a["F"].half()),
     "kron_factor_update_: F must be float32 or float64, got torch.float16"),
    ("kron_factor_update_", dict(X=lambda a: a["X"][0]),
     "kron_factor_update_: X must be [..., N, d] with F's leading dims and d = 4, got F (2, 4, "
     "4) and X (5, 4)"),
    ("kron_factor_update_", dict(X=lambda a: _randn(3, 5, 4)),
     "kron_factor_update_: X must be [..., N, d] with F's leading dims and d = 4, got F (2, 4, "
     "4) and X (3, 5, 4)"),
    ("kron_factor_update_", dict(X=lambda a: a["X"][..., :3]),
     "kron_factor_update_: X must be [..., N, d] with F's leading dims and d = 4, got F (2, 4, "
     "4) and X (2, 5, 3)"),
    ("kron_factor_update_", _double("X"),
     "kron_factor_update_: X must have F's dtype or a lower-precision float dtype, got "
     "torch.float64 with F torch.float32"),
    ("kron_factor_update_", dict(X=lambda a: a["X"].int()),
     "kron_factor_update_: X must have F's dtype or a lower-precision float dtype, got "
     "torch.int32 with F torch.float32"),
    ("kron_factor_update_", dict(X=lambda a: _meta(a["X"])),
     "kron_factor_update_: X is on meta, F on cpu"),
    # kron_damped_inverse, kron_eigh
    ("kron_damped_inverse", dict(A=lambda a: a["A"][..., :3]),
     "kron_damped_inverse: A must be a [..., n, n] stack of square matrices, got shape (2, 4, 3)"),
    ("kron_damped_inverse", dict(A=lambda a: a["A"].int()),
     "kron_damped_inverse: A must be float32 or float64, got torch.int32"),
    ("kron_damped_inverse", dict(damping=lambda a: -1.0),
     "kron_damped_inverse: damping must be >= 0, got -1.0"),
    ("kron_damped_inverse", dict(damping=lambda a: float("nan")),
     "kron_damped_inverse: damping must be >= 0, got nan"),
    ("kron_eigh", dict(A=lambda a: a["A"][..., :3]),
     "kron_eigh: A must be a [..., n, n] stack of square matrices, got shape (2, 4, 3)"),
    ("kron_eigh", dict(A=lambda a: torch.ones(4)),
     "kron_eigh: A must be a [..., n, n] stack of square matrices, got shape (4,)"),
    ("kron_eigh", dict(A=lambda a: a["A"].int()),
     "kron_eigh: A must be float32 or float64, got torch.int32"),
    # kron_inverse_root
    ("kron_inverse_root", dict(A=lambda a: a["A"][..., :3]),
     "kron_inverse_root: A must be a [..., n, n] stack of square matrices, got shape (2, 4, 3)"),
    ("kron_inverse_root", dict(A=lambda a: a["A"].half()),
     "kron_inverse_root: A must be float32 or float64, got torch.float16"),
    ("kron_inverse_root", dict(p=lambda a: 0), "kron_inverse_root: p must be >= 1, got 0"),
    ("kron_inverse_root", dict(epsilon=lambda a: -1.0),
     "kron_inverse_root: epsilon must be finite and >= 0, got -1.0"),
    ("kron_inverse_root", dict(epsilon=lambda a: float("inf")),
     "kron_inverse_root: epsilon must be finite and >= 0, got inf"),
    ("kron_inverse_root", dict(epsilon=lambda a: float("nan")),
     "kron_inverse_root: epsilon must be finite and >= 0, got nan"),
    ("kron_inverse_root", dict(method=lambda a: "qr"),
     "kron_inverse_root: method must be 'newton' or 'eigh', got 'qr'"),
    ("kron_inverse_root", dict(max_iters=lambda a: -1),
     "kron_inverse_root: max_iters must be >= 0, got -1"),
    ("kron_inverse_root", dict(tol=lambda a: -1.0),
     "kron_inverse_root: tol must be >= 0, got -1.0"),
    # kfac_precondition_eigen
    ("kfac_precondition_eigen", dict(grad=lambda a: _randn(4)),
     "kfac_precondition_eigen: grad must be [..., o, i], got shape (4,)"),
    ("kfac_precondition_eigen", dict(grad=lambda a: a["grad"].half()),
     "kfac_precondition_eigen: grad must be float32 or float64, got torch.float16"),
    ("kfac_precondition_eigen", dict(QG=lambda a: _eye_stack(2, 4)),
     "kfac_precondition_eigen: with grad (2, 3, 4) QG must be [..., 3, 3], dG [..., 3], QA "
     "[..., 4, 4], dA [..., 4]; got (2, 4, 4), (2, 3), (2, 4, 4), (2, 4)"),
    ("kfac_precondition_eigen", dict(dG=lambda a: torch.ones(2, 4)),
     "kfac_precondition_eigen: with grad (2, 3, 4) QG must be [..., 3, 3], dG [..., 3], QA "
     "[..., 4, 4], dA [..., 4]; got (2, 3, 3), (2, 4), (2, 4, 4), (2, 4)"),
    ("kfac_precondition_eigen", dict(QA=lambda a: _eye_stack(3, 4)),
     "kfac_precondition_eigen: with grad (2, 3, 4) QG must be [..., 3, 3], dG [..., 3], QA "
     "[..., 4, 4], dA [..., 4]; got (2, 3, 3), (2, 3), (3, 4, 4), (2, 4)"),
    ("kfac_precondition_eigen", dict(dA=lambda a: torch.ones(4)),
     "kfac_precondition_eigen: with grad (2, 3, 4) QG must be [..., 3, 3], dG [..., 3], QA "
     "[..., 4, 4], dA [..., 4]; got (2, 3, 3), (2, 3), (2, 4, 4), (4,)"),
    ("kfac_precondition_eigen", _double("QG"),
     "kfac_precondition_eigen: all tensors must have grad's dtype torch.float32, got "
     "torch.float64"),
    ("kfac_precondition_eigen", _double("dA"),
     "kfac_precondition_eigen: all tensors must have grad's dtype torch.float32, got "
     "torch.float64"),
    ("kfac_precondition_eigen", dict(QA=lambda a: _meta(a["QA"])),
     "kfac_precondition_eigen: all tensors must be on cpu, got meta"),
    ("kfac_precondition_eigen", dict(dG=lambda a: _meta(a["dG"])),
     "kfac_precondition_eigen: all tensors must be on cpu, got meta"),
    # all_finite
    ("all_finite", dict(tensors=lambda a: []),
     "all_finite: tensors must not be empty (the result is on their device)"),
    ("all_finite", dict(tensors=lambda a: a["tensors"] + [torch.ones(2, dtype=torch.int32)]),
     "all_finite: every tensor must be float64, float32, bfloat16 or float16, got torch.int32"),
    ("all_finite", dict(tensors=lambda a: a["tensors"] + [_meta(_randn(2))]),
     "all_finite: all tensors must be on one device, got meta and cpu"),
]

# Arguments of other types where an int or a float goes: torch._check's errors (the fast path
# leaves them to the checks; the window ops' earlier fast path let a tensor or numpy `rows` through).
TENSOR_COND = ("cond must be a bool, but got a Tensor. For tensor conditions, use "
               "torch._check_tensor_all() to assert that all elements are true.")
NUMPY_COND = f"cond must be a bool, but got {type(np.int64(1) >= 0)}"
BAD_TYPES = [
    ("lbfgs_direction", dict(count=lambda a: torch.tensor(2)), TypeError, TENSOR_COND),
    ("lbfgs_direction", dict(newest=lambda a: np.int64(1)), TypeError, NUMPY_COND),
    ("lbfgs_direction", dict(count=lambda a: None), TypeError,
     "'<=' not supported between instances of 'int' and 'NoneType'"),
    ("window_gram", dict(rows=lambda a: torch.tensor(2)), TypeError, TENSOR_COND),
    ("window_combine", dict(rows=lambda a: np.int64(2)), TypeError, NUMPY_COND),
    ("kron_damped_inverse", dict(damping=lambda a: torch.tensor(1e-3)), TypeError, TENSOR_COND),
    ("kron_inverse_root", dict(epsilon=lambda a: np.float64(1e-3)), TypeError, NUMPY_COND),
    ("kron_inverse_root", dict(p=lambda a: torch.tensor(2)), TypeError, TENSOR_COND),
    ("kron_inverse_root", dict(max_iters=lambda a: np.int64(10)), TypeError, NUMPY_COND),
    ("kron_inverse_root", dict(tol=lambda a: None), TypeError,
     "'>=' not supported between instances of 'NoneType' and 'int'"),
    ("drsom_perturb", dict(t=lambda a: 0.1), AttributeError, "'float' object has no attribute 'dim'"),
    ("kfac_precondition_eigen", dict(QG=lambda a: None), AttributeError,
     "'NoneType' object has no attribute 'shape'"),
]


def _arguments(op, changes):
    args = VALID[op]()
    return {**args, **{name: change(args) for name, change in changes.items()}}


def _case_id(case):
    op, changes = case[:2]
    return f"{op}-{'-'.join(changes) or 'as-is'}"


@pytest.mark.parametrize("op, changes, message", BAD, ids=[_case_id(c) for c in BAD])
def test_every_bad_argument_gets_its_message(op, changes, message):
    args = _arguments(op, changes)
    with pytest.raises(RuntimeError) as error:
        getattr(ops, op)(**args)
    assert type(error.value) is RuntimeError
    assert str(error.value) == message


@pytest.mark.parametrize("op, changes, error, message", BAD_TYPES,
                         ids=[_case_id(c) for c in BAD_TYPES])
def test_arguments_of_other_types_get_the_checks_errors(op, changes, error, message):
    args = _arguments(op, changes)
    with pytest.raises(error) as raised:
        getattr(ops, op)(**args)
    assert type(raised.value) is error
    assert str(raised.value) == message


def _count_checks_of_ops(monkeypatch) -> list:
    """Records every torch._check call made from soo_ext/ops.py (its condition)."""
    calls, check = [], torch._check

    def counting_check(cond, message=None):
        if sys._getframe(1).f_code.co_filename == ops.__file__:
            calls.append(cond)
        return check(cond, message)

    monkeypatch.setattr(torch, "_check", counting_check)
    return calls


@pytest.mark.parametrize("op, changes", VALID_VARIANTS,
                         ids=[_case_id(c) for c in VALID_VARIANTS])
def test_valid_calls_skip_the_torch_checks(op, changes, monkeypatch):
    args = _arguments(op, changes)
    calls = _count_checks_of_ops(monkeypatch)
    getattr(ops, op)(**args)
    assert calls == []


# The checks that the wrappers (and the fake kernels) call, with the wrappers' argument names.
CHECKS = {
    "lbfgs_direction": lambda a: ops._check_lbfgs_direction(
        a["S"], a["Y"], a["SY"], a["YY"], a["g"], a["newest"], a["count"]),
    "bfgs_direction": lambda a: ops._check_bfgs_direction(a["H"], a["s"], a["y"], a["g"]),
    "drsom_perturb": lambda a: ops._check_drsom_perturb(a["x"], a["x0"], a["v"], a["t"]),
    "drsom_reduce": lambda a: ops._check_drsom_reduce(a["g_pert"], a["g"], a["V"], a["t"]),
    "drsom_update": lambda a: ops._check_drsom_update(a["x"], a["p"], a["V"], a["alpha"]),
    "drsom_subproblem": lambda a: ops._check_drsom_subproblem(
        a["Q"], a["G"], a["c"], a["gamma"], a["max_length"], a["gamma_increase"]),
    "window_gram": lambda a: ops._check_window_gram(a["W"], a["X"], a["rows"]),
    "window_combine": lambda a: ops._check_window_combine(
        a["out"], a["W"], a["coef"], a["rows"], a["base"], a["base_coef"]),
    "kron_factor_update_": lambda a: ops._check_kron_factor_update(a["F"], a["X"]),
    "kron_damped_inverse": lambda a: ops._check_square_stack("kron_damped_inverse", a["A"]),
    "kron_eigh": lambda a: ops._check_square_stack("kron_eigh", a["A"]),
    "kron_inverse_root": lambda a: ops._check_kron_inverse_root(
        a["A"], a["p"], a["epsilon"], a["method"], a["max_iters"], a["tol"]),
    "kfac_precondition_eigen": lambda a: ops._check_kfac_precondition(
        a["grad"], a["QG"], a["dG"], a["QA"], a["dA"]),
    "all_finite": lambda a: ops._check_all_finite(a["tensors"]),
}


@pytest.mark.parametrize("op", sorted(CHECKS))
def test_symbolic_sizes_take_the_torch_checks(op, monkeypatch):
    """Traced with symbolic sizes, the checks run their torch._check calls, as they did before
    the fast path (which must not decide on symbolic conditions)."""
    args = VALID[op]()
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    lists = [k for k, v in args.items() if isinstance(v, list)]

    def traced(*tensors):
        given = dict(zip(names, tensors))
        for k in lists:  # at most one list (V or X): the tensors after the named ones
            given[k] = list(tensors[len(names):])
        assert all(t._has_symbolic_sizes_strides for t in tensors if t.dim())
        CHECKS[op]({**args, **given})
        return tensors[0] + 0

    flat = [args[k] for k in names] + [t for k in lists for t in args[k]]
    calls = _count_checks_of_ops(monkeypatch)
    make_fx(traced, tracing_mode="symbolic")(*flat)
    assert calls, "the checks were skipped on symbolic sizes"
