"""RefreshSchedule (the automatic refresh interval) alone with a fake clock, and in KFAC,
Shampoo, SOAP, EKFAC and PSGDKron (automatic by default, explicit intervals and
refresh_budget=None turn it off, the state_dict carries it)."""
import copy
import logging
import math

import pytest
import torch
from torch import nn

import soo_ext
from soo_ext.curvature.kfac_factors import EigenCorrectedFactors
from soo_ext.curvature.psgd_kron import PSGDKronFactors, update_probability
from soo_ext.curvature.refresh_schedule import RefreshSchedule
from soo_ext.curvature.soap_bases import SOAPBases
from soo_ext.optim.psgd_kron import _fit_due


def drive(schedule, record, steps, plain, refresh, start=0):
    """Steps ``start .. start + steps - 1`` with a fake clock: an iteration takes ``plain``
    seconds, ``plain + refresh`` when it refreshes. Returns the steps that refreshed."""
    clock = [0.0]
    schedule.timer = lambda: clock[0]
    done = []
    for n in range(start, start + steps):
        due = schedule.due(record, n)
        clock[0] += plain + (refresh if due else 0.0)
        if due:
            done.append(n)
        schedule.after_step(record, n)
    return done


@pytest.mark.parametrize("plain, refresh, budget, expected", [
    (1.0, 3.0, 0.25, 9),     # 3 * 0.75 / 0.25
    (2.0, 3.0, 0.5, 2),      # ceil(1.5)
    (1.0, 0.1, 0.25, 1),     # cheap refresh: every step
    (1.0, 0.0, 0.25, 1),
    (1.0, 1000.0, 0.25, 100),  # bounded by max_interval
    (0.01, 0.05, 0.1, 45),
])
def test_interval_follows_the_measured_ratio(plain, refresh, budget, expected):
    s = RefreshSchedule("test", budget)
    record = s.new_record()
    done = drive(s, record, 7, plain, refresh)
    assert done == [0, 2, 4, 6]  # the measurement window refreshes every other step
    assert record["interval"] == expected and not record["measuring"]
    assert math.isclose(record["cost_plain"], plain) and math.isclose(record["cost_refresh"],
                                                                      refresh, abs_tol=1e-9)
    if refresh > 0:  # the refresh share over one interval is within the budget ...
        t = record["interval"]
        assert refresh / (t * plain + refresh) <= budget + 1e-12 or t == s.max_interval
        if 1 < t < s.max_interval:  # ... and one step less would exceed it
            assert refresh / ((t - 1) * plain + refresh) > budget


def test_schedule_after_the_window_and_remeasurement():
    s = RefreshSchedule("test", 0.25, remeasure_steps=20)
    record = s.new_record()
    done = drive(s, record, 40, 1.0, 1.0)  # interval 3 (1 * 0.75 / 0.25)
    # window 0..6; every 3 from 6; the first refresh from 6 + 20 = 26 on starts a window 27..33
    assert done == [0, 2, 4, 6, 9, 12, 15, 18, 21, 24, 27, 29, 31, 33, 36, 39]
    assert record["anchor"] == 33 and record["next_measure"] == 53


def test_remeasurement_picks_up_a_changed_cost_and_restart():
    s = RefreshSchedule("test", 0.25, remeasure_steps=1000)
    record = s.new_record()
    drive(s, record, 7, 1.0, 1.0)
    assert record["interval"] == 3
    s.restart(record, 10)  # the refresh sizes changed: a window from the next refresh on
    done = drive(s, record, 20, 1.0, 4.0, start=7)
    assert done[:5] == [9, 12, 14, 16, 18]
    assert record["interval"] == 12 and record["anchor"] == 18


def test_resume_mid_window_is_exact():
    s = RefreshSchedule("test", 0.25)
    record = s.new_record()
    drive(s, record, 4, 1.0, 2.0)  # saved inside the first window (the times so far in it)
    saved = copy.deepcopy(record)
    assert saved["measuring"] and saved["plain"] and saved["stamp"] is not None
    a, b = record, copy.deepcopy(saved)
    # both continue with the same clock (the saved reading is on the same clock)
    clock = [saved["stamp"]]
    s.timer = lambda: clock[0]
    steps = {id(a): [], id(b): []}
    for rec in (a, b):
        clock[0] = saved["stamp"]
        for n in range(4, 30):
            due = s.due(rec, n)
            clock[0] += 1.0 + (2.0 if due else 0.0)
            steps[id(rec)].append(due)
            s.after_step(rec, n)
    assert steps[id(a)] == steps[id(b)] and a == b and a["interval"] == 6


