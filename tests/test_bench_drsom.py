"""Smoke test of python -m bench drsom at --quick settings on the MNIST-1D MLP: the JSON holds
the expected fields with sane numbers.  Whether a step meets the 3.3-gradient target is what
the benchmark reports, not tested."""
import json
import math

import pytest
import torch

import soo_ext
from soo_ext.curvature.drsom_models import subspace_gram
from soo_ext.optim.drsom import _StepScratch
from bench import __main__ as cli
from bench import drsom


def test_drsom_writes_cost_and_accuracy_records(tmp_path, capsys, one_thread):
    out, png = tmp_path / "drsom.json", tmp_path / "drsom.png"
    records, _ = cli.main(["drsom", "--quick", "--device", "cpu", "--models", "mlp",
                           "--batch-size", "64", "--json", str(out), "--plot", str(png)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "drsom" and payload["records"] == records
    env = payload["environment"]
    for key in ("date", "torch_version", "devices", "soo_ext", "batch_size", "seeds",
                "min_run_time", "fd_target"):
        assert key in env
    assert env["seeds"] == drsom.QUICK["seeds"] and env["batch_size"] == 64

    cost = [r for r in records if r["kind"] == "cost"]
    assert [r["hvp"] for r in cost] == list(drsom.HVPS)
    for row in cost:
        assert row["model"] == "mlp" and row["n_params"] == 15_210 and row["k"] == 2
        for key in ("step_ms", "gradient_ms", "forward_ms", "cost_units", "forward_units",
                    "adam_step_ms", "adam_step_units"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["cost_units"] >= 1 and row["steps_timed"] >= 1
        assert row["cost_units"] == pytest.approx(row["step_ms"] / row["gradient_ms"])
        assert row["adam_step_units"] == pytest.approx(row["step_ms"] / row["adam_step_ms"])
        # a trust-region step: base gradient + k (fd) or 2k (central) gradients, 1 + k hvps, or
        # 1 + k (k + 1) / 2 interpolation forwards
        grads = {"fd": 3, "central": 5, "autograd": 1, "interp": 1}[row["hvp"]]
        if row["line_searches_per_step"] == 0:
            assert row["grads_per_step"] == grads and row["grad_evals_per_step"] == grads
        assert row["hvps_per_step"] == (2 if row["hvp"] == "autograd" else 0)
        interp_points = 3 if row["hvp"] == "interp" and row["line_searches_per_step"] == 0 else 0
        assert row["forwards_per_step"] >= 1
        assert row["forwards_per_step"] == pytest.approx(row["trials_per_step"] + interp_points)
        assert row["closure_calls_per_step"] == row["grads_per_step"] + row["forwards_per_step"]
        assert row["evaluation_units"] == pytest.approx(
            row["grads_per_step"] + row["forwards_per_step"] * row["forward_units"])
        assert row["overhead_units"] == pytest.approx(row["cost_units"] - row["evaluation_units"])
        assert (row["target"] == drsom.FD_TARGET) == (row["hvp"] == "fd")
        assert (row["meets_target"] is None) == (row["hvp"] != "fd")

    accuracy = [r for r in records if r["kind"] == "q_accuracy"]
    assert [(r["dtype"], r["hvp"]) for r in accuracy] == [
        (dt, hvp) for dt in ("float32", "float64") for hvp in ("fd", "central", "interp")]
    for row in accuracy:
        assert len(row["rel_errors"]) == len(drsom.QUICK["seeds"])
        assert all(math.isfinite(e) and e >= 0 for e in row["rel_errors"])
        assert row["rel_error_max"] == max(row["rel_errors"])
        assert row["rel_error_median"] <= row["rel_error_max"]
        if row["dtype"] == "float64":  # sqrt(eps) 1.5e-8, eps^(2/3) 3.7e-11, eps^(1/4) 1.2e-4
            assert row["rel_error_max"] < {"fd": 1e-6, "central": 1e-8, "interp": 1e-3}[
                row["hvp"]], row
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "DRSOM step cost" in printed and "Accuracy of Q" in printed


def test_q_from_the_public_ops_matches_autograd_on_a_smooth_model():
    """The finite-difference Q has the accuracy DRSOM documents where the model is smooth (no
    ReLU kinks): about sqrt(eps) ('fd'), eps^(2/3) ('central') and eps^(1/4) ('interp') in
    float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    xb, yb = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    params = list(model.parameters())
    x = drsom.flatten_params(params)
    x_before = x.clone()

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(xb), yb)

    g, _ = drsom.flat_gradient(loss_fn, params)
    V = [g, torch.randn_like(x)]
    exact = drsom.q_autograd(loss_fn, params, V)
    for mode, tol in (("fd", 1e-6), ("central", 1e-9), ("interp", 5e-4)):
        if mode == "interp":
            Q = drsom.q_interpolated(loss_fn, x, g, V)
        else:
            Q = drsom.q_finite_difference(loss_fn, params, x, g, V, mode == "central")
        assert torch.equal(x, x_before)  # restored bit-exactly
        assert torch.equal(Q, Q.T)
        error = torch.linalg.matrix_norm(Q - exact) / torch.linalg.matrix_norm(exact)
        assert error < tol, (mode, error)


@pytest.mark.parametrize("hvp", ["fd", "central", "interp"])
def test_q_is_the_q_drsom_builds(hvp):
    """The benchmark's finite-difference Q is the one DRSOM's step computes (its Hessian model,
    with its scratch vectors and evaluator, called the way step() calls it), on the same point
    and directions."""
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                    torch.nn.Linear(7, 3)).double()
        xb = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        yb = torch.arange(16) % 3
        return model, lambda: torch.nn.functional.cross_entropy(model(xb), yb)

    model, loss_fn = setup()
    params = list(model.parameters())
    x = drsom.flatten_params(params)
    g, _ = drsom.flat_gradient(loss_fn, params)
    d = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    if hvp == "interp":
        Q = drsom.q_interpolated(loss_fn, x, g, [g, d])
    else:
        Q = drsom.q_finite_difference(loss_fn, params, x, g, [g, d], hvp == "central")

    model, loss_fn = setup()
    opt = soo_ext.DRSOM(model.parameters(), hvp=hvp)
    ws = opt._scratch = _StepScratch(opt._evaluator, opt._x)
    hessian = ws.hessian_model(hvp)
    opt._evaluator.begin(loss_fn)
    _, f, _ = opt._evaluator.gradient(ws.g)
    torch.testing.assert_close(ws.g, g, rtol=0, atol=0)
    V = [ws.g, d]
    G, c = subspace_gram(ws.g, V, ws.one)
    Q_drsom = hessian.products(V, G, c, f)  # symmetrised in the solve
    torch.testing.assert_close(Q, (Q_drsom + Q_drsom.T) / 2, rtol=1e-12, atol=0)
