"""EKFAC's factors alone (EigenCorrectedFactors in kfac_factors): the scaling from held rows
against dense fp64 per-sample formulas, its running average and skipped steps, and the
preconditioning, which is K-FAC's eigen mode when the scaling is d_G d_A^T."""
import torch
from torch import nn

from soo_ext.curvature.kfac_factors import EigenCorrectedFactors, EigenFactors, KFACLayout
from soo_ext.curvature.kfac_layers import find_layers

F64 = torch.float64
DAMPING = 1e-2


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                         nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(F64)


def staged(cls, rows_per_sample=1, seed=0, make=model):
    """Factors of ``make()``'s layers with two passes staged per layer (2 then 3 samples of
    ``rows_per_sample`` rows each, G's rows weighing 4: a batch-averaged loss over 2
    samples), committed once and decomposed; and the rows by layer name."""
    net = make()
    layers = find_layers(net, {id(p): 0 for p in net.parameters()}, ())
    factors = cls(KFACLayout(layers), F64, torch.device("cpu"), DAMPING)
    gen = torch.Generator().manual_seed(seed)
    rows, R = {}, rows_per_sample
    for l in layers:
        a = torch.randn(5 * R, l.a_dim, generator=gen, dtype=F64)
        g = torch.randn(5 * R, l.out, generator=gen, dtype=F64)
        factors.stage(l, a[:2 * R], g[:2 * R], 0.0, 1 / (2 * R), 4.0, 2)
        factors.stage(l, a[2 * R:], g[2 * R:], 2 / 5, 1 / (5 * R), 4.0, 3)
        l.captures = 2
        rows[l.name] = (a, g)
    factors.staged_statistics(None)
    factors.commit(0.5, None)
    factors.refresh(DAMPING, None)
    return layers, factors, rows


def dense_scale(a, g, QA, QG, rows_per_sample, g_scale=4.0):
    """``mean_n ((Q_G^T grad_n Q_A) ** 2)``, ``grad_n = sqrt(g_scale) sum_t g_nt a_nt^T``."""
    R = rows_per_sample
    grads = [g_scale ** 0.5 * g[n * R:(n + 1) * R].T @ a[n * R:(n + 1) * R]
             for n in range(a.shape[0] // R)]
    return torch.stack([(QG.T @ gn @ QA) ** 2 for gn in grads]).mean(0)


def widening():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)


def test_scale_is_the_mean_squared_projected_per_sample_gradient():
    # R rows a sample: a Linear's one; a conv's positions, summed before squaring.  Each basis
    # goes on the rows or on the per-sample gradients (out < R: Q_A on the gradients,
    # a_dim < R: Q_G): ``widening``'s layers (a_dim, out) = (3, 6), (7, 2) take every
    # combination over R = 2, 4, 7
    for make, Rs in ((model, (1, 3, 5)), (widening, (1, 2, 4, 7))):
        for R in Rs:
            layers, factors, rows = staged(EigenCorrectedFactors, R, make=make)
            factors.update_scale(0.0, None)
            for l in layers:
                v = factors.views(l)
                want = dense_scale(*rows[l.name], v["QA"], v["QG"], R)
                torch.testing.assert_close(v["scale"], want, rtol=1e-12, atol=1e-14)


def test_scale_running_average_and_skipped_step():
    layers, factors, rows = staged(EigenCorrectedFactors)
    # ones carried into the first bases: ones up to rounding (rows of (Q^T I) o (Q^T I) sum to 1)
    start = [factors.views(l)["scale"].clone() for l in layers]
    for s0 in start:
        torch.testing.assert_close(s0, torch.ones_like(s0), rtol=0, atol=1e-14)
    factors.update_scale(0.9, torch.tensor(False))  # skipped: nothing changes
    for l, s0 in zip(layers, start):
        assert torch.equal(factors.views(l)["scale"], s0)
    factors.update_scale(0.9, torch.tensor(True))
    for l, s0 in zip(layers, start):
        v = factors.views(l)
        want = 0.9 * s0 + 0.1 * dense_scale(*rows[l.name], v["QA"], v["QG"], 1)
        torch.testing.assert_close(v["scale"], want, rtol=1e-12, atol=1e-14)
    factors.reset_staged()  # the held rows are dropped with the staged statistics
    before = [factors.views(l)["scale"].clone() for l in layers]
    factors.update_scale(0.0, None)
    assert all(torch.equal(factors.views(l)["scale"], b) for l, b in zip(layers, before))


def test_only_captured_layers_update_their_scale():
    layers, factors, _ = staged(EigenCorrectedFactors)
    group = factors.groups[1]  # three layers of one shape
    del factors.held[group.layers[0]]  # the first was not captured at this step
    start = [factors.views(l)["scale"].clone() for l in group.layers[:2]]
    factors.update_scale(0.0, None)
    assert torch.equal(factors.views(group.layers[0])["scale"], start[0])
    assert not torch.equal(factors.views(group.layers[1])["scale"], start[1])


def test_precondition_with_kfac_scaling_is_kfac_eigen_mode():
    """``S = d_G d_A^T`` (K-FAC's special case): EigenFactors' preconditioning, all layers of a
    shape group or a subset."""
    _, ekfac, _ = staged(EigenCorrectedFactors)
    _, kfac, _ = staged(EigenFactors)
    for group, kgroup in zip(ekfac.groups, kfac.groups):
        for l in group.layers:
            v = ekfac.views(l)
            v["scale"].copy_(v["dG"][:, None] * v["dA"][None, :])
        gen = torch.Generator().manual_seed(1)
        grad = torch.randn(group.grad.shape, generator=gen, dtype=F64)
        group.grad.copy_(grad)
        kgroup.grad.copy_(grad)
        for members in (group.layers, group.layers[1:]):
            V, g = ekfac.precondition(group, members, DAMPING)
            kmembers = [kgroup.layers[l.row] for l in members]
            W, h = kfac.precondition(kgroup, kmembers, DAMPING)
            torch.testing.assert_close(V, W, rtol=1e-10, atol=1e-13)
            assert torch.equal(g, h)