@pytest.mark.parametrize("device, clock", [("cpu", "process_time"), ("cuda", "perf_counter")])
def test_default_clock_is_cpu_time_on_cpu_and_wall_clock_on_cuda(monkeypatch, device, clock):
    # CPU time is what other processes' load leaves alone; a GPU's work shows on the wall clock
    import soo_ext.curvature.refresh_schedule as rs
    readings = {"process_time": iter(range(100, 200)), "perf_counter": iter(range(500, 600))}
    monkeypatch.setattr(rs.time, "process_time", lambda: float(next(readings["process_time"])))
    monkeypatch.setattr(rs.time, "perf_counter", lambda: float(next(readings["perf_counter"])))
    synced = []
    s = RefreshSchedule("Thing", 0.25, sync=lambda: synced.append(1))
    record = s.new_record()
    s.after_step(record, 0, device=torch.device(device))
    assert record["stamp"] == (100.0 if clock == "process_time" else 500.0) and synced == [1]


def test_logs_the_chosen_interval(caplog):
    s = RefreshSchedule("Thing roots", 0.25)
    with caplog.at_level(logging.INFO, logger="soo_ext"):
        drive(s, s.new_record(), 7, 1.0, 3.0)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "Thing roots: refresh every 9 steps" in caplog.records[0].getMessage()


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5])
def test_invalid_budget(budget):
    with pytest.raises(ValueError, match="refresh_budget"):
        RefreshSchedule("test", budget)


# ---- in the optimizers ----------------------------------------------------------------------

class FakeClock:
    """The optimizer's timer: a step takes ``plain`` seconds, ``plain + refresh`` when the
    schedule (the record in the optimizer's state, at step ``index()``) refreshes; read once
    at the end of a timed step."""

    def __init__(self, opt, index, plain=1.0, refresh=3.0):
        self.opt, self.index, self.plain, self.refresh, self.t = opt, index, plain, refresh, 0.0

    def __call__(self):
        glob = self.opt.state[self.opt.param_groups[0]["params"][0]]
        due = RefreshSchedule.due(glob["refresh_schedule"], self.index(glob))
        self.t += self.plain + (self.refresh if due else 0.0)
        return self.t


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def no_clock():
    raise AssertionError("the clock is read with the schedule off")


def kfac(model, **kw):
    opt = soo_ext.KFAC(model, lr=0.05, **kw)
    if "refresh_timer" not in kw:
        opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"])
    return opt


def factor_updates(opt):
    return opt.state[opt.layers[0][1].weight]["factor_updates"]


def test_kfac_is_automatic_by_default():
    model = mlp()
    opt = kfac(model)
    assert opt.defaults["factor_update_steps"] is None and opt.defaults["inv_update_steps"] is None
    assert opt.defaults["refresh_budget"] == 0.25
    train(model, opt, 25)
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 9 and record["anchor"] == 6
    assert factor_updates(opt) == 6  # steps 0, 2, 4, 6 (window), 15, 24


def test_kfac_schedule_turned_on_mid_run_measures_from_there():
    model = mlp()
    opt = kfac(model, factor_update_steps=2, inv_update_steps=2)
    train(model, opt, 10)  # steps 0, 2, 4, 6, 8
    opt.param_groups[0].update(factor_update_steps=None, inv_update_steps=None)
    train(model, opt, 16)  # steps 10..25: a window at 10, 12, 14, 16, then every 9: 25
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 9 and record["anchor"] == 16
    assert factor_updates(opt) == 10


