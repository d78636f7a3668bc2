"""Configures and builds soo_ext._C with CMake, then checks the module registers a working op.

Run by `make test` (cmake-check) so CMakeLists.txt cannot rot:  python tests/cmake_build.py DIR
CUDA kernels are included when SOO_EXT_CUDA=1 (default: CPU only, to keep CI short).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch.utils

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


def main(build_dir: str) -> None:
    build = ROOT / build_dir
    cuda = os.environ.get("SOO_EXT_CUDA") == "1"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *generator,
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DPython_EXECUTABLE={sys.executable}", f"-DSOO_EXT_CUDA={'ON' if cuda else 'OFF'}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2")],
                   check=True)
    module = next((build / "soo_ext").glob("_C*.so"))
    # A fresh interpreter that loads only the CMake-built module (not the setup.py one).
    env = dict(os.environ, SOO_EXT_DISABLE_EXT="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-c", CHECK, str(module)], check=True, env=env)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build-cmake")
