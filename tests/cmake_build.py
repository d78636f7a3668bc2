"""CMakeLists.txt keeps building the module: configure, build, load, run every op.

Run by `make test` (make cmake-check) so that CMakeLists.txt cannot rot:

    python tests/cmake_build.py [DIR]        (default DIR: build-cmake)

1. DIR/cpu: configure and build the module with the CPU kernels (no CUDA: the CUDA kernels take
   minutes to compile for several architectures and setup.py's build already compiles them);
   then a fresh interpreter imports soo_ext with this module in place of setup.py's (a copy of
   the package around it), checks its build information, that it registers every op the package
   calls with a CPU kernel, and runs each op against its pure-PyTorch reference.
2. DIR/cuda, when torch has CUDA and nvcc is found: configure with SOO_EXT_CUDA=ON (enable_language
   (CUDA), torch's CUDA config, the C++20 flags CMake < 3.26 lacks, the CUDA library headers) and
   compile one CUDA source for one architecture (the first of TORCH_CUDA_ARCH_LIST): CMake's CUDA
   flags work with nvcc and torch's headers.
With SOO_EXT_CUDA=1 (make cmake-check SOO_EXT_CUDA=1) step 1 builds the CUDA kernels too, for
every architecture of TORCH_CUDA_ARCH_LIST (default 8.0;8.6;9.0+PTX), and the module is checked
to hold device code for each; step 2 is then not needed.  SOO_EXT_CUDA=0 skips step 2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.utils

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"
# the CUDA source compiled in step 2: the smallest
CUDA_PROBE = "csrc/cuda/bfgs_direction_cuda.cu"

CHECK = r"""
import re, sys, torch
module, with_cuda = sys.argv[1], sys.argv[2] == "1"
import soo_ext
from soo_ext import ops, reference
assert ops.extension_loaded(), ops.extension_error()
assert soo_ext._C.__file__ == module, (soo_ext._C.__file__, module)
info = soo_ext.build_info()
assert info["version"] == soo_ext.__version__ and info["torch_version"] == torch.__version__, info
assert info["with_cuda"] is with_cuda, info

# every op the package calls is registered, with a CPU kernel
called = set(re.findall(r"torch\.ops\.soo\.(\w+)", open(ops.__file__).read()))
for name in sorted(called):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soo::{name}", "CPU"), name

# and computes what its reference computes (in-place arguments compared too)
gen = torch.Generator().manual_seed(0)
def randn(*shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)
def spd(b, n):
    X = randn(b, 2 * n, n)
    return X.mT @ X / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)
def copy(x):
    return [copy(v) for v in x] if isinstance(x, list) else x.clone() if torch.is_tensor(x) else x
def tensors(args):
    return [a for a in args if torch.is_tensor(a) or isinstance(a, list)]
n, m = 1001, 4
S, Y = randn(m, n), randn(m, n)
Y = Y * 0.1 + S
H, s = spd(1, 37)[0], randn(37)
V = [randn(n), randn(n)]
cases = {
    "lbfgs_direction": (S, Y, S @ Y.T, Y @ Y.T, randn(n), 2, 3, True),
    "bfgs_direction": (H, s, 0.8 * s + 0.1 * randn(37), randn(37), True),
    "drsom_perturb": (randn(n), randn(n), randn(n), torch.tensor(1e-3, dtype=torch.float64), True),
    "drsom_reduce": (randn(n), randn(n), V, torch.tensor(1e-3, dtype=torch.float64), True),
    "drsom_update": (randn(n), randn(n), V, randn(2)),
    "drsom_subproblem": (H[:2, :2] - 2, H[2:4, 2:4], randn(2), 1e-6, 10.0, 5.0),
    "window_gram": (randn(4, n), [randn(n), randn(n)], 3, True),
    "window_combine": (randn(n), randn(4, n), randn(4), 3, randn(n),
                       torch.tensor(0.5, dtype=torch.float64)),
    "kron_factor_update_": (spd(2, 9), randn(2, 30, 9), 0.9, 0.1),
    "kron_damped_inverse": (spd(3, 9), 1e-3),
    "kron_inverse_root": (spd(3, 9), 4, 1e-6, "eigh", 100, 1e-6),
    "kfac_precondition_eigen": (randn(2, 5, 7), *torch.linalg.qr(randn(2, 5, 5))[:1],
                                randn(2, 5).abs(), *torch.linalg.qr(randn(2, 7, 7))[:1],
                                randn(2, 7).abs(), 1e-3),
    "all_finite": ([randn(n), randn(3, 5).float(), randn(0)],),
}
for name, args in cases.items():
    a, b = copy(args), copy(args)
    torch.testing.assert_close((getattr(ops, name)(*a), tensors(a)),
                               (getattr(reference, name)(*b), tensors(b)),
                               msg=lambda text: f"{name}: {text}")
