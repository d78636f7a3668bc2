"""Configures and builds soo_ext._C with CMake, then checks the module registers a working op.

Run by `make test` (cmake-check) so CMakeLists.txt cannot rot:  python tests/cmake_build.py DIR
CUDA kernels are included by the same rule as setup.py: SOO_EXT_CUDA=0|1, else whenever torch
has CUDA and nvcc is found; then the module is checked to hold device code for every target.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch.utils

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
from soo_ext import LBFGSHistory, reference
hist = LBFGSHistory(1001, 4, dtype=torch.float64)
for _ in range(5):
    s = torch.randn(1001, dtype=torch.float64)
    hist.push(s, 2 * s)
    hist.direction(torch.randn(1001, dtype=torch.float64))
g = torch.randn(1001, dtype=torch.float64)
d, _ = torch.ops.soo.lbfgs_direction(hist.S, hist.Y, hist.SY, hist.YY, g, hist.newest, hist.count, False)
torch.testing.assert_close(d, reference.lbfgs_two_loop_textbook(hist.S, hist.Y, g, hist.newest, hist.count))
print("cmake-built module OK:", sys.argv[1])
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


def main(build_dir: str) -> None:
    build = ROOT / build_dir
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    cuda = os.environ.get("SOO_EXT_CUDA", "1" if torch.version.cuda and (
        (cuda_home / "bin" / "nvcc").exists() or shutil.which("nvcc")) else "0") == "1"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;8.6;9.0+PTX"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *generator,
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DPython_EXECUTABLE={sys.executable}", f"-DSOO_EXT_CUDA={'ON' if cuda else 'OFF'}", f"-DTORCH_CUDA_ARCH_LIST={archs}",
                    *cuda_hints()],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2")],
                   check=True)
    module = next((build / "soo_ext").glob("_C*.so"))
    # A fresh interpreter that loads only the CMake-built module (not the setup.py one).
    env = dict(os.environ, SOO_EXT_DISABLE_EXT="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-c", CHECK, str(module)], check=True, env=env)
    if cuda:
        from cuda_archs import check
        check(module, archs)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build-cmake")
