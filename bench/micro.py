"""python -m bench micro: the fused ops against the code they replace (--ops picks them).
Ctrl-C (SIGINT) or SIGTERM stops the run and reports the cases measured so far ("interrupted":
true in the JSON's environment).

lbfgs_direction, implementations timed on the same data:
  soo        soo_ext.ops.lbfgs_direction (fused kernels when built), update_gram=False
  soo+gram   the same with update_gram=True: the Gram row/column of a just-pushed pair is also
             recomputed, in the same pass over the history
  reference  soo_ext.reference.lbfgs_direction (pure-PyTorch compact form)
  torch      what torch.optim.LBFGS does per iteration: the two-loop recursion over Python lists
             of flat vectors, then g.d and max|t d| (the two scalars the op also returns)
  window-ops the same direction composed of the window ops (window_direction): window_gram of S
             and of Y against g (the 2m dots), the compact form's m x m solves in torch on the
             device, two window_combine calls (d from g and S, then Y added), g.d and max|d| by
             torch; window-ops+gram also recomputes the Gram row/column from the same
             window_gram calls (y_new, s_new as extra vectors)

DRSOM ops (float32 and float64 only; bf16 in --dtype is skipped for them), k = 2 directions,
each op as soo (soo_ext.ops.*, fused kernels when built) and reference (soo_ext.reference.*,
pure PyTorch) on the same data, the variant in its own column:
  drsom_perturb  save:     x0 <- x, x <- x0 + t v         no-save:  x <- x0 + t v
  drsom_reduce   gram:     q = V^T (g_pert - g) / t, G = V^T V, c = V^T g
                 no-gram:  q only
  drsom_update   p <- V alpha, x <- x + p
The directions V are k separate vectors (none aliases g, x or p).  drsom_reduce also as
window-ops (window_reduce): g_pert - g by torch, then window_gram over the k directions held as
the rows of one [k, n] window (stacked once, outside the timing: the best case, an optimizer
that keeps them so), with the Gram matrix from the same pass (the directions as extra vectors).

Window ops (GGT, M-FAC, natural gradient; opt-in with --ops window_gram window_combine; the
window m x n in the --dtype storage: float32, float64, bf16 = a bfloat16 window with float32
vectors), windows of --window-m rows (default 32 256), all rows filled:
  window_gram    dots:  D = W X^T, k = 2 vectors (what M-FAC's and GGT's step needs)
                 full:  G = W W^T and D (what the natural gradient's step needs)
  window_combine out = base_coef base + coef^T W
  impls: soo (soo_ext.ops.*), reference (soo_ext.reference.*), torch: the plain formulation,
  W @ X^T, W @ W^T, base_coef * base + coef @ W in the vectors' dtype (the window cast to it).

Kronecker-factor ops (K-FAC / Shampoo; opt-in with --ops kron_inverse kron_eigh kron_root
kfac_precondition; float32 and float64).  The factor set is that of a ResNet-50 whose channel
counts (and its 1000 classes) are scaled by --width (default 0.25 on the CPU, 1.0 on CUDA;
--quick 0.0625): for each conv/linear layer (in, out, k x k) the K-FAC factors
A (in*k*k + 1, the +1 for the bias) and G (out); Shampoo's weight [out, in*k*k] cut into blocks of
at most --max-dim (1024) per side, each block with an L (rows) and an R (columns) factor.  At
width 1 the K-FAC A factors run up to 4609 (layer4 3x3 convs: 512*9 + 1) and 2049 (fc), G up to
2048; at width 0.25 up to 1153 and 513.  Same-size factors form one bucket ([count, n, n]); soo
makes one call per bucket, the peers one call per factor, on the same data:
  kron_inverse       soo (kron_damped_inverse: Cholesky, float64 retry), reference (its
                     pure-PyTorch version), kaisa-inv: torch.linalg.inv(F + damping I) per factor
  kron_eigh          soo (kron_eigh), kaisa-eigh: torch.linalg.eigh per factor, clamped >= 0
  kron_root          soo-eigh / soo-newton (kron_inverse_root, p = 4, epsilon 1e-6, tol 1e-6),
                     shampoo-eigh: per block eigh, shift, Q diag(l^{-1/4}) Q^T
  kfac_precondition  soo (kfac_precondition_eigen per bucket of same-shape layers), kaisa: the
                     per-layer Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T
Rows per bucket ("count x n") and a "total" row per impl (the sum of the bucket medians: the
whole network); "x peer" = peer median / impl median (the peer is the per-factor loop).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math

import torch
from tqdm import tqdm

from soo_ext import ops, reference

from . import common

OP = "lbfgs_direction"
IMPLS = ("soo", "soo+gram", "window-ops", "window-ops+gram", "reference", "torch")
DRSOM_OPS = ("drsom_perturb", "drsom_reduce", "drsom_update")
KRON_OPS = ("kron_inverse", "kron_eigh", "kron_root", "kfac_precondition")
KRON_IMPLS = {"kron_inverse": ("soo", "reference", "kaisa-inv"),
              "kron_eigh": ("soo", "kaisa-eigh"),
              "kron_root": ("soo-eigh", "soo-newton", "shampoo-eigh"),
              "kfac_precondition": ("soo", "kaisa")}
KRON_PEER = {"kron_inverse": "kaisa-inv", "kron_eigh": "kaisa-eigh", "kron_root": "shampoo-eigh",
             "kfac_precondition": "kaisa"}
WINDOW_OPS = ("window_gram", "window_combine")
WINDOW_VARIANTS = {"window_gram": ("dots", "full"), "window_combine": ("",)}
WINDOW_IMPLS = ("soo", "reference", "torch")
WINDOW_K = 2
VECTOR_OPS = (OP,) + DRSOM_OPS
OPS = VECTOR_OPS + WINDOW_OPS + KRON_OPS
DRSOM_IMPLS = ("soo", "reference")
DRSOM_REDUCE_IMPLS = DRSOM_IMPLS + ("window-ops",)
DRSOM_VARIANTS = {"drsom_perturb": ("save", "no-save"), "drsom_reduce": ("gram", "no-gram"),
                  "drsom_update": ("",)}
DRSOM_DTYPES = ("float32", "float64")
DRSOM_K = 2
DEFAULT_N = [100_000, 1_000_000, 4_000_000]
QUICK_N = [4_096, 65_536]

BYTES_HELP = """\
Effective bandwidth = bytes / median time, with the same minimal byte count for every
implementation (so GB/s ratios are speed ratios):
  lbfgs_direction: bytes = (4*m*h + 3*b) * n
  h = bytes per history element (4 fp32, 8 fp64, 2 bf16), b = bytes per gradient element:
  two passes over S and Y (m x n each), g read twice, d written once.
  drsom_perturb save:     bytes = 4*b*n      (read x, v; write x0, x)
  drsom_perturb no-save:  bytes = 3*b*n      (read x0, v; write x)
  drsom_reduce:           bytes = (2+k)*b*n  (read g_pert, g and the k directions; the Gram
                                              G = V^T V and c = V^T g come from the same pass,
                                              so gram and no-gram move the same bytes)
  drsom_update:           bytes = (k+3)*b*n  (read the k directions and x; write x and p)
  b = bytes per element of the DRSOM vectors (4 fp32, 8 fp64), k = 2.
  window_gram dots:       bytes = (m*w + k*b)*n  (read the window and the k vectors once)
  window_gram full:       bytes = (m*w + k*b)*n  (the same: one pass could give G too)
  window_combine:         bytes = (m*w + 2*b)*n  (read the window and base, write out)
  w = bytes per window element (4 fp32, 8 fp64, 2 bf16), b = per vector element, k = 2."""


def parse_count(text: str) -> int:
    """An element count such as 4000000, 4e6, 4M or 100k."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    number = text[:-1] if scale != 1 else text
    value = float(number) * scale
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive element count: {text!r}")
    return int(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "micro", help="time the fused ops (lbfgs_direction, drsom_*) against the references",
        description=__doc__ + "\n" + BYTES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_device_argument(parser)
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(VECTOR_OPS),
                        metavar="OP",
                        help="ops to time: " + ", ".join(OPS) + " (default: "
                             + ", ".join(VECTOR_OPS) + ")")
    parser.add_argument("--width", type=float, default=None,
                        help="ResNet-50 width multiplier of the factor set of the Kronecker ops "
                             "(default 0.25 on the CPU, 1.0 on CUDA; --quick: 0.0625)")
    parser.add_argument("--max-dim", type=int, default=1024,
                        help="Shampoo's max_preconditioner_dim (block size, default 1024)")
    parser.add_argument("--n", nargs="+", type=parse_count, default=None,
                        help=f"vector lengths (default: {' '.join(map(str, DEFAULT_N))}; "
                             f"--quick: {' '.join(map(str, QUICK_N))}); 4M, 100k are accepted")
    parser.add_argument("--m", nargs="+", type=int, default=[10],
                        help="history sizes (default: 10)")
    parser.add_argument("--window-m", nargs="+", type=int, default=[32, 256],
                        help="window rows of the window ops (default: 32 256)")
    parser.add_argument("--dtype", nargs="+", choices=list(common.DTYPES),
                        default=list(common.DTYPES),
                        help="float32, float64, bf16 (float32 gradient, bfloat16 history); "
                             "the torch path always runs in the gradient dtype (default: all)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of timing per impl and case (default 1; --quick: 0.05)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="the impls are timed in turn, this many times over, so that noise "
                             "on a shared machine hits them alike (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, short timings")
    parser.add_argument("--json", metavar="PATH", help="write records and environment as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s vs n per impl")
    return parser


