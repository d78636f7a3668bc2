"""Pure-PyTorch references of every soo_ext op.

They are the test oracle for the compiled kernels and the fallback used when the compiled
module ``soo_ext._C`` is missing.  Each function has exactly the semantics of the op of the same
name in :mod:`soo_ext.ops`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._support.guard import finite_by_extremes

__all__ = ["accumulation_dtype", "ring_slots", "lbfgs_direction", "lbfgs_two_loop_textbook",
           "bfgs_direction", "drsom_perturb", "drsom_reduce", "drsom_update", "drsom_subproblem",
           "window_gram", "window_combine", "KRON_OK", "KRON_FALLBACK", "KRON_FAILED", "kron_factor_update_", "kron_damped_inverse",
           "kron_eigh", "kron_inverse_root", "kfac_precondition_eigen", "all_finite"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which dot products and coefficients are accumulated for a gradient of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_slots(newest: int, count: int, m: int) -> list[int]:
    """Physical slots of the ``count`` valid pairs of an ``m``-slot ring, oldest first."""
    return [(newest - count + 1 + i) % m for i in range(count)]


def lbfgs_direction(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, g: Tensor,
                    newest: int, count: int, update_gram: bool) -> tuple[Tensor, Tensor]:
    """L-BFGS direction ``d = -H g`` in compact form (reference of ``soo::lbfgs_direction``).

    ``S``, ``Y``: ``[m, n]`` ring buffers of the pairs (rows are physical slots), dtype ``g.dtype``
    or bfloat16 when ``g`` is float32.  ``SY[i, j] = s_i . y_j`` and ``YY[i, j] = y_i . y_j`` over
    physical slots, in the accumulation dtype.  The ``count`` valid pairs occupy the slots
    ``newest - count + 1 .. newest`` (mod m).  With ``update_gram`` the row and column ``newest``
    of SY and YY are first recomputed from S and Y (in place): that is how a push is completed.
    The initial scaling is ``gamma = s.y / y.y`` of the newest pair.

    Returns ``(d, stats)``: ``d`` has g's dtype, ``stats = [g.d, max|d|]`` in the accumulation dtype.
    """
    acc = accumulation_dtype(g.dtype)
    m = S.shape[0]
    slots = ring_slots(newest, count, m)
    ga = g.to(acc)
    if count == 0:
        d = -ga
    else:
        idx = torch.tensor(slots, device=g.device, dtype=torch.long)
        Sv = S.index_select(0, idx).to(acc)
        Yv = Y.index_select(0, idx).to(acc)
        if update_gram:
            s_new, y_new = S[newest].to(acc), Y[newest].to(acc)
            SY[idx, newest] = (Sv @ y_new).to(SY.dtype)
            SY[newest, idx] = (Yv @ s_new).to(SY.dtype)
            yy_new = (Yv @ y_new).to(YY.dtype)
            YY[idx, newest] = yy_new
            YY[newest, idx] = yy_new
        sy = SY.to(acc)[idx][:, idx]
        yy = YY.to(acc)[idx][:, idx]
        sg, yg = Sv @ ga, Yv @ ga
        alpha, coef_s = _two_loop_coefficients(sy, yy, sg, yg)
        gamma = sy[-1, -1] / yy[-1, -1]
        d = -(gamma * ga - gamma * (alpha @ Yv) + coef_s @ Sv)
    stats = torch.stack([torch.dot(ga, d), d.abs().max() if d.numel() else d.new_zeros(())])
    return d.to(g.dtype), stats


def _two_loop_coefficients(sy: Tensor, yy: Tensor, sg: Tensor, yg: Tensor) -> tuple[Tensor, Tensor]:
    """Both loops of the recursion on scalars only; pairs in logical order, oldest first.

    Returns ``alpha`` (first loop) and ``alpha - beta`` (the weights of the s_i in the result).
    """
    k = sg.shape[0]
    rho = 1.0 / torch.diagonal(sy)
    gamma = sy[-1, -1] / yy[-1, -1]
    alpha = [None] * k
    for i in range(k - 1, -1, -1):  # s_i . q with q = g - sum_{j>i} alpha_j y_j
        acc = sg[i]
        for j in range(i + 1, k):
            acc = acc - alpha[j] * sy[i, j]
        alpha[i] = rho[i] * acc
    alpha_t = torch.stack(alpha)
    coef_s = [None] * k
    for i in range(k):  # y_i . r with r = gamma q + sum_{l<i} (alpha_l - beta_l) s_l
        acc = gamma * (yg[i] - torch.dot(alpha_t, yy[i]))
        for j in range(i):
            acc = acc + coef_s[j] * sy[j, i]
        coef_s[i] = alpha[i] - rho[i] * acc
    return alpha_t, torch.stack(coef_s)


def lbfgs_two_loop_textbook(S: Tensor, Y: Tensor, g: Tensor, newest: int, count: int) -> Tensor:
    """The textbook two-loop recursion (Nocedal & Wright, Alg. 7.4) over the valid ring slots.

    Independent of the Gram blocks: the oracle against which the compact form is checked.
    Returns ``d = -H g``.
    """
    m = S.shape[0]
    slots = ring_slots(newest, count, m)
    q = -g.clone()
    if count == 0:
        return q
    s = [S[j].to(g.dtype) for j in slots]
    y = [Y[j].to(g.dtype) for j in slots]
    rho = [1.0 / torch.dot(y[i], s[i]) for i in range(count)]
    alpha = [None] * count
    for i in range(count - 1, -1, -1):
        alpha[i] = rho[i] * torch.dot(s[i], q)
        q = q - alpha[i] * y[i]
    r = q * (torch.dot(s[-1], y[-1]) / torch.dot(y[-1], y[-1]))
    for i in range(count):
        beta = rho[i] * torch.dot(y[i], r)
        r = r + (alpha[i] - beta) * s[i]
    return r


def bfgs_direction(H: Tensor, s: Tensor, y: Tensor, g: Tensor,
                   update: bool) -> tuple[Tensor, Tensor]:
    """Dense BFGS direction (reference of ``soo::bfgs_direction``).

    ``H``: ``[n, n]`` symmetric inverse-Hessian approximation, dtype ``g.dtype``.  With ``update``
    it is first replaced, in place, by the BFGS update with the pair ``(s, y)`` (the caller
    guarantees ``y.s > 0``)::

        H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T,   rho = 1 / y.s
          =  H - rho (s u^T + u s^T) + (rho^2 y.u + rho) s s^T,   u = H y

    Returns ``(d, stats)``: ``d = -H g`` with the (updated) H, ``stats = [g.d, max|d|]``.
    """
    if update:
        u = H @ y
        rho = 1.0 / torch.dot(y, s)
        c = rho * rho * torch.dot(y, u) + rho
        H.sub_(rho * (torch.outer(s, u) + torch.outer(u, s))).add_(c * torch.outer(s, s))
    d = -(H @ g)
    stats = torch.stack([torch.dot(g, d), d.abs().max() if d.numel() else d.new_zeros(())])
    return d, stats


# --------------------------------------------------------------------------------------------- #
# DRSOM (dimension-reduced second-order method): the three fused vector ops and the k x k
# trust-region step.

DRSOM_LAMBDA_FLOOR = 1e-8  # lb = max(1e-8, -lambda_min), as in DRSOM.jl
DRSOM_GAMMA_FLOOR = 1e-16  # where a climb from gamma = 0 starts
DRSOM_GAMMA_MAX = 1e16  # lambda ~ 1e16 lambda_max: steps below rounding
DRSOM_MAX_RUNGS = 200  # climbs of gamma in one drsom_subproblem call, at most

def drsom_perturb(x: Tensor, x0: Tensor, v: Tensor, t: Tensor, save: bool) -> None:
    """Move to a perturbed point (reference of ``soo::drsom_perturb``), in place.

    With ``save``: ``x0 <- x`` then ``x <- x0 + t v``; without: ``x <- x0 + t v`` (``x0`` already
    holds the base point).  ``t`` is a 0-dim device tensor of the vectors' dtype.
    ``x.copy_(x0)`` restores the base point exactly.
    """
    if save:
        x0.copy_(x)
    x.copy_(x0 + t.reshape(()) * v)


def drsom_reduce(g_pert: Tensor, g: Tensor, V: list[Tensor], t: Tensor,
                 with_gram: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Reductions of one DRSOM step (reference of ``soo::drsom_reduce``).

    ``q[j] = (g_pert - g) . V[j] / t`` (finite-difference Hessian-vector products projected on the
    directions; central differences: ``g_pert = grad(x + t v)``, ``g = grad(x - t v)``, ``2t``).
    With ``with_gram`` also ``G[i, j] = V[i] . V[j]`` and ``c[j] = g . V[j]``; without, ``G`` and
    ``c`` are empty tensors of shapes ``[0, 0]`` and ``[0]``.  Summed in float64 also for float32
    vectors, as the compiled kernels do, and returned in the vectors' dtype; ``G`` is symmetric
    bit for bit.
    """
    k = len(V)
    dt = g.dtype
    acc = torch.float64
    if k == 0:
        Vm = g.new_zeros((0, g.numel()), dtype=acc)
    else:
        Vm = torch.stack([vj.reshape(-1) for vj in V]).to(acc)
    q = (Vm @ (g_pert.to(acc) - g.to(acc))) / t.reshape(()).to(acc)
    if with_gram:
        G = Vm @ Vm.T
        G = (G + G.T) / 2  # a + b == b + a: exactly symmetric
        c = Vm @ g.to(acc)
    else:
        G = g.new_zeros((0, 0))
        c = g.new_zeros((0,))
    return q.to(dt), G.to(dt), c.to(dt)


