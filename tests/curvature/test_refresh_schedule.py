"""RefreshSchedule (the automatic refresh interval) alone with a fake clock, and in KFAC and
Shampoo (automatic by default, explicit intervals and refresh_budget=None turn it off, the
state_dict carries it)."""
import copy
import logging
import math

import pytest
import torch
from torch import nn

import soo_ext
from soo_ext.curvature.refresh_schedule import RefreshSchedule


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
    opt = soo_ext.Shampoo(model.parameters(), lr=1e-2, start_preconditioning_step=2, **kw)
    if "refresh_timer" not in kw:
        opt._schedule.timer = FakeClock(opt, lambda glob: glob["step"] - 2, refresh=1.0)
    return opt


def root_updates(opt):
    return opt.state[opt.param_groups[0]["params"][0]]["root_updates"]


def test_shampoo_is_automatic_by_default():
    model = mlp()
    opt = shampoo(model)
    assert opt.defaults["precondition_frequency"] is None
    train(model, opt, 20)  # steps k = 1..20; n = k - 2; window n = 0..6; interval 3
    record = opt.state[opt.param_groups[0]["params"][0]]["refresh_schedule"]
    assert record["interval"] == 3 and record["anchor"] == 6
    assert root_updates(opt) == 8  # n = 0, 2, 4, 6, 9, 12, 15, 18


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
