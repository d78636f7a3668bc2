"""SOAPBases alone: the layout (merged shapes, rotated dims, buckets), the rotations (batched
matmuls between kept views, every pattern of rotated and unrotated dims), the factor statistics,
the initial eigenbases and the power-iteration + QR refresh with its moment bookkeeping, and the
masks (a skipped step, params without a gradient)."""
import pytest
import torch

from soo_ext.curvature.soap_bases import SOAPBases, soap_shape

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("shape,merge,p1d,expected", [
    ((7, 5), False, False, ((7, 5), (True, True))),
    ((64, 3, 3, 3), True, False, ((576, 3), (True, True))),  # Shampoo's merge_dims
    ((64, 3, 3, 3), False, False, ((64, 3, 3, 3), (False, True, True, True))),
    ((20, 5), False, False, ((20, 5), (False, True))),  # 20 > max_dim 16: unrotated
    ((1, 6), False, False, ((6,), (True,))),  # size-1 dims have a trivial basis
    ((6,), False, False, ((6,), (False,))),  # 1-D: Adam
    ((6,), False, True, ((6,), (True,))),
    ((20,), False, True, ((20,), (False,))),
    ((), False, True, ((1,), (False,))),
])
def test_layout(shape, merge, p1d, expected):
    max_dim = 1024 if merge else 16
    assert soap_shape(shape, max_dim, merge, p1d) == expected


@pytest.mark.parametrize("shape,expected", [
    ((7, 5), (False, True)),  # the smaller side's basis only
    ((5, 7), (True, False)),
    ((6, 6), (False, True)),  # of equal dims the first is dropped
    ((6, 3, 6), (False, True, True)),  # order 3: only the largest dropped
    ((20, 5), (False, True)),  # 20 > max_dim 16: one rotated dim, kept
    ((20, 30), (False, False)),
    ((6,), (True,)),  # 1-D (precondition_1d): its one dim kept
])
def test_layout_one_sided(shape, expected):
    assert soap_shape(shape, 16, False, True, one_sided=True) == (shape, expected)


def make(shapes, max_dim=16, p1d=False, decays=0.9, dtype=F64, factor_dtype=F64):
    """Params of ``shapes`` and their bases; ``decays``: the factor decay, or one per param."""
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    bases = SOAPBases([params], max_dim, False, p1d, factor_dtype)
    decays = decays if isinstance(decays, list) else [decays] * len(params)
    bases.set_hyper([(0.01, 0.9, 0.95, 1.0, d) for d in decays])
    return params, bases


def begin(bases, grads, ok=True):
    """A step's start: the gradients (None: the param has none) and the skip guard's flag."""
    bases.load_grads(grads)
    flag = torch.tensor(ok)
    bases.mask(flag, ~flag)


def random_bases(bases):
    for Q in bases.bases.values():
        Q.copy_(torch.linalg.qr(torch.randn_like(Q)).Q)


def test_buckets_batch_equal_sizes_and_views_share_storage():
    params, bases = make([(7, 5), (7, 5), (5, 20), (3,)])
    assert bases.buckets.counts == {7: 2, 5: 3}  # (7, 5) twice; the 5 of (5, 20)
    assert [sg.shape for sg in bases.shape_groups] == [(7, 5), (5, 20), (3,)]
    views = bases.views(2)
    assert len(views["GG"]) == len(views["Q"]) == 1 and views["Q"][0].shape == (5, 5)
    views["exp_avg"].fill_(3.0)
    assert (bases.exp_avg[1] == 3.0).all()
    assert bases.views(3)["GG"] == []


def test_adam_groups_come_last():
    params, bases = make([(3,), (7, 5), (4,), (20, 20)])  # (20, 20): no dim rotated
    assert [sg.shape for sg in bases.shape_groups] == [(7, 5), (3,), (4,), (20, 20)]
    assert bases.views(1)["exp_avg"].data_ptr() == bases.exp_avg[0].data_ptr()


