"""Python entry points of the soo_ext ops, their fake kernels, and the fallback to the references.

The compiled module ``soo_ext._C`` registers the ops in the ``soo`` namespace (CPU and CUDA kernels
of one schema).  When it is missing, or was built against another torch, the wrappers here run the
pure-PyTorch references of :mod:`soo_ext.reference` instead, after one warning;
``SOO_EXT_REQUIRE_EXT=1`` turns that into an ImportError.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import reference

__all__ = ["lbfgs_direction", "bfgs_direction", "drsom_perturb", "drsom_reduce", "drsom_update",
           "drsom_subproblem", "window_gram", "window_combine", "kron_factor_update_", "kron_damped_inverse", "kron_eigh",
           "kron_inverse_root", "kfac_precondition_eigen", "all_finite", "extension_loaded",
           "extension_error",
           "build_info"]

_BUILD_INFO_FILE = Path(__file__).with_name("_build_info.json")


def _load_extension() -> tuple[bool, str | None]:
    """Import ``soo_ext._C`` if it was built against the running torch; says why not otherwise."""
    if os.environ.get("SOO_EXT_DISABLE_EXT") == "1":
        return False, "disabled by SOO_EXT_DISABLE_EXT=1"
    try:
        recorded = json.loads(_BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return False, "compiled module soo_ext._C not found (not built)"
    # Checked before the import: loading a module built for another torch can fail or crash.
    if recorded.get("torch_version") != torch.__version__:
        return False, (f"soo_ext._C was built against torch {recorded.get('torch_version')}, "
                       f"running torch {torch.__version__}: rebuild it")
    try:
        from . import _C  # noqa: F401  (registers the soo:: ops)
    except ImportError as exc:
        return False, f"soo_ext._C failed to import: {exc}"
    return True, None


_LOADED, _ERROR = _load_extension()
if not _LOADED:
    if os.environ.get("SOO_EXT_REQUIRE_EXT") == "1":
        raise ImportError(f"SOO_EXT_REQUIRE_EXT=1 but {_ERROR}")
    warnings.warn(f"soo_ext: {_ERROR}; ops fall back to the pure-PyTorch references (slow).",
                  RuntimeWarning, stacklevel=2)


def extension_loaded() -> bool:
    """Whether the compiled kernels are in use (False: references are used instead)."""
    return _LOADED


def extension_error() -> str | None:
    """Why the compiled module is not in use, or None."""
    return _ERROR


def build_info() -> dict:
    """Package version, the torch the module was built against, CUDA kernels and architectures."""
    from ._support.version import __version__
    info = {"version": __version__, "extension_loaded": _LOADED, "extension_error": _ERROR,
            "torch_runtime": torch.__version__}
    if _LOADED:
        from . import _C
        info.update(_C.build_info())
    else:
        try:
            info.update(json.loads(_BUILD_INFO_FILE.read_text()))
        except (OSError, ValueError):
            info.update({"torch_version": None, "with_cuda": False, "cuda_archs": []})
    return info


# ---------------------------------------------------------------------------------------------
# Argument checks: each op's check (torch._check calls and their messages) is decorated with
# _fast_path and a predicate of the same conditions as one plain short-circuiting expression.

_FLOAT_DTYPES = (torch.float32, torch.float64)
_PLAIN_SCALARS = frozenset((bool, int, float, str, type(None)))


def _concrete_tensors(values) -> bool:
    """Whether no tensor among ``values`` (and in lists of them) has symbolic sizes."""
    for value in values:
        kind = type(value)
        if kind is Tensor:  # the common cases first, by type alone (cheaper than isinstance)
            if value._has_symbolic_sizes_strides:
                return False
        elif kind not in _PLAIN_SCALARS:
            if isinstance(value, Tensor):
                if value._has_symbolic_sizes_strides:
                    return False
            elif isinstance(value, (list, tuple)) and not _concrete_tensors(value):
                return False
    return True


def _concrete(args: tuple, scalars: tuple[int, ...]) -> bool:
    """Whether ``args`` hold plain Python scalars at the positions ``scalars`` (not a SymInt, a
    tensor or a numpy number) and no tensor with symbolic sizes.  (Dynamo answers for the
    tensors; it shows a dynamic int as an int, whose conditions then guard as torch._check's
    would: dynamo's symbols are backed.)"""
    for i in scalars:
        if type(args[i]) not in _PLAIN_SCALARS:
            return False
    return _concrete_tensors(args)


def _fast_path(holds):
    """Decorator of an argument check: the check is skipped when ``holds(*args)`` (its conditions
    in one expression) is true on :func:`_concrete` arguments.  A torch._check costs ~1 us, the
    checks of a call up to ~12 us: a third of a small op, which optimizers call several times a
    step.  Anything else runs the check itself, so every bad argument gets its usual error:
    ``holds`` false or raising (a malformed argument); symbolic sizes (the fake tensors of a
    symbolic trace, dynamo's dynamic shapes), on which ``bool()`` would guard, or fail (unbacked),
    where torch._check may defer to a runtime assert; anything but a Python scalar where the check
    takes an int or a float (a tensor or numpy number there makes a condition a tensor or a numpy
    bool, which torch._check refuses and ``and`` takes)."""
    def decorate(check):
        parameters = inspect.signature(check).parameters.values()
        scalars = tuple(i for i, p in enumerate(parameters) if p.annotation in ("int", "float"))

        @functools.wraps(check)
        def checked(*args):
            if _concrete(args, scalars):
                try:
                    if holds(*args):
                        return
                except Exception:  # a malformed argument: the check below names it
                    pass
            check(*args)
        return checked
    return decorate


def _vectors_like(vectors, dtype: torch.dtype, device: torch.device, n: int) -> bool:
    """Whether each of ``vectors`` is a contiguous ``[n]`` tensor of ``dtype`` on ``device``."""
    for v in vectors:
        if not (v.dim() == 1 and v.dtype == dtype and v.device == device and v.shape[0] == n
                and v.is_contiguous()):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# lbfgs_direction

def _lbfgs_direction_valid(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, g: Tensor,
                           newest: int, count: int) -> bool:
    dtype, device = g.dtype, g.device  # float32/float64: its own accumulation dtype (SY, YY)
    m = S.shape[0] if S.dim() == 2 else -1
    return (g.dim() == 1 and dtype in _FLOAT_DTYPES and m >= 0 and S.shape == Y.shape
            and S.shape[1] == g.shape[0]
            and (S.dtype == dtype or (S.dtype == torch.bfloat16 and dtype == torch.float32))
            and Y.dtype == S.dtype and SY.shape == (m, m) and YY.shape == (m, m)
            and SY.dtype == dtype and YY.dtype == dtype and 0 <= count <= m
            and 0 <= newest < max(m, 1) and S.device == device and Y.device == device
            and SY.device == device and YY.device == device)


@_fast_path(_lbfgs_direction_valid)
def _check_lbfgs_direction(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, g: Tensor,
                           newest: int, count: int) -> None:
    torch._check(g.dim() == 1, lambda: f"g must be 1-D, got shape {tuple(g.shape)}")
    torch._check(g.dtype in (torch.float32, torch.float64),
                 lambda: f"g must be float32 or float64, got {g.dtype}")
    torch._check(S.dim() == 2 and S.shape == Y.shape,
                 lambda: f"S and Y must be [m, n] of one shape, got {tuple(S.shape)}, {tuple(Y.shape)}")
    torch._check(S.shape[1] == g.shape[0],
                 lambda: f"history length {S.shape[1]} != gradient length {g.shape[0]}")
    allowed = (g.dtype, torch.bfloat16) if g.dtype == torch.float32 else (g.dtype,)
    torch._check(S.dtype == Y.dtype and S.dtype in allowed,
                 lambda: f"history dtype {S.dtype} not allowed with a {g.dtype} gradient")
    m = S.shape[0]
    acc = reference.accumulation_dtype(g.dtype)
    torch._check(SY.shape == (m, m) and YY.shape == (m, m) and SY.dtype == acc and YY.dtype == acc,
                 lambda: f"SY and YY must be [{m}, {m}] {acc}")
    torch._check(0 <= count <= m, lambda: f"count must be in [0, {m}], got {count}")
    torch._check(0 <= newest < max(m, 1), lambda: f"newest must be in [0, {m}), got {newest}")
    torch._check(S.device == g.device and Y.device == g.device and SY.device == g.device
                 and YY.device == g.device, lambda: "all tensors must be on one device")


def lbfgs_direction(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, g: Tensor,
                    newest: int, count: int, update_gram: bool = False) -> tuple[Tensor, Tensor]:
    """L-BFGS direction ``d = -H g`` by the compact two-loop recursion (fused kernels).

    See :func:`soo_ext.reference.lbfgs_direction` for the exact contract.  With ``update_gram``
    the row and column ``newest`` of SY and YY are recomputed in the same pass over the history
    that computes ``S^T g`` and ``Y^T g`` (SY and YY are mutated in place).  Never synchronises
    with the host.  Returns ``(d, stats)`` with ``stats = [g.d, max|d|]``.
    """
    _check_lbfgs_direction(S, Y, SY, YY, g, newest, count)
    if _LOADED:
        return torch.ops.soo.lbfgs_direction.default(S, Y, SY, YY, g, newest, count, update_gram)
    return reference.lbfgs_direction(S, Y, SY, YY, g, newest, count, update_gram)


if _LOADED:
    @torch.library.register_fake("soo::lbfgs_direction")
    def _lbfgs_direction_fake(S, Y, SY, YY, g, newest, count, update_gram):
        _check_lbfgs_direction(S, Y, SY, YY, g, newest, count)
        return torch.empty_like(g), g.new_empty(2, dtype=reference.accumulation_dtype(g.dtype))


# ---------------------------------------------------------------------------------------------
# bfgs_direction

def _bfgs_direction_valid(H: Tensor, s: Tensor, y: Tensor, g: Tensor) -> bool:
    dtype, device = g.dtype, g.device
    n = g.shape[0] if g.dim() == 1 else -1
    return (n >= 0 and dtype in _FLOAT_DTYPES and H.shape == (n, n) and s.shape == (n,)
            and y.shape == (n,) and H.dtype == dtype and s.dtype == dtype and y.dtype == dtype
            and H.is_contiguous() and H.device == device and s.device == device
            and y.device == device)


@_fast_path(_bfgs_direction_valid)
def _check_bfgs_direction(H: Tensor, s: Tensor, y: Tensor, g: Tensor) -> None:
    torch._check(g.dim() == 1, lambda: f"g must be 1-D, got shape {tuple(g.shape)}")
    torch._check(g.dtype in (torch.float32, torch.float64),
                 lambda: f"g must be float32 or float64, got {g.dtype}")
    n = g.shape[0]
    torch._check(H.shape == (n, n) and s.shape == (n,) and y.shape == (n,),
                 lambda: f"H must be [{n}, {n}] and s, y [{n}], got {tuple(H.shape)}, "
                         f"{tuple(s.shape)}, {tuple(y.shape)}")
    torch._check(H.dtype == g.dtype and s.dtype == g.dtype and y.dtype == g.dtype,
                 lambda: f"H, s, y must have g's dtype {g.dtype}")
    torch._check(H.is_contiguous(), lambda: "H must be contiguous (it is updated in place)")
    torch._check(H.device == g.device and s.device == g.device and y.device == g.device,
                 lambda: "all tensors must be on one device")


def bfgs_direction(H: Tensor, s: Tensor, y: Tensor, g: Tensor,
                   update: bool) -> tuple[Tensor, Tensor]:
    """Dense BFGS direction ``d = -H g``, after the BFGS update of ``H`` with ``(s, y)`` in place
    when ``update`` (fused: H is read once and, when updating, written once).

    See :func:`soo_ext.reference.bfgs_direction` for the exact contract.  Never synchronises with
    the host.  Returns ``(d, stats)`` with ``stats = [g.d, max|d|]``.
    """
    _check_bfgs_direction(H, s, y, g)
    if _LOADED:
        return torch.ops.soo.bfgs_direction.default(H, s, y, g, update)
    return reference.bfgs_direction(H, s, y, g, update)


if _LOADED:
    @torch.library.register_fake("soo::bfgs_direction")
    def _bfgs_direction_fake(H, s, y, g, update):
        _check_bfgs_direction(H, s, y, g)
        return torch.empty_like(g), g.new_empty(2)


# ---------------------------------------------------------------------------------------------
# DRSOM: perturb, reduce, update, subproblem (see csrc/drsom.h)

_DRSOM_MAX_DIRS = 8


def _check_drsom_vector(op: str, name: str, a: Tensor, ref: Tensor) -> None:
    torch._check(a.dim() == 1, lambda: f"{op}: {name} must be 1-D, got shape {tuple(a.shape)}")
    torch._check(a.dtype == ref.dtype,
                 lambda: f"{op}: {name} has dtype {a.dtype}, expected {ref.dtype} (no dtype mix)")
    torch._check(a.device == ref.device,
                 lambda: f"{op}: {name} is on {a.device}, expected {ref.device} "
                         "(all tensors on one device)")
    torch._check(a.shape[0] == ref.shape[0],
                 lambda: f"{op}: {name} has length {a.shape[0]}, expected {ref.shape[0]}")
    torch._check(a.is_contiguous(), lambda: f"{op}: {name} must be contiguous")


def _check_drsom_base(op: str, name: str, a: Tensor) -> None:
    torch._check(a.dim() == 1, lambda: f"{op}: {name} must be 1-D, got shape {tuple(a.shape)}")
    torch._check(a.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: {name} must be float32 or float64, got {a.dtype}")
    torch._check(a.is_contiguous(), lambda: f"{op}: {name} must be contiguous")


def _check_drsom_directions(op: str, V, ref: Tensor) -> None:
    if not (isinstance(V, (list, tuple)) and 1 <= len(V) <= _DRSOM_MAX_DIRS):
        raise RuntimeError(f"{op}: V must hold 1 to {_DRSOM_MAX_DIRS} directions, got "
                           f"{len(V) if isinstance(V, (list, tuple)) else type(V).__name__}")
    for vj in V:
        _check_drsom_vector(op, "every V[j]", vj, ref)


def _check_drsom_scalar(op: str, name: str, a: Tensor, ref: Tensor) -> None:
    torch._check(a.dtype == ref.dtype,
                 lambda: f"{op}: {name} has dtype {a.dtype}, expected {ref.dtype} (no dtype mix)")
    torch._check(a.device == ref.device,
                 lambda: f"{op}: {name} is on {a.device}, expected {ref.device} "
                         "(all tensors on one device)")


def _drsom_vectors_valid(base: Tensor, vectors, scalar: Tensor) -> bool:
    """The common case of the DRSOM checks: ``base`` (float32/float64) and ``vectors`` contiguous
    ``[n]`` tensors of one dtype on one device, ``scalar`` of that dtype on that device."""
    dtype, device = base.dtype, base.device
    return (base.dim() == 1 and dtype in _FLOAT_DTYPES and base.is_contiguous()
            and scalar.dtype == dtype and scalar.device == device
            and _vectors_like(vectors, dtype, device, base.shape[0]))


def _drsom_directions_valid(V) -> bool:
    return isinstance(V, (list, tuple)) and 1 <= len(V) <= _DRSOM_MAX_DIRS


def _drsom_perturb_valid(x: Tensor, x0: Tensor, v: Tensor, t: Tensor) -> bool:
    return t.dim() == 0 and _drsom_vectors_valid(x, (x0, v), t)


def _drsom_reduce_valid(g_pert: Tensor, g: Tensor, V, t: Tensor) -> bool:
    return (_drsom_directions_valid(V) and t.dim() == 0
            and _drsom_vectors_valid(g, (g_pert, *V), t))


def _drsom_update_valid(x: Tensor, p: Tensor, V, alpha: Tensor) -> bool:
    return (_drsom_directions_valid(V) and alpha.dim() == 1 and alpha.shape[0] == len(V)
            and alpha.is_contiguous() and _drsom_vectors_valid(x, (p, *V), alpha))


def _drsom_subproblem_valid(Q: Tensor, G: Tensor, c: Tensor, gamma: float, max_length: float,
                            gamma_increase: float) -> bool:
    k = Q.shape[0] if Q.dim() == 2 else 0
    return (1 <= k <= _DRSOM_MAX_DIRS and Q.shape[1] == k and Q.dtype in _FLOAT_DTYPES
            and G.shape == Q.shape and c.dim() == 1 and c.shape[0] == k
            and G.dtype == c.dtype == Q.dtype and G.device == c.device == Q.device
            and math.isfinite(gamma) and gamma >= 0 and max_length >= 0
            and math.isfinite(gamma_increase) and gamma_increase > 1)


@_fast_path(_drsom_perturb_valid)
def _check_drsom_perturb(x: Tensor, x0: Tensor, v: Tensor, t: Tensor) -> None:
    op = "drsom_perturb"
    _check_drsom_base(op, "x", x)
    _check_drsom_vector(op, "x0", x0, x)
    _check_drsom_vector(op, "v", v, x)
    torch._check(t.dim() == 0, lambda: f"{op}: t must be a 0-dim tensor, got shape {tuple(t.shape)}")
    _check_drsom_scalar(op, "t", t, x)


@_fast_path(_drsom_reduce_valid)
def _check_drsom_reduce(g_pert: Tensor, g: Tensor, V, t: Tensor) -> None:
    op = "drsom_reduce"
    _check_drsom_base(op, "g", g)
    _check_drsom_vector(op, "g_pert", g_pert, g)
    _check_drsom_directions(op, V, g)
    torch._check(t.dim() == 0, lambda: f"{op}: t must be a 0-dim tensor, got shape {tuple(t.shape)}")
    _check_drsom_scalar(op, "t", t, g)


@_fast_path(_drsom_update_valid)
def _check_drsom_update(x: Tensor, p: Tensor, V, alpha: Tensor) -> None:
    op = "drsom_update"
    _check_drsom_base(op, "x", x)
    _check_drsom_vector(op, "p", p, x)
    _check_drsom_directions(op, V, x)
    torch._check(alpha.dim() == 1 and alpha.shape[0] == len(V),
                 lambda: f"{op}: alpha must be 1-D with len(V) = {len(V)} entries, got shape "
                         f"{tuple(alpha.shape)}")
    _check_drsom_scalar(op, "alpha", alpha, x)
    torch._check(alpha.is_contiguous(), lambda: f"{op}: alpha must be contiguous")


@_fast_path(_drsom_subproblem_valid)
def _check_drsom_subproblem(Q: Tensor, G: Tensor, c: Tensor, gamma: float, max_length: float,
                            gamma_increase: float) -> None:
    op = "drsom_subproblem"
    torch._check(Q.dim() == 2 and Q.shape[0] == Q.shape[1] and 1 <= Q.shape[0] <= _DRSOM_MAX_DIRS,
                 lambda: f"{op}: Q must be k x k with 1 <= k <= {_DRSOM_MAX_DIRS}, got shape "
                         f"{tuple(Q.shape)}")
    torch._check(Q.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: Q must be float32 or float64, got {Q.dtype}")
    torch._check(G.shape == Q.shape,
                 lambda: f"{op}: G must have Q's shape {tuple(Q.shape)}, got {tuple(G.shape)}")
    torch._check(c.dim() == 1 and c.shape[0] == Q.shape[0],
                 lambda: f"{op}: c must be 1-D with {Q.shape[0]} entries, got shape "
                         f"{tuple(c.shape)}")
    _check_drsom_scalar(op, "G", G, Q)
    _check_drsom_scalar(op, "c", c, Q)
    torch._check(math.isfinite(gamma) and gamma >= 0,
                 lambda: f"{op}: gamma must be finite and >= 0, got {gamma}")
    torch._check(max_length >= 0,
                 lambda: f"{op}: max_length must be >= 0 (inf: no limit), got {max_length}")
    torch._check(math.isfinite(gamma_increase) and gamma_increase > 1,
                 lambda: f"{op}: gamma_increase must be finite and > 1, got {gamma_increase}")


def drsom_perturb(x: Tensor, x0: Tensor, v: Tensor, t: Tensor, save: bool) -> None:
    """DRSOM perturbation in one pass, in place: with ``save`` ``x0 <- x``; then ``x <- x0 + t v``.

    ``t`` is a 0-dim tensor of the vectors' dtype on their device (no host sync).  Restore the
    base point exactly with ``x.copy_(x0)``.  See :func:`soo_ext.reference.drsom_perturb`.
    """
    _check_drsom_perturb(x, x0, v, t)
    if _LOADED:
        torch.ops.soo.drsom_perturb.default(x, x0, v, t, save)
    else:
        reference.drsom_perturb(x, x0, v, t, save)


def drsom_reduce(g_pert: Tensor, g: Tensor, V, t: Tensor,
                 with_gram: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DRSOM reductions in one pass over ``g_pert``, ``g`` and the k (1..8) directions ``V``.

    Returns ``(q, G, c)``: ``q[j] = (g_pert - g).V[j] / t``; with ``with_gram``
    ``G[i, j] = V[i].V[j]`` and ``c[j] = g.V[j]``, else empty ``[0, 0]`` and ``[0]`` tensors.
    See :func:`soo_ext.reference.drsom_reduce`.  Never synchronises with the host.
    """
    _check_drsom_reduce(g_pert, g, V, t)
    if _LOADED:
        return torch.ops.soo.drsom_reduce.default(g_pert, g, list(V), t, with_gram)
    return reference.drsom_reduce(g_pert, g, list(V), t, with_gram)


def drsom_update(x: Tensor, p: Tensor, V, alpha: Tensor) -> None:
    """DRSOM step in one pass, in place: ``p <- sum_j alpha[j] V[j]``, ``x <- x + p``.

    ``p`` may alias one of ``V``.  See :func:`soo_ext.reference.drsom_update`.
    """
    _check_drsom_update(x, p, V, alpha)
    if _LOADED:
        torch.ops.soo.drsom_update.default(x, p, list(V), alpha)
    else:
        reference.drsom_update(x, p, list(V), alpha)


def drsom_subproblem(Q: Tensor, G: Tensor, c: Tensor, gamma: float, max_length: float = math.inf,
                     gamma_increase: float = 5.0) -> Tensor:
    """DRSOM's ``k x k`` (k <= 8) radius-free trust-region step, in float64 on the device (one
    tiny kernel, no host sync): ``[alpha (k), predicted decrease, ok, gamma used, step length]``
    in Q's dtype; ``gamma`` climbs by ``gamma_increase`` while the step is longer than
    ``max_length``.  See :func:`soo_ext.reference.drsom_subproblem`."""
    gamma, max_length, gamma_increase = float(gamma), float(max_length), float(gamma_increase)
    _check_drsom_subproblem(Q, G, c, gamma, max_length, gamma_increase)
    if _LOADED:
        return torch.ops.soo.drsom_subproblem.default(Q, G, c, gamma, max_length, gamma_increase)
    return reference.drsom_subproblem(Q, G, c, gamma, max_length, gamma_increase)


if _LOADED:
    @torch.library.register_fake("soo::drsom_subproblem")
    def _drsom_subproblem_fake(Q, G, c, gamma, max_length, gamma_increase):
        _check_drsom_subproblem(Q, G, c, gamma, max_length, gamma_increase)
        return Q.new_empty(Q.shape[0] + 4)

    @torch.library.register_fake("soo::drsom_perturb")
    def _drsom_perturb_fake(x, x0, v, t, save):
        _check_drsom_perturb(x, x0, v, t)
        return None

    @torch.library.register_fake("soo::drsom_reduce")
    def _drsom_reduce_fake(g_pert, g, V, t, with_gram):
        _check_drsom_reduce(g_pert, g, V, t)
        k = len(V)
        m = k if with_gram else 0
        return g.new_empty(k), g.new_empty(m, m), g.new_empty(m)

    @torch.library.register_fake("soo::drsom_update")
    def _drsom_update_fake(x, p, V, alpha):
        _check_drsom_update(x, p, V, alpha)
        return None


# ---------------------------------------------------------------------------------------------
# Windows of vectors (GGT, M-FAC, Woodbury natural gradient).  Contracts in soo_ext/reference.py.

_WINDOW_MAX_VECTORS = 8


def _check_window(op: str, W: Tensor, dtype: torch.dtype, rows: int) -> None:
    torch._check(W.dim() == 2, lambda: f"{op}: W must be an [m, n] window, got shape {tuple(W.shape)}")
    allowed = (torch.float32, torch.bfloat16) if dtype == torch.float32 else (dtype,)
    torch._check(W.dtype in allowed,
                 lambda: f"{op}: window dtype {W.dtype} not allowed with {dtype} vectors")
    torch._check(W.is_contiguous(), lambda: f"{op}: W must be contiguous")
    torch._check(0 <= rows <= W.shape[0], lambda: f"{op}: rows must be in [0, {W.shape[0]}], got {rows}")


def _window_valid(W: Tensor, dtype: torch.dtype, rows: int) -> bool:
    return (W.dim() == 2 and dtype in _FLOAT_DTYPES and W.is_contiguous()
            and (W.dtype == dtype or (W.dtype == torch.bfloat16 and dtype == torch.float32))
            and 0 <= rows <= W.shape[0])


def _window_gram_valid(W: Tensor, X, rows: int) -> bool:
    return (isinstance(X, list) and 1 <= len(X) <= _WINDOW_MAX_VECTORS
            and _window_valid(W, X[0].dtype, rows)
            and _vectors_like(X, X[0].dtype, W.device, W.shape[1]))


def _window_combine_valid(out: Tensor, W: Tensor, coef: Tensor, rows: int, base,
                          base_coef) -> bool:
    dtype, device = out.dtype, out.device
    if not (out.dim() == 1 and out.is_contiguous() and _window_valid(W, dtype, rows)
            and out.shape[0] == W.shape[1] and W.device == device and coef.dim() == 1
            and coef.shape[0] == W.shape[0] and coef.dtype == torch.float64
            and coef.device == device):
        return False
    if base is None:
        return base_coef is None
    return (base_coef is not None and base.dim() == 1 and base.dtype == dtype
            and base.device == device and base.shape[0] == out.shape[0] and base.is_contiguous()
            and base_coef.dim() == 0 and base_coef.dtype == torch.float64
            and base_coef.device == device)


@_fast_path(_window_gram_valid)
def _check_window_gram(W: Tensor, X, rows: int) -> None:
    op = "window_gram"
    if not (isinstance(X, (list, tuple)) and len(X) <= _WINDOW_MAX_VECTORS):
        raise RuntimeError(f"{op}: X must be a list of 0 to {_WINDOW_MAX_VECTORS} vectors")
    dtype = X[0].dtype if X else (torch.float64 if W.dtype == torch.float64 else torch.float32)
    torch._check(dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: X must be float32 or float64, got {dtype}")
    _check_window(op, W, dtype, rows)
    for x in X:
        _check_drsom_vector(op, "every X[j]", x, X[0])
        torch._check(x.shape[0] == W.shape[1],
                     lambda: f"{op}: vector length {x.shape[0]} != window length {W.shape[1]}")
        torch._check(x.device == W.device, lambda: f"{op}: all tensors must be on one device")


@_fast_path(_window_combine_valid)
def _check_window_combine(out: Tensor, W: Tensor, coef: Tensor, rows: int, base, base_coef) -> None:
    op = "window_combine"
    _check_drsom_base(op, "out", out)
    _check_window(op, W, out.dtype, rows)
    torch._check(out.shape[0] == W.shape[1],
                 lambda: f"{op}: out has length {out.shape[0]}, window length {W.shape[1]}")
    torch._check(coef.dim() == 1 and coef.shape[0] == W.shape[0] and coef.dtype == torch.float64,
                 lambda: f"{op}: coef must be [{W.shape[0]}] float64, got {tuple(coef.shape)} {coef.dtype}")
    torch._check((base is None) == (base_coef is None),
                 lambda: f"{op}: base and base_coef go together")
    if base is not None:
        _check_drsom_vector(op, "base", base, out)
        torch._check(base_coef.dim() == 0 and base_coef.dtype == torch.float64,
                     lambda: f"{op}: base_coef must be a 0-dim float64 tensor")
    for t in (W, coef) + ((base_coef,) if base is not None else ()):
        torch._check(t.device == out.device, lambda: f"{op}: all tensors must be on one device")


def window_gram(W: Tensor, X, rows: int, full: bool = False) -> tuple[Tensor, Tensor]:
    """Dot products of a window's first ``rows`` rows with k (0..8) vectors, and with ``full``
    their Gram matrix, in one pass over the window (float64 results).

    Returns ``(G, D)``: ``D[i, j] = W[i] . X[j]`` (``[m, k]``), ``G[i, j] = W[i] . W[j]``
    (``[m, m]``, or ``[0, 0]`` without ``full``); rows and columns ``>= rows`` are zero.
    See :func:`soo_ext.reference.window_gram`.  Never synchronises with the host.
    """
    X = list(X)
    _check_window_gram(W, X, rows)
    if _LOADED:
        return torch.ops.soo.window_gram.default(W, X, rows, full)
    return reference.window_gram(W, X, rows, full)


def window_combine(out: Tensor, W: Tensor, coef: Tensor, rows: int,
                   base: Tensor | None = None, base_coef: Tensor | None = None) -> None:
    """``out <- base_coef * base + sum_{i < rows} coef[i] W[i]`` in one pass, in place.

    ``coef`` ``[m]`` and ``base_coef`` (0-dim) are float64 tensors on the device (no host sync);
    ``out`` may alias ``base``, not ``W``.  See :func:`soo_ext.reference.window_combine`.
    """
    _check_window_combine(out, W, coef, rows, base, base_coef)
    if out.numel() and W.numel():  # out may alias base, never the window (real tensors only)
        o, w = out.data_ptr(), W.data_ptr()
        if not (o + out.nbytes <= w or w + W.nbytes <= o):  # torch._check's error, without its cost
            raise RuntimeError("window_combine: out must not overlap the window W")
    if _LOADED:
        torch.ops.soo.window_combine.default(out, W, coef, rows, base, base_coef)
    else:
        reference.window_combine(out, W, coef, rows, base, base_coef)


if _LOADED:
    @torch.library.register_fake("soo::window_gram")
    def _window_gram_fake(W, X, rows, full):
        _check_window_gram(W, list(X), rows)
        m = W.shape[0]
        return (W.new_empty((m, m) if full else (0, 0), dtype=torch.float64),
                W.new_empty((m, len(X)), dtype=torch.float64))

    @torch.library.register_fake("soo::window_combine")
    def _window_combine_fake(out, W, coef, rows, base, base_coef):
        _check_window_combine(out, W, coef, rows, base, base_coef)
        return None


# ---------------------------------------------------------------------------------------------
# Kronecker factors (K-FAC, Shampoo): statistics, damped inverse, eigh, inverse p-th root,
# eigenbasis preconditioning.  Contracts in soo_ext/reference.py.

def _square_stack_valid(A: Tensor) -> bool:
    return A.dim() >= 2 and A.shape[-1] == A.shape[-2] and A.dtype in _FLOAT_DTYPES


@_fast_path(lambda op, A, name="A": _square_stack_valid(A))
def _check_square_stack(op: str, A: Tensor, name: str = "A") -> None:
    torch._check(A.dim() >= 2 and A.shape[-1] == A.shape[-2],
                 lambda: f"{op}: {name} must be a [..., n, n] stack of square matrices, got shape "
                         f"{tuple(A.shape)}")
    torch._check(A.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: {name} must be float32 or float64, got {A.dtype}")


@_fast_path(lambda op, name, value: value >= 0)
def _check_nonnegative(op: str, name: str, value: float) -> None:
    torch._check(value >= 0, lambda: f"{op}: {name} must be >= 0, got {value}")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _kron_factor_update_valid(F: Tensor, X: Tensor) -> bool:
    return (_square_stack_valid(F) and X.dim() == F.dim() and X.shape[:-2] == F.shape[:-2]
            and X.shape[-1] == F.shape[-1]
            and (X.dtype == F.dtype or X.dtype in _LOW_PRECISION
                 or (X.dtype == torch.float32 and F.dtype == torch.float64))
            and X.device == F.device)


@_fast_path(_kron_factor_update_valid)
def _check_kron_factor_update(F: Tensor, X: Tensor) -> None:
    op = "kron_factor_update_"
    _check_square_stack(op, F, "F")
    torch._check(X.dim() == F.dim() and X.shape[:-2] == F.shape[:-2]
                 and X.shape[-1] == F.shape[-1],
                 lambda: f"{op}: X must be [..., N, d] with F's leading dims and d = "
                         f"{F.shape[-1]}, got F {tuple(F.shape)} and X {tuple(X.shape)}")
    torch._check(X.dtype == F.dtype or X.dtype in _LOW_PRECISION
                 or (X.dtype == torch.float32 and F.dtype == torch.float64),
                 lambda: f"{op}: X must have F's dtype or a lower-precision float dtype, got "
                         f"{X.dtype} with F {F.dtype}")
    torch._check(X.device == F.device, lambda: f"{op}: X is on {X.device}, F on {F.device}")


def _kron_inverse_root_valid(A: Tensor, p: int, epsilon: float, method: str, max_iters: int,
                             tol: float) -> bool:
    return (_square_stack_valid(A) and p >= 1 and epsilon >= 0 and epsilon != float("inf")
            and method in ("newton", "eigh") and max_iters >= 0 and tol >= 0)


@_fast_path(_kron_inverse_root_valid)
def _check_kron_inverse_root(A: Tensor, p: int, epsilon: float, method: str, max_iters: int,
                             tol: float) -> None:
    op = "kron_inverse_root"
    _check_square_stack(op, A)
    torch._check(p >= 1, lambda: f"{op}: p must be >= 1, got {p}")
    torch._check(epsilon >= 0 and epsilon != float("inf"),
                 lambda: f"{op}: epsilon must be finite and >= 0, got {epsilon}")
    torch._check(method in ("newton", "eigh"),
                 lambda: f"{op}: method must be 'newton' or 'eigh', got {method!r}")
    _check_nonnegative(op, "max_iters", max_iters)
    _check_nonnegative(op, "tol", tol)


def _kfac_precondition_valid(grad: Tensor, QG: Tensor, dG: Tensor, QA: Tensor,
                             dA: Tensor) -> bool:
    if not (grad.dim() >= 2 and grad.dtype in _FLOAT_DTYPES):
        return False
    *batch, o, i = grad.shape
    dtype, device = grad.dtype, grad.device
    return (QG.shape == (*batch, o, o) and dG.shape == (*batch, o) and QA.shape == (*batch, i, i)
            and dA.shape == (*batch, i) and QG.dtype == dtype and dG.dtype == dtype
            and QA.dtype == dtype and dA.dtype == dtype and QG.device == device
            and dG.device == device and QA.device == device and dA.device == device)


@_fast_path(_kfac_precondition_valid)
def _check_kfac_precondition(grad: Tensor, QG: Tensor, dG: Tensor, QA: Tensor,
                             dA: Tensor) -> None:
    op = "kfac_precondition_eigen"
    torch._check(grad.dim() >= 2, lambda: f"{op}: grad must be [..., o, i], got shape "
                                          f"{tuple(grad.shape)}")
    torch._check(grad.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: grad must be float32 or float64, got {grad.dtype}")
    batch, (o, i) = tuple(grad.shape[:-2]), tuple(grad.shape[-2:])
    torch._check(tuple(QG.shape) == (*batch, o, o) and tuple(dG.shape) == (*batch, o)
                 and tuple(QA.shape) == (*batch, i, i) and tuple(dA.shape) == (*batch, i),
                 lambda: f"{op}: with grad {tuple(grad.shape)} QG must be [..., {o}, {o}], dG "
                         f"[..., {o}], QA [..., {i}, {i}], dA [..., {i}]; got {tuple(QG.shape)}, "
                         f"{tuple(dG.shape)}, {tuple(QA.shape)}, {tuple(dA.shape)}")
    for t in (QG, dG, QA, dA):
        torch._check(t.dtype == grad.dtype,
                     lambda: f"{op}: all tensors must have grad's dtype {grad.dtype}, got {t.dtype}")
        torch._check(t.device == grad.device,
                     lambda: f"{op}: all tensors must be on {grad.device}, got {t.device}")


def kron_factor_update_(F: Tensor, X: Tensor, decay: float, scale: float) -> None:
    """``F <- decay F + scale X^T X``, then ``F <- (F + F^T) / 2``, in place (one batched GEMM into
    F and one symmetrisation pass).  ``F [..., d, d]`` float32/float64, ``X [..., N, d]`` of F's
    dtype or a lower-precision float (computed in F's dtype).  See
    :func:`soo_ext.reference.kron_factor_update_`."""
    _check_kron_factor_update(F, X)
    if _LOADED:
        torch.ops.soo.kron_factor_update_.default(F, X, decay, scale)
    else:
        reference.kron_factor_update_(F, X, decay, scale)


def kron_damped_inverse(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Batched ``(A + damping I)^{-1}`` by Cholesky with a float64 retry (more damping) of the
    matrices that fail; ``(X, status)`` with int32 statuses 0 ok / 1 retried / 2 failed (X = 0).
    Sync-free on CUDA.  See :func:`soo_ext.reference.kron_damped_inverse`."""
    _check_square_stack("kron_damped_inverse", A)
    _check_nonnegative("kron_damped_inverse", "damping", damping)
    if _LOADED:
        return torch.ops.soo.kron_damped_inverse.default(A, damping)
    return reference.kron_damped_inverse(A, damping)


def kron_eigh(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched eigendecomposition of PSD factors, eigenvalues ascending and clamped >= 0, float64
    retry; ``(d, Q, status)`` (status 2: d = 0, Q = I).  See :func:`soo_ext.reference.kron_eigh`."""
    _check_square_stack("kron_eigh", A)
    if _LOADED:
        return torch.ops.soo.kron_eigh.default(A)
    return reference.kron_eigh(A)


def kron_inverse_root(A: Tensor, p: int, epsilon: float, method: str = "newton",
                      max_iters: int = 100, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Batched ``(A + epsilon I)^{-1/p}`` by the coupled Newton iteration (per-matrix stopping) or
    by eigh; ``(X, status)``.  See :func:`soo_ext.reference.kron_inverse_root`."""
    _check_kron_inverse_root(A, p, epsilon, method, max_iters, tol)
    if _LOADED:
        return torch.ops.soo.kron_inverse_root.default(A, p, epsilon, method, max_iters, tol)
    return reference.kron_inverse_root(A, p, epsilon, method, max_iters, tol)


def kfac_precondition_eigen(grad: Tensor, QG: Tensor, dG: Tensor, QA: Tensor, dA: Tensor,
                            damping: float) -> Tensor:
    """``Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T`` with the division fused (see
    :func:`soo_ext.reference.kfac_precondition_eigen`)."""
    _check_kfac_precondition(grad, QG, dG, QA, dA)
    if _LOADED:
        return torch.ops.soo.kfac_precondition_eigen.default(grad, QG, dG, QA, dA, damping)
    return reference.kfac_precondition_eigen(grad, QG, dG, QA, dA, damping)


if _LOADED:
    @torch.library.register_fake("soo::kron_factor_update_")
    def _kron_factor_update_fake(F, X, decay, scale):
        _check_kron_factor_update(F, X)
        return None

    def _status_like(A):
        return A.new_empty(A.shape[:-2], dtype=torch.int32)

    @torch.library.register_fake("soo::kron_damped_inverse")
    def _kron_damped_inverse_fake(A, damping):
        _check_square_stack("kron_damped_inverse", A)
        return A.new_empty(A.shape), _status_like(A)

    @torch.library.register_fake("soo::kron_eigh")
    def _kron_eigh_fake(A):
        _check_square_stack("kron_eigh", A)
        return A.new_empty(A.shape[:-1]), A.new_empty(A.shape), _status_like(A)

    @torch.library.register_fake("soo::kron_inverse_root")
    def _kron_inverse_root_fake(A, p, epsilon, method, max_iters, tol):
        _check_kron_inverse_root(A, p, epsilon, method, max_iters, tol)
        return A.new_empty(A.shape), _status_like(A)

    @torch.library.register_fake("soo::kfac_precondition_eigen")
    def _kfac_precondition_eigen_fake(grad, QG, dG, QA, dA, damping):
        _check_kfac_precondition(grad, QG, dG, QA, dA)
        return grad.new_empty(grad.shape)


# ---------------------------------------------------------------------------------------------
# The finiteness check of the skip guard.  Contract in soo_ext/reference.py.

_FINITE_CHECK_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _all_finite_valid(tensors) -> bool:
    if not (isinstance(tensors, list) and tensors):
        return False
    device = tensors[0].device
    for t in tensors:
        if not (t.dtype in _FINITE_CHECK_DTYPES and t.device == device):
            return False
    return True


@_fast_path(_all_finite_valid)
def _check_all_finite(tensors) -> None:
    op = "all_finite"
    if not (isinstance(tensors, (list, tuple)) and tensors):
        raise RuntimeError(f"{op}: tensors must not be empty (the result is on their device)")
    for t in tensors:
        torch._check(t.dtype in _FINITE_CHECK_DTYPES,
                     lambda: f"{op}: every tensor must be float64, float32, bfloat16 or float16, "
                             f"got {t.dtype}")
        torch._check(t.device == tensors[0].device,
                     lambda: f"{op}: all tensors must be on one device, got {t.device} and "
                             f"{tensors[0].device}")


def all_finite(tensors) -> Tensor:
    """Whether every element of every tensor is finite: a 0-dim bool tensor on their device, from
    one pass over each tensor's bits (never a host sync).  Float64, float32, bfloat16 and float16,
    mixed and of any strides; not an empty list.  See :func:`soo_ext.reference.all_finite`."""
    tensors = list(tensors)
    _check_all_finite(tensors)
    if _LOADED:
        return torch.ops.soo.all_finite.default(tensors)
    return reference.all_finite(tensors)


if _LOADED:
    @torch.library.register_fake("soo::all_finite")
    def _all_finite_fake(tensors):
        _check_all_finite(list(tensors))
        return tensors[0].new_empty((), dtype=torch.bool)
