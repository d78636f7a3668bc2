"""soo_ext.curvature.psgd_kron alone: the merged shapes and factor kinds, the norm bound, the
batched fit against one param at a time, the masks, balancing and the preconditioning."""
import pytest
import torch

from soo_ext.curvature.psgd_kron import (PSGDKronFactors, PSGDKronLayout, factor_kinds,
                                         norm_lower_bound, psgd_merged_shape)

F64 = torch.float64


@pytest.mark.parametrize("shape,merge,expected", [
    ((64, 3, 3, 3), True, (64, 27)), ((25, 25, 1, 3), True, (25, 75)),  # the first dim kept
    ((25, 1, 1, 5), True, (25, 5)), ((512, 512, 3, 3), True, (512, 512, 9)),  # <= 1024 merged
    ((10, 1, 1), True, (10, 1)), ((6, 2, 3), True, (6, 6)),
    ((64, 3, 3, 3), "reference", (576, 3)),  # the reference's signed-difference rule
    ((25, 25, 1, 3), "reference", (625, 3)), ((6, 2, 3), "reference", (12, 3)),
    ((2, 3, 40), "reference", (6, 40)), ((6, 2, 3), False, (6, 2, 3)),
    ((5, 4), True, (5, 4)), ((7,), True, (7,)), ((), True, (1,)), ((), "reference", (1,)),
])
def test_merged_shape(shape, merge, expected):
    assert psgd_merged_shape(shape, merge) == expected


@pytest.mark.parametrize("shape,args,expected", [
    ((5, 4), (8192, 2, None), ("tri", "tri")), ((7,), (8192, 2, None), ("diag",)),
    ((7,), (8192, 1, None), ("tri",)), ((1, 7), (8192, 2, None), ("diag", "tri")),
    ((9, 4), (8, 2, None), ("diag", "tri")), ((9, 4), (8192, 2, "one_diag"), ("diag", "tri")),
    ((4, 4), (8192, 2, "one_diag"), ("tri", "diag")),  # ties: the last
    ((4, 4), (8192, 2, "smart_one_diag"), ("tri", "tri")),
    ((3, 5), (8192, 2, "all_diag"), ("diag", "diag")),
])
def test_factor_kinds(shape, args, expected):
    assert factor_kinds(shape, *args) == expected


def test_norm_lower_bound():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 5, 5, dtype=F64, generator=gen)
    S = X @ X.transpose(1, 2)
    S[2] = 0
    bound = norm_lower_bound(S)
    exact = torch.linalg.matrix_norm(S, ord=2)
    assert bound[2] == 0
    assert (bound <= exact * (1 + 1e-12)).all() and (bound[exact > 0] >= exact[exact > 0] / 5).all()
    for s, b in zip(S, bound):  # one matrix at a time, as the reference
        if s.abs().max() == 0:
            continue
        A = s / s.abs().max()
        x = A[:, (A * A).sum(0).argmax()] @ A
        assert torch.allclose(b, (A @ (x / x.norm())).norm() * s.abs().max(), rtol=1e-14)


def fitted(params, grads, probes, take=None, steps=3):
    layout = PSGDKronLayout(params, True, 8192, 2, None)
    factors = PSGDKronFactors(layout, F64, F64, torch.device("cpu"), 1.0)
    for _ in range(steps):
        stacks, vs = [], []
        for sg in layout.shape_groups:
            members = [i for i, _ in sg.members]
            stacks.append(torch.stack([grads[i].reshape(sg.shape) for i in members]))
            vs.append(torch.stack([probes[i].reshape(sg.shape) for i in members]))
        factors.update_(stacks, vs, torch.tensor(True) if take is None
                        else torch.tensor([take[i] for i in factors.order]), 0.1)
    return layout, factors


def test_batched_fit_is_the_fit_of_each_param_alone():
    gen = torch.Generator().manual_seed(1)
    shapes = [(5, 4), (5, 4), (3,), (6, 2, 3), (5, 4)]
    params = [torch.zeros(s, dtype=F64) for s in shapes]
    grads = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    probes = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    layout, factors = fitted(params, grads, probes)
    assert len(layout.shape_groups) == 3 and layout.buckets.counts[("tri", 4)] == 3
    for i in range(len(shapes)):
        _, alone = fitted([params[i]], [grads[i]], [probes[i]])
        for a, b in zip(factors.views(i)["Q"], alone.views(0)["Q"]):
            assert torch.allclose(a, b, rtol=0, atol=1e-14)
    # the fit moved the factors, kept them triangular
    Q = factors.views(0)["Q"][0]
    assert not torch.equal(Q, torch.eye(5, dtype=F64)) and torch.equal(Q, Q.triu())


