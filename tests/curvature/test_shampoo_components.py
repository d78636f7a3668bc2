"""Shampoo's components alone: merging and blocking (shampoo_blocks), the factors and roots in
buckets against the formulas in float64 (shampoo_roots), and the grafting methods (grafting)."""
import pytest
import torch

from soo_ext import RootFailureError
from soo_ext._support.guard import SkipGuard
from soo_ext.curvature.grafting import (AdaGradGrafting, AdamGrafting, SGDGrafting,
                                        make_grafting)
from soo_ext.curvature.shampoo_blocks import ShampooBlocking, merge_dims, merge_dims_by_cost
from soo_ext.curvature.shampoo_roots import ShampooRoots

F64 = torch.float64
OK, SKIPPED = SkipGuard(torch.tensor(True)), SkipGuard(torch.tensor(False))


def inv_root(A, p, eps):
    lam, Q = torch.linalg.eigh(A)
    return (Q * (lam.clamp_min(0) + eps).pow(-1.0 / p)) @ Q.T


def unfold(T, i):
    return T.movedim(i, 0).reshape(T.shape[i], -1)


def mode_product(T, M, i):
    return torch.tensordot(M, T, dims=([1], [i])).movedim(0, i)


@pytest.mark.parametrize("shape,max_dim,merged,leading", [
    # merged from the last dim as distributed Shampoo does; ``leading``: from the first (SOAP)
    ((25, 25, 1, 3), 1024, (25, 75), (625, 3)),  # the MNIST-1D CNN's kernel
    ((64, 3, 3, 3), 1024, (64, 27), (576, 3)),
    ((8, 2, 8), 16, (8, 16), (16, 8)),
    ((16, 1, 5), 1024, (80,), (80,)),
    ((10, 1, 1), 8, (10,), (10,)),
    ((1, 1), 8, (), ()),
    ((1,), 8, (), ()),
    ((6, 2, 2, 9), 8, (6, 4, 9), (6, 4, 9)),
    ((2000, 3), 1024, (2000, 3), (2000, 3)),  # dims > max_dim stay (blocked later)
    ((3, 2000), 1024, (3, 2000), (3, 2000)),
    ((3, 2000, 1, 4, 5), 1024, (3, 2000, 20), (3, 2000, 20)),
    ((5, 4, 2000, 3), 1024, (20, 2000, 3), (20, 2000, 3)),
])
def test_merge_dims(shape, max_dim, merged, leading):
    assert merge_dims(shape, max_dim) == merged
    assert merge_dims(shape, max_dim, from_last=False) == leading


@pytest.mark.parametrize("shape,merged", [
    ((25, 25, 1, 3), (25, 75)),  # 75^3 = 27 (25^3 + 3^3): merged, as the reference does
    ((25, 1, 1, 5), (125,)),     # 124 times
    ((64, 3, 3, 3), (64, 27)),   # 243 times
    ((10, 100), (10, 100)),      # one 1000-long dim would cost 1000 times: not merged
    ((10, 32), (10, 32)),        # 970 times
    ((64, 64, 3, 3), (64, 64, 9)),  # 3 x 3 merge (13.5 times), 64 x 9 would be 727 times
    ((3, 2000), (3, 2000)),
])
def test_merge_dims_by_cost(shape, merged):
    assert merge_dims_by_cost(shape, 1024) == merged
    assert merge_dims_by_cost(shape, 1024, float("inf")) == merge_dims(shape, 1024)
    assert merge_dims_by_cost((10, 100), 1024, 1000) == (1000,)  # the bound is inclusive


def test_blocking_merges_from_the_last_dim():
    b = ShampooBlocking([[torch.zeros(25, 25, 1, 3)]], 1024, True, False)
    assert b.params[0].merged == (25, 75) and b.params[0].block_shapes == [(25, 75)]
    b = ShampooBlocking([[torch.zeros(8, 2, 8), torch.zeros(4, 4, 1, 9)]], 16, True, False)
    assert b.params[0].merged == (8, 16) and b.params[0].block_shapes == [(8, 16)]
    assert b.params[1].merged == (16, 9) and b.params[1].block_shapes == [(16, 9)]