def random_pairs(n: int, m: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    """m pairs (rows of S, Y) with y = C s + noise, C = diag(c), c in [0.5, 1.5]: y.s > 0."""
    curvature = torch.rand(n, generator=gen, dtype=dtype, device=device) + 0.5
    S = torch.randn(m, n, generator=gen, dtype=dtype, device=device)
    Y = torch.randn(m, n, generator=gen, dtype=dtype, device=device).mul_(0.01)
    return S, Y.addcmul_(S, curvature)


def window_direction(S, Y, SY, YY, g, newest: int, count: int, update_gram: bool):
    """lbfgs_direction's result (d, [g.d, max|d|]) composed of the window ops (issue 18's
    question: could L-BFGS drop its fused op?).  The valid pairs must fill the whole ring or
    its first ``count`` slots (window ops read a prefix of rows).

    Pass 1: window_gram of S against [g (, y_new)] and of Y against [g (, s_new, y_new)].  The
    compact form (Byrd, Nocedal & Schnabel 1994) on the m x m blocks in float64, on the device:
    with R = triu(S^T Y) and D its diagonal (pairs in logical order), H g = gamma g + S c_s +
    Y c_y, alpha = R^-1 S^T g, c_y = -gamma alpha, c_s = R^-T ((D + gamma Y^T Y) alpha -
    gamma Y^T g), the same coefficients as the fused op's two loops.  Pass 2: two
    window_combine calls, d = -gamma g - S c_s, then d -= Y c_y; torch reads d again for g.d
    and max|d|."""
    m = S.shape[0]
    if count == 0:
        d = -g
        return d, torch.stack([torch.dot(g, d), torch.linalg.vector_norm(d, math.inf)])
    slots = reference.ring_slots(newest, count, m)
    rows = m if count == m else count
    if sorted(slots) != list(range(rows)):
        raise ValueError("window_direction: the valid pairs must be a prefix of the ring")
    idx = torch.tensor(slots, device=g.device)
    extra_s, extra_y = [], []
    if update_gram:  # window_gram's vectors are float32 with a bf16 window
        y_new = Y[newest].to(g.dtype)
        extra_s, extra_y = [y_new], [S[newest].to(g.dtype), y_new]
    Ds = ops.window_gram(S, [g] + extra_s, rows)[1][idx]
    Dy = ops.window_gram(Y, [g] + extra_y, rows)[1][idx]
    if update_gram:  # the row and column `newest` of the Gram blocks, as the fused op writes
        SY[idx, newest], SY[newest, idx] = Ds[:, 1].to(SY.dtype), Dy[:, 1].to(SY.dtype)
        YY[idx, newest] = YY[newest, idx] = Dy[:, 2].to(YY.dtype)
    sy = SY[idx][:, idx].double()
    yy = YY[idx][:, idx].double()
    gamma = sy[-1, -1] / yy[-1, -1]
    R = sy.triu()
    alpha = torch.linalg.solve_triangular(R, Ds[:, :1], upper=True)
    rhs = sy.diagonal()[:, None] * alpha + gamma * (yy @ alpha - Dy[:, :1])
    coef_s = torch.linalg.solve_triangular(R.T, rhs, upper=False)[:, 0]
    zero = g.new_zeros(m, dtype=torch.float64)
    d = torch.empty_like(g)
    ops.window_combine(d, S, zero.index_copy(0, idx, -coef_s), rows, g, -gamma)
    ops.window_combine(d, Y, zero.index_copy(0, idx, gamma * alpha[:, 0]), rows, d,
                       gamma.new_ones(()))
    return d, torch.stack([torch.dot(g, d), torch.linalg.vector_norm(d, math.inf)])


def window_reduce(g_pert, g, Vw, t, with_gram: bool):
    """drsom_reduce's result (q, G, c) composed of window_gram, the k (<= 6 with the Gram)
    directions the rows of one [k, n] window ``Vw``.  g_pert - g is formed first (as the fused
    op does): V.g_pert - V.g would cancel.  With the Gram matrix the directions are also
    window_gram's vectors, so one pass over the window gives G (its full=True path is a second
    pass, float64 GEMMs)."""
    k, dt = Vw.shape[0], g.dtype
    X = [g_pert - g] + ([g] + list(Vw) if with_gram else [])
    D = ops.window_gram(Vw, X, k)[1]
    q = (D[:, 0] / t.double()).to(dt)
    if not with_gram:
        return q, g.new_zeros((0, 0)), g.new_zeros((0,))
    return q, D[:, 2:].to(dt), D[:, 1].to(dt)


class Case:
    """A full ring of m random pairs with positive curvature, its Gram blocks, a gradient, and
    the same pairs as torch.optim.LBFGS keeps them (lists of separate flat vectors)."""

    def __init__(self, n: int, m: int, dtype: str, device: str, seed: int = 0) -> None:
        grad_dtype, hist_dtype = common.DTYPES[dtype]
        gen = torch.Generator(device=device).manual_seed(seed)
        S, Y = random_pairs(n, m, grad_dtype, device, gen)
        self.S, self.Y = S.to(hist_dtype), Y.to(hist_dtype)
        acc = reference.accumulation_dtype(grad_dtype)
        self.SY = self.S.to(acc) @ self.Y.to(acc).T
        self.YY = self.Y.to(acc) @ self.Y.to(acc).T
        self.g = torch.randn(n, generator=gen, dtype=grad_dtype, device=device)
        self.m = m
        self.newest = m // 2  # the ring has wrapped around, as in a long run

        # torch.optim.LBFGS's state after m accepted pairs, oldest first, in the gradient dtype
        # (from the stored pairs, so that every impl sees the same bf16-rounded data).
        slots = reference.ring_slots(self.newest, m, m)
        self.old_stps = [self.S[j].to(grad_dtype, copy=True) for j in slots]
        self.old_dirs = [self.Y[j].to(grad_dtype, copy=True) for j in slots]
        self.ro = [1.0 / y.dot(s) for s, y in zip(self.old_stps, self.old_dirs)]
        s_new, y_new = self.old_stps[-1], self.old_dirs[-1]
        self.H_diag = y_new.dot(s_new) / y_new.dot(y_new)
        self.al = [None] * m

    def soo_direction(self, update_gram: bool):
        return ops.lbfgs_direction(self.S, self.Y, self.SY, self.YY, self.g, self.newest, self.m,
                                   update_gram)

    def window_ops_direction(self, update_gram: bool):
        return window_direction(self.S, self.Y, self.SY, self.YY, self.g, self.newest, self.m,
                                update_gram)

    def reference_direction(self):
        return reference.lbfgs_direction(self.S, self.Y, self.SY, self.YY, self.g, self.newest,
                                         self.m, False)

    def torch_direction(self, t: float = 1.0):
        """torch.optim.LBFGS's direction code, as it runs once the history is full (t = lr)."""
        flat_grad, old_dirs, old_stps, ro, al = (self.g, self.old_dirs, self.old_stps, self.ro,
                                                 self.al)
        q = flat_grad.neg()
        for i in range(len(old_dirs) - 1, -1, -1):
            al[i] = old_stps[i].dot(q) * ro[i]
            q.add_(old_dirs[i], alpha=-al[i])
        d = r = torch.mul(q, self.H_diag)
        for i in range(len(old_dirs)):
            be_i = old_dirs[i].dot(r) * ro[i]
            r.add_(old_stps[i], alpha=al[i] - be_i)
        gtd = flat_grad.dot(d)
        return d, gtd, d.mul(t).abs().max()


def direction_bytes(n: int, m: int, dtype: str) -> int:
    grad_dtype, hist_dtype = common.DTYPES[dtype]
    h = torch.empty((), dtype=hist_dtype).element_size()
    b = torch.empty((), dtype=grad_dtype).element_size()
    return (4 * m * h + 3 * b) * n


def measure_case(n: int, m: int, dtype: str, device: str, min_run_time: float,
                 rounds: int) -> list[dict]:
    case = Case(n, m, dtype, device)
    calls = {"soo": lambda: case.soo_direction(False),
             "soo+gram": lambda: case.soo_direction(True),
             "window-ops": lambda: case.window_ops_direction(False),
             "window-ops+gram": lambda: case.window_ops_direction(True),
             "reference": case.reference_direction, "torch": case.torch_direction}
    grad_dtype, hist_dtype = common.DTYPES[dtype]
    nbytes = direction_bytes(n, m, dtype)
    seconds = common.time_medians(calls, min_run_time, rounds)
    rows = []
    for impl in IMPLS:
        rows.append({
            "op": OP, "impl": impl, "device": device, "n": n, "m": m, "dtype": dtype,
            "grad_dtype": common.dtype_name(grad_dtype),
            # torch.optim.LBFGS keeps its history in the gradient dtype
            "history_dtype": common.dtype_name(grad_dtype if impl == "torch" else hist_dtype),
            "median_ms": seconds[impl] * 1e3, "bytes": nbytes,
            "gbps": nbytes / seconds[impl] / 1e9,
        })
    by_impl = {row["impl"]: row["median_ms"] for row in rows}
    for row in rows:
        row["speedup_vs_torch"] = by_impl["torch"] / row["median_ms"]
        row["speedup_vs_reference"] = by_impl["reference"] / row["median_ms"]
    return rows


def drsom_bytes(op: str, variant: str, n: int, dtype: str, k: int = DRSOM_K) -> int:
    """The minimal bytes a DRSOM op moves (see BYTES_HELP)."""
    b = torch.empty((), dtype=common.DTYPES[dtype][0]).element_size()
    if op == "drsom_perturb":
        return (4 if variant == "save" else 3) * b * n
    if op == "drsom_reduce":
        return (2 + k) * b * n
    if op == "drsom_update":
        return (k + 3) * b * n
    raise ValueError(f"unknown DRSOM op {op!r}")


class DrsomCase:
    """The vectors of one DRSOM step: x, x0, v, g_pert, g, k directions V, p, and 0-dim t and
    k-vector alpha on the device.  t and alpha are small so that x stays bounded while the
    in-place ops are called over and over."""

    def __init__(self, n: int, dtype: str, device: str, k: int = DRSOM_K, seed: int = 0) -> None:
        dt = common.DTYPES[dtype][0]
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn():
            return torch.randn(n, generator=gen, dtype=dt, device=device)

        self.x, self.x0, self.v, self.g = randn(), randn(), randn(), randn()
        self.g_pert = self.g + 1e-3 * randn()
        self.V = [randn() for _ in range(k)]
        self.Vw = torch.stack(self.V)  # the same directions as one window (window-ops)
        self.p = torch.zeros(n, dtype=dt, device=device)
        self.t = torch.tensor(1e-3, dtype=dt, device=device)
        self.alpha = torch.full((k,), 1e-6, dtype=dt, device=device)

    def calls(self, op: str, variant: str) -> dict:
        """impl -> a no-argument function running the op once."""
        out = {}
        for impl, mod in (("soo", ops), ("reference", reference)):
            if op == "drsom_perturb":
                out[impl] = functools.partial(mod.drsom_perturb, self.x, self.x0, self.v, self.t,
                                              variant == "save")
            elif op == "drsom_reduce":
                out[impl] = functools.partial(mod.drsom_reduce, self.g_pert, self.g, self.V,
                                              self.t, variant == "gram")
            else:
                out[impl] = functools.partial(mod.drsom_update, self.x, self.p, self.V,
                                              self.alpha)
        if op == "drsom_reduce":
            out["window-ops"] = functools.partial(window_reduce, self.g_pert, self.g, self.Vw,
                                                  self.t, variant == "gram")
        return out


def measure_drsom_case(op: str, n: int, dtype: str, device: str, min_run_time: float,
                       rounds: int) -> list[dict]:
    case = DrsomCase(n, dtype, device)
    rows = []
    for variant in DRSOM_VARIANTS[op]:
        seconds = common.time_medians(case.calls(op, variant), min_run_time, rounds)
        nbytes = drsom_bytes(op, variant, n, dtype)
        for impl in DRSOM_REDUCE_IMPLS if op == "drsom_reduce" else DRSOM_IMPLS:
            rows.append({
                "op": op, "variant": variant, "impl": impl, "device": device, "n": n,
                "k": DRSOM_K, "dtype": dtype, "median_ms": seconds[impl] * 1e3, "bytes": nbytes,
                "gbps": nbytes / seconds[impl] / 1e9,
                "speedup_vs_reference": seconds["reference"] / seconds[impl],
            })
    return rows


def window_bytes(op: str, m: int, n: int, dtype: str, k: int = WINDOW_K) -> int:
    """The minimal bytes a window op moves (see BYTES_HELP)."""
    vec_dtype, window_dtype = common.DTYPES[dtype]
    w = torch.empty((), dtype=window_dtype).element_size()
    b = torch.empty((), dtype=vec_dtype).element_size()
    return (m * w + (k if op == "window_gram" else 2) * b) * n


def window_calls(op: str, variant: str, m: int, n: int, dtype: str, device: str) -> dict:
    """impl -> a no-argument function running the op once on fresh random data."""
    vec_dtype, window_dtype = common.DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(m, n, generator=gen, dtype=vec_dtype, device=device).to(window_dtype)
    X = [torch.randn(n, generator=gen, dtype=vec_dtype, device=device) for _ in range(WINDOW_K)]
    coef = torch.randn(m, generator=gen, dtype=torch.float64, device=device)
    bc = torch.tensor(0.5, dtype=torch.float64, device=device)
    out = torch.empty_like(X[0])
    if op == "window_gram":
        full = variant == "full"
        Xs = torch.stack(X)

        def plain():
            Wc = W.to(vec_dtype)
            return (Wc @ Wc.T if full else None), Wc @ Xs.T
        return {"soo": functools.partial(ops.window_gram, W, X, m, full),
                "reference": functools.partial(reference.window_gram, W, X, m, full),
                "torch": plain}
    coef_v, bc_v = coef.to(vec_dtype), bc.to(vec_dtype)
    return {"soo": functools.partial(ops.window_combine, out, W, coef, m, X[0], bc),
            "reference": functools.partial(reference.window_combine, out, W, coef, m, X[0], bc),
            "torch": lambda: torch.add(bc_v * X[0], coef_v @ W.to(vec_dtype), out=out)}


def measure_window_case(op: str, m: int, n: int, dtype: str, device: str, min_run_time: float,
                        rounds: int) -> list[dict]:
    rows = []
    for variant in WINDOW_VARIANTS[op]:
        seconds = common.time_medians(window_calls(op, variant, m, n, dtype, device),
                                      min_run_time, rounds)
        nbytes = window_bytes(op, m, n, dtype)
        for impl in WINDOW_IMPLS:
            rows.append({
                "op": op, "variant": variant, "impl": impl, "device": device, "n": n, "m": m,
                "k": WINDOW_K, "dtype": dtype, "median_ms": seconds[impl] * 1e3,
                "bytes": nbytes, "gbps": nbytes / seconds[impl] / 1e9,
                "speedup_vs_reference": seconds["reference"] / seconds[impl],
                "speedup_vs_torch": seconds["torch"] / seconds[impl],
            })
    return rows


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device_list = common.devices(args.device)
    sizes = args.n or (QUICK_N if args.quick else DEFAULT_N)
    min_run_time = args.min_run_time or (0.05 if args.quick else 1.0)
    rounds = args.rounds or (1 if args.quick else 3)
    env = common.environment(device_list)
    env["copy_gbps"] = {}
    if "cuda" in device_list:
        env["copy_gbps"]["cuda"] = common.copy_bandwidth("cuda", min_run_time=min_run_time)

    cases = []
    if OP in args.ops:
        cases += [(OP, device, dtype, m, n)
                  for device, dtype, m, n in itertools.product(device_list, args.dtype, args.m,
                                                               sizes)]
    drsom_dtypes = [d for d in args.dtype if d in DRSOM_DTYPES]
    cases += [(op, device, dtype, None, n)
              for device, op, dtype, n in itertools.product(
                  device_list, [o for o in DRSOM_OPS if o in args.ops], drsom_dtypes, sizes)]
    cases += [(op, device, dtype, m, n)
              for device, op, dtype, m, n in itertools.product(
                  device_list, [o for o in WINDOW_OPS if o in args.ops], args.dtype,
                  args.window_m, sizes)]
    kron_dtypes = [d for d in args.dtype if d in DRSOM_DTYPES]
    cases += [(op, device, dtype, None, None)
              for device, op, dtype in itertools.product(
                  device_list, [o for o in KRON_OPS if o in args.ops], kron_dtypes)]
    records = []
    try:
        for op, device, dtype, m, n in tqdm(cases, desc="micro", unit="case"):
            if op in KRON_OPS:
                width = args.width or (0.0625 if args.quick else 1.0 if device == "cuda" else 0.25)
                records += measure_kron_op(op, dtype, device, width, args.max_dim, min_run_time,
                                           rounds)
            elif op == OP:
                records += measure_case(n, m, dtype, device, min_run_time, rounds)
            elif op in WINDOW_OPS:
                records += measure_window_case(op, m, n, dtype, device, min_run_time, rounds)
            else:
                records += measure_drsom_case(op, n, dtype, device, min_run_time, rounds)
            if device == "cuda":
                torch.cuda.empty_cache()  # give the next (larger) case the memory back
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (python -m bench): report what was
        records += getattr(stop, "records", [])  # measured, also the buckets of a kron op
        common.note_interrupted(env, "micro")
    for row in records:
        if row["op"] in KRON_OPS:
            continue
        copy_gbps = env["copy_gbps"].get(row["device"])
        row["pct_of_copy"] = 100 * row["gbps"] / copy_gbps if copy_gbps else None
    report(records, env, args)
    return records, env


def report(records: list[dict], env: dict, args: argparse.Namespace) -> None:
    kernels = ("fused kernels" if ops.extension_loaded()
               else f"pure-PyTorch fallback ({ops.extension_error()})")
    columns = {"op": "op", "impl": "impl", "device": "device", "n": "n", "m": "m",
               "dtype": "dtype", "median_ms": "median ms", "gbps": "eff. GB/s",
               "speedup_vs_torch": "x torch", "speedup_vs_reference": "x reference"}
    if env["copy_gbps"]:
        columns["pct_of_copy"] = "% of copy"
    copy_lines = "".join(f"\n{device} copy bandwidth (clone, 2*size bytes): {gbps:.0f} GB/s"
                         for device, gbps in env["copy_gbps"].items())
    lbfgs = [r for r in records if r["op"] == OP]
    if lbfgs:
        title = f"lbfgs_direction, soo = {kernels}; bytes = (4*m*h + 3*b)*n" + copy_lines
        common.print_table(lbfgs, columns, title)
    drsom = [r for r in records if r["op"] in DRSOM_OPS]
    if drsom:
        drsom_columns = {"op": "op", "variant": "variant", "impl": "impl", "device": "device",
                         "n": "n", "k": "k", "dtype": "dtype", "median_ms": "median ms",
                         "gbps": "eff. GB/s", "speedup_vs_reference": "x reference"}
        if env["copy_gbps"]:
            drsom_columns["pct_of_copy"] = "% of copy"
        title = (f"DRSOM ops, soo = {kernels}; bytes: perturb save 4*b*n, no-save 3*b*n, "
                 f"reduce (2+k)*b*n, update (k+3)*b*n" + copy_lines)
        common.print_table(drsom, drsom_columns, title)
    window = [r for r in records if r["op"] in WINDOW_OPS]
    if window:
        window_columns = {"op": "op", "variant": "variant", "impl": "impl", "device": "device",
                          "n": "n", "m": "m", "dtype": "dtype", "median_ms": "median ms",
                          "gbps": "eff. GB/s", "speedup_vs_torch": "x torch",
                          "speedup_vs_reference": "x reference"}
        if env["copy_gbps"]:
            window_columns["pct_of_copy"] = "% of copy"
        title = (f"Window ops, soo = {kernels}; bytes: gram (m*w + k*b)*n, combine "
                 f"(m*w + 2*b)*n, k = {WINDOW_K}" + copy_lines)
        common.print_table(window, window_columns, title)
    kron = [r for r in records if r["op"] in KRON_OPS]
    if kron:
        kron_columns = {"op": "op", "impl": "impl", "device": "device", "dtype": "dtype",
                        "width": "width", "bucket": "bucket", "median_ms": "median ms",
                        "peer": "peer", "speedup_vs_peer": "x peer"}
        title = (f"Kronecker-factor ops on a ResNet-50 factor set, soo = {kernels}; "
                 f"torch threads = {torch.get_num_threads()}")
        common.print_table(kron, kron_columns, title)
    if args.json:
        common.write_json(args.json, "micro", env, records)
    if args.plot:
        plot(records, env, args.plot)


def plot_kron_totals(ax, rows: list[dict], title: str) -> None:
    """Bars of the whole-network median (the "total" rows) per op and impl, log scale."""
    totals = [r for r in rows if r["bucket"] == "total"]
    ops_here = list(dict.fromkeys(r["op"] for r in totals))
    x = 0
    ticks, labels = [], []
    for op in ops_here:
        for r in (r for r in totals if r["op"] == op):
            peer = r["impl"] == r["peer"]
            ax.bar(x, r["median_ms"], color="gray" if peer else "C0")
            ax.text(x, r["median_ms"], f"{r['speedup_vs_peer']:.2g}x", ha="center",
                    va="bottom", fontsize="x-small")
            ticks.append(x)
            labels.append(f"{op}\n{r['impl']}")
            x += 1
        x += 0.5
    ax.set_xticks(ticks, labels, rotation=90, fontsize="x-small")
    ax.set(yscale="log", ylabel="median ms (whole factor set)", title=title)
    ax.grid(True, axis="y", alpha=0.3)


def line_label(row: dict) -> str:
    """The legend entry of a record's line: impl and m for lbfgs_direction, op, variant and impl
    for the DRSOM ops."""
    if row["op"] == OP:
        return f"{row['impl']} (m={row['m']})"
    if row["op"] in WINDOW_OPS:
        variant = f" {row['variant']}" if row["variant"] else ""
        return f"{row['op'].removeprefix('window_')}{variant} {row['impl']} (m={row['m']})"
    name = row["op"].removeprefix("drsom_") + (f" {row['variant']}" if row["variant"] else "")
    return f"{name} {row['impl']}"


def plot(records: list[dict], env: dict, path: str) -> None:
    """One panel per (op family, device, dtype): effective GB/s vs n, a line per (impl, m) for
    lbfgs_direction and per (op, variant, impl) for the DRSOM ops (a colour per op and variant:
    soo solid, reference dashed, window-ops dotted)."""
    def family(row):
        return (OP if row["op"] == OP else "window" if row["op"] in WINDOW_OPS else "drsom")

    kron = [r for r in records if r["op"] in KRON_OPS]
    records = [r for r in records if r["op"] not in KRON_OPS]
    panels = list(dict.fromkeys((family(r), r["device"], r["dtype"]) for r in records))
    kron_panels = list(dict.fromkeys((r["device"], r["dtype"]) for r in kron))
    fig, axes = common.new_figure(len(panels) + len(kron_panels))
    for ax, (device, dtype) in zip(axes[len(panels):], kron_panels):
        plot_kron_totals(ax, [r for r in kron if r["device"] == device and r["dtype"] == dtype],
                         f"factor ops, ResNet-50 set, {device} {dtype}")
    for ax, (fam, device, dtype) in zip(axes, panels):
        rows = [r for r in records
                if family(r) == fam and r["device"] == device and r["dtype"] == dtype]
        labels = list(dict.fromkeys(line_label(r) for r in rows))
        variants = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label in labels))
        for label in labels:
            line = sorted((r["n"], r["gbps"]) for r in rows if line_label(r) == label)
            name, impl = label.rsplit(" ", 1)
            style = {"reference": "--", "window-ops": ":"}.get(impl, "-") if fam == "drsom" else "-"
            color = f"C{variants.index(name)}" if fam == "drsom" else None
            ax.plot(*zip(*line), marker="o", linestyle=style, color=color, label=label)
        if device in env["copy_gbps"]:
            ax.axhline(env["copy_gbps"][device], color="gray", linestyle="--", label="copy")
        title = {OP: f"{OP} {device} {dtype}", "drsom": f"DRSOM ops (k={DRSOM_K}) {device} {dtype}",
                 "window": f"window ops (k={WINDOW_K}) {device} {dtype}"}[fam]
        ax.set(xscale="log", xlabel="n", ylabel="effective GB/s", title=title)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    common.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Kronecker factors (K-FAC, Shampoo): batched soo ops against the per-layer loops they replace

