"""Adversarial checks of the Levenberg–Marquardt (ELK, quasi-ELK) solvers against
`lax.scan`: edge-case tolerances and states, honest failure codes."""

import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn

from .helpers import scan_reference


def _expanding_with_zero_component(y, x, args):
    # Component 0 expands by 3 per step around the initial guess y = 0 (it settles
    # near a fixed point); component 1 stays exactly zero along the whole trajectory.
    del args
    return jnp.stack([jnp.tanh(3.0 * y[0]) + x[0], 0.5 * y[1]])


@pytest.mark.parametrize("solver", [pdyn.ELK, pdyn.QuasiELK], ids=["elk", "quasi_elk"])
def test_zero_atol_with_a_component_that_stays_zero(solver):
    # With atol = 0 the defect of a component with y_t = 0 and a zero residual is
    # 0 / 0. It used to be NaN, which made the maximum over the row NaN, and a NaN
    # row counted as converged: every row did, so the solver stopped after a few
    # damped steps with defects of order 1e-2 and reported success.
    T = 40
    inputs = jnp.full((T, 1), 0.01)
    y0 = jnp.zeros(2)
    expected = scan_reference(_expanding_with_zero_component, y0, inputs, None)
    sol = pdyn.solve(
        _expanding_with_zero_component,
        solver(rtol=1e-8, atol=0.0),
        y0,
        inputs,
        throw=False,
    )
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, expected, rtol=1e-7, atol=0)
    assert int(sol.stats["num_steps"]) <= sol.stats["max_steps"]