def mode_products(G, Qs, back):
    """``G [*shape]`` times ``Q^T`` (``Q`` with ``back``) along every dim with a basis."""
    for k, Q in enumerate(Qs):
        if Q is not None:
            G = torch.movedim(torch.tensordot(G, Q if back else Q.T, dims=([k], [1])), -1, k)
    return G


# every pattern of rotated (<= 16) and unrotated dims, a middle dim, a lone rotated dim
@pytest.mark.parametrize("shape", [(7, 5), (20, 5), (5, 20), (4, 20, 3), (20, 4, 20), (3, 4, 5),
                                   (20, 3, 4), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtypes", [(F64, F64), (F32, F64)])
def test_rotate_in_and_back(shape, dtypes):
    params, bases = make([shape, shape, (6,)], dtype=dtypes[0], factor_dtype=dtypes[1])
    random_bases(bases)
    grads = [torch.randn(s, dtype=dtypes[0]) for s in (shape, shape, (6,))]
    begin(bases, grads)
    bases.rotate_in.run()
    for i in range(2):
        Qs = iter(bases.views(i)["Q"])
        full = [next(Qs) if 1 < n <= 16 else None for n in shape]
        expected = mode_products(grads[i].to(dtypes[1]), full, back=False)
        torch.testing.assert_close(bases.work_stacks[0][i], expected.to(dtypes[0]))
    bases.rotate_back.run()
    torch.testing.assert_close(bases.update_stacks[0], torch.stack(grads[:2]))


def test_factor_statistics_per_dim_and_decay():
    """``GG <- d GG + (1 - d) G_(k) G_(k)^T``, every dim (the middle one copied out), each
    param with its own decay (two runs of equal decays in one shape group)."""
    shapes = [(3, 4, 5)] * 3
    decays = [0.9, 0.9, 0.5]
    params, bases = make(shapes, decays=decays)
    grads = [[torch.randn(s, dtype=F64) for s in shapes] for _ in range(2)]
    for G in grads:
        begin(bases, G)
        bases.update_factors()
    for i, d in enumerate(decays):
        for k, GG in enumerate(bases.views(i)["GG"]):
            unfold = [G[i].movedim(k, 0).reshape(G[i].shape[k], -1) for G in grads]
            expected = (1 - d) * (d * unfold[0] @ unfold[0].T + unfold[1] @ unfold[1].T)
            torch.testing.assert_close(GG, expected)


def test_init_bases_descending_and_masked():
    params, bases = make([(7, 5), (7, 5)])
    G = torch.randn(7, 5, dtype=F64)
    begin(bases, [G, None])  # the second param has no gradient: left alone
    bases.update_factors()
    torch.testing.assert_close(bases.views(0)["GG"][0], 0.1 * G @ G.T)
    assert not bases.views(1)["GG"][0].any()
    bases.init_bases()
    GG, Q = bases.views(0)["GG"][1], bases.views(0)["Q"][1]
    d = torch.diagonal(Q.T @ GG @ Q)
    assert (d[:-1] >= d[1:]).all()
    assert torch.equal(bases.views(1)["Q"][1], torch.eye(5, dtype=F64))


def test_refresh_is_one_power_iteration_with_qr_and_moves_the_moments():
    params, bases = make([(6, 4)], decays=0.5)
    begin(bases, [torch.randn(6, 4, dtype=F64)])
    bases.update_factors()
    bases.init_bases()
    begin(bases, [torch.randn(6, 4, dtype=F64)])
    bases.update_factors()
    old = [Q.clone() for Q in bases.views(0)["Q"]]
    M, V = torch.randn(1, 6, 4, dtype=F64), torch.rand(1, 6, 4, dtype=F64)
    bases.exp_avg[0].copy_(M)
    bases.exp_avg_sq[0].copy_(V)
    bases.refresh()
    new = bases.views(0)["Q"]
    V_expected = V[0]
    for k, (GG, Q) in enumerate(zip(bases.views(0)["GG"], old)):
        P = GG @ Q
        order = torch.argsort((Q * P).sum(0), descending=True, stable=True)
        torch.testing.assert_close(new[k], torch.linalg.qr(P[:, order]).Q)
        V_expected = V_expected.index_select(k, order)
    torch.testing.assert_close(bases.exp_avg_sq[0][0], V_expected)
    original = old[0] @ M[0] @ old[1].T
    torch.testing.assert_close(bases.exp_avg[0][0], new[0].T @ original @ new[1])


@pytest.mark.parametrize("shape", [(20, 5), (4, 20, 3), (3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtypes", [(F64, F64), (F32, F64)])
def test_refresh_rotates_the_first_moments_into_the_new_bases(shape, dtypes):
    """``M`` (kept in the bases) is rotated out of the old ones and into the new ones along every
    rotated dim (a middle dim, an unrotated one, a cast to the factor dtype)."""
    params, bases = make([shape, (6,)], dtype=dtypes[0], factor_dtype=dtypes[1], decays=0.5)
    for _ in range(2):
        begin(bases, [torch.randn(s, dtype=dtypes[0]) for s in (shape, (6,))])
        bases.update_factors()
    bases.init_bases()
    old = [Q.clone() for Q in bases.views(0)["Q"]]
    M = torch.randn(shape, dtype=dtypes[0])
    bases.exp_avg[0][0].copy_(M)
    bases.refresh()
    new, rotated = iter(bases.views(0)["Q"]), [1 < n <= 16 for n in shape]
    new = [next(new) if r else None for r in rotated]
    old = iter(old)
    old = [next(old) if r else None for r in rotated]
    original = mode_products(M.to(dtypes[1]), old, back=True)
    torch.testing.assert_close(bases.exp_avg[0][0],
                               mode_products(original, new, back=False).to(dtypes[0]))


def test_refresh_leaves_masked_members_alone():
    params, bases = make([(6, 4), (6, 4)], decays=0.5)
    begin(bases, [torch.randn(6, 4, dtype=F64)] * 2)
    bases.update_factors()
    begin(bases, [torch.randn(6, 4, dtype=F64), None])
    bases.exp_avg[0].normal_()
    bases.exp_avg_sq[0].uniform_()
    before = ([t.clone() for t in bases.views(1)["Q"]] + [bases.exp_avg[0][1].clone(),
                                                          bases.exp_avg_sq[0][1].clone()])
    bases.refresh()
    after = list(bases.views(1)["Q"]) + [bases.exp_avg[0][1], bases.exp_avg_sq[0][1]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(bases.views(0)["Q"][0], torch.eye(6, dtype=F64))


def test_skipped_step_changes_nothing_bit_for_bit():
    """With the guard's flag False (a gradient holding a NaN) the Adam step, the statistics and
    a refresh leave params, moments, factors and bases as they were, -0.0 included."""
    params, bases = make([(6, 4), (3, 4, 5), (5,)])
    for i in range(2):
        begin(bases, [torch.randn_like(p) for p in params])
        bases.update_factors()
        bases.adam_step_(torch.tensor(i + 1), 1e-8, True, False)
        bases.init_bases() if i == 0 else bases.refresh()
    with torch.no_grad():
        params[2][0] = -0.0
    bases.exp_avg[0].view(-1)[0] = -0.0
    state = lambda: ([p.clone() for p in params] + [t.clone() for t in bases.exp_avg]  # noqa
                     + [t.clone() for t in bases.exp_avg_sq]
                     + [t.clone() for t in (*bases.factors.values(), *bases.bases.values())])
    before = state()
    grads = [torch.randn_like(p) for p in params]
    grads[1][0, 0, 0] = float("nan")
    begin(bases, grads, ok=False)
    bases.update_factors()
    bases.adam_step_(torch.tensor(2), 1e-8, True, False)
    bases.refresh()
    for a, b in zip(before, state()):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
