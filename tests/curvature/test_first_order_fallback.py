"""soo_ext.curvature.first_order_fallback alone: the AdamW step of the params a K-FAC-type
optimizer leaves out, against a naive fp64 transcription of AdamW (Loshchilov & Hutter 2019,
torch.optim.AdamW's form) and torch.optim.AdamW itself, per param group; a skipped step changes
nothing; the step counts survive Optimizer.load_state_dict uncast."""
import collections
import math

import pytest
import torch

from soo_ext.curvature.first_order_fallback import (OPTIONS, adamw_fallback_, fallback_params,
                                                    restore_uncast, sgd_lr)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def groups_and_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen, dtype=dtype), torch.randn(5, generator=gen,
                                                                        dtype=dtype)]
    groups = [dict(params=[params[0]], lr=0.1, weight_decay=0.1, fallback_lr=3e-3,
                   fallback_betas=(0.9, 0.999), fallback_eps=1e-8),
              dict(params=[params[1]], lr=0.1, weight_decay=0.0, fallback_lr=None,
                   fallback_betas=(0.5, 0.9), fallback_eps=1e-8)]
    return groups, params, {id(params[0]): 0, id(params[1]): 1}


def grads(steps, shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
            for _ in range(steps)]


def naive_adamw(p, gs, lr, b1, b2, eps, wd):
    """AdamW as its paper's Algorithm 2 in torch.optim.AdamW's form, element by element."""
    p = p.clone().flatten().tolist()
    m, v = [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(gs, 1):
        g = g.flatten().tolist()
        for i in range(len(p)):
            p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mhat, vhat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] -= lr * mhat / (math.sqrt(vhat) + eps)
    return torch.tensor(p, dtype=torch.float64)


def run(groups, params, group_of, gs, oks=None):
    state = collections.defaultdict(dict)  # as Optimizer.state
    for k, step_grads in enumerate(gs):
        for p, g in zip(params, step_grads):
            p.grad = g
        adamw_fallback_(groups, state, group_of, params, None if oks is None else oks[k])
    return state


def test_matches_naive_transcription_and_torch_adamw():
    groups, params, group_of = groups_and_params()
    start = [p.clone() for p in params]
    gs = grads(6, [p.shape for p in params])
    state = run(groups, params, group_of, gs)
    # group 0: fallback_lr 3e-3; group 1: None is ADAMW_LR, 1e-2
    for i, (lr, (b1, b2), wd) in enumerate([(3e-3, (0.9, 0.999), 0.1), (1e-2, (0.5, 0.9), 0.0)]):
        want = naive_adamw(start[i], [g[i] for g in gs], lr, b1, b2, 1e-8, wd)
        # a few roundings of fp64 per step: 1e-13 relative to the step sizes (~lr)
        torch.testing.assert_close(params[i].flatten(), want, rtol=0, atol=1e-13)
        shadow = start[i].clone().requires_grad_()
        ref = torch.optim.AdamW([shadow], lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=wd)
        for g in gs:
            shadow.grad = g[i]
            ref.step()
        torch.testing.assert_close(params[i], shadow.detach(), rtol=0, atol=1e-13)
        assert float(state[params[i]]["fallback_step"]) == 6
        assert state[params[i]]["fallback_step"].dtype == torch.float32


def test_skipped_step_changes_nothing():
    groups, params, group_of = groups_and_params()
    twin_groups, twin, twin_of = groups_and_params()
    gs = grads(5, [p.shape for p in params])
    bad = [[torch.full_like(g, float("nan")) for g in gs[0]]]
    yes, no = torch.tensor(True), torch.tensor(False)
    # a skipped first step (t = 0: no 0/0), then a skipped step in the middle
    state = run(groups, params, group_of, bad + gs[:2] + bad + gs[2:],
                oks=[no, yes, yes, no, yes, yes, yes])
    twin_state = run(twin_groups, twin, twin_of, gs)  # the same steps without the skipped ones
    for p, q in zip(params, twin):
        assert torch.isfinite(p).all()
        # the masked arithmetic (x * 1, + 0 * d) is exact: equal bit for bit
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "fallback_step"):
            assert torch.equal(state[p][key], twin_state[q][key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_keep_float32_counts(dtype):
    groups, params, group_of = groups_and_params(dtype)
    gs = [[g.to(dtype) for g in step] for step in grads(3, [p.shape for p in params])]
    state = run(groups, params, group_of, gs)
    for p in params:
        assert state[p]["exp_avg"].dtype == dtype and torch.isfinite(p).all()
        assert state[p]["fallback_step"].dtype == torch.float32


def test_restore_uncast_moves_the_counts():
    p = torch.zeros(2)
    kept = {p: {"fallback_step": torch.tensor(7.0, dtype=torch.float64), "other": 1}}
    state = {p: {}}
    restore_uncast(kept, state)
    assert state[p]["fallback_step"].dtype == torch.float32
    assert float(state[p]["fallback_step"]) == 7 and kept[p] == {"other": 1}


def test_options_and_split():
    assert OPTIONS["fallback"].accepts("adamw") and not OPTIONS["fallback"].accepts("adam")
    assert OPTIONS["fallback_betas"].accepts((0.9, 0.999))
    for bad in [(0.9,), (1.0, 0.9), (0.9, -0.1), "ab", (0.9, True)]:
        assert not OPTIONS["fallback_betas"].accepts(bad), bad
    assert not OPTIONS["fallback_eps"].accepts(0) and OPTIONS["fallback_lr"].accepts(None)
    ps = [torch.zeros(1)]
    assert fallback_params(ps, {"fallback": "sgd"}) == (ps, [])
    assert fallback_params(ps, {"fallback": "adamw"}) == ([], ps)
    assert sgd_lr({"lr": 0.1, "fallback_lr": None}) == 0.1
    assert sgd_lr({"lr": 0.1, "fallback_lr": 0.5}) == 0.5
