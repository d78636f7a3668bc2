"""`make test`: every pass runs to its end, a line per pass comes at the end, and the run fails if
any pass failed (.ci/test-passes); the Makefile runs the CMake check and the three passes."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_passes(tmp_path, *passes):
    return subprocess.run(["bash", str(ROOT / ".ci" / "test-passes"), *passes], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TEST_LOGS": str(tmp_path)})


def summary(stdout):
    return stdout.split("=== summary", 1)[1].splitlines()[1:]


def test_a_failed_pass_does_not_stop_the_others_and_fails_the_run(tmp_path):
    done = run_passes(tmp_path, "first|echo '1 failed, 2 passed in 0.1s'; exit 1",
                       "second|echo one; echo '3 passed in 0.2s'", "third|echo '4 passed in 0.3s'")
    assert done.returncode == 1, done.stderr
    lines = summary(done.stdout)
    assert lines[0].startswith("first") and "FAILED (exit 1)" in lines[0]
    assert lines[0].endswith("1 failed, 2 passed in 0.1s")
    assert lines[1].startswith("second") and " ok " in lines[1] and lines[1].endswith("3 passed in 0.2s")
    assert lines[2].startswith("third") and lines[2].endswith("4 passed in 0.3s")
    assert "FAILED" in lines[3]
    assert (tmp_path / "second.log").read_text() == "one\n3 passed in 0.2s\n"


def test_the_run_passes_when_every_pass_passed(tmp_path):
    done = run_passes(tmp_path, "a b|echo '=== 5 passed in 1.0s ==='", "c|true")
    assert done.returncode == 0, done.stderr
    lines = summary(done.stdout)
    assert lines[0].startswith("a b") and lines[0].endswith(" 5 passed in 1.0s")
    assert lines[-1] == "make test: every pass passed"


def test_make_test_runs_the_cmake_check_and_the_three_passes():
    """The Makefile's test recipe (read, not run: `make -n` runs a recipe line with $(MAKE))."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ntest: build\n"):].split("\n\n", 1)[0]
    call = recipe[recipe.index(".ci/test-passes"):]
    names = [line.split("|")[0].strip().strip('"') for line in call.splitlines()[1:]
             if "|" in line]
    assert names == ["cmake check", "compiled kernels", "emulated CUDA", "fallback"], call
    assert "$(MAKE) --no-print-directory cmake-check" in call
    assert "--cuda-emu-as-cpu tests $(FIRST_PASS_ONLY)" in call
    assert "SOO_EXT_DISABLE_EXT=1 $(PYTEST) tests $(FIRST_PASS_ONLY)" in call
    assert call.count("SOO_EXT_REQUIRE_EXT=1 $(PYTEST)") == 2
