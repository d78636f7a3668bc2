"""The build: build information, device code for the requested architectures, the fallback."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soo_ext
from soo_ext import ops

sys.path.insert(0, str(Path(__file__).parent))
from cuda_archs import embedded_archs, requested_archs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_build_info_describes_the_module():
    info = soo_ext.build_info()
    assert info["version"] == soo_ext.__version__
    assert info["extension_loaded"] is ops.extension_loaded()
    if ops.extension_loaded():
        assert info["torch_version"] == torch.__version__
        assert isinstance(info["with_cuda"], bool) and isinstance(info["cuda_archs"], list)
        assert info["with_cuda"] == bool(info["cuda_archs"])


@pytest.mark.skipif(not (ops.extension_loaded() and soo_ext.build_info()["with_cuda"]),
                    reason="CUDA kernels not built")
def test_module_contains_device_code_for_every_requested_arch():
    module = Path(soo_ext.ops.__file__).parent
    so = next(module.glob("_C*.so"))
    got = embedded_archs(so)
    wanted = requested_archs(";".join(soo_ext.build_info()["cuda_archs"]))
    assert wanted["elf"] <= got["elf"] and wanted["ptx"] <= got["ptx"], (wanted, got)
    # the default list, where the build had neither a list nor a visible GPU (whose arch it takes)
    assert ({80, 86, 90} <= got["elf"] or os.environ.get("TORCH_CUDA_ARCH_LIST")
            or torch.cuda.is_available())


def test_requested_archs_parsing():
    assert requested_archs("8.0;8.6;9.0+PTX") == {"elf": {80, 86, 90}, "ptx": {90}}
    assert requested_archs("9.0 10.0+PTX") == {"elf": {90, 100}, "ptx": {100}}


def test_fallback_to_references_warns_once():
    res = run_python(
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import soo_ext\n"
        "    h = soo_ext.LBFGSHistory(5, 2, dtype=torch.float64)\n"
        "    h.push(torch.ones(5, dtype=torch.float64), 2 * torch.ones(5, dtype=torch.float64))\n"
        "    d, _ = h.direction(torch.ones(5, dtype=torch.float64))\n"
        "msgs = [str(x.message) for x in w if 'soo_ext' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'fall back' in msgs[0], msgs\n"
        "assert not soo_ext.ops.extension_loaded()\n"
        "assert torch.allclose(d, -0.5 * torch.ones(5, dtype=torch.float64))\n"
        "print('ok')", SOO_EXT_DISABLE_EXT="1", SOO_EXT_REQUIRE_EXT="0")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_require_ext_turns_the_fallback_into_an_error():
    res = run_python("import soo_ext", SOO_EXT_DISABLE_EXT="1", SOO_EXT_REQUIRE_EXT="1")
    assert res.returncode != 0 and "SOO_EXT_REQUIRE_EXT" in res.stderr


@pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")
def test_module_built_for_another_torch_is_not_loaded(tmp_path):
    pkg = tmp_path / "soo_ext"
    shutil.copytree(ROOT / "soo_ext", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    info = json.loads((pkg / "_build_info.json").read_text())
    info["torch_version"] = "1.0.0"
    (pkg / "_build_info.json").write_text(json.dumps(info))
    res = subprocess.run(
        [sys.executable, "-c", "import soo_ext; assert not soo_ext.ops.extension_loaded(); "
                               "print(soo_ext.ops.extension_error())"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "SOO_EXT_REQUIRE_EXT": "0"})
    assert res.returncode == 0, res.stderr
    assert "built against torch 1.0.0" in res.stdout and "rebuild" in res.stderr


def setup_py(*args, **env):
    return subprocess.run([sys.executable, "setup.py", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env})


def test_forced_cuda_build_without_nvcc_fails_loudly(tmp_path):
    res = setup_py("--version", SOO_EXT_CUDA="1", CUDA_HOME=str(tmp_path),
                   PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")
    if torch.version.cuda is None:
        assert res.returncode != 0 and "torch has no CUDA support" in res.stderr
    else:
        assert res.returncode != 0 and "nvcc not found" in res.stderr


def test_sdist_carries_every_source_and_header(tmp_path):
    import tarfile
    res = setup_py("-q", "sdist", "-d", str(tmp_path), SOO_EXT_CUDA="0")
    assert res.returncode == 0, res.stderr
    (archive,) = tmp_path.glob("soo_ext-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {str(f.relative_to(ROOT)) for f in (ROOT / "csrc").rglob("*") if f.is_file()}
    assert needed and needed <= names, sorted(needed - names)
    assert {"CMakeLists.txt", "setup.py", "pyproject.toml", "soo_ext/ops.py"} <= names


def test_cuda_can_be_switched_off():
    res = setup_py("--version", SOO_EXT_CUDA="0")
    assert res.returncode == 0 and "CUDA kernels off" in res.stderr
    assert setup_py("--version", SOO_EXT_CUDA="maybe").returncode != 0


ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
from op_inputs import random_history, random_problem
from soo_ext import ops
out = []
for dtype, hist_dtype in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                          (torch.float32, torch.bfloat16)]:
    hist, g = random_history(7, 40_013, 7, 3, dtype, hist_dtype, "cpu")
    hist.push(g * 0.5, g * 0.7 + 0.1)
    out += list(hist.direction(g)) + [hist.SY, hist.YY]
for dtype in (torch.float64, torch.float32):
    H, s, y, g = (t.to(dtype) for t in random_problem(203))
    out += list(ops.bfgs_direction(H, s, y, g, True)) + [H]
for dtype in (torch.float64, torch.float32):  # DRSOM ops: n not a multiple of the SIMD width
    gen = torch.Generator().manual_seed(5)
    gp, g, x, *V = (torch.randn(40_013, generator=gen, dtype=torch.float64).to(dtype)
                    for _ in range(8))
    t = torch.tensor(1e-3, dtype=dtype)
    out += list(ops.drsom_reduce(gp, g, V, t, True))
    x0 = torch.empty_like(x)
    ops.drsom_perturb(x, x0, V[0], t, True)
    p = torch.empty_like(x)
    ops.drsom_update(x0, p, V, torch.linspace(-1, 1, 5, dtype=dtype))
    out += [x, x0, p]
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not ops.extension_loaded(), reason="compiled module not built")
def test_cpu_kernels_give_the_same_bits_on_every_instruction_set(tmp_path):
    """The AVX2 and baseline builds of the CPU kernels (vec.h) agree bit for bit."""
    results = []
    for baseline in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "SOO_EXT_CPU_BASELINE"}
        if baseline == "1":
            env["SOO_EXT_CPU_BASELINE"] = "1"
        path = tmp_path / f"{baseline}.pt"
        done = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(path)], cwd=ROOT,
                              env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results.append(torch.load(path))
    assert len(results[0]) == 3 * 4 + 2 * 3 + 2 * 6
    for a, b in zip(*results):
        assert torch.equal(a, b)
