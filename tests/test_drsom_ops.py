"""The DRSOM vector ops (soo::drsom_perturb, drsom_reduce, drsom_update) against fp64 oracles."""
import pytest
import torch

from soo_ext import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return (out - ref).norm().item() / (den.item() if den > 0 else 1.0)


def naive_inputs(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, dtype=torch.float64, generator=gen)  # noqa: E731
    return r(), r(), [r() for _ in range(k)]


@pytest.mark.parametrize("n,k", [(0, 1), (1, 2), (17, 3), (1001, 5)])
def test_reference_drsom_against_naive_loops(n, k):
    gp, g, V = naive_inputs(n, k)
    t = torch.tensor(1e-3, dtype=torch.float64)
    q, G, c = reference.drsom_reduce(gp, g, V, t, True)
    for j in range(k):
        assert abs(q[j].item() - sum((gp[i] - g[i]).item() * V[j][i].item() for i in range(n)) / 1e-3) \
            <= 1e-9 * (1 + abs(q[j].item()))
        assert abs(c[j].item() - sum(g[i].item() * V[j][i].item() for i in range(n))) <= 1e-9 * (1 + n)
        for i2 in range(k):
            ref = sum(V[i2][i].item() * V[j][i].item() for i in range(n))
            assert abs(G[i2, j].item() - ref) <= 1e-9 * (1 + n)
    q2, G2, c2 = reference.drsom_reduce(gp, g, V, t, False)
    assert torch.equal(q2, q) and G2.shape == (0, 0) and c2.shape == (0,)

    x = gp.clone()
    x0 = torch.empty_like(x)
    reference.drsom_perturb(x, x0, V[0], t, True)
    assert torch.equal(x0, gp)
    assert torch.allclose(x, gp + 1e-3 * V[0], rtol=0, atol=1e-15)
    reference.drsom_perturb(x, x0, V[0], torch.tensor(0.0, dtype=torch.float64), False)
    assert torch.equal(x, gp)

    alpha = torch.arange(1.0, k + 1, dtype=torch.float64)
    x = g.clone()
    p = V[-1]
    V_copy = [v.clone() for v in V]
    reference.drsom_update(x, p, V, alpha)  # p aliases V[-1]
    step = [sum(alpha[j].item() * V_copy[j][i].item() for j in range(k)) for i in range(n)]
    assert torch.allclose(p, torch.tensor(step, dtype=torch.float64).reshape(n), atol=1e-12)
    assert torch.allclose(x, g + p, atol=1e-12)
