"""SOAPBases alone: the layout (merged shapes, rotated dims, buckets), the rotations, the
initial eigenbases and the power-iteration + QR refresh with its moment bookkeeping."""
import pytest
import torch

from soo_ext.curvature.soap_bases import SOAPBases, soap_shape

F64 = torch.float64


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


def scales(decay):
    return {key: (1 - d).sqrt() for key, d in decay.items()}


def make(shapes, max_dim=16, p1d=False):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=F64) for s in shapes]
    return params, SOAPBases([params], max_dim, False, p1d, F64)


def test_buckets_batch_equal_sizes_and_views_share_storage():
    params, bases = make([(7, 5), (7, 5), (5, 20), (3,)])
    assert bases.buckets.counts == {7: 2, 5: 3}  # (7, 5) twice; the 5 of (5, 20)
    assert [sg.shape for sg in bases.shape_groups] == [(7, 5), (5, 20), (3,)]
    views = bases.views(2)
    assert len(views["GG"]) == len(views["Q"]) == 1 and views["Q"][0].shape == (5, 5)
    views["exp_avg"].fill_(3.0)
    assert (bases.exp_avg[1] == 3.0).all()
    assert bases.views(3)["GG"] == []


def test_rotate_and_back_is_the_identity():
    params, bases = make([(7, 5), (7, 5)])
    for key, Q in bases.bases.items():
        Q.copy_(torch.linalg.qr(torch.randn_like(Q)).Q)
    G = torch.randn(2, 7, 5, dtype=F64)
    R = bases.rotate(G, 0)
    Q0, Q1 = bases.views(0)["Q"]
    torch.testing.assert_close(R[0], Q0.T @ G[0] @ Q1)
    torch.testing.assert_close(bases.rotate(R, 0, back=True), G)


def test_init_bases_descending_and_masked():
    params, bases = make([(7, 5), (7, 5)])
    G = torch.randn(2, 7, 5, dtype=F64)
    decay = {key: torch.full((B,), 0.9, dtype=F64) for key, B in bases.buckets.counts.items()}
    bases.update_factors([G], decay, scales(decay))
    torch.testing.assert_close(bases.views(0)["GG"][0], 0.1 * G[0] @ G[0].T)
    take = {key: torch.tensor([True, False]) for key in bases.buckets.counts}
    bases.init_bases(take)
    GG, Q = bases.views(0)["GG"][1], bases.views(0)["Q"][1]
    d = torch.diagonal(Q.T @ GG @ Q)
    assert (d[:-1] >= d[1:]).all()
    assert torch.equal(bases.views(1)["Q"][1], torch.eye(5, dtype=F64))


def test_refresh_is_one_power_iteration_with_qr_and_moves_the_moments():
    params, bases = make([(6, 4)])
    G = torch.randn(1, 6, 4, dtype=F64)
    decay = {key: torch.full((1,), 0.5, dtype=F64) for key in bases.buckets.counts}
    bases.update_factors([G], decay, scales(decay))
    bases.init_bases({key: torch.tensor([True]) for key in decay})
    bases.update_factors([torch.randn(1, 6, 4, dtype=F64)], decay, scales(decay))
    old = [Q.clone() for Q in bases.views(0)["Q"]]
    M, V = torch.randn(1, 6, 4, dtype=F64), torch.rand(1, 6, 4, dtype=F64)
    bases.exp_avg[0].copy_(M)
    bases.exp_avg_sq[0].copy_(V)
    bases.refresh({key: torch.tensor([True]) for key in decay}, [torch.tensor([True])])
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


def test_refresh_leaves_masked_members_alone():
    params, bases = make([(6, 4), (6, 4)])
    decay = {key: torch.full((2,), 0.5, dtype=F64) for key in bases.buckets.counts}
    bases.update_factors([torch.randn(2, 6, 4, dtype=F64)], decay, scales(decay))
    bases.exp_avg[0].normal_()
    before = [t.clone() for t in bases.views(1)["Q"]] + [bases.exp_avg[0][1].clone()]
    take = {key: torch.tensor([True, False]) for key in decay}
    bases.refresh(take, [torch.tensor([True, False])])
    after = list(bases.views(1)["Q"]) + [bases.exp_avg[0][1]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(bases.views(0)["Q"][0], torch.eye(6, dtype=F64))
