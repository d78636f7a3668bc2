"""soo_ext's CUDA sources built for the CPU emulation of cuda_emu.h, and loaded.

Each ``csrc/cuda/*.cu`` (and ``common.cuh``) is rewritten into ``build/cuda_emu/src`` with six
textual changes, then compiled as C++ by torch.utils.cpp_extension (ninja: only what changed is
rebuilt; the first build takes ~30 s here):

- ``kernel<<<grid, block, smem, stream>>>(args)`` -> ``::soo_emu::Launch(grid, block, smem,
  stream)(kernel, args)``
- ``extern __shared__ T name[];`` -> a pointer to the launch's dynamic shared memory, and
  ``__shared__ T name[N];`` -> a reference to an instance of the block that runs; both are filled
  with NaN bytes at the start of every block
- ``reinterpret_cast<float4*>`` (and the other vector types) -> ``::soo_emu::vec_cast``, which
  fails on a misaligned address as the device does
- ``__launch_bounds__(B)`` -> a check of the block size at the start of the kernel
- ``TORCH_LIBRARY_IMPL(soo, CUDA, m)`` -> ``TORCH_LIBRARY_IMPL(soo_emu, CPU, m)``

The ``soo_emu`` ops get the schemas of the ``soo`` ops of the compiled module (so it must be
loaded), and run the CUDA host code and kernels on CPU tensors.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emu"

_LAUNCH = re.compile(r"^(\s*)(\S.*?)<<<(.*?)>>>\(")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w[\w\s]*?)\s+(\w+)\[\];")
_VEC_CAST = re.compile(r"reinterpret_cast<((?:const\s+)?(?:float4|float2|double2|uint4|uint2)\s*\*)>\(")
_REGISTER = re.compile(r"TORCH_LIBRARY_IMPL\(soo,\s*CUDA,")
_SHARED = re.compile(r"(?<!extern )__shared__\s+([\w:<>]+)\s+([^;]+);")
_DECLARATOR = re.compile(r"\s*(\w+)\s*((?:\[[^\]]+\])*)\s*$")


_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(([^()]+)\)")


def _check_launch_bounds(source: str) -> str:
    """``__launch_bounds__(B) kernel(...) {`` -> the same, the body starting with a check that
    the block has at most B threads (the device refuses such a launch)."""
    out, pos = [], 0
    for m in _LAUNCH_BOUNDS.finditer(source):
        depth, i = 0, m.end()
        while not (source[i] == "{" and depth == 0):  # the body's brace, after the parameters
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        out.append(source[pos:m.start()] + source[m.end():i + 1]
                   + f" ::soo_emu::check_launch_bounds({m.group(1)});")
        pos = i + 1
    return "".join(out) + source[pos:]


def _shared_declarations(m: re.Match) -> str:
    """``__shared__ T a[N], b;`` -> per-block, poisoned instances from ``::soo_emu::shared``."""
    type_, declarators = m.groups()
    out = []
    for decl in declarators.split(","):  # no commas inside the array bounds here
        name, dims = _DECLARATOR.match(decl).groups()
        out.append(f"static char {name}_key_; "
                   f"auto& {name} = ::soo_emu::shared<{type_}{dims}>(&{name}_key_);")
    return " ".join(out)
_PARENT_INCLUDE = re.compile(r'#include "\.\./')


def rewrite(source: str) -> str:
    """The emulation's version of one CUDA source (see the module docstring)."""
    lines = []
    for line in source.splitlines():
        m = _LAUNCH.match(line)
        if m:
            indent, kernel, config = m.groups()
            rest = line[m.end():]
            sep = "" if rest.lstrip().startswith(")") else ", "
            line = f"{indent}::soo_emu::Launch({config})({kernel}{sep}{rest}"
        lines.append(line)
    out = "\n".join(lines) + "\n"
    out = _EXTERN_SHARED.sub(
        r"\1* \2 = reinterpret_cast<\1*>(::soo_emu::dynamic_smem());", out)
    out = _VEC_CAST.sub(r"::soo_emu::vec_cast<\1>(", out)
    out = _SHARED.sub(_shared_declarations, out)
    out = _check_launch_bounds(out)
    out = _REGISTER.sub("TORCH_LIBRARY_IMPL(soo_emu, CPU,", out)
    return _PARENT_INCLUDE.sub('#include "', out)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _define_schemas() -> None:
    """``soo_emu::<op>`` with the schema of every CUDA-implemented ``soo::<op>`` (once)."""
    if hasattr(_define_schemas, "lib"):
        return
    lib = torch.library.Library("soo_emu", "DEF")
    for name in op_names():
        schema = str(getattr(torch.ops.soo, name).default._schema)
        lib.define(schema.split("::", 1)[1])
    _define_schemas.lib = lib  # keep the library (and its definitions) alive


def op_names() -> list[str]:
    """The ops with a CUDA kernel (registered in csrc/cuda/*.cu)."""
    names = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        names += re.findall(r'm\.impl\("(\w+)"', cu.read_text())
    return names


def load():
    """Builds (if needed) and loads the emulated CUDA ops; returns ``torch.ops.soo_emu``."""
    import soo_ext._C  # the soo schemas
    from soo_ext import ops
    if not ops._LOADED:
        raise RuntimeError("cuda_emu needs the compiled soo_ext module (for the op schemas)")
    _define_schemas()
    # the CUDA sources call host helpers of the CPU sources (argument checks, output shapes):
    # take them from the compiled module, made global for the symbol lookup of the next load
    ctypes.CDLL(soo_ext._C.__file__, mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    src = BUILD / "src"
    (src / "cuda").mkdir(parents=True, exist_ok=True)
    sources = []
    for f in sorted((ROOT / "csrc" / "cuda").iterdir()):
        if f.suffix not in (".cu", ".cuh"):
            continue
        out = src / "cuda" / (f.stem + (".cpp" if f.suffix == ".cu" else ".cuh"))
        _write_if_changed(out, rewrite(f.read_text()))
        if f.suffix == ".cu":
            sources.append(str(out))
    sources.append(str(HERE / "config.cpp"))
    cpp_extension.load(
        name="soo_cuda_emu",
        sources=sources,
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc")],
        # -O1: quick to build, fast enough to run.  No FMA contraction, as in the CPU kernels
        # (so the two can agree bit for bit); nvcc contracts a * b + c by default, which the
        # emulation does not reproduce (the GPU tests' tolerances allow for it)
        extra_cflags=["-O1", "-ffp-contract=off", "-U_FORTIFY_SOURCE",
                      "-include", str(HERE / "cuda_emu.h")],
        # calls between the module's own functions stay inside it (an inline function that
        # torch or soo_ext._C also defines must not be taken from them)
        extra_ldflags=["-Wl,-Bsymbolic"],
        build_directory=str(BUILD),
        with_cuda=False,
        is_python_module=False,
        verbose=bool(os.environ.get("SOO_EMU_VERBOSE")),
    )
    return torch.ops.soo_emu


def configure(sms: int = 2, order_seed: int = 0) -> int:
    """The emulated device's SM count and the seed of its block, warp and lane orders (0: in
    order); returns the launches since the previous call (and restarts the count, on which the
    orders also depend)."""
    return torch.ops.soo_emu_config.configure(sms, order_seed)


def install_as_cpu_kernels() -> torch.library.Library:
    """Makes the emulated CUDA kernels the ``soo`` ops' CPU kernels, so that every CPU test
    runs the CUDA sources (pytest ``--cuda-emu-as-cpu``), on 3 emulated SMs with blocks, warps and
    lanes in shuffled orders; undone when the returned library is destroyed."""
    import warnings
    emu = load()
    configure(sms=3, order_seed=11)  # grids of several blocks, in shuffled orders
    lib = torch.library.Library("soo", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel" (intended)
        warnings.simplefilter("ignore")
        for name in op_names():
            lib.impl(name, getattr(emu, name).default, "CPU")
    return lib