def blocking():
    params = [torch.zeros(5, 3, dtype=F64), torch.zeros(7, dtype=F64),
              torch.zeros(2, 3, 3, dtype=F64), torch.zeros(4, 3, dtype=F64),
              torch.zeros(2, 1, 2, 3, dtype=F64)]
    return params, ShampooBlocking([params[:2], params[2:]], 4, True, False)


def test_blocks_shape_groups_and_slots():
    params, b = blocking()
    P = b.params
    assert P[0].merged == (5, 3) and P[0].block_shapes == [(4, 3), (1, 3)]
    assert P[1].merged is None  # 1-D: grafting only
    assert P[2].merged == (2, 3, 3) and P[2].block_shapes == [(2, 3, 3)]
    assert P[3].merged == (4, 3) and P[3].block_shapes == [(4, 3)]
    assert P[4].merged == (4, 3) and P[4].block_shapes == [(4, 3)]  # (2, 1, 2, 3) merged
    assert b.by_group == [[0, 1], [2, 3, 4]]
    shapes = {sg.shape: sg.members for sg in b.shape_groups}
    assert shapes[(4, 3)] == [(0, 0), (3, 0), (4, 0)] and shapes[(2, 3, 3)] == [(2, 0)]
    # every (param, block, dim) has its own slot, in a bucket of its size and order
    slots = [s for i in (0, 2, 3, 4) for s in b.slots(i)]
    assert len(slots) == len(set(slots)) == 2 * 2 + 3 + 2 + 2
    for i in (0, 2, 3, 4):
        shapes_i = P[i].block_shapes
        assert [key for key, _ in b.slots(i)] == [(d, len(s)) for s in shapes_i for d in s]
    assert all(b.owner[key][s][0] == i for i in (0, 2, 3, 4) for key, s in b.slots(i))
    x = torch.arange(15.0).reshape(5, 3)
    assert torch.equal(P[0].block(x, 1), x[4:5])