def resnet50_layers(width: float) -> list[tuple[str, int, int, int]]:
    """(name, in_channels, out_channels, kernel size) of every conv / linear layer of a ResNet-50
    whose channel counts (and the 1000 classes) are scaled by ``width`` (the 3 input channels
    are not); the linear layer has kernel size 1."""
    def ch(c):
        return max(1, int(round(c * width)))

    layers = [("conv1", 3, ch(64), 7)]
    cin = ch(64)
    for stage, (mid, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        w, out = ch(mid), ch(4 * mid)
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            layers += [(f"{name}.conv1", cin, w, 1), (f"{name}.conv2", w, w, 3),
                       (f"{name}.conv3", w, out, 1)]
            if b == 0:
                layers.append((f"{name}.downsample", cin, out, 1))
            cin = out
    layers.append(("fc", cin, ch(1000), 1))
    return layers


def kfac_factor_sizes(width: float) -> list[int]:
    """K-FAC factor sizes: per layer A (in_channels * kh * kw + 1) and G (out_channels)."""
    sizes = []
    for _, cin, cout, k in resnet50_layers(width):
        sizes += [cin * k * k + 1, cout]
    return sizes


def split_dim(n: int, max_dim: int) -> list[int]:
    """Blocks of a dimension as Distributed Shampoo cuts it: max_dim, ..., max_dim, remainder."""
    return [max_dim] * (n // max_dim) + ([n % max_dim] if n % max_dim else [])


def shampoo_factor_sizes(width: float, max_dim: int) -> list[int]:
    """Shampoo factor sizes: each weight as a matrix [out, in * kh * kw], cut into blocks of at
    most max_dim x max_dim; per block an L (rows) and an R (columns) factor."""
    sizes = []
    for _, cin, cout, k in resnet50_layers(width):
        for r in split_dim(cout, max_dim):
            for c in split_dim(cin * k * k, max_dim):
                sizes += [r, c]
    return sizes


def buckets(sizes: list[int]) -> list[tuple[int, int]]:
    """(n, count) of the same-size factors, largest n first."""
    counts: dict[int, int] = {}
    for n in sizes:
        counts[n] = counts.get(n, 0) + 1
    return sorted(counts.items(), reverse=True)


class KronBucket:
    """``count`` random SPD factors of size n (X^T X / 2n + 1e-4 I): as one [count, n, n] stack
    (what soo takes) and as separate tensors (what the per-layer loops keep)."""

    def __init__(self, n: int, count: int, dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed + n)
        X = torch.randn(count, 2 * n, n, generator=gen, dtype=dtype, device=device)
        eye = torch.eye(n, dtype=dtype, device=device)
        self.stack = X.mT @ X / (2 * n) + 1e-4 * eye
        self.stack = (self.stack + self.stack.mT) / 2
        self.factors = [f.clone() for f in self.stack]
        self.eye = eye


def kaisa_inverse(factors, damping):
    """KAISA inverse mode: one torch.linalg.inv per factor."""
    return [torch.linalg.inv(f + damping * torch.eye(f.shape[-1], dtype=f.dtype, device=f.device))
            for f in factors]


def kaisa_eigh(factors):
    """KAISA eigen mode: one torch.linalg.eigh per factor, eigenvalues clamped >= 0."""
    out = []
    for f in factors:
        d, Q = torch.linalg.eigh(f)
        out.append((d.clamp_(min=0), Q))
    return out


def shampoo_root(factors, p, epsilon):
    """Shampoo's eigh root per block: shift by -min(l_min, 0), add epsilon, Q diag(l^{-1/p}) Q^T."""
    out = []
    for f in factors:
        d, Q = torch.linalg.eigh(f)
        d = d - d.min().clamp(max=0) + epsilon
        out.append((Q * d.pow(-1.0 / p)) @ Q.mT)
    return out


def kaisa_precondition(layers, damping):
    """KAISA eigen-mode preconditioning, one layer at a time."""
    out = []
    for grad, QG, dG, QA, dA in layers:
        inner = (QG.mT @ grad @ QA) / (dG[:, None] * dA[None, :] + damping)
        out.append(QG @ inner @ QA.mT)
    return out


KRON_DAMPING = 1e-3
KRON_ROOT_P = 4
KRON_EPSILON = 1e-6


def kron_impls(op: str) -> tuple[str, ...]:
    return KRON_IMPLS[op]


def kron_factor_set(op: str, width: float, max_dim: int) -> list[tuple[int, int]]:
    """(n, count) buckets of the factors an op works on (see the module docstring)."""
    if op == "kron_root":
        return buckets(shampoo_factor_sizes(width, max_dim))
    return buckets(kfac_factor_sizes(width))


def kron_calls(op: str, bucket: KronBucket) -> dict:
    """impl -> a no-argument function running the op on one bucket."""
    if op == "kron_inverse":
        return {"soo": functools.partial(ops.kron_damped_inverse, bucket.stack, KRON_DAMPING),
                "reference": functools.partial(reference.kron_damped_inverse, bucket.stack,
                                               KRON_DAMPING),
                "kaisa-inv": functools.partial(kaisa_inverse, bucket.factors, KRON_DAMPING)}
    if op == "kron_eigh":
        return {"soo": functools.partial(ops.kron_eigh, bucket.stack),
                "kaisa-eigh": functools.partial(kaisa_eigh, bucket.factors)}
    if op == "kron_root":
        return {"soo-eigh": functools.partial(ops.kron_inverse_root, bucket.stack, KRON_ROOT_P,
                                              KRON_EPSILON, "eigh"),
                "soo-newton": functools.partial(ops.kron_inverse_root, bucket.stack, KRON_ROOT_P,
                                                KRON_EPSILON, "newton"),
                "shampoo-eigh": functools.partial(shampoo_root, bucket.factors, KRON_ROOT_P,
                                                  KRON_EPSILON)}
    raise ValueError(f"unknown factor op {op!r}")


class PreconditionBucket:
    """``count`` layers of one shape (o, i): gradients and the eigendecompositions of their
    factors, stacked (soo) and per layer (KAISA)."""

    def __init__(self, o: int, i: int, count: int, dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed + o + 7 * i)
        self.grad = torch.randn(count, o, i, generator=gen, dtype=dtype, device=device)
        self.QG = torch.linalg.qr(torch.randn(count, o, o, generator=gen, dtype=dtype,
                                              device=device))[0]
        self.QA = torch.linalg.qr(torch.randn(count, i, i, generator=gen, dtype=dtype,
                                              device=device))[0]
        self.dG = torch.rand(count, o, generator=gen, dtype=dtype, device=device)
        self.dA = torch.rand(count, i, generator=gen, dtype=dtype, device=device)
        self.layers = [tuple(t[b].clone() for t in (self.grad, self.QG, self.dG, self.QA, self.dA))
                       for b in range(count)]

    def calls(self) -> dict:
        return {"soo": functools.partial(ops.kfac_precondition_eigen, self.grad, self.QG, self.dG,
                                         self.QA, self.dA, KRON_DAMPING),
                "kaisa": functools.partial(kaisa_precondition, self.layers, KRON_DAMPING)}


def layer_shapes(width: float) -> list[tuple[tuple[int, int], int]]:
    """((o, i), count) of the K-FAC layers (gradient [out, in * kh * kw + 1]), largest first."""
    counts: dict[tuple[int, int], int] = {}
    for _, cin, cout, k in resnet50_layers(width):
        key = (cout, cin * k * k + 1)
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[0][0] * kv[0][1], kv[0]))


