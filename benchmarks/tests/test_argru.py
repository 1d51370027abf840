"""The trained AR-GRU case (shared/cases/argru_sine_L10000.npz) as a step map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.argru import (
    argru_step,
    default_case_path,
    load_argru_case,
    mad_x,
    sequential_rollout,
)


if not default_case_path().is_file():
    pytest.skip(
        f"AR-GRU case file not found at {default_case_path()} "
        "(set PDYN_CASES_DIR to the folder holding argru_sine_L10000.npz)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"seed{s}")
def case(request):
    return load_argru_case(seed=request.param)


def test_shapes_and_dtypes(case):
    assert case.s0.shape == (4,)
    assert case.drivers.shape == (9999,)
    assert case.reference.shape == (9999, 4)
    assert case.noise0.shape == ()
    for leaf in jax.tree_util.tree_leaves(case):
        assert leaf.dtype == jnp.float32
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(case.params)) == 56


def test_sequential_rollout_reproduces_reference(case):
    traj = sequential_rollout(case.params, case.s0, case.drivers)
    assert traj.dtype == jnp.float32
    assert traj.shape == case.reference.shape
    # Close to neutral dynamics amplify one-ulp differences to ~1e-4 over 9999 steps
    # (see the README); on CPU this implementation is in fact bit-identical.
    err = np.max(np.abs(np.asarray(traj) - np.asarray(case.reference)))
    assert err <= 1e-4
    assert float(mad_x(traj, case.reference, case.s0[0])) <= 1e-5


def test_initial_state_is_step_from_zero(case):
    s0 = argru_step(jnp.zeros(4, jnp.float32), case.noise0, case.params)
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(case.s0))


def test_single_steps_on_reference_states(case):
    prev = jnp.concatenate([case.s0[None], case.reference[:-1]], axis=0)
    steps = jax.jit(jax.vmap(argru_step, in_axes=(0, 0, None)))
    out = steps(prev, case.drivers, case.params)
    # |x| reaches ~14, where 2e-6 is two float32 ulps; allow one more ulp relative.
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(case.reference), rtol=1e-7, atol=2e-6
    )


def test_mad_x():
    ref = jnp.stack([jnp.arange(4.0), jnp.zeros(4)], axis=1)
    traj = ref.at[:, 0].add(jnp.array([1.0, -1.0, 0.0, 3.0]))
    # L = T + 1 = 5 outputs; x_1 is shared and contributes 0.
    assert float(mad_x(traj, ref, 7.0)) == pytest.approx(5.0 / 5)
    assert float(mad_x(traj[:, 0], ref[:, 0], 7.0)) == pytest.approx(1.0)


def test_env_var_overrides_case_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PDYN_CASES_DIR", str(tmp_path))
    assert default_case_path() == tmp_path / "argru_sine_L10000.npz"
    with pytest.raises(FileNotFoundError, match="PDYN_CASES_DIR"):
        load_argru_case()