def drsom_update(x: Tensor, p: Tensor, V: list[Tensor], alpha: Tensor) -> None:
    """Take the step (reference of ``soo::drsom_update``), in place.

    ``p <- sum_j alpha[j] V[j]`` then ``x <- x + p``.  ``p`` may alias one of ``V`` (every
    ``V[j]`` is read before ``p`` is written).
    """
    step = torch.zeros_like(x)
    for j, vj in enumerate(V):
        step = step + alpha[j] * vj
    p.copy_(step)
    x.add_(step)


def drsom_subproblem(Q: Tensor, G: Tensor, c: Tensor, gamma: float, max_length: float = math.inf,
                     gamma_increase: float = 5.0) -> Tensor:
    """DRSOM's radius-free trust-region step over ``span V`` (reference of
    ``soo::drsom_subproblem``), in float64 whatever the inputs' dtype.

    ``Q``, ``G`` (``k x k``, symmetrised here), ``c`` (``k``): the model
    ``m(a) = c.a + a.Q a / 2`` and the Gram matrix of the directions.  With ``s_i = G_ii^-1/2``
    (directions scaled to unit length): ``Gh = s G s + sqrt(eps) I`` (eps of the inputs'
    dtype), ``Qh = s Q s``, ``ch = s c``; ``lambda_min/max`` are the extreme eigenvalues of
    ``L^-1 Qh L^-T`` (``Gh = L L^T``); ``lb = max(-lambda_min, 1e-8)``,
    ``top = max(lb, lambda_max) + max|lambda|``, ``lambda = gamma top + (1 - gamma) lb``,
    ``ah = -(Qh + lambda Gh)^-1 ch``.  While the step's length ``||V a|| = sqrt(a.G a)``
    exceeds ``max_length`` (or is NaN), ``gamma <- gamma_increase gamma`` (from 1e-16 if it is
    0; at most 1e16 and 200 times) and the system is solved again.  Returns
    ``[ah * s (k), pred, ok, gamma, length]`` in the inputs' dtype: the step's coefficients on
    the (unscaled) directions, the predicted decrease ``-(ch.ah + ah.Qh ah / 2)``, 1 if ``Qh``,
    ``ch`` and the eigenvalues are finite (and ``Gh`` positive definite), else 0 (then the
    other entries are meaningless), the gamma used and the step's length.
    """
    dt, k = Q.dtype, Q.shape[0]
    f64 = torch.float64
    Q, G, c = Q.to(f64), G.to(f64), c.to(f64)
    eye = torch.eye(k, dtype=f64, device=Q.device)
    s = torch.rsqrt(torch.diagonal(G))
    S = s[:, None] * s[None, :]
    Qh = (Q + Q.T) / 2 * S
    Gs = (G + G.T) / 2 * S
    Gh = Gs + math.sqrt(torch.finfo(dt).eps) * eye
    ch = c * s
    L, info = torch.linalg.cholesky_ex(Gh)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    M = Linv @ Qh @ Linv.T
    M = (M + M.T) / 2
    ok = (info == 0) & torch.isfinite(torch.cat([Qh.reshape(-1), ch, M.reshape(-1)])).all()
    ev = torch.linalg.eigvalsh(torch.where(ok, M, eye))  # eigvalsh may fail on NaN input
    lmin, lmax = ev[0], ev[-1]
    lb = torch.clamp_min(-lmin, DRSOM_LAMBDA_FLOOR)
    top = torch.maximum(lb, lmax) + torch.maximum(lmin.abs(), lmax.abs())
    ok_host = bool(ok)
    for rung in range(DRSOM_MAX_RUNGS + 1):
        lam = gamma * top + (1 - gamma) * lb
        ah, _ = torch.linalg.solve_ex(Qh + lam * Gh, -ch)
        length = torch.dot(ah, Gs @ ah).clamp_min(0).sqrt()
        too_long = not bool(length <= max_length)  # also a NaN step (a singular system)
        if not ok_host or not too_long or gamma >= DRSOM_GAMMA_MAX or rung == DRSOM_MAX_RUNGS:
            break
        gamma = min(gamma * gamma_increase if gamma > 0 else DRSOM_GAMMA_FLOOR, DRSOM_GAMMA_MAX)
    pred = -(torch.dot(ch, ah) + 0.5 * torch.dot(ah, Qh @ ah))
    gamma_t = torch.tensor([gamma], dtype=f64, device=Q.device)
    return torch.cat([ah * s, pred.reshape(1), ok.to(f64).reshape(1), gamma_t,
                      length.reshape(1)]).to(dt)