A = spd(3, 9)
(d, Q, status), (d_ref, Q_ref, _) = ops.kron_eigh(A), reference.kron_eigh(A)
torch.testing.assert_close((Q * d[..., None, :]) @ Q.mT, (Q_ref * d_ref[..., None, :]) @ Q_ref.mT)
assert not ops.all_finite([randn(n), torch.tensor([1.0, float("nan")]).bfloat16()])
assert not (set(called) - set(cases) - {"kron_eigh"}), set(called) - set(cases)
print(f"cmake-built module OK: {module}: {len(called)} ops registered and equal to their references")
"""


def cuda_hints() -> list[str]:
    """torch's CMake config looks for the CUDA toolkit even for a CPU-only extension.  A bare
    toolkit (nvcc, cudart) lacks the CUDA libraries torch links; the nvidia-* wheels torch
    depends on ship them, so point CMake there."""
    if torch.version.cuda is None:
        return []
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    hints = [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}"]
    if (cuda_home / "include" / "cusparse.h").exists():
        return hints
    wheel = next((p.parent.parent for p in Path(torch.__file__).parent.parent.glob("nvidia/*/include/cusparse.h")), None)
    if wheel is not None:
        nvrtc = sorted((wheel / "lib").glob("libnvrtc.so*"))
        hints += [f"-DCMAKE_LIBRARY_PATH={wheel / 'lib'}", f"-DCMAKE_INCLUDE_PATH={wheel / 'include'}"]
        hints += [f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}"] if nvrtc else []
    return hints


def cuda_available() -> bool:
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    return bool(torch.version.cuda) and ((cuda_home / "bin" / "nvcc").exists()
                                         or shutil.which("nvcc") is not None)


def configure(build: Path, cuda: bool, archs: str) -> None:
    """cmake's output (torch's config warns a lot) is shown only if it fails."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    done = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *generator,
                           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                           f"-DPython_EXECUTABLE={sys.executable}",
                           f"-DSOO_EXT_CUDA={'ON' if cuda else 'OFF'}",
                           f"-DTORCH_CUDA_ARCH_LIST={archs}",
                           *cuda_hints()],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        print(done.stdout)
        raise SystemExit(f"cmake failed to configure {build} (above)")


def build_and_load(build: Path, cuda: bool, archs: str) -> None:
    """Step 1: the whole module, loaded in a copy of the package and checked."""
    configure(build, cuda, archs)
    subprocess.run(["cmake", "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2")],
                   check=True)
    module = next((build / "soo_ext").glob("_C*.so"))
    # the package around it: soo_ext's Python files, this module, a build record for its torch
    package = build / "package" / "soo_ext"
    shutil.rmtree(package.parent, ignore_errors=True)
    shutil.copytree(ROOT / "soo_ext", package,
                    ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_build_info.json"))
    shutil.copy2(module, package / module.name)
    (package / "_build_info.json").write_text(json.dumps({"torch_version": torch.__version__}))
    env = dict(os.environ, PYTHONPATH=str(package.parent), SOO_EXT_REQUIRE_EXT="1",
               PYTHONWARNINGS="ignore")
    env.pop("SOO_EXT_DISABLE_EXT", None)
    done = subprocess.run([sys.executable, "-c", CHECK, str(package / module.name),
                           "1" if cuda else "0"], env=env, cwd=package.parent)
    if done.returncode:
        raise SystemExit(f"the CMake-built module {module} failed its check (above)")
    if cuda:
        from cuda_archs import check
        check(module, archs)


def compile_one_cuda_source(build: Path, archs: str) -> None:
    """Step 2: CMake's CUDA configuration, and one CUDA source compiled by it."""
    first = re.split(r"[;\s]+", archs.strip())[0].replace("+PTX", "")
    configure(build, True, first)
    target = f"CMakeFiles/_C.dir/{CUDA_PROBE}.o"
    subprocess.run(["cmake", "--build", str(build), "--target", target], check=True)
    print(f"cmake CUDA configuration OK: {CUDA_PROBE} compiled for {first}")


def main(build_dir: str) -> None:
    build = ROOT / build_dir
    forced = os.environ.get("SOO_EXT_CUDA")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    start = time.perf_counter()
    build_and_load(build / "cpu" if forced != "1" else build / "cuda-all", forced == "1", archs)
    if forced is None and cuda_available():
        compile_one_cuda_source(build / "cuda", archs)
    print(f"cmake check: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build-cmake")