def test_members_not_taken_keep_their_factors():
    gen = torch.Generator().manual_seed(2)
    params = [torch.zeros(5, 4, dtype=F64) for _ in range(3)]
    grads = [torch.randn(5, 4, dtype=F64, generator=gen) for _ in params]
    probes = [torch.randn(5, 4, dtype=F64, generator=gen) for _ in params]
    grads[2][0, 0] = float("inf")  # an overflowing fit never enters Q either
    _, factors = fitted(params, grads, probes, take=[True, False, True])
    assert not torch.equal(factors.views(0)["Q"][0], torch.eye(5, dtype=F64))
    for i in (1, 2):
        assert torch.equal(factors.views(i)["Q"][0], torch.eye(5, dtype=F64))


def test_balance_keeps_the_preconditioner_and_precondition_is_qtq():
    gen = torch.Generator().manual_seed(3)
    params = [torch.zeros(5, 4, dtype=F64)]
    grads = [torch.randn(5, 4, dtype=F64, generator=gen)]
    probes = [torch.randn(5, 4, dtype=F64, generator=gen)]
    _, factors = fitted(params, grads, probes)
    Q1, Q2 = (q.clone() for q in factors.views(0)["Q"])
    factors.Q[("tri", 5)] *= 8.0  # unbalanced: Q1 (x) Q2 is the same with Q2 / 8
    factors.Q[("tri", 4)] /= 8.0
    factors.balance_(torch.tensor(True))
    B1, B2 = factors.views(0)["Q"]
    assert torch.allclose(B1.abs().max(), B2.abs().max())
    assert torch.allclose(torch.kron(B1, B2), torch.kron(Q1, Q2), rtol=1e-13)
    M = torch.randn(1, 5, 4, dtype=F64, generator=gen)
    assert torch.allclose(factors.precondition(0, M)[0], Q1.T @ Q1 @ M[0] @ Q2.T @ Q2)


def test_direction_clips_each_member_and_zeroes_a_skipped_step():
    params = [torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), torch.zeros(4, dtype=F64)]
    layout = PSGDKronLayout(params, True, 8192, 2, None)
    factors = PSGDKronFactors(layout, F64, F64, torch.device("cpu"), 1.0)  # Q = I
    values = {0: 2.0, 1: 0.5, 2: -3.0}
    M = torch.cat([torch.full((params[i].numel(),), values[i], dtype=F64) for i in factors.order])
    U = factors.param_views(factors.direction(M, 1.1, torch.tensor(False)))
    assert torch.allclose(U[0], torch.full((3, 2), 1.1, dtype=F64)) and (U[1] == 0.5).all()
    assert torch.allclose(U[2], torch.full((4,), -1.1, dtype=F64))
    U = factors.param_views(factors.direction(M, None, torch.tensor(False)))
    assert (U[0] == 2.0).all() and (U[2] == -3.0).all()
    U = factors.direction(M, 1.1, torch.tensor(True))
    assert (U == 0).all() and not torch.signbit(U).any()  # +0: p - lr * 0 is p bit for bit


def test_momentum_counts_and_corrects_each_member():
    params = [torch.zeros(2, 2, dtype=F64), torch.zeros(3, dtype=F64)]
    layout = PSGDKronLayout(params, True, 8192, 2, None)
    factors = PSGDKronFactors(layout, F64, F64, torch.device("cpu"), 1.0)
    G = torch.ones(factors.total, dtype=F64)
    factors.momentum_(G, torch.tensor(True), 0.9)
    take = torch.tensor([i == 0 for i in factors.order])
    M = factors.param_views(factors.momentum_(2 * G, take, 0.9))
    # param 0: two updates (1, then 2), corrected by 1 - 0.9^2; param 1: one update
    assert torch.allclose(M[0], torch.full((2, 2), (0.9 * 0.1 + 0.2) / (1 - 0.81), dtype=F64))
    assert torch.allclose(M[1], torch.ones(3, dtype=F64))
    assert factors.views(0)["momentum_steps"] == 2 and factors.views(1)["momentum_steps"] == 1
