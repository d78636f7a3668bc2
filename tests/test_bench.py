"""Smoke tests of the benchmark CLI (python -m bench) at tiny sizes: it runs, and its JSON holds
the expected fields with sane numbers.  Speed targets are reported by the benchmarks, not tested."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import __main__ as cli
from bench import micro

ROOT = Path(__file__).resolve().parent.parent


def load(path):
    payload = json.loads(Path(path).read_text())
    env = payload["environment"]
    for key in ("date", "torch_version", "devices", "cpu_count", "soo_ext"):
        assert key in env
    assert "extension_loaded" in env["soo_ext"]
    return payload


def test_micro_writes_records_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "micro.json", tmp_path / "micro.png"
    cli.main(["micro", "--quick", "--device", "cpu", "--n", "1000", "3000", "--m", "3",
              "--min-run-time", "0.01", "--json", str(out), "--plot", str(png)])
    payload = load(out)
    assert payload["benchmark"] == "micro"
    records = payload["records"]
    assert len(records) == 2 * len(micro.common.DTYPES) * len(micro.IMPLS)
    for row in records:
        assert row["op"] == "lbfgs_direction" and row["device"] == "cpu" and row["m"] == 3
        assert row["bytes"] == micro.direction_bytes(row["n"], 3, row["dtype"])
        for key in ("median_ms", "gbps", "speedup_vs_torch", "speedup_vs_reference"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["gbps"] == pytest.approx(row["bytes"] / row["median_ms"] / 1e6)
        if row["impl"] == "torch":
            assert row["speedup_vs_torch"] == 1 and row["history_dtype"] == row["grad_dtype"]
    assert {r["dtype"] for r in records} == set(micro.common.DTYPES)
    assert png.stat().st_size > 0
    assert "eff. GB/s" in capsys.readouterr().out


def test_direction_bytes_formula():
    # (4*m*h + 3*b) * n: two passes over S and Y, g read twice, d written once
    assert micro.direction_bytes(1000, 10, "float32") == (4 * 10 * 4 + 3 * 4) * 1000
    assert micro.direction_bytes(1000, 10, "float64") == (4 * 10 * 8 + 3 * 8) * 1000
    assert micro.direction_bytes(1000, 10, "bf16") == (4 * 10 * 2 + 3 * 4) * 1000


@pytest.mark.parametrize("dtype", list(micro.common.DTYPES))
def test_micro_impls_compute_the_same_direction(dtype):
    case = micro.Case(2000, 5, dtype, "cpu")
    d_torch, gtd, dmax = case.torch_direction()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype != "float64" else {}
    for d, stats in (case.soo_direction(False), case.soo_direction(True),
                     case.reference_direction()):
        torch.testing.assert_close(d, d_torch, **tol)
        torch.testing.assert_close(stats, torch.stack([gtd, dmax]).to(stats.dtype), **tol)


def test_step_writes_records_and_plot(tmp_path):
    out, png = tmp_path / "step.json", tmp_path / "step.png"
    cli.main(["step", "--quick", "--device", "cpu", "--n", "5000", "--m", "3", "--hidden", "8",
              "--iters-per-step", "2", "--repeats", "2", "--json", str(out), "--plot", str(png)])
    payload = load(out)
    assert payload["benchmark"] == "step"
    records = payload["records"]
    assert [(r["case"], r["impl"], r["history_dtype"]) for r in records] == [
        (case, impl, hist) for case in ("quadratic", "digits-mlp")
        for impl, hist in (("torch.optim.LBFGS", "fp32"), ("soo_ext.LBFGS", "fp32"),
                           ("soo_ext.LBFGS", "bf16"))]
    for row in records:
        assert row["device"] == "cpu" and row["m"] == 3 and row["n"] > 0
        for key in ("median_ms_per_iter", "speedup_vs_torch"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isfinite(row["final_loss"])
    assert records[0]["n"] == 5000
    assert png.stat().st_size > 0


def test_no_subcommand_runs_the_demo(monkeypatch):
    seen = []
    monkeypatch.setattr(micro, "run", lambda args: seen.append(args) or ([], {}))
    cli.main([])
    cli.main(["demo"])
    assert len(seen) == 2 and all(args.command == "micro" and args.n for args in seen)


def test_help_documents_the_bandwidth_formula():
    result = subprocess.run([sys.executable, "-m", "bench", "micro", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(4*m*h + 3*b) * n" in result.stdout