# --------------------------------------------------------------------------------------------- #
# Windows of vectors (GGT, M-FAC, Woodbury natural gradient): an ``[m, n]`` window, its ``m x m``
# Gram matrix and dot products in one pass, and a combination of its rows in another.

def window_gram(W: Tensor, X: list[Tensor], rows: int, full: bool) -> tuple[Tensor, Tensor]:
    """Gram matrix of a window of vectors and its dot products (reference of ``soo::window_gram``).

    ``W`` is an ``[m, n]`` window whose first ``rows`` rows are filled (the rest are ignored: a
    ring that has not wrapped yet), ``X`` a list of k (0..8) vectors of length n.  Returns
    ``(G, D)``, both float64 whatever the storage: ``D[i, j] = W[i] . X[j]`` (``[m, k]``) and, with
    ``full``, ``G[i, j] = W[i] . W[j]`` (``[m, m]``; ``[0, 0]`` without); entries of rows or columns
    ``>= rows`` are zero.  ``G`` is symmetric bit for bit.  float64 because the ``m x m`` systems
    built from them (Woodbury, M-FAC's recursion, GGT's eigendecomposition) are ill-conditioned.
    """
    m, k = W.shape[0], len(X)
    acc = torch.float64
    Wv = W[:rows].to(acc)
    D = W.new_zeros((m, k), dtype=acc)
    if k:
        D[:rows] = Wv @ torch.stack([x.reshape(-1) for x in X]).to(acc).T
    if not full:
        return W.new_zeros((0, 0), dtype=acc), D
    G = W.new_zeros((m, m), dtype=acc)
    Gv = Wv @ Wv.T
    G[:rows, :rows] = (Gv + Gv.T) / 2  # a + b == b + a: exactly symmetric
    return G, D