@pytest.mark.parametrize("kw, updates", [
    (dict(factor_update_steps=2, inv_update_steps=3), 5),  # explicit: steps 0, 2, 4, 6, 8
    (dict(refresh_budget=None), 10),  # off: every step
])
def test_kfac_explicit_intervals_or_no_budget_turn_it_off(kw, updates):
    model = mlp()
    opt = soo_ext.KFAC(model, lr=0.05, refresh_timer=no_clock, **kw)
    train(model, opt, 10)
    assert factor_updates(opt) == updates
    assert "refresh_schedule" not in opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("saved_at", [4, 12])  # inside the first window, after it
def test_kfac_state_dict_carries_the_schedule(saved_at):
    model = mlp()
    opt = kfac(model)
    train(model, opt, saved_at)
    sd, weights, clock = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict()), \
        opt._schedule.timer.t
    train(model, opt, 20, seed=2)
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = kfac(model2)
    opt2.load_state_dict(sd)
    opt2._schedule.timer.t = clock  # the same clock
    train(model2, opt2, 20, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    key = opt.param_groups[0]["params"][0]
    assert opt.state[key]["refresh_schedule"] == opt2.state[opt2.param_groups[0]["params"][0]][
        "refresh_schedule"]
    assert opt.state[key]["refresh_schedule"]["interval"] == 9


def shampoo(model, **kw):
    kw.setdefault("refresh_budget", 0.25)  # the schedule's mechanics at one budget
    opt = soo_ext.Shampoo(model.parameters(), lr=1e-2, start_preconditioning_step=2, **kw)
    if "refresh_timer" not in kw:
        opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"] - 2, refresh=1.0)
    return opt


def root_updates(opt):
    return opt.state[opt.param_groups[0]["params"][0]]["root_updates"]


def test_shampoo_is_automatic_by_default():
    model = mlp()
    opt = soo_ext.Shampoo(model.parameters(), lr=1e-2, start_preconditioning_step=2)
    opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"] - 2, refresh=1.0)
    assert opt.defaults["precondition_frequency"] is None and opt.defaults["refresh_budget"] == 0.1
    train(model, opt, 20)  # steps k = 1..20; n = k - 2; window n = 0..6; interval 9 (0.9 / 0.1)
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 9 and record["anchor"] == 6
    assert root_updates(opt) == 5  # n = 0, 2, 4, 6, 15


@pytest.mark.parametrize("kw, updates", [
    (dict(precondition_frequency=4), 5),  # n = 0, 4, 8, 12, 16
    (dict(refresh_budget=None), 2),  # off: every 10 steps (n = 0, 10)
])
def test_shampoo_explicit_frequency_or_no_budget_turn_it_off(kw, updates):
    model = mlp()
    opt = shampoo(model, refresh_timer=no_clock, **kw)
    train(model, opt, 20)
    assert root_updates(opt) == updates
    assert "refresh_schedule" not in opt.state[opt.param_groups[0]["params"][0]]


def test_shampoo_state_dict_carries_the_schedule():
    model = mlp()
    opt = shampoo(model)
    train(model, opt, 5)  # inside the first window
    sd, weights, clock = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict()), \
        opt._schedule.timer.t
    train(model, opt, 15, seed=2)
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = shampoo(model2)
    opt2.load_state_dict(sd)
    opt2._schedule.timer.t = clock
    train(model2, opt2, 15, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    r1 = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1 == opt2.state[opt2.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1["interval"] == 3


@pytest.mark.parametrize("cls, kw", [("KFAC", "factor_update_steps"),
                                     ("Shampoo", "precondition_frequency")])
def test_invalid_options(cls, kw):
    model = mlp()
    arg = model if cls == "KFAC" else model.parameters()
    with pytest.raises(ValueError, match="refresh_budget"):
        getattr(soo_ext, cls)(arg, refresh_budget=1.0)
    with pytest.raises(ValueError, match=kw):
        getattr(soo_ext, cls)(arg, **{kw: 0})


def test_shampoo_measures_again_after_new_sizes():
    model, extra = mlp(), nn.Linear(4, 5)
    opt = shampoo(model)
    train(model, opt, 12)
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert not record["measuring"] and record["anchor"] == 6
    opt.add_param_group({"params": list(extra.parameters())})
    for p in extra.parameters():
        p.grad = torch.ones_like(p)
    train(model, opt, 1)  # k = 13 (n = 11): new sizes seen at n = 10; the refresh due at
    assert record["next_measure"] == 10  # n = 12 starts a window
    assert record["measuring"] and record["anchor"] == 12 and record["sizes"][-3:] == [1024, 1, 0]


def test_record_in_makes_the_record_and_measures_again_after_new_sizes():
    s, state = RefreshSchedule("test", 0.25), {}
    record = s.record_in(state, [3, 4], 0, start=5)
    assert state["refresh_schedule"] is record and record["anchor"] == 5 and record["measuring"]
    assert not s.due(record, 4) and s.due(record, 5)
    drive(s, record, 12, 1.0, 1.0)  # the window 5..11: interval 3
    assert record["interval"] == 3 and not record["measuring"]
    assert s.record_in(state, [3, 4], 12) is record and record["next_measure"] == 2011
    s.record_in(state, [3, 5], 12)
    assert record["sizes"] == [3, 5] and record["next_measure"] == 12
    late = s.record_in({}, [3], 40, start=5)  # turned on at n = 40: its window starts there
    assert late["anchor"] == 40 and drive(s, late, 7, 1.0, 1.0, start=40) == [40, 42, 44, 46]
    assert late["interval"] == 3


def test_soap_schedule_turned_on_mid_run_measures_from_there(monkeypatch):
    model = mlp()
    opt = soap(model, precondition_frequency=4)
    done = refreshes(monkeypatch, SOAPBases, opt)
    train(model, opt, 10)  # k = 1..10: refreshes at k = 5, 9
    opt.param_groups[0]["precondition_frequency"] = None
    train(model, opt, 12)  # k = 11..22, n = 9..20: a window n = 9..15 (k = 11..17), interval 6
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 6 and record["anchor"] == 15
    assert done == [5, 9, 11, 13, 15, 17]


# ---- SOAP, EKFAC and PSGDKron: the same schedule (the record's step n is each one's own) -----

def soap(model, **kw):
    kw.setdefault("refresh_budget", 0.25)  # the schedule's mechanics at one budget
    opt = soo_ext.SOAP(model.parameters(), lr=1e-2, **kw)
    if "refresh_timer" not in kw:  # n = k - 2: the Adam steps before step k
        opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"] - 2, refresh=2.0)
    return opt


def refreshes(monkeypatch, cls, opt):
    """The steps (the global state's ``step`` then) at which ``cls.refresh`` is called: a list
    that fills as ``opt`` trains."""
    done, original = [], cls.refresh

    def counted(self, *args):
        done.append(opt.state[opt.param_groups[0]["params"][0]]["step"])
        return original(self, *args)
    monkeypatch.setattr(cls, "refresh", counted)
    return done


def test_soap_is_automatic_by_default(monkeypatch):
    model = mlp()
    opt = soo_ext.SOAP(model.parameters(), lr=1e-2)
    opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"] - 2, refresh=2.0)
    assert opt.defaults["precondition_frequency"] is None and opt.defaults["refresh_budget"] == 0.1
    done = refreshes(monkeypatch, SOAPBases, opt)
    train(model, opt, 30)  # k = 1..30, n = k - 2; window n = 0..6; interval 18
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 18 and record["anchor"] == 6  # 2 * 0.9 / 0.1
    assert done == [2, 4, 6, 8, 26]


@pytest.mark.parametrize("kw, refreshed", [
    (dict(precondition_frequency=4), [5, 9, 13, 17, 21]),  # every 4 Adam steps, as before
    (dict(refresh_budget=None), [11, 21]),  # off: every 10 (the reference's default)
])
def test_soap_explicit_frequency_or_no_budget_turn_it_off(monkeypatch, kw, refreshed):
    model = mlp()
    opt = soap(model, refresh_timer=no_clock, **kw)
    done = refreshes(monkeypatch, SOAPBases, opt)
    train(model, opt, 22)
    assert done == refreshed
    assert "refresh_schedule" not in opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("saved_at", [5, 12])  # inside the first window, after it
def test_soap_state_dict_carries_the_schedule(saved_at):
    model = mlp()
    opt = soap(model)
    train(model, opt, saved_at)
    sd, weights, clock = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict()), \
        opt._schedule.timer.t
    train(model, opt, 15, seed=2)
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = soap(model2)
    opt2.load_state_dict(sd)
    opt2._schedule.timer.t = clock
    train(model2, opt2, 15, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    r1 = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1 == opt2.state[opt2.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1["interval"] == 6


def test_soap_measures_again_after_new_sizes():
    model, extra = mlp(), nn.Linear(4, 5)
    opt = soap(model)
    train(model, opt, 12)
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert not record["measuring"] and record["anchor"] == 6
    opt.add_param_group({"params": list(extra.parameters())})
    for p in extra.parameters():
        p.grad = torch.ones_like(p)
    train(model, opt, 1)  # k = 13 (n = 11): new sizes; the refresh due at n = 12 (k = 14)
    assert record["next_measure"] == 11 and record["sizes"][-6:-4] == [5, -1]
    train(model, opt, 1)
    assert record["measuring"] and record["anchor"] == 12


def ekfac(model, **kw):
    kw.setdefault("refresh_budget", 0.25)  # the schedule's mechanics at one budget
    opt = soo_ext.EKFAC(model, lr=0.05, **kw)
    if "refresh_timer" not in kw:
        opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"], refresh=4.0)
    return opt


def test_ekfac_schedules_its_eigenbases_by_default(monkeypatch):
    model = mlp()
    opt = soo_ext.EKFAC(model, lr=0.05)
    opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"], refresh=4.0)
    assert opt.defaults["inv_update_steps"] is None and opt.defaults["factor_update_steps"] == 2
    assert opt.defaults["refresh_budget"] == 0.1
    done = refreshes(monkeypatch, EigenCorrectedFactors, opt)
    train(model, opt, 45)  # window 0..6: a decomposition costs 4 steps: interval 36 (3.6 / 0.1)
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 36 and record["anchor"] == 6
    assert done == [0, 2, 4, 6, 42] and factor_updates(opt) == 23  # factors: every 2 steps


@pytest.mark.parametrize("kw, bases", [
    (dict(inv_update_steps=5), [0, 5, 10]),  # explicit
    (dict(refresh_budget=None), list(range(12))),  # off with None intervals: every step (KFAC's)
])
def test_ekfac_explicit_intervals_or_no_budget_turn_it_off(monkeypatch, kw, bases):
    model = mlp()
    opt = soo_ext.EKFAC(model, lr=0.05, refresh_timer=no_clock, **kw)
    done = refreshes(monkeypatch, EigenCorrectedFactors, opt)
    train(model, opt, 12)
    assert done == bases and factor_updates(opt) == 6  # factors: every 2 steps
    assert "refresh_schedule" not in opt.state[opt.param_groups[0]["params"][0]]


def test_ekfac_state_dict_carries_the_schedule():
    model = mlp()
    opt = ekfac(model)
    train(model, opt, 4)  # inside the first window
    sd, weights, clock = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict()), \
        opt._schedule.timer.t
    train(model, opt, 25, seed=2)
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = ekfac(model2)
    opt2.load_state_dict(sd)
    opt2._schedule.timer.t = clock
    train(model2, opt2, 25, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    r1 = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1 == opt2.state[opt2.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1["interval"] == 12


@pytest.fixture
def early_window(monkeypatch):
    """PSGDKron's first measurement window at n = 10 instead of the flat start's end (500):
    shorter runs, the same mechanics (the steps before it fit on the start's schedule either way)."""
    monkeypatch.setattr(soo_ext.optim.psgd_kron, "FLAT_START", 10)


def psgd_kron(model, refresh=0.5, **kw):
    opt = soo_ext.PSGDKron(model.parameters(), lr=1e-3, **kw)
    if "refresh_timer" not in kw:  # n = k - 1: the steps before step k
        opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"] - 1, refresh=refresh)
    return opt


def fits(monkeypatch, opt):
    """The steps (k) that fit the factors: a list that fills as ``opt`` trains."""
    done, original = [], PSGDKronFactors.update_

    def counted(self, *args):
        done.append(opt.state[opt.param_groups[0]["params"][0]]["step"])
        return original(self, *args)
    monkeypatch.setattr(PSGDKronFactors, "update_", counted)
    return done


def test_psgd_kron_fit_decisions():
    """The annealed probability's floor is 1 / interval of the automatic schedule (0.03 without
    it); its measurement window fits by the window's pattern, whatever the draw."""
    record = {**RefreshSchedule.new_record(), "anchor": 500}  # the first window: n = 500..506
    assert _fit_due(None, 10, 0.999, record)  # the flat start (p = 1)
    assert _fit_due(None, 500, 0.999, record) and not _fit_due(None, 501, 0.0, record)
    record.update(measuring=False, interval=4, anchor=506)
    n = 8000  # the reference's schedule is at its floor 0.03 long before
    assert _fit_due(None, n, 0.249, record) and not _fit_due(None, n, 0.251, record)
    assert _fit_due(None, n, 0.029, None) and not _fit_due(None, n, 0.031, None)  # off: 0.03
    # annealed from the start's 1/2, not from 1: exp(-0.001 (1000 - 500)) / 2 = 0.303
    assert _fit_due(None, 1000, 0.3, record) and not _fit_due(None, 1000, 0.31, record)
    assert _fit_due(0.5, 3, 0.49, None) and not _fit_due(lambda n: 0.1, 3, 0.11, None)


def test_psgd_kron_measures_at_the_end_of_the_flat_start():
    model = mlp()
    opt = psgd_kron(model)
    train(model, opt, 1)
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["anchor"] == 500 and record["measuring"] and record["stamp"] is None


def test_psgd_kron_floor_is_automatic_by_default(monkeypatch, caplog, early_window):
    model = mlp()
    opt = psgd_kron(model, refresh=0.5)  # interval ceil(0.5 * 0.75 / 0.25) = 2: floor 1/2
    assert opt.defaults["update_probability"] is None and opt.defaults["refresh_budget"] == 0.25
    done = fits(monkeypatch, opt)
    with caplog.at_level(logging.INFO, logger="soo_ext"):
        train(model, opt, 20)  # k = 1..20, n = k - 1: the window n = 10..16
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 2 and record["anchor"] == 16
    assert done[:5] == [1, 3, 5, 7, 9]  # before the window: the start, every 2nd step
    assert [k for k in done if 11 <= k <= 17] == [11, 13, 15, 17]  # the window
    assert "PSGDKron fits (the floor of their probability: 1 / interval): refresh every 2 " \
        "steps" in caplog.text


@pytest.mark.parametrize("kw", [dict(update_probability=0.5), dict(refresh_budget=None)])
def test_psgd_kron_explicit_probability_or_no_budget_turn_it_off(monkeypatch, kw,
                                                                 early_window):
    import random
    model = mlp()
    opt = psgd_kron(model, refresh_timer=no_clock, **kw)
    done = fits(monkeypatch, opt)
    train(model, opt, 20)
    chance = kw.get("update_probability") or update_probability  # (off: no window at 10..16)
    assert done == [k for k in range(1, 21) if random.Random(k).random() < (
        chance(k - 1) if callable(chance) else chance)]  # seed 0: the draws of before
    assert "refresh_schedule" not in opt.state[opt.param_groups[0]["params"][0]]


def test_psgd_kron_state_dict_carries_the_schedule(early_window):
    model = mlp()
    opt = psgd_kron(model, refresh=4.0)
    train(model, opt, 13)  # inside the first window (n = 10..16)
    sd, weights, clock = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict()), \
        opt._schedule.timer.t
    train(model, opt, 12, seed=2)
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = psgd_kron(model2, refresh=4.0)
    opt2.load_state_dict(sd)
    opt2._schedule.timer.t = clock
    train(model2, opt2, 12, seed=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    r1 = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1 == opt2.state[opt2.param_groups[0]["params"][0]]["refresh_schedule"]
    assert r1["interval"] == 12


def test_shampoo_schedule_turned_on_mid_run_measures_from_there():
    model = mlp()
    opt = shampoo(model, precondition_frequency=4)
    train(model, opt, 10)  # k = 1..10, n = k - 2: roots at n = 0, 4, 8
    opt.param_groups[0]["precondition_frequency"] = None
    train(model, opt, 12)  # k = 11..22 (n = 9..20): a window at n = 9, 11, 13, 15, then every 3
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 3 and record["anchor"] == 15
    assert root_updates(opt) == 3 + 4 + 1  # n = 18