@pytest.mark.parametrize("relative_epsilon", [0.0, 1e-3])
def test_factor_update_roots_and_directions_match_the_formulas(relative_epsilon):
    # the root of L + relative_epsilon ||L||_F I (relative_epsilon 1e-3 moves the small
    # eigenvalues of these factors by far more than the tolerance)
    params, b = blocking()
    roots = ShampooRoots(b, F64, F64, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    history = [[torch.randn(p.shape, generator=gen, dtype=F64) for p in params] for _ in range(2)]
    betas2 = (0.5, 0.25)
    for grads in history:
        roots.load_grads(grads)
        stacked = roots.update(OK, betas2)
    state = {"root_updates": 0, "failed_roots": torch.zeros((), dtype=torch.int64)}
    roots.update_roots(OK, 1e-6, relative_epsilon, "eigh", 5, state, 2)
    assert state["root_updates"] == 1 and state["failed_roots"] == 0
    graft = roots.flat()  # the grafting directions, in the roots' flat layout
    torch._foreach_copy_(roots.flat_views(graft), history[-1])
    dirs = roots.flat_views(roots.precondition(stacked, graft.clone(), rescale=False))
    assert torch.equal(dirs[1], history[-1][1])  # no factors: the grafting direction
    for i, beta2 in ((0, 0.5), (2, 0.25), (3, 0.25), (4, 0.25)):
        P = b.params[i]
        views = roots.views(i)
        slot = 0
        for j, shape in enumerate(P.block_shapes):
            blocks = [P.block(g[i], j) for g in history]
            want = blocks[1]
            for mode in range(len(shape)):
                L = beta2 * unfold(blocks[0], mode) @ unfold(blocks[0], mode).T \
                    + unfold(blocks[1], mode) @ unfold(blocks[1], mode).T
                torch.testing.assert_close(views["factors"][slot], L)
                ridge = (relative_epsilon * torch.linalg.matrix_norm(L)
                         * torch.eye(len(L), dtype=F64))
                want = mode_product(want, inv_root(L + ridge, 2 * len(shape), 1e-6), mode)
                slot += 1
            torch.testing.assert_close(P.block(dirs[i], j), want, rtol=1e-8, atol=1e-10)
    rescaled = roots.flat_views(roots.precondition(stacked, graft.clone(), rescale=True))
    for i in (0, 2, 3, 4):
        P = b.params[i]
        for j in range(len(P.blocks)):
            torch.testing.assert_close(P.block(rescaled[i], j).norm(),
                                       P.block(history[-1][i], j).norm())


def test_skipped_update_and_failed_roots():
    params, b = blocking()
    roots = ShampooRoots(b, F64, F64, torch.device("cpu"))
    zeros = [torch.zeros_like(p) for p in params]
    before = {k: v.clone() for k, v in roots.factors.items()}

    def update(grads, guard, betas2):
        roots.load_grads(grads)
        roots.update(guard, betas2)

    update([torch.ones_like(p) for p in params], OK, (0.9, 0.9))
    update(zeros, SKIPPED, (0.9, 0.9))  # no decay on a skipped step
    assert not any(torch.equal(before[k], roots.factors[k]) for k in before)
    kept = {k: v.clone() for k, v in roots.factors.items()}
    update(zeros, SKIPPED, (0.9, 0.5))
    assert all(torch.equal(kept[k], roots.factors[k]) for k in kept)
    # a param without a gradient (params[3]): its factors neither decay nor grow
    mine = [roots.factors[key][slot].clone() for key, slot in b.slots(3)]
    others = [roots.factors[key][slot].clone() for key, slot in b.slots(0)]
    update(zeros[:3] + [None] + zeros[4:], OK, (0.9, 0.5))
    assert all(torch.equal(roots.factors[key][slot], m) for (key, slot), m in zip(b.slots(3), mine))
    assert all(torch.equal(roots.factors[key][slot], 0.9 * o)
               for (key, slot), o in zip(b.slots(0), others))
    state = {"root_updates": 0, "failed_roots": torch.zeros((), dtype=torch.int64)}
    roots.update_roots(SKIPPED, 1e-6, 0.0, "eigh", 5, state, 1)
    assert state["root_updates"] == 0
    key, slot = b.slots(3)[0]
    roots.factors[key][slot].fill_(float("nan"))
    old = roots.roots[key][slot].clone()
    roots.update_roots(OK, 1e-6, 0.0, "eigh", 2, state, 2)
    assert torch.equal(roots.roots[key][slot], old) and state["failed_roots"] == 1
    with pytest.raises(RootFailureError, match="dim 0 of block 0 of param 3"):
        roots.update_roots(OK, 1e-6, 1e-5, "eigh", 2, state, 3)


def test_grafting_methods():
    gen = torch.Generator().manual_seed(0)
    g = [torch.randn(3, 2, generator=gen, dtype=F64)]
    taken = torch.tensor(2.0, dtype=F64)
    assert make_grafting(None, 1e-8, 0.9).precondition([], g, taken) is g
    assert type(make_grafting("sgd", 1e-8, 0.9)) is SGDGrafting
    ada = make_grafting("adagrad", 1e-3, 0.9)
    assert type(ada) is AdaGradGrafting and ada.state_key == "graft_state"
    s = [torch.full((3, 2), 0.5, dtype=F64)]
    ada.update(s, g, OK)
    torch.testing.assert_close(s[0], 0.5 + g[0] ** 2)
    torch.testing.assert_close(ada.precondition(s, g, taken)[0], g[0] / (s[0].sqrt() + 1e-3))
    adam = make_grafting("adam", 1e-3, 0.9)
    assert type(adam) is AdamGrafting
    v = [torch.full((3, 2), 0.5, dtype=F64)]
    adam.update(v, [torch.zeros_like(g[0])], SKIPPED)
    assert (v[0] == 0.5).all()  # a skipped step keeps v (the gradient is zero there)
    adam.update(v, g, OK)
    torch.testing.assert_close(v[0], 0.9 * 0.5 + 0.1 * g[0] ** 2)
    want = g[0] / (v[0].sqrt() / (1 - 0.9 ** 2) ** 0.5 + 1e-3)
    torch.testing.assert_close(adam.precondition(v, g, taken)[0], want)