def window_combine(out: Tensor, W: Tensor, coef: Tensor, rows: int,
                   base: Tensor | None = None, base_coef: Tensor | None = None) -> None:
    """Combination of a window's rows (reference of ``soo::window_combine``), in place.

    ``out <- base_coef * base + sum_{i < rows} coef[i] W[i]`` (without ``base`` just the sum),
    summed in float64 and rounded once to ``out``'s dtype.  ``coef`` is ``[m]`` float64 and
    ``base_coef`` a 0-dim float64 tensor, both on the device (no host sync).  ``out`` may alias
    ``base``; it must not overlap ``W``.
    """
    acc = torch.float64
    total = coef[:rows].to(acc) @ W[:rows].to(acc) if rows else out.new_zeros(out.shape, dtype=acc)
    if base is not None:
        total = total + base_coef.to(acc) * base.to(acc)
    out.copy_(total)


# --------------------------------------------------------------------------------------------- #
# Kronecker factors (K-FAC, Shampoo).  Batched ops take ``[..., n, n]`` stacks of square factors
# (any number of leading batch dims, usually one: a bucket of same-size factors).
# ``status`` codes, int32 per matrix: 0 ok; 1 usable after a fallback (retried in float64, or
# for the Newton root: stopped before reaching ``tol``); 2 failed (the output is zero there and
# the caller keeps what it had).

