"""Tests of python -m bench train: its time-to-target and selection helpers on hand-made numbers,
and smoke runs at a tiny budget (the JSON holds every record with sane numbers, the plot is
written).  Whether an optimizer reaches a target fast is what the benchmark reports, not tested."""
import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

import soo_ext

from bench import __main__ as cli
from bench import train
from bench.adabelief import AdaBelief

# The smoke run's optimizers; MLBFGS and BFGS get their own quick runs below.
STABLE = ["torch.optim.SGD", "torch.optim.Adam", "torch.optim.LBFGS", "soo_ext.LBFGS"]
N_PARAMS = {"mnist1d-mlp": 15_210, "mnist1d-cnn": 5_210, "digits-mlp": 2_410}


def test_first_crossing_on_a_hand_made_curve():
    times = [0.0, 0.5, 1.25, 2.0, 3.0]
    steps = [0, 10, 20, 30, 40]
    accs = [0.1, 0.55, 0.6, 0.4, 0.7]
    assert train.first_crossing(times, steps, accs, 0.6) == (1.25, 20)  # reaching it counts
    assert train.first_crossing(times, steps, accs, 0.65) == (3.0, 40)  # the first, after a dip
    assert train.first_crossing(times, steps, accs, 0.1) == (0.0, 0)    # already at the start
    assert train.first_crossing(times, steps, accs, 0.71) is None       # never reached
    assert train.first_crossing([], [], [], 0.5) is None
    losses = [3.0, 2.5, 2.0, 2.2, 1.9]  # a loss reaches its target from above
    assert train.first_crossing(times, steps, losses, 2.0, lower_is_better=True) == (1.25, 20)
    assert train.first_crossing(times, steps, losses, 1.95, lower_is_better=True) == (3.0, 40)
    assert train.first_crossing(times, steps, losses, 1.5, lower_is_better=True) is None


def test_best_setting_rule():
    def row(reached, seconds, acc):
        return {"reached": reached, "time_to_target": seconds, "final_test_acc": acc,
                "metric": "test_acc"}

    rows = [row(2, 0.5, 0.9), row(3, 5.0, 0.9), row(3, 2.0, 0.6), row(3, 2.0, 0.65),
            row(0, None, 0.99)]
    # most seeds at target, then the fastest, then the best final test accuracy
    assert min(rows, key=train.selection_key) is rows[3]
    assert min([rows[0], rows[4]], key=train.selection_key) is rows[0]
    assert min([row(0, None, 0.5), row(0, None, 0.7)], key=train.selection_key)[
        "final_test_acc"] == 0.7


def test_mean_curve_is_taken_evaluation_by_evaluation_up_to_the_shortest_run():
    a = {"time": [0.0, 1.0, 2.0], "step": [0, 10, 20], "train_loss": [2.0, 1.0, 0.5],
         "test_acc": [0.1, 0.5, 0.7]}
    b = {"time": [0.0, 3.0], "step": [0, 10], "train_loss": [2.0, 2.0], "test_acc": [0.1, 0.3]}
    assert train.mean_curve([a, b]) == {"time": [0.0, 2.0], "step": [0, 10],
                                        "train_loss": [2.0, 1.5], "test_acc": [0.1, 0.4]}


