"""Using soo_ext from one's own code: ``pip install --no-build-isolation .`` (the README's install)
into a fresh virtual environment, then ``import soo_ext`` from another directory runs the compiled
kernels.

The environment is made for the test and sees the project's torch (and setuptools, ninja) through
a .pth file: nothing is downloaded or copied.  pip builds in the source tree, where ninja finds
the objects of ``make build`` up to date: the install links and packs the module without
compiling anything, given the in-tree build's settings (CUDA or not, its architectures), which
the test takes from its _build_info.json.  It runs in the first pass of ``make test`` only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from soo_ext import ops

ROOT = Path(__file__).resolve().parent.parent
BUILD_INFO = ROOT / "soo_ext" / "_build_info.json"

USE = """
import torch, soo_ext
from soo_ext import ops
assert ops.extension_loaded(), ops.extension_error()
print(soo_ext.__file__)
print(soo_ext._C.__file__)
# soo_ext.LBFGS on the compiled kernels tracks torch.optim.LBFGS (to 1e-6, as in test_lbfgs.py;
# a strongly convex problem, condition < 100: rounding stays far below that)
weights = torch.arange(1, 51, dtype=torch.float64)
def minimize(cls):
    x = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    opt = cls([x], line_search_fn="strong_wolfe", history_size=5, max_iter=20)
    def closure():
        opt.zero_grad()
        loss = (weights * (x - 1) ** 2).sum() + (x ** 4).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return x.detach()
x, x_torch = minimize(soo_ext.LBFGS), minimize(torch.optim.LBFGS)
torch.testing.assert_close(x, x_torch, rtol=1e-6, atol=1e-9)
assert (x - 1).abs().max() < 0.5, x
"""


def in_tree_build_settings() -> dict | None:
    """The environment that rebuilds what ``make build`` built (None: no in-tree build)."""
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None
    if not list(ROOT.glob("build/temp.*/build.ninja")):
        return None
    env = {"SOO_EXT_CUDA": "1" if info["with_cuda"] else "0"}
    if info["with_cuda"]:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(info["cuda_archs"])
    return env


@pytest.mark.skipif(not ops.extension_loaded() or in_tree_build_settings() is None,
                    reason="needs the in-tree build of make build (reused, not recompiled)")
def test_pip_install_into_a_new_venv_and_import_from_elsewhere(tmp_path):
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the project's site-packages (torch, setuptools, ninja) behind the new venv's own
    Path(site, "project-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {**os.environ, **in_tree_build_settings(),
           "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}:{Path(sys.executable).parent}"}
    for key in ("PYTHONPATH", "SOO_EXT_DISABLE_EXT", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(key, None)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-build-isolation",
         "--no-deps", "--no-index", "--no-cache-dir", "--disable-pip-version-check", "-q", str(ROOT)],
        capture_output=True, text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed = time.perf_counter() - start

    used = subprocess.run([str(python), "-c", USE], capture_output=True, text=True, cwd=elsewhere,
                          env={**env, "SOO_EXT_REQUIRE_EXT": "1"}, timeout=300)
    assert used.returncode == 0, used.stderr[-3000:]
    package, module = used.stdout.splitlines()[:2]
    assert Path(package).is_relative_to(site) and Path(module).is_relative_to(site), used.stdout
    print(f"pip install {installed:.0f} s, import and use {time.perf_counter() - start - installed:.0f} s")
