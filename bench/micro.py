"""python -m bench micro: the fused ops against the code they replace (--ops picks them).

lbfgs_direction, implementations timed on the same data:
  soo        soo_ext.ops.lbfgs_direction (fused kernels when built), update_gram=False
  soo+gram   the same with update_gram=True: the Gram row/column of a just-pushed pair is also
             recomputed, in the same pass over the history
  reference  soo_ext.reference.lbfgs_direction (pure-PyTorch compact form)
  torch      what torch.optim.LBFGS does per iteration: the two-loop recursion over Python lists
             of flat vectors, then g.d and max|t d| (the two scalars the op also returns)

DRSOM ops (float32 and float64 only; bf16 in --dtype is skipped for them), k = 2 directions,
each op as soo (soo_ext.ops.*, fused kernels when built) and reference (soo_ext.reference.*,
pure PyTorch) on the same data, the variant in its own column:
  drsom_perturb  save:     x0 <- x, x <- x0 + t v         no-save:  x <- x0 + t v
  drsom_reduce   gram:     q = V^T (g_pert - g) / t, G = V^T V, c = V^T g
                 no-gram:  q only
  drsom_update   p <- V alpha, x <- x + p
The directions V are k separate vectors (none aliases g, x or p).
"""
from __future__ import annotations

import argparse
import functools
import itertools

import torch
from tqdm import tqdm

from soo_ext import ops, reference

from . import common

OP = "lbfgs_direction"
IMPLS = ("soo", "soo+gram", "reference", "torch")
DRSOM_OPS = ("drsom_perturb", "drsom_reduce", "drsom_update")
OPS = (OP,) + DRSOM_OPS
DRSOM_IMPLS = ("soo", "reference")
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
  b = bytes per element of the DRSOM vectors (4 fp32, 8 fp64), k = 2."""


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
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), metavar="OP",
                        help="ops to time: " + ", ".join(OPS) + " (default: all)")
    parser.add_argument("--n", nargs="+", type=parse_count, default=None,
                        help=f"vector lengths (default: {' '.join(map(str, DEFAULT_N))}; "
                             f"--quick: {' '.join(map(str, QUICK_N))}); 4M, 100k are accepted")
    parser.add_argument("--m", nargs="+", type=int, default=[10],
                        help="history sizes (default: 10)")
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
        return out


def measure_drsom_case(op: str, n: int, dtype: str, device: str, min_run_time: float,
                       rounds: int) -> list[dict]:
    case = DrsomCase(n, dtype, device)
    rows = []
    for variant in DRSOM_VARIANTS[op]:
        seconds = common.time_medians(case.calls(op, variant), min_run_time, rounds)
        nbytes = drsom_bytes(op, variant, n, dtype)
        for impl in DRSOM_IMPLS:
            rows.append({
                "op": op, "variant": variant, "impl": impl, "device": device, "n": n,
                "k": DRSOM_K, "dtype": dtype, "median_ms": seconds[impl] * 1e3, "bytes": nbytes,
                "gbps": nbytes / seconds[impl] / 1e9,
                "speedup_vs_reference": seconds["reference"] / seconds[impl],
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
    records = []
    for op, device, dtype, m, n in tqdm(cases, desc="micro", unit="case"):
        if op == OP:
            records += measure_case(n, m, dtype, device, min_run_time, rounds)
        else:
            records += measure_drsom_case(op, n, dtype, device, min_run_time, rounds)
        if device == "cuda":
            torch.cuda.empty_cache()  # give the next (larger) case the memory back
    for row in records:
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
    if args.json:
        common.write_json(args.json, "micro", env, records)
    if args.plot:
        plot(records, env, args.plot)


def line_label(row: dict) -> str:
    """The legend entry of a record's line: impl and m for lbfgs_direction, op, variant and impl
    for the DRSOM ops."""
    if row["op"] == OP:
        return f"{row['impl']} (m={row['m']})"
    name = row["op"].removeprefix("drsom_") + (f" {row['variant']}" if row["variant"] else "")
    return f"{name} {row['impl']}"


def plot(records: list[dict], env: dict, path: str) -> None:
    """One panel per (op family, device, dtype): effective GB/s vs n, a line per (impl, m) for
    lbfgs_direction and per (op, variant, impl) for the DRSOM ops (soo solid, reference dashed)."""
    def family(row):
        return OP if row["op"] == OP else "drsom"

    panels = list(dict.fromkeys((family(r), r["device"], r["dtype"]) for r in records))
    fig, axes = common.new_figure(len(panels))
    for ax, (fam, device, dtype) in zip(axes, panels):
        rows = [r for r in records
                if family(r) == fam and r["device"] == device and r["dtype"] == dtype]
        labels = list(dict.fromkeys(line_label(r) for r in rows))
        for i, label in enumerate(labels):
            line = sorted((r["n"], r["gbps"]) for r in rows if line_label(r) == label)
            style = "--" if fam == "drsom" and label.endswith("reference") else "-"
            color = f"C{i // 2}" if fam == "drsom" else None
            ax.plot(*zip(*line), marker="o", linestyle=style, color=color, label=label)
        if device in env["copy_gbps"]:
            ax.axhline(env["copy_gbps"][device], color="gray", linestyle="--", label="copy")
        title = f"{OP} {device} {dtype}" if fam == OP else f"DRSOM ops (k={DRSOM_K}) {device} {dtype}"
        ax.set(xscale="log", xlabel="n", ylabel="effective GB/s", title=title)
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    common.save_figure(fig, path)
