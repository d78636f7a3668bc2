"""The strong-Wolfe line search of soo_ext.optim.line_search (the one QuasiNewton runs for LBFGS
and BFGS), alone: cubic interpolation and the Wolfe conditions on a quadratic."""
import pytest

from soo_ext.optim.line_search import LinePoint, cubic_interpolate, strong_wolfe


def test_cubic_interpolate_finds_the_minimiser_of_a_cubic():
    def f(t):
        return t ** 3 - 3 * t  # minimum at t = 1
    t = cubic_interpolate(0.0, f(0.0), -3.0, 2.0, f(2.0), 9.0)
    assert t == pytest.approx(1.0)
    assert cubic_interpolate(0.0, f(0.0), -3.0, 2.0, f(2.0), 9.0, bounds=(1.5, 3.0)) == 1.5
    # No real minimiser: the midpoint of the bounds.
    assert cubic_interpolate(0.0, 0.0, 2.0, 1.0, 1.0, 2.0, bounds=(0.0, 4.0)) == 2.0


@pytest.mark.parametrize("t0", [1e-3, 1.0, 30.0])
def test_strong_wolfe_on_a_quadratic_meets_the_conditions(t0):
    def evaluate(t, keep):
        return LinePoint(t, (t - 2.0) ** 2, 2 * (t - 2.0))
    start = evaluate(0.0, ())
    point, evals = strong_wolfe(evaluate, start, t0, d_norm=1.0)
    assert evals >= 1
    assert point.f <= start.f + 1e-4 * point.t * start.gtd
    assert abs(point.gtd) <= 0.9 * abs(start.gtd)