def test_target_option():
    assert train.parse_target("0.7") == (None, 0.7)
    assert train.parse_target("mnist1d-cnn=0.9") == ("mnist1d-cnn", 0.9)
    assert train.parse_target("stdlib-lm=2.5") == ("stdlib-lm", 2.5)  # a validation loss
    for bad in ("nocase=0.5", "1.5", "0", "x", "mnist1d-cnn=2.5", "stdlib-lm=-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            train.parse_target(bad)


def test_an_optimizer_that_does_not_fit_is_reported_by_the_warm_up():
    def refuse(params, lr, iters):
        raise ValueError("n^2 state too large")

    spec = train.OptimizerSpec("refuses", (1.0,), True, refuse)
    case = next(c for c in train.CASES if c.name == "digits-mlp")  # no data generation
    budget = train.Budget(1.0, 10, 5, 2, 32)
    assert train.warm_up(case, spec, case.load(), budget, "cpu") == "n^2 state too large"
    adam = next(s for s in train.OPTIMIZERS if s.name == "torch.optim.Adam")
    assert train.warm_up(case, adam, case.load(), budget, "cpu") is None


@pytest.mark.parametrize("name", ["torch.optim.Adam", "soo_ext.LBFGS"])
def test_runs_are_deterministic_given_the_seed(name, one_thread):
    case = next(c for c in train.CASES if c.name == "digits-mlp")
    spec = next(s for s in train.OPTIMIZERS if s.name == name)
    budget = train.Budget(math.inf, 10, 5, 2, 32)

    def curve(seed):
        run = train.train_run(case, spec, spec.lrs[0], seed, case.load(), budget, "cpu")
        return {key: run["curve"][key] for key in ("step", "train_loss", "test_acc")}

    assert curve(0) == curve(0) != curve(1)


def check_record(row, seeds, max_steps):
    assert row["device"] == "cpu" and row["n_params"] == N_PARAMS[row["case"]]
    assert row["seeds"] == len(seeds) and [r["seed"] for r in row["runs"]] == seeds
    assert 0 <= row["reached"] <= len(seeds) and row["diverged"] == 0
    for key in ("final_train_loss", "final_test_acc", "ms_per_step", "steps", "epochs"):
        assert math.isfinite(row[key]) and math.isfinite(row[key + "_std"]), (key, row)
    assert 0 <= row["final_test_acc"] <= 1 and row["ms_per_step"] > 0 and row["epochs"] > 0
    for run in row["runs"]:
        assert run["steps"] >= 1 and run["train_seconds"] > 0
        # a full-batch (or DRSOM) step() call may pass the cap; it is checked after
        if not row["full_batch"] and not row["closure"]:
            assert run["steps"] <= max_steps
        assert run["steps"] == run["grad_evals"] + run["forward_evals"]
        assert (run["time_to_target"] is None) == (run["steps_to_target"] is None)
    if row["reached"]:
        assert row["time_to_target"] >= 0 and math.isfinite(row["time_to_target_std"])
        assert 0 <= row["steps_to_target"] <= row["steps"]
    else:
        assert row["time_to_target"] is None and row["steps_to_target"] is None
    if row["best"]:
        curve = row["curve"]
        assert set(curve) == set(train.CURVE_KEYS) | {row["metric"]}
        assert curve["time"][0] == curve["step"][0] == 0
        assert len({len(v) for v in curve.values()}) == 1 and len(curve["time"]) >= 2
        assert curve["time"] == sorted(curve["time"]) and curve["step"] == sorted(curve["step"])
    else:
        assert "curve" not in row and row["time_to_target_vs_baseline"] is None


def quick_train(case, name, *extra):
    """bench train --quick on the CPU: one case, seed 0, one optimizer."""
    return cli.main(["train", "--quick", "--device", "cpu", "--cases", case, "--seeds", "0",
                     "--optimizers", name, *extra])


def test_train_interrupted_reports_the_runs_finished(tmp_path, monkeypatch, one_thread):
    """Ctrl-C (or SIGTERM) during the third run: the two finished runs are reported and written,
    and the environment says the run was interrupted."""
    calls = []
    run = train.train_run

    def run_then_interrupt(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(*args, **kwargs)
    monkeypatch.setattr(train, "train_run", run_then_interrupt)
    out = tmp_path / "train.json"
    records, env = quick_train("digits-mlp", "torch.optim.SGD", "--json", str(out))
    spec = next(s for s in train.OPTIMIZERS if s.name == "torch.optim.SGD")
    assert env["interrupted"] is True and len(calls) == 3
    assert [r["lr"] for r in records] == list(spec.lrs)[:2]
    payload = json.loads(out.read_text())
    assert payload["environment"]["interrupted"] is True and len(payload["records"]) == 2


def check_lr_sweep(records, env, name):
    """One well-formed record per lr of ``name``'s sweep, and no notes."""
    spec = next(s for s in train.OPTIMIZERS if s.name == name)
    assert [r["lr"] for r in records] == list(spec.lrs) and env["notes"] == []
    for row in records:
        check_record(row, [0], train.QUICK["max_steps"])


def test_train_writes_records_table_json_and_plot(tmp_path, capsys, one_thread):
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    records, _ = cli.main(["train", "--quick", "--device", "cpu", "--seeds", "0", "1",
                           "--optimizers", *STABLE, "--target", "0.3", "digits-mlp=0.2",
                           "--json", str(out), "--plot", str(png)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "train" and payload["records"] == records
    env = payload["environment"]
    for key in ("date", "torch_version", "devices", "soo_ext", "seeds", "budget_seconds",
                "max_steps", "eval_every", "full_batch_iters", "batch_size", "lrs", "notes"):
        assert key in env
    assert env["seeds"] == [0, 1] and env["budget_seconds"] == train.QUICK["budget"]
    assert {c: info["n_params"] for c, info in env["cases"].items()} == N_PARAMS
    assert {c: info["target"] for c, info in env["cases"].items()} == {
        "mnist1d-mlp": 0.3, "mnist1d-cnn": 0.3, "digits-mlp": 0.2}
    assert env["cases"]["mnist1d-mlp"]["n_train"] == 4000
    assert env["cases"]["mnist1d-mlp"]["n_test"] == 1000

    specs = [s for s in train.OPTIMIZERS if s.name in STABLE]
    assert [(r["case"], r["optimizer"], r["lr"]) for r in records] == [
        (case, s.name, lr) for case in N_PARAMS for s in specs for lr in s.lrs]
    for row in records:
        check_record(row, [0, 1], train.QUICK["max_steps"])
    best = [(r["case"], r["optimizer"]) for r in records if r["best"]]
    assert sorted(best) == sorted((case, s.name) for case in N_PARAMS for s in specs)
    for row in records:
        if row["best"] and row["optimizer"] == train.ADAM and row["reached"]:
            assert row["time_to_target_vs_baseline"] == 1.0
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "Best lr per optimizer" in printed and "Learning-rate sweep" in printed
    assert "mnist1d-mlp: mL-BFGS vs Adam not measured" in printed


@pytest.mark.parametrize("name", ["soo_ext.MLBFGS", "soo_ext.BFGS"])
def test_train_runs_mlbfgs_and_bfgs(name, one_thread):
    records, env = quick_train("digits-mlp", name)
    check_lr_sweep(records, env, name)


def test_bfgs_is_skipped_with_a_note_where_its_state_is_too_large(one_thread):
    records, env = quick_train("mnist1d-mlp", "soo_ext.BFGS")
    assert records == []
    assert len(env["notes"]) == 1 and "max_state_bytes" in env["notes"][0]


@pytest.mark.parametrize("name", ["soo_ext.DRSOM", "soo_ext.DRSOM interp", "AdaBelief"])
def test_train_runs_drsom_and_adabelief(name, one_thread):
    # a budget that max_steps reaches first, however slow the machine (or the emulated kernels)
    records, env = quick_train("digits-mlp", name, "--budget", "600")
    check_lr_sweep(records, env, name)
    drsom = name.startswith("soo_ext.DRSOM")
    for row in records:
        assert row["closure"] == drsom and not row["full_batch"]
    if drsom:
        assert records[0]["lr"] is None and env["lrs"][name] == [None]
        (run,) = records[0]["runs"]
        # every step() call: at least one gradient and one trial forward, all counted as steps
        assert run["grad_evals"] >= 1 and run["forward_evals"] >= 1
        assert run["steps"] >= train.QUICK["max_steps"]
        calls = run["epochs"] * 1347 / 128  # minibatches drawn: one per step() call
        calls = round(calls)
        assert calls >= 2
        if name == "soo_ext.DRSOM":
            # the first call is a line search (1 gradient), a later one 3 gradients ('fd',
            # k = 2) or 1 (a line search where g and the last step are collinear)
            assert calls <= run["grad_evals"] <= 1 + 3 * (calls - 1)
        else:  # 'interp': one gradient a call; Q from 3 forwards, then the trials
            assert run["grad_evals"] == calls and run["forward_evals"] >= calls


def naive_adabelief(x, grads, lr, betas, eps, weight_decay=0.0, decoupled=False):
    """AdaBelief (Zhuang et al. 2020, Algorithm 2) transcribed elementwise, in float64 Python."""
    beta1, beta2 = betas
    x = list(x)
    m, s = [0.0] * len(x), [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        for i in range(len(x)):
            gi = g[i] + (weight_decay * x[i] if weight_decay and not decoupled else 0.0)
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            s[i] = beta2 * s[i] + (1 - beta2) * (gi - m[i]) ** 2 + eps
            m_hat, s_hat = m[i] / (1 - beta1 ** t), s[i] / (1 - beta2 ** t)
            if weight_decay and decoupled:
                x[i] *= 1 - lr * weight_decay
            x[i] -= lr * m_hat / (math.sqrt(s_hat) + eps)
    return x


@pytest.mark.parametrize("options", [dict(), dict(eps=1e-8), dict(weight_decay=0.1),
                                     dict(weight_decay=0.1, decoupled=True)])
def test_adabelief_matches_a_naive_transcription(options):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, generator=gen, dtype=torch.float64)
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(5)]
    lr, betas = 0.05, (0.8, 0.95)
    p = torch.nn.Parameter(x0.clone())
    opt = AdaBelief([p], lr=lr, betas=betas, **options)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = naive_adabelief(x0.tolist(), [g.tolist() for g in grads], lr, betas,
                               options.get("eps", 1e-16), options.get("weight_decay", 0.0),
                               options.get("decoupled", False))
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    assert opt.state[p]["step"] == len(grads)


def test_adabelief_defaults_and_option_checks():
    p = torch.nn.Parameter(torch.zeros(3))
    group = AdaBelief([p]).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"],
            group["decoupled"]) == (1e-3, (0.9, 0.999), 1e-16, 0.0, False)
    for bad in (dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            AdaBelief([p], **bad)


def test_mnist1d_cnn_is_the_conv1d_network_written_with_conv2d():
    """Same function and same initial weights as Conv1d layers with the same arguments."""
    torch.manual_seed(0)
    conv2d = train.mnist1d_cnn()
    torch.manual_seed(0)
    conv1d = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 40)),
        torch.nn.Conv1d(1, 25, 5, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv1d(25, 25, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv1d(25, 25, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(125, 10))
    for a, b in zip(conv2d.parameters(), conv1d.parameters()):
        assert torch.equal(a.flatten(), b.flatten())
    x = torch.randn(16, 40)
    torch.testing.assert_close(conv2d(x), conv1d(x))


@pytest.mark.parametrize("name", ["soo_ext.KFAC", "soo_ext.Shampoo"])
def test_train_runs_kfac_and_shampoo(name, one_thread):
    records, env = quick_train("mnist1d-cnn", name)
    check_lr_sweep(records, env, name)


def test_train_runs_psgd_kron(one_thread):
    records, env = quick_train("mnist1d-cnn", "soo_ext.PSGDKron")
    check_lr_sweep(records, env, "soo_ext.PSGDKron")


@pytest.mark.parametrize("name", ["soo_ext.KBFGS", "soo_ext.KBFGS(L)"])
def test_train_runs_kbfgs(name, one_thread):
    """torch's closure on each minibatch, two evaluations (two steps) per step() call."""
    records, env = quick_train("mnist1d-cnn", name)
    check_lr_sweep(records, env, name)
    for row in records:
        assert all(run["grad_evals"] % 2 == 0 for run in row["runs"])


def test_train_runs_soap(one_thread):
    records, env = quick_train("mnist1d-cnn", "soo_ext.SOAP")
    check_lr_sweep(records, env, "soo_ext.SOAP")


@pytest.mark.parametrize("name", ["soo_ext.MFAC", "soo_ext.GGT"])
def test_train_runs_the_window_optimizers(name, one_thread):
    records, env = quick_train("mnist1d-mlp", name)
    check_lr_sweep(records, env, name)


@pytest.mark.parametrize("name,module", [("asdl.KFAC", "asdl"),
                                         ("pytorch_optimizer.Shampoo", "pytorch_optimizer"),
                                         ("pytorch_optimizer.SOAP", "pytorch_optimizer"),
                                         ("heavyball.SOAP", "heavyball"),
                                         ("kron_torch.Kron", "kron_torch"),
                                         ("pytorch_optimizer.Kron", "pytorch_optimizer"),
                                         ("heavyball.PSGDKron", "heavyball")])
def test_peers_run_when_installed_and_are_skipped_with_a_note_otherwise(name, module, one_thread):
    records, env = quick_train("mnist1d-cnn", name)
    try:
        __import__(module)
    except ImportError:
        assert records == [] and len(env["notes"]) == 1 and "not installed" in env["notes"][0]
        return
    assert env["notes"] == [] and [r["lr"] for r in records] == list(
        next(s for s in train.OPTIMIZERS if s.name == name).lrs)
    for row in records:
        assert row["seeds"] == 1 and 0 <= row["final_test_acc"] <= 1


def test_mean_std_of_a_diverged_seed_is_nan():
    assert train.mean_std([]) == (None, None)
    assert train.mean_std([1.0]) == (1.0, 0.0)
    mean, std = train.mean_std([1.0, float("nan"), 2.0])
    assert math.isnan(mean) and math.isnan(std)


def test_lr_sweep_of_the_defaults_protocol():
    assert train.lr_sweep(1e-3) == (1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2)
    assert train.lr_sweep(None) == (None,)
    specs = {s.name: s for s in train.protocol_specs("defaults")}
    assert "torch.optim.Adam" not in specs and "torch.optim.AdamW" in specs
    assert specs["soo_ext.KFAC"].lrs == train.lr_sweep(0.1)
    # the defaults maker, not the tuned settings
    model = train.mnist1d_cnn()
    opt = specs["soo_ext.KFAC"].make(model.parameters(), 0.1, 1, model)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.defaults == soo_ext.KFAC(
        train.mnist1d_cnn()).defaults


def test_warm_up_and_cosine_schedule():
    factor = train.schedule(105)  # 5 warm-up steps, then 100 of decay
    assert [factor(i) for i in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    decay = [factor(i) for i in range(5, 106)]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert factor(55) == pytest.approx(0.5, abs=1e-12)  # half way through the decay


def test_the_scheduled_baseline_decays_to_zero_over_the_budget(one_thread):
    case = next(c for c in train.CASES if c.name == "digits-mlp")
    spec = next(s for s in train.OPTIMIZERS if s.name == "torch.optim.AdamW")
    budget = train.Budget(math.inf, 20, 20, 1, 32)
    trainer = train.make_trainer(spec, case.make_model(), 1e-3, case.load(), budget, 0,
                                 scheduled=True)
    lrs = []
    for _ in range(20):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.budget = train.Budget(math.inf, 20, 1, 1, 32)
        trainer.advance()
    assert lrs[0] == pytest.approx(1e-3 / 1) and max(lrs) == pytest.approx(1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-18)
    unscheduled = train.make_trainer(spec, case.make_model(), 1e-3, case.load(), budget, 0)
    assert unscheduled.scheduler is None


@pytest.mark.parametrize("schedule", ["baseline", "all"])
def test_schedule_all_warms_up_and_decays_every_optimizer_stepped_once_a_step(
        schedule, monkeypatch, one_thread):
    """--schedule all: soo_ext's minibatch optimizers (K-FAC from the model, SOAP from the
    params) get the case's schedule too, DRSOM (closure-fed) keeps its lr; baseline: AdamW alone."""
    made = {}
    make_trainer = train.make_trainer

    def record(spec, *args, **kwargs):
        trainer = make_trainer(spec, *args, **kwargs)
        made[spec.name] = getattr(trainer, "scheduler", None) is not None
        return trainer
    monkeypatch.setattr(train, "make_trainer", record)
    records, env = quick_train("stdlib-lm", "soo_ext.KFAC", "soo_ext.SOAP", "soo_ext.DRSOM",
                               "--protocol", "defaults", "--no-baselines", "--schedule", schedule)
    assert env["schedule"] == schedule
    assert made == {"soo_ext.KFAC": schedule == "all", "soo_ext.SOAP": schedule == "all",
                    "soo_ext.DRSOM": False, "torch.optim.AdamW": True}


def test_stdlib_text_is_split_by_file():
    from bench import tasks
    train_text, validation_text, info = tasks.stdlib_text()
    assert len(train_text) + len(validation_text) == info["bytes"] >= tasks.STDLIB_BYTES
    files = tasks.stdlib_files()[:info["files"]]
    validation = b"".join(open(f, "rb").read() for i, f in enumerate(files)
                          if i % tasks.VALIDATION_EVERY == tasks.VALIDATION_EVERY - 1)
    assert validation == validation_text and len(validation_text) > 0
    x, y = tasks.windows(b"abcdefgh" * 20)
    assert x.shape == y.shape == ((160 - 1) // tasks.CONTEXT, tasks.CONTEXT)
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # the next byte is the label


def test_docs_text_is_split_by_topic_and_disjoint_from_the_stdlib_text():
    """docs-lm's text: pydoc_data's topics (sorted by name, UTF-8), every VALIDATION_EVERY-th
    to validation, as the stdlib files; not a file that stdlib-lm reads."""
    import sysconfig
    from pydoc_data import topics

    from bench import tasks
    train_text, validation_text, info = tasks.docs_text()
    names = sorted(topics.topics)
    assert info["of_topics"] == len(names) and info["file"] == "pydoc_data/topics.py"
    texts = [topics.topics[name].encode() for name in names[:info["topics"]]]
    assert len(train_text) + len(validation_text) == info["bytes"] == sum(map(len, texts))
    assert validation_text == b"".join(texts[tasks.VALIDATION_EVERY - 1::tasks.VALIDATION_EVERY])
    assert len(validation_text) > tasks.CONTEXT and train_text.startswith(texts[0])
    stdlib_read = tasks.stdlib_files()[:tasks.stdlib_text()[2]["files"]]
    root = sysconfig.get_paths()["stdlib"]
    assert topics.__file__.startswith(root) and topics.__file__ not in stdlib_read


def test_docs_lm_is_a_development_case_with_the_stdlib_lm_protocol(one_thread):
    """docs-lm: development (defaults for token models are chosen on it), the LM protocol of
    stdlib-lm (validation loss, AdamW's final as the target, a step budget, the schedule), a
    smaller CausalTransformer; a --quick run works and reports its text."""
    from bench import tasks
    docs, stdlib = (next(c for c in train.CASES if c.name == name)
                    for name in ("docs-lm", "stdlib-lm"))
    assert not docs.held_out and docs.name not in train.DEFAULT_CASES
    assert replace(docs, name="", load=None, make_model=None, max_steps=None, held_out=False) \
        == replace(stdlib, name="", load=None, make_model=None, max_steps=None, held_out=False)
    assert docs.max_steps == train.DOCS_LM_STEPS
    model = docs.make_model()
    assert isinstance(model, tasks.CausalTransformer) and len(model.layers) == 2
    assert sum(p.numel() for p in model.parameters()) == 137_216
    records, env = quick_train("docs-lm", "soo_ext.KFAC", "--protocol", "defaults",
                               "--no-baselines")
    assert env["docs_text"] == tasks.docs_text()[2] and "stdlib_text" not in env
    assert not env["cases"]["docs-lm"]["held_out"]
    adamw = [r for r in records if r["optimizer"] == "torch.optim.AdamW"]  # the reference
    assert env["cases"]["docs-lm"]["target"] == min(r["final_val_loss"] for r in adamw)
    assert all(r["metric"] == "val_loss" and math.isfinite(r["final_val_loss"]) for r in records)


def test_causal_transformer_does_not_look_ahead():
    from bench import tasks
    torch.manual_seed(0)
    model = tasks.CausalTransformer(d_model=16, layers=2, heads=2).eval()
    tokens = torch.randint(0, 256, (2, tasks.CONTEXT))
    changed = tokens.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % 256
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (2, tasks.VOCAB, tasks.CONTEXT)
    assert torch.equal(logits[..., :40], logits_changed[..., :40])
    assert not torch.equal(logits[..., 40:], logits_changed[..., 40:])


def test_evaluation_runs_batchnorm_in_eval_mode():
    case = next(c for c in train.CASES if c.name == "mnist1d-resnet")
    model = case.make_model()
    data = train.digits_data()
    data = train.Data(torch.randn(64, 40), data.y[:64], torch.randn(32, 40), data.y[:32])
    stats = [b.running_mean.clone() for b in model.modules()
             if isinstance(b, torch.nn.BatchNorm1d)]
    train.evaluate(model, data)
    assert model.training
    assert all(torch.equal(a, b.running_mean) for a, b in zip(
        stats, (b for b in model.modules() if isinstance(b, torch.nn.BatchNorm1d))))


def test_development_and_held_out_cases():
    held_out = {c.name for c in train.CASES if c.held_out}
    assert held_out == {"mnist1d-resnet", "stdlib-lm"}  # docs-lm: development
    assert not held_out & set(train.DEFAULT_CASES)  # the tuned protocol's cases are development


@pytest.mark.parametrize("listed,added", [
    (["soo_ext.KFAC"], ["torch.optim.AdamW", "torch.optim.SGD"]),
    (["torch.optim.SGD", "soo_ext.KFAC"], ["torch.optim.AdamW"]),
    (["torch.optim.AdamW", "soo_ext.KFAC", "torch.optim.SGD"], [])])
def test_defaults_protocol_adds_its_baselines_to_the_optimizers_listed(listed, added, one_thread):
    """The ratio column needs AdamW and SGD: those not listed run too (lr sweeps and the ratio
    column as in a full run), with a note; --no-baselines runs only the optimizers listed."""
    extra = ("--protocol", "defaults", "--target", "digits-mlp=0.2")  # a target reached fast
    records, env = quick_train("digits-mlp", *listed, *extra)
    assert {r["optimizer"] for r in records} == set(listed + added)
    assert env["notes"] == ([" and ".join(added) + " run as well: the baselines of the ratio "
                             "column (--no-baselines leaves them out)"] if added else [])
    for name in listed + added:
        spec = next(s for s in train.protocol_specs("defaults") if s.name == name)
        assert [r["lr"] for r in records if r["optimizer"] == name] == list(spec.lrs)
    best = [r for r in records if r["best"] and r["reached"]]
    assert {r["optimizer"] for r in best} & set(train.BASELINES["defaults"])
    assert all(r["time_to_target_vs_baseline"] is not None for r in best)
    records, env = quick_train("digits-mlp", *listed, *extra, "--no-baselines")
    assert {r["optimizer"] for r in records} == set(listed) and env["notes"] == []
    if not set(listed) & set(train.BASELINES["defaults"]):
        assert all(r["time_to_target_vs_baseline"] is None for r in records)


def test_the_tuned_protocol_runs_only_the_optimizers_listed(one_thread):
    records, env = quick_train("digits-mlp", "soo_ext.KFAC")
    assert {r["optimizer"] for r in records} == {"soo_ext.KFAC"} and env["notes"] == []


def test_defaults_protocol_sets_the_lm_target_from_adamw(one_thread):
    """--no-baselines: AdamW still runs on stdlib-lm, as the reference that sets its target."""
    records, env = quick_train("stdlib-lm", "torch.optim.SGD", "--protocol", "defaults",
                               "--no-baselines")
    assert env["protocol"] == "defaults" and env["reference"] == "torch.optim.AdamW"
    assert env["baselines"] == ["torch.optim.AdamW", "torch.optim.SGD"]
    assert any("AdamW runs as well" in note for note in env["notes"])
    assert env["stdlib_text"]["bytes"] >= 1_500_000
    assert env["cases"]["stdlib-lm"]["held_out"]  # no default is tuned on it
    target = env["cases"]["stdlib-lm"]["target"]
    adamw = [r for r in records if r["optimizer"] == "torch.optim.AdamW"]
    assert [r["lr"] for r in adamw] == list(train.lr_sweep(1e-3))
    assert {r["optimizer"] for r in records} == {"torch.optim.AdamW", "torch.optim.SGD"}
    assert target == min(r["final_val_loss"] for r in adamw)
    for row in records:
        assert row["metric"] == "val_loss" and row["target"] == target
        assert math.isfinite(row["final_val_loss"]) and row["final_val_loss"] > 0
    best = next(r for r in adamw if r["best"])
    assert best["reached"] == 1  # the target is its own final loss
    assert set(best["curve"]) == {"time", "step", "train_loss", "val_loss"}


def test_mnist1d_transformer_is_a_development_case_whose_attention_kfac_captures(one_thread):
    """A development case (defaults may be tuned on it) outside the tuned protocol's default
    run; K-FAC preconditions its Linears and attention in-projections and leaves exactly the
    LayerNorms and the position Embedding to the fallback step."""
    case = next(c for c in train.CASES if c.name == "mnist1d-transformer")
    assert not case.held_out and case.name not in train.DEFAULT_CASES
    assert case.load is train.mnist1d_data and case.metric == "test_acc"
    torch.manual_seed(0)
    model = case.make_model()
    assert sum(p.numel() for p in model.parameters()) == 18_826
    with pytest.warns(UserWarning, match="KFAC: the trainable params") as caught:
        optimizer = soo_ext.KFAC(model, lr=0.1)
    left_out = [line.split()[0] for line in str(caught[0].message).splitlines()[1:]]
    assert left_out == ["position"] + [f"layers.{i}.norm{j}" for i in (0, 1) for j in (1, 2)] \
        + ["norm"]
    assert [name for name, _ in optimizer.layers] == ["value"] + [
        f"layers.{i}.{layer}" for i in (0, 1)
        for layer in ("self_attn", "self_attn.out_proj", "linear1", "linear2")] + ["head"]
    generator = torch.Generator().manual_seed(0)
    signals, labels = torch.randn(16, 40, generator=generator), torch.arange(16) % 10
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        logits = model(signals)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for layer in model.layers:  # its statistics were captured at the steps
        assert optimizer.state[layer.self_attn.in_proj_weight]["factor_updates"] >= 1