KRON_OK, KRON_FALLBACK, KRON_FAILED = 0, 1, 2


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _finite_matrices(X: Tensor) -> Tensor:
    """Per matrix of a ``[..., n, n]`` stack: all entries finite."""
    return torch.isfinite(X).flatten(-2).all(-1)


def kron_factor_update_(F: Tensor, X: Tensor, decay: float, scale: float) -> None:
    """Factor statistics in place (reference of ``soo::kron_factor_update_``)::

        F <- decay F + scale X^T X,   then F <- (F + F^T) / 2

    ``F``: ``[..., d, d]`` float32/float64; ``X``: ``[..., N, d]`` (same leading dims) of F's dtype
    or a lower-precision float (bfloat16/float16 activations under AMP), computed in F's dtype.
    K-FAC's running average is ``decay = alpha, scale = (1 - alpha) / N``; Shampoo's sum of
    outer products ``G G^T`` is ``X = G^T`` with ``decay = beta2, scale = 1``.
    """
    Xf = X.to(F.dtype)
    F.mul_(decay).add_(Xf.transpose(-1, -2) @ Xf, alpha=scale)
    F.copy_((F + F.transpose(-1, -2)) * 0.5)


def kron_damped_inverse(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Inverses of damped SPD factors (reference of ``soo::kron_damped_inverse``).

    ``X = (A + damping I)^{-1}`` by Cholesky for each matrix of the ``[..., n, n]`` stack ``A``
    (symmetric, float32/float64).  A matrix with a non-finite entry fails (status 2: Cholesky
    reads one triangle only).  A matrix whose Cholesky fails (or gives a non-finite inverse)
    is retried in float64 with ``damping' = 10 damping + eps32 |tr A| / n`` (eps32 = float32
    epsilon: a scale-aware shift that also rescues undamped rank-deficient factors) and gets
    status 1; if that fails too it gets status 2 and a zero matrix.  Returns ``(X, status)``.
    """
    eye = _eye_like(A)
    L, info = torch.linalg.cholesky_ex(A + damping * eye)
    # A failed factorisation leaves a partial L that cholesky_inverse refuses: invert I there.
    X = torch.cholesky_inverse(torch.where((info == 0)[..., None, None], L, eye))
    ok = (info == 0) & _finite_matrices(X)
    A64 = A.to(torch.float64)
    n = A.shape[-1]
    shift = 10.0 * damping + torch.finfo(torch.float32).eps * A64.diagonal(0, -2, -1).sum(-1).abs() / max(n, 1)
    L64, info64 = torch.linalg.cholesky_ex(A64 + shift[..., None, None] * eye.to(torch.float64))
    X64 = torch.cholesky_inverse(torch.where((info64 == 0)[..., None, None], L64,
                                             eye.to(torch.float64))).to(A.dtype)
    ok64 = (info64 == 0) & _finite_matrices(X64)
    finite = _finite_matrices(A)
    ok, ok64 = ok & finite, ok64 & finite
    out = torch.where(ok[..., None, None], X, torch.where(ok64[..., None, None], X64, torch.zeros_like(X)))
    status = torch.where(ok, KRON_OK, torch.where(ok64, KRON_FALLBACK, KRON_FAILED)).to(torch.int32)
    return out, status


def _eigh_one(A: Tensor) -> tuple[Tensor, Tensor] | None:
    """eigh of one matrix, None when it fails to converge or is non-finite."""
    try:
        d, Q = torch.linalg.eigh(A)
    except RuntimeError:  # torch.linalg.LinAlgError: the algorithm did not converge
        return None
    return (d, Q) if bool(torch.isfinite(d).all() and torch.isfinite(Q).all()) else None


def kron_eigh(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigendecompositions of symmetric PSD factors (reference of ``soo::kron_eigh``).

    ``A = Q diag(d) Q^T`` for each matrix of the ``[..., n, n]`` stack (float32/float64; only
    the lower triangle is read), eigenvalues ascending and clamped to ``>= 0``.  A matrix whose
    decomposition fails or is non-finite is redone in float64 (status 1); if that fails too it
    gets ``d = 0, Q = I`` and status 2.  Returns ``(d, Q, status)``.
    """
    n = A.shape[-1]
    flat = A.reshape(math.prod(A.shape[:-2]), n, n)
    d = A.new_zeros(flat.shape[:-1])
    Q = _eye_like(A).expand_as(flat).clone()
    status = torch.full(flat.shape[:1], KRON_FAILED, dtype=torch.int32, device=A.device)
    for b in range(flat.shape[0]):  # one at a time: a failure must not spoil the others
        for code, dtype in ((KRON_OK, A.dtype), (KRON_FALLBACK, torch.float64)):
            result = _eigh_one(flat[b].to(dtype))
            if result is not None:
                d[b], Q[b], status[b] = result[0], result[1], code
                break
    batch = A.shape[:-2]
    return d.clamp_min(0).reshape(*batch, n), Q.reshape(A.shape), status.reshape(batch)