def measure_kron_op(op: str, dtype: str, device: str, width: float, max_dim: int,
                    min_run_time: float, rounds: int) -> list[dict]:
    """Per bucket, every impl of ``op`` timed on the same factors; then a "total" row per impl
    (sum of the bucket medians: the whole network's factors, one soo call per bucket)."""
    dt = common.DTYPES[dtype][0]
    impls, peer = KRON_IMPLS[op], KRON_PEER[op]
    if op == "kfac_precondition":
        cases = [((o, i), count, PreconditionBucket(o, i, count, dt, device))
                 for (o, i), count in layer_shapes(width)]
        cases = [(shape, count, b.calls()) for shape, count, b in cases]
    else:
        cases = [(n, count, kron_calls(op, KronBucket(n, count, dt, device)))
                 for n, count in kron_factor_set(op, width, max_dim)]
    rows = []
    totals = {impl: 0.0 for impl in impls}
    try:
        for shape, count, calls in cases:
            seconds = common.time_medians(calls, min_run_time, rounds)
            for impl in impls:
                totals[impl] += seconds[impl]
                rows.append({"op": op, "impl": impl, "device": device, "dtype": dtype,
                             "width": width, "bucket": f"{count}x{shape}",
                             "n": shape if isinstance(shape, int) else list(shape),
                             "count": count, "median_ms": seconds[impl] * 1e3,
                             "speedup_vs_peer": seconds[peer] / seconds[impl], "peer": peer})
            if device == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt as stop:  # the buckets measured so far (no total) go with it
        stop.records = rows
        raise
    n_factors = sum(count for _, count, _ in cases)
    for impl in impls:
        rows.append({"op": op, "impl": impl, "device": device, "dtype": dtype, "width": width,
                     "bucket": "total", "n": None, "count": n_factors,
                     "median_ms": totals[impl] * 1e3,
                     "speedup_vs_peer": totals[peer] / totals[impl], "peer": peer})
    return rows
