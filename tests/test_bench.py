"""Smoke tests of the benchmark CLI (python -m bench) at tiny sizes: it runs, and its JSON holds
the expected fields with sane numbers.  Speed targets are reported by the benchmarks, not tested."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import __main__ as cli
from bench import common, demo, micro, precond
from soo_ext import ops

ROOT = Path(__file__).resolve().parent.parent


def load(path):
    payload = json.loads(Path(path).read_text())
    env = payload["environment"]
    for key in ("date", "torch_version", "devices", "cpu_count", "machine", "load", "soo_ext"):
        assert key in env
    assert "extension_loaded" in env["soo_ext"]
    return payload


def test_micro_writes_records_table_and_plot(tmp_path, capsys, one_thread):
    out, png = tmp_path / "micro.json", tmp_path / "micro.png"
    cli.main(["micro", "--quick", "--device", "cpu", "--n", "1000", "3000", "--m", "3",
              "--min-run-time", "0.01", "--json", str(out), "--plot", str(png)])
    payload = load(out)
    assert payload["benchmark"] == "micro"
    records = [r for r in payload["records"] if r["op"] == "lbfgs_direction"]
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


def test_micro_times_the_drsom_ops(tmp_path, capsys, one_thread):
    out, png = tmp_path / "micro.json", tmp_path / "micro.png"
    records, _ = cli.main(["micro", "--quick", "--device", "cpu", "--n", "1000", "3000",
                           "--ops", *micro.DRSOM_OPS, "--min-run-time", "0.01",
                           "--json", str(out), "--plot", str(png)])
    assert load(out)["records"] == records
    # bf16 (the default --dtype list has it) is skipped: the DRSOM ops take fp32 and fp64
    expected = [(op, variant, impl, dtype, n) for op in micro.DRSOM_OPS
                for dtype in micro.DRSOM_DTYPES for n in (1000, 3000)
                for variant in micro.DRSOM_VARIANTS[op]
                for impl in (micro.DRSOM_REDUCE_IMPLS if op == "drsom_reduce"
                             else micro.DRSOM_IMPLS)]
    assert [(r["op"], r["variant"], r["impl"], r["dtype"], r["n"]) for r in records] == expected
    for row in records:
        assert row["device"] == "cpu" and row["k"] == 2
        assert row["bytes"] == micro.drsom_bytes(row["op"], row["variant"], row["n"], row["dtype"])
        for key in ("median_ms", "gbps", "speedup_vs_reference"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["gbps"] == pytest.approx(row["bytes"] / row["median_ms"] / 1e6)
        if row["impl"] == "reference":
            assert row["speedup_vs_reference"] == 1
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "DRSOM ops" in printed and "lbfgs_direction, soo" not in printed


def test_micro_times_the_window_ops(tmp_path, capsys, one_thread):
    out, png = tmp_path / "micro.json", tmp_path / "micro.png"
    records, _ = cli.main(["micro", "--quick", "--device", "cpu", "--n", "1000", "--window-m", "3",
                           "--ops", *micro.WINDOW_OPS, "--min-run-time", "0.01",
                           "--json", str(out), "--plot", str(png)])
    expected = [(op, variant, impl, dtype) for op in micro.WINDOW_OPS
                for dtype in micro.common.DTYPES for variant in micro.WINDOW_VARIANTS[op]
                for impl in micro.WINDOW_IMPLS]
    assert sorted((r["op"], r["variant"], r["impl"], r["dtype"]) for r in records) == sorted(expected)
    for row in records:
        assert row["m"] == 3 and row["n"] == 1000
        assert row["bytes"] == micro.window_bytes(row["op"], 3, 1000, row["dtype"])
        assert row["gbps"] == pytest.approx(row["bytes"] / row["median_ms"] / 1e6)
    assert micro.window_bytes("window_gram", 32, 1000, "bf16") == (32 * 2 + 2 * 4) * 1000
    assert micro.window_bytes("window_combine", 32, 1000, "float64") == (32 * 8 + 2 * 8) * 1000
    assert png.stat().st_size > 0 and "Window ops" in capsys.readouterr().out


def test_micro_ops_option_selects_lbfgs_only(one_thread):
    records, _ = cli.main(["micro", "--quick", "--device", "cpu", "--n", "1000", "--m", "2",
                           "--dtype", "float32", "--ops", "lbfgs_direction",
                           "--min-run-time", "0.01"])
    assert {r["op"] for r in records} == {"lbfgs_direction"} and len(records) == len(micro.IMPLS)


def test_drsom_bytes_formulas():
    # perturb save: read x, v, write x0, x; no-save: read x0, v, write x
    assert micro.drsom_bytes("drsom_perturb", "save", 1000, "float32") == 4 * 4 * 1000
    assert micro.drsom_bytes("drsom_perturb", "no-save", 1000, "float64") == 3 * 8 * 1000
    # reduce: read g_pert, g and k = 2 directions, with or without the Gram
    for variant in ("gram", "no-gram"):
        assert micro.drsom_bytes("drsom_reduce", variant, 1000, "float32") == (2 + 2) * 4 * 1000
    # update: read k directions and x, write x and p
    assert micro.drsom_bytes("drsom_update", "", 1000, "float64") == (2 + 3) * 8 * 1000


@pytest.mark.parametrize("dtype", micro.DRSOM_DTYPES)
def test_drsom_micro_impls_compute_the_same(dtype):
    """soo and reference on copies of the same case give the same results."""
    soo, ref = micro.DrsomCase(500, dtype, "cpu"), micro.DrsomCase(500, dtype, "cpu")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else {}
    for op in micro.DRSOM_OPS:
        for variant in micro.DRSOM_VARIANTS[op]:
            a, b = soo.calls(op, variant)["soo"](), ref.calls(op, variant)["reference"]()
            if op == "drsom_reduce":
                for u, w in zip(a, b):
                    torch.testing.assert_close(u, w, **tol)
                for u, w in zip(soo.calls(op, variant)["window-ops"](), a):
                    torch.testing.assert_close(u, w, **tol)
            for u, w in ((soo.x, ref.x), (soo.x0, ref.x0), (soo.p, ref.p)):
                torch.testing.assert_close(u, w, **tol)


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
                     case.window_ops_direction(False), case.window_ops_direction(True),
                     case.reference_direction()):
        torch.testing.assert_close(d, d_torch, **tol)
        torch.testing.assert_close(stats, torch.stack([gtd, dmax]).to(stats.dtype), **tol)


@pytest.mark.parametrize("count,newest", [(6, 2), (6, 5), (4, 3), (1, 0), (0, 0)])
@pytest.mark.parametrize("update_gram", [False, True])
def test_window_ops_direction_is_the_fused_direction(count, newest, update_gram):
    """The L-BFGS direction composed of window ops (bench micro's window-ops rows) against the
    fused op, fp64, on wrapped and partly filled rings: d, [g.d, max|d|] and, after a push, the
    Gram blocks.  Compact form and two loops differ in rounding only: well-conditioned pairs
    (curvature in [0.5, 1.5]) keep the difference near n eps, far below 1e-10."""
    gen = torch.Generator().manual_seed(count + newest)
    S, Y = micro.random_pairs(300, 6, torch.float64, "cpu", gen)
    S[count:], Y[count:] = 0, 0  # a ring filled up to `count` (all of it: wrapped)
    if count == 6:
        S, Y = S.roll(newest + 1, 0), Y.roll(newest + 1, 0)
    g = torch.randn(300, dtype=torch.float64, generator=gen)
    SY, YY = S @ Y.T, Y @ Y.T
    if update_gram and count:  # stale row/column `newest`, as before a push is completed
        SY[newest], SY[:, newest], YY[newest], YY[:, newest] = 7, 7, 7, 7
    fused_SY, fused_YY = SY.clone(), YY.clone()
    d, stats = ops.lbfgs_direction(S, Y, fused_SY, fused_YY, g, newest, count, update_gram)
    d_w, stats_w = micro.window_direction(S, Y, SY, YY, g, newest, count, update_gram)
    scale = d.abs().max()
    torch.testing.assert_close(d_w, d, rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(stats_w, stats, rtol=1e-10, atol=1e-10 * scale * g.abs().sum())
    for gram, fused in ((SY, fused_SY), (YY, fused_YY)):  # dots of 300 terms, other orders
        torch.testing.assert_close(gram, fused, rtol=0, atol=1e-12 * fused.abs().max())


def test_window_ops_direction_needs_the_valid_pairs_in_a_prefix_of_the_ring():
    S = torch.randn(4, 10, dtype=torch.float64)
    SY = YY = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="prefix"):
        micro.window_direction(S, S, SY, YY, S[0], 2, 2, False)  # slots 1, 2


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
    monkeypatch.setattr(demo, "run", lambda args: seen.append(args) or ([], {}))
    cli.main([])
    cli.main(["demo"])
    assert len(seen) == 2 and all(args.command == "demo" for args in seen)


def test_demo_prints_one_table_with_the_machine_and_its_load(tmp_path):
    """python -m bench demo as a process: one table, the machine first, the load last, no
    warning (torch.utils.cpp_extension, if imported, warns "No CUDA runtime is found")."""
    pytest.importorskip("mnist1d")
    out = tmp_path / "demo.json"
    done = subprocess.run([sys.executable, "-m", "bench", "demo", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime" not in done.stderr, done.stderr
    payload = load(out)
    records = payload["records"]
    rows = [r for r in records if "what" in r]
    assert [r["what"].split(",")[0].split(" (")[0] for r in rows] == [
        "L-BFGS direction", "L-BFGS direction", "MNIST-1D CNN to 0.8 test accuracy"]
    for row in rows[:2]:
        assert row["soo_ms"] > 0 and row["torch_ms"] > 0
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["soo_ms"])
    runs = [r for r in records if "optimizer" in r]
    assert {r["optimizer"] for r in runs} == {"soo_ext.KFAC", "torch.optim.AdamW"}
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0] and "load average" in lines[0]
    assert lines[-1].startswith("load during the run") and "vary with the CPU and its load" in lines[-1]
    assert done.stdout.count("soo_ext against torch") == 1  # one table
    env = payload["environment"]
    assert env["machine"]["cores"] == os.cpu_count() and env["load"]["seconds"] > 0


def test_bench_does_not_import_cpp_extension():
    """torch.utils.cpp_extension looks for a CUDA toolkit on import (on a machine without a GPU it
    warns "No CUDA runtime is found" on every start); torch.utils.benchmark imports it."""
    code = ("import sys, bench.__main__\n"
            "bad = [m for m in sys.modules if m.startswith(('torch.utils.cpp_extension', "
            "'torch.utils.benchmark'))]\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime" not in done.stderr


def test_block_size_follows_blocked_autorange():
    """The first power of ten whose block lasts min_run_time / 1000 (timer overhead negligible),
    or a block longer than min_run_time."""
    assert common.block_size(lambda: time.sleep(0.02), 0.01) == 1  # longer than min_run_time
    assert common.block_size(lambda: time.sleep(0.002), 0.1) in (1, 10, 100)  # 100: 0.2 s > 0.1
    assert common.block_size(lambda: None, 1.0) >= 1000
    medians = common.time_medians({"a": lambda: time.sleep(0.001), "b": lambda: None}, 0.05, 2)
    assert medians["a"] >= 0.001 > medians["b"] > 0


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat")
def test_load_meter_counts_the_other_processes():
    meter = common.LoadMeter()
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    time.sleep(1.0)  # this process idles; the (not yet reaped) child spins
    reading = meter.read()
    busy.wait()
    assert reading["other_cores"] >= 0.5 and reading["own_cores"] < 0.5, reading
    assert "other processes kept" in common.load_line(reading)


def test_help_documents_the_bandwidth_formula():
    result = subprocess.run([sys.executable, "-m", "bench", "micro", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "(4*m*h + 3*b) * n" in result.stdout
    for formula in ("4*b*n", "3*b*n", "(2+k)*b*n", "(k+3)*b*n", "--ops"):
        assert formula in result.stdout


def test_precond_reports_overheads_against_sgd(tmp_path, capsys):
    out, png = tmp_path / "precond.json", tmp_path / "precond.png"
    records, env = cli.main(["precond", "--quick", "--models", "mnist1d-cnn", "--no-peers",
                             "--json", str(out), "--plot", str(png)])
    assert json.loads(out.read_text())["records"] == records and png.stat().st_size > 0
    names = [(r["optimizer"], r["update_every"]) for r in records]
    # the baselines and the window methods (no update frequency), then per frequency
    assert names[:len(precond.UNSCHEDULED)] == [(name, None) for name in precond.UNSCHEDULED]
    preconditioned = sorted(set(precond.OWN) - set(precond.UNSCHEDULED))  # no peers
    scheduled = names[len(precond.UNSCHEDULED):]
    assert [f for _, f in scheduled] == sorted(f for _, f in scheduled)
    for f in (1, 2):
        assert sorted(n for n, g in names if g == f) == preconditioned
    assert records[0]["vs_sgd"] == 1.0
    for r in records:
        assert r["ms_per_step"] > 0 and math.isfinite(r["vs_sgd"]) and r["n_params"] == 5_210
    assert "x SGD" in capsys.readouterr().out


def test_spread_times_one_rank_and_spread_ranks(tmp_path, capsys, one_thread):
    out, png = tmp_path / "spread.json", tmp_path / "spread.png"
    records, env = cli.main(["spread", "--quick", "--json", str(out), "--plot", str(png)])
    assert json.loads(out.read_text())["records"] == records and png.stat().st_size > 0
    assert [r["mode"] for r in records] == ["eigen", "inverse", "root"] and env["world"] == 2
    for r in records:
        sizes = (micro.shampoo_factor_sizes(env["width"], 1024) if r["mode"] == "root"
                 else micro.kfac_factor_sizes(env["width"]))
        assert r["factors"] == len(sizes) and r["largest"] == max(sizes)
        assert r["one_rank_ms"] > 0 and r["spread_ms"] > 0
        assert 0 < r["decompose_ms"] <= r["spread_ms"] and r["gathered_mb"] > 0
        assert math.isclose(sum(r["loads"]), 1.0) and max(r["loads"]) < 0.6
    assert "x one rank" in capsys.readouterr().out


def test_micro_times_the_kron_ops(tmp_path, capsys, one_thread):
    out, png = tmp_path / "micro.json", tmp_path / "micro.png"
    records, _ = cli.main(["micro", "--quick", "--device", "cpu", "--ops", *micro.KRON_OPS,
                           "--width", "0.02", "--max-dim", "16", "--dtype", "float32",
                           "--min-run-time", "0.01", "--json", str(out), "--plot", str(png)])
    assert load(out)["records"] == records
    assert {r["op"] for r in records} == set(micro.KRON_OPS)
    for op in micro.KRON_OPS:
        rows = [r for r in records if r["op"] == op]
        assert {r["impl"] for r in rows} == set(micro.KRON_IMPLS[op])
        totals = [r for r in rows if r["bucket"] == "total"]
        assert [r["impl"] for r in totals] == list(micro.KRON_IMPLS[op])
        for row in rows:
            assert row["device"] == "cpu" and row["dtype"] == "float32" and row["width"] == 0.02
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
            assert row["peer"] == micro.KRON_PEER[op]
            if row["impl"] == row["peer"]:
                assert row["speedup_vs_peer"] == 1
        # the total is the sum of the buckets
        for total in totals:
            parts = [r["median_ms"] for r in rows if r["impl"] == total["impl"] and r is not total]
            assert total["median_ms"] == pytest.approx(sum(parts))
    assert png.stat().st_size > 0
    assert "Kronecker-factor ops" in capsys.readouterr().out


def test_resnet50_factor_sets():
    layers = micro.resnet50_layers(1.0)
    assert len(layers) == 54  # conv1, 16 bottlenecks x 3 convs, 4 downsamples, fc
    kfac = micro.kfac_factor_sizes(1.0)
    assert max(kfac) == 512 * 9 + 1 and 2049 in kfac and 2048 in kfac and 148 in kfac
    assert len(kfac) == 2 * len(layers)
    assert sum(c for _, c in micro.buckets(kfac)) == len(kfac)
    shampoo = micro.shampoo_factor_sizes(1.0, 1024)
    assert max(shampoo) == 1024 and min(shampoo) >= 1
    assert micro.split_dim(2500, 1024) == [1024, 1024, 452] and micro.split_dim(7, 1024) == [7]
    assert max(micro.kfac_factor_sizes(0.25)) == 128 * 9 + 1


@pytest.mark.parametrize("op", ["kron_inverse", "kron_eigh", "kron_root"])
def test_kron_micro_impls_compute_the_same(op):
    bucket = micro.KronBucket(12, 3, torch.float64, "cpu")
    calls = micro.kron_calls(op, bucket)
    if op == "kron_inverse":
        X, status = calls["soo"]()
        assert status.tolist() == [0, 0, 0]
        torch.testing.assert_close(X, torch.stack(calls["kaisa-inv"]()))
    elif op == "kron_eigh":
        d, Q, _ = calls["soo"]()
        d_peer = torch.stack([dq[0] for dq in calls["kaisa-eigh"]()])
        torch.testing.assert_close(d, d_peer)
    else:
        peer = torch.stack(calls["shampoo-eigh"]())
        for impl in ("soo-eigh", "soo-newton"):
            torch.testing.assert_close(calls[impl]()[0], peer, rtol=1e-5, atol=1e-5)


def test_kfac_precondition_micro_impls_compute_the_same():
    bucket = micro.PreconditionBucket(5, 9, 2, torch.float64, "cpu")
    calls = bucket.calls()
    torch.testing.assert_close(calls["soo"](), torch.stack(calls["kaisa"]()))


def test_micro_interrupted_reports_the_cases_measured(tmp_path, monkeypatch, one_thread):
    """Ctrl-C during the second case: the first case's records are reported and written, and the
    environment says the run was interrupted."""
    calls = []
    measure = micro.measure_case

    def measure_then_interrupt(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)
    monkeypatch.setattr(micro, "measure_case", measure_then_interrupt)
    out = tmp_path / "micro.json"
    records, env = cli.main(["micro", "--quick", "--device", "cpu", "--n", "1000", "2000", "3000",
                             "--m", "2", "--dtype", "float32", "--ops", "lbfgs_direction",
                             "--min-run-time", "0.01", "--json", str(out)])
    assert env["interrupted"] is True and len(calls) == 2
    assert {r["n"] for r in records} == {1000} and len(records) == len(micro.IMPLS)
    payload = load(out)
    assert payload["environment"]["interrupted"] is True and len(payload["records"]) == len(records)


def test_sigterm_stops_the_cli_which_writes_what_it_measured(tmp_path):
    """python -m bench under `timeout` (SIGTERM): the JSON still comes, marked interrupted."""
    out = tmp_path / "micro.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "micro", "--device", "cpu", "--n", "1000", "2000", "3000",
         "4000", "--m", "2", "--dtype", "float32", "--ops", "lbfgs_direction",
         "--min-run-time", "2", "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = b""
    while b"1/4" not in seen:  # tqdm's progress bar: the first case is done
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    payload = load(out)
    assert payload["environment"]["interrupted"] is True
    assert 1 <= len({r["n"] for r in payload["records"]}) < 4