def kron_inverse_root(A: Tensor, p: int, epsilon: float, method: str = "newton",
                      max_iters: int = 100, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Inverse p-th roots of symmetric PSD factors (reference of ``soo::kron_inverse_root``).

    For each matrix of the ``[..., n, n]`` stack (float32/float64) ``X ~= (A + epsilon I)^{-1/p}``
    (``p >= 1``).  Returns ``(X, status)``.

    ``method='eigh'``: ``A = Q diag(l) Q^T`` (as :func:`kron_eigh`, float64 retry), eigenvalues
    shifted ``l <- l - min(l_min, 0) + epsilon``, ``X = Q diag(l^{-1/p}) Q^T``; status as
    :func:`kron_eigh`.

    ``method='newton'``: the coupled Newton iteration (Guo & Higham 2006, as in Shampoo) on
    ``B = A + epsilon I``: with ``z = (p + 1) / (2 ||B||_F)``, ``X_0 = z^{1/p} I``, ``M_0 = z B``::

        T = ((p + 1) I - M) / p,   X <- X T,   M <- T^p M        (M = X^p B -> I)

    until ``err = max|M - I| <= tol`` (status 0) or ``max_iters`` iterations or ``err`` growing
    above 1.2x its previous value (the last X before the growth is kept; status 1).  A non-finite
    X gets status 2 and a zero matrix.  Each matrix stops on its own.
    """
    if method == "eigh":
        d, Q, status = kron_eigh(A)
        dmin = d.amin(-1, keepdim=True) if d.shape[-1] else d
        # kron_eigh clamps to >= 0, so the shift is just epsilon; kept explicit for the contract.
        lam = d - dmin.clamp_max(0) + epsilon
        X = (Q * lam.pow(-1.0 / p)[..., None, :]) @ Q.transpose(-1, -2)
        X = torch.where((status == KRON_FAILED)[..., None, None], torch.zeros_like(X), X)
        return X, status
    if method != "newton":
        raise ValueError(f"method must be 'newton' or 'eigh', got {method!r}")
    eye = _eye_like(A)
    B = A + epsilon * eye
    z = (p + 1) / (2 * torch.linalg.matrix_norm(B))  # Frobenius norm per matrix
    X = z.pow(1.0 / p)[..., None, None] * eye
    M = z[..., None, None] * B
    err = (M - eye).abs().flatten(-2).amax(-1)
    active = err > tol
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        T = ((p + 1) * eye - M) / p
        X_new = X @ T
        M_new = torch.linalg.matrix_power(T, p) @ M
        err_new = (M_new - eye).abs().flatten(-2).amax(-1)
        grew = ~(err_new <= 1.2 * err)  # also catches NaN
        take = active & ~grew
        X = torch.where(take[..., None, None], X_new, X)
        M = torch.where(take[..., None, None], M_new, M)
        err = torch.where(take, err_new, err)
        active = take & (err_new > tol)
    finite = _finite_matrices(X)
    status = torch.where(err <= tol, KRON_OK, KRON_FALLBACK)
    status = torch.where(finite, status, KRON_FAILED).to(torch.int32)
    X = torch.where(finite[..., None, None], X, torch.zeros_like(X))
    return X, status


def kfac_precondition_eigen(grad: Tensor, QG: Tensor, dG: Tensor, QA: Tensor, dA: Tensor,
                            damping: float) -> Tensor:
    """K-FAC update in the factors' eigenbasis (reference of ``soo::kfac_precondition_eigen``)::

        V = Q_G [ (Q_G^T grad Q_A) / (d_G d_A^T + damping) ] Q_A^T

    ``grad``: ``[..., o, i]`` (the weight gradient, bias as the last column); ``Q_G [..., o, o]``,
    ``d_G [..., o]``, ``Q_A [..., i, i]``, ``d_A [..., i]``; all one float dtype.
    """
    inner = QG.transpose(-1, -2) @ grad @ QA
    inner = inner / (dG[..., :, None] * dA[..., None, :] + damping)
    return QG @ inner @ QA.transpose(-1, -2)


# --------------------------------------------------------------------------------------------- #
# The finiteness check of the skip guard

def all_finite(tensors: list[Tensor]) -> Tensor:
    """Whether every element of every tensor is finite (reference of ``soo::all_finite``): a 0-dim
    bool tensor on their device, True for tensors without elements, no host sync.  The tensors are
    float64, float32, bfloat16 or float16 (mixed in one list is fine), of any strides, all on one
    device; an empty list is an error (the result's device would be unknown).  This is the skip
    guard's own torch-ops version, ``soo_ext._support.guard.finite_by_extremes``."""
    return finite_by_extremes(tensors)
