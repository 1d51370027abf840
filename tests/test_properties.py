"""Property-based tests: no solver ever returns a wrong trajectory marked successful.

Hypothesis draws random step maps (random MLP cells and linear maps with a `tanh`, in
contracting, neutral, expanding, saturating and chaotic regimes), initial states,
inputs and their scales; the shapes are fixed per test so that each solver is compiled
once per test and the examples only change the values. For every solver:

- a result marked successful is finite, satisfies the recurrence to a tolerance derived
  from the solver's `rtol`/`atol`, and matches `lax.scan` to that tolerance plus the
  rounding error that the dynamics amplify (by the condition number of the linearised
  recurrence, computed from the Jacobians along the trajectory); on chaotic or
  unstable maps, where no solver can match `lax.scan` to the tolerance, it must match
  to what its defects explain through the condition number;
- a result not marked successful is allowed, but it must be honest: `Sequential` says
  `nonfinite` exactly when `lax.scan` overflows, and a successful solve of a trajectory
  that `lax.scan` cannot represent is a bug;
- every iterative solver returns a finite iterate whatever the result (a non-finite
  update is never accepted), ELK and quasi-ELK in particular.

The examples are derandomised (CI is deterministic). `PDYN_PROPERTY_EXAMPLES=<n>` sets
the number of examples per test (default below); the larger sweeps are marked `slow`.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest
from hypothesis import given, HealthCheck, settings, strategies as st
from jax.flatten_util import ravel_pytree

import parallel_dynamics as pdyn

from .helpers import scan_reference


EXAMPLES = int(os.environ.get("PDYN_PROPERTY_EXAMPLES", "6"))

_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int):
    return settings(max_examples=n, **_SETTINGS)


# --- random step maps -----------------------------------------------------------------
#
# One step function for every map: the state PyTree is flattened to a vector v and
#
#     v_t = leak * v_{t-1} + W2 tanh(W1 v_{t-1} + U x_t + b),
#
# so the regimes differ only in the values of the parameters (and the compiled solves
# are reused across examples). A tanh RNN is W2 = I; an MLP cell has a random W2.


def cell(state, x, params):
    flat, unravel = ravel_pytree(state)
    pre = params["w1"] @ flat + params["b"]
    if x is not None:
        pre = pre + params["u"] @ ravel_pytree(x)[0].astype(flat.dtype)
    new = params["leak"] * flat + params["w2"] @ jnp.tanh(pre)
    return unravel(new)


def constant_diagonal(state, x, params):
    """A crude user diagonal (`QuasiDEER(diagonal=callable)`): the leak alone."""
    del x
    return jtu.tree_map(lambda leaf: jnp.full_like(leaf, params["leak"]), state)


REGIMES = ("contracting", "neutral", "expanding", "saturating", "chaotic", "exploding")


@dataclasses.dataclass(frozen=True)
class Draw:
    """The values hypothesis draws for one problem; the arrays come from `seed`."""

    regime: str
    seed: int
    mlp: bool
    leak: float
    gain: float
    input_scale: float
    y0_scale: float


@st.composite
def draws(draw, regimes=REGIMES):
    regime = draw(st.sampled_from(regimes))
    unit = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)
    # Where within its regime's range each parameter lies.
    a, g = draw(unit), draw(unit)
    leak, gain, mlp = {
        "contracting": (0.6 * a, 0.4 * g, draw(st.booleans())),
        "neutral": (1.0, 0.3 * g, draw(st.booleans())),
        "expanding": (1.02 + 0.5 * a, 0.5 * g, draw(st.booleans())),
        "saturating": (0.0, 1.5 + 3.5 * g, False),
        "chaotic": (0.0, 2.0 + 3.0 * g, False),
        # Grows like leak^t: beyond float32's range within 32 steps.
        "exploding": (20.0 + 40.0 * a, 0.3 * g, draw(st.booleans())),
    }[regime]
    return Draw(
        regime=regime,
        seed=draw(st.integers(0, 2**32 - 1)),
        mlp=mlp,
        leak=leak,
        gain=gain,
        input_scale=draw(st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.0])),
        y0_scale=draw(st.sampled_from([0.0, 0.1, 1.0, 3.0])),
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """A fixed state structure and input structure (shapes only)."""

    state: object  # PyTree of `Leaf`s
    inputs: object  # PyTree of `Leaf`s (the shapes of one step), or None


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array: its shape, and its dtype (`None`: the test's dtype)."""

    shape: tuple[int, ...]
    dtype: str | None = None


LAYOUTS = {
    "vector": Layout(state=Leaf((4,)), inputs=Leaf((2,))),
    "nested": Layout(
        state={"a": (Leaf((2,)), Leaf((1, 2))), "b": Leaf(())},
        inputs={"u": Leaf(()), "v": Leaf((3,))},
    ),
    "nested_no_inputs": Layout(state=(Leaf((3,)), {"c": Leaf((2, 1))}), inputs=None),
    # Leaves of two dtypes: the flat layout works in float64 and casts back.
    "mixed_dtypes": Layout(
        state=(Leaf((2,), "float32"), {"k": Leaf((2,), "float64")}),
        inputs=Leaf((1,)),
    ),
}


def build(d: Draw, layout: Layout, dtype, length: int):
    """The problem `(y0, inputs, params)` of a draw, for a layout, dtype and length."""
    rng = np.random.default_rng(d.seed)

    def leaf(spec: Leaf, scale, lead=()):
        dt = np.dtype(spec.dtype or dtype)
        return jnp.asarray((scale * rng.standard_normal(lead + spec.shape)).astype(dt))

    y0 = jtu.tree_map(lambda s: leaf(s, d.y0_scale), layout.state)
    flat_dtype = ravel_pytree(y0)[0].dtype
    size = ravel_pytree(y0)[0].size
    if layout.inputs is None:
        inputs, features = None, 1
    else:
        inputs = jtu.tree_map(
            lambda s: leaf(s, d.input_scale, (length,)), layout.inputs
        )
        features = ravel_pytree(jtu.tree_map(lambda x: x[0], inputs))[0].size
    normal = lambda *shape: rng.standard_normal(shape)
    if d.regime == "saturating":
        w1 = d.gain * np.eye(size) * rng.uniform(0.7, 1.0, size)
    else:
        w1 = d.gain * normal(size, size) / np.sqrt(size)
    w2 = normal(size, size) / np.sqrt(size) if d.mlp else np.eye(size)
    params = {
        "w1": w1,
        "w2": w2,
        "u": normal(size, features),
        "b": 0.1 * normal(size),
        "leak": np.asarray(d.leak),
    }
    params = {k: jnp.asarray(v.astype(flat_dtype)) for k, v in params.items()}
    return y0, inputs, params


# --- the reference and the checks -----------------------------------------------------


@functools.partial(jax.jit, static_argnums=(3,))
def _reference(y0, inputs, params, length):
    return scan_reference(cell, y0, inputs, params, length=length)


@jax.jit
def _defects(trajectory, y0, inputs, params):
    """$|y_t - f(y_{t-1}, x_t)|$ and the Jacobians $J_t$, flat."""
    flat = jax.vmap(lambda y: ravel_pytree(y)[0])(trajectory)
    flat0, unravel = ravel_pytree(y0)
    previous = jnp.concatenate([flat0[None], flat[:-1]])

    def flat_step(v, x):
        return ravel_pytree(cell(unravel(v), x, params))[0]

    if inputs is None:
        values = jax.vmap(lambda v: flat_step(v, None))(previous)
        jacobians = jax.vmap(jax.jacfwd(lambda v: flat_step(v, None)))(previous)
    else:
        values = jax.vmap(flat_step)(previous, inputs)
        jacobians = jax.vmap(jax.jacfwd(flat_step))(previous, inputs)
    return flat, flat - values, jacobians


def sensitivity(jacobians: np.ndarray) -> tuple[float, float]:
    """How the linearised recurrence amplifies perturbations, computed exactly: the
    condition number of its block bidiagonal operator L, ||L^-1||_inf =
    max_t sum_{s<=t} ||J_t ... J_{s+1}||_inf (the forward error per unit defect), and
    the growth max_{s<=t} ||J_t ... J_{s+1}||_inf (large for unstable and chaotic
    maps)."""
    jacobians = np.asarray(jacobians, np.float64)
    length, size, _ = jacobians.shape
    cond = growth = 1.0
    # propagators[s] = J_t ... J_{s+1} for the current t.
    propagators = np.zeros((0, size, size))
    with np.errstate(all="ignore"):
        for t in range(length):
            propagators = np.concatenate(
                [jacobians[t] @ propagators, np.eye(size)[None]]
            )
            rows = np.abs(propagators).sum(axis=2)  # (s, i)
            cond = max(cond, float(np.max(rows.sum(axis=0))))
            growth = max(growth, float(np.max(rows)))
            if not np.isfinite(cond):
                return np.inf, np.inf
    return cond, growth


def tolerances(solver, dtype):
    rtol = getattr(solver, "rtol", None)
    atol = getattr(solver, "atol", None)
    default = float(np.finfo(dtype).eps ** 0.7)
    return (default if rtol is None else rtol), (default if atol is None else atol)


# How far beyond its tolerance a successful solve may be: the stopping tests estimate
# the error left after the last update, they do not bound it.
SLACK = 10.0
# How many roundings of the largest state the dynamics may amplify, beyond the
# condition number (each step rounds the step's output, and the solvers' scans).
ROUNDING = 50.0
# Maps that amplify some perturbation more than this are treated as chaotic (or
# unstable): a trajectory is then only expected to match `lax.scan` to within what
# its defects explain through the condition number.
CHAOTIC_GROWTH = 100.0


def check_honest(solver, sol, y0, inputs, params, length):
    """The properties of the module docstring, for one solve."""
    value = sol.value
    result = sol.result
    leaves = jtu.tree_leaves(value)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    # Structure, shapes and dtypes of the state, with a leading time axis.
    expected_struct = jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct((length,) + x.shape, x.dtype), y0
    )
    assert jtu.tree_structure(value) == jtu.tree_structure(expected_struct)
    for leaf, ref in zip(leaves, jtu.tree_leaves(expected_struct)):
        assert (leaf.shape, leaf.dtype) == (ref.shape, ref.dtype)
    num_steps = int(sol.stats["num_steps"])
    assert 1 <= num_steps <= int(sol.stats["max_steps"])

    if not isinstance(solver, pdyn.Sequential):
        # A non-finite update is never accepted: the iterate stays finite (ELK and
        # quasi-ELK by construction, the Newton-type solvers by keeping the last one).
        assert finite, f"{type(solver).__name__} returned a non-finite iterate"

    reference = _reference(y0, inputs, params, length)
    reference_finite = all(
        bool(jnp.all(jnp.isfinite(x))) for x in jtu.tree_leaves(reference)
    )
    if isinstance(solver, pdyn.Sequential):
        expected = (
            optx.RESULTS.successful if reference_finite else optx.RESULTS.nonfinite
        )
        assert result == expected
    if result != optx.RESULTS.successful:
        return
    assert finite, "a successful solve returned non-finite values"
    assert reference_finite, "successful, but lax.scan overflows on this problem"

    flat_dtype = ravel_pytree(y0)[0].dtype
    rtol, atol = tolerances(solver, flat_dtype)
    eps = float(np.finfo(flat_dtype).eps)
    flat, defects, jacobians = _defects(value, y0, inputs, params)
    flat, defects = np.asarray(flat, np.float64), np.asarray(defects, np.float64)
    ref_flat = np.asarray(jax.vmap(lambda y: ravel_pytree(y)[0])(reference), np.float64)
    jacobians = np.asarray(jacobians, np.float64)
    scale = atol + rtol * np.abs(flat)
    # 1. The recurrence holds to the tolerance: each defect is what is left of the last
    # update after one step's Jacobian acts on it, plus one rounding of the step.
    norms = 1 + np.abs(jacobians).sum(axis=2)
    defect_bound = SLACK * scale * norms + ROUNDING * eps * (1 + np.abs(flat))
    # 2. The trajectory matches lax.scan to the tolerance plus the rounding errors
    # amplified by the dynamics (both trajectories carry them); on a chaotic map, to
    # what its defects explain through the condition number.
    cond, growth = sensitivity(jacobians)
    magnitude = 1 + np.max(np.abs(ref_flat))
    error_bound = SLACK * (atol + rtol * np.abs(ref_flat)) + ROUNDING * cond * eps * (
        magnitude
    )
    if growth > CHAOTIC_GROWTH:
        error_bound = error_bound + 2 * cond * np.max(np.abs(defects))
    defect_ratio = float(np.max(np.abs(defects) / defect_bound))
    error_ratio = float(np.max(np.abs(flat - ref_flat) / error_bound))
    assert defect_ratio <= 1, (
        f"successful, but the recurrence is violated by {defect_ratio:.3g} x its bound"
    )
    assert error_ratio <= 1, (
        f"successful, but differs from lax.scan by {error_ratio:.3g} x its bound "
        f"(condition number {cond:.3g}, growth {growth:.3g})"
    )


# --- the solvers ----------------------------------------------------------------------


def _solvers():
    return {
        "deer": pdyn.DEER(),
        "quasi_deer": pdyn.QuasiDEER(),
        "quasi_deer_stochastic": pdyn.QuasiDEER(
            diagonal="stochastic", num_probes=2, key=jr.key(7)
        ),
        "quasi_deer_callable": pdyn.QuasiDEER(diagonal=constant_diagonal),
        "block_quasi_deer": pdyn.BlockQuasiDEER(2),
        "elk": pdyn.ELK(),
        "quasi_elk": pdyn.QuasiELK(),
        "picard": pdyn.Picard(),
        "jacobi": pdyn.Jacobi(),
        "sequential": pdyn.Sequential(),
    }


SOLVERS = _solvers()
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def run(solver, d: Draw, layout: Layout, dtype, length: int):
    y0, inputs, params = build(d, layout, dtype, length)
    sol = pdyn.solve(cell, solver, y0, inputs, params, length=length, throw=False)
    check_honest(solver, sol, y0, inputs, params, length)
    return sol


# --- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_is_honest(name, dtype):
    """A vector state with inputs, T = 32: every regime, every solver, both dtypes."""

    @examples(EXAMPLES)
    @given(d=draws())
    def prop(d):
        run(SOLVERS[name], d, LAYOUTS["vector"], DTYPES[dtype], 32)

    prop()


@pytest.mark.parametrize(
    "layout, name",
    [
        ("nested", "deer"),
        ("nested", "quasi_elk"),
        ("nested_no_inputs", "quasi_deer_stochastic"),
        ("nested_no_inputs", "picard"),
        ("mixed_dtypes", "jacobi"),
        ("mixed_dtypes", "elk"),
    ],
)
def test_pytree_states(layout, name):
    """Nested tuples and dicts of arrays of different shapes (and dtypes), with and
    without inputs, T = 24, float64."""

    @examples(EXAMPLES)
    @given(d=draws())
    def prop(d):
        run(SOLVERS[name], d, LAYOUTS[layout], jnp.float64, 24)

    prop()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_length_one(name):
    """T = 1: one step, which every solver takes exactly."""

    @examples(max(EXAMPLES // 2, 1))
    @given(d=draws())
    def prop(d):
        sol = run(SOLVERS[name], d, LAYOUTS["vector"], jnp.float32, 1)
        if jnp.all(
            jnp.isfinite(_reference(*build(d, LAYOUTS["vector"], jnp.float32, 1), 1))
        ):
            assert sol.result == optx.RESULTS.successful

    prop()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("length", [1000, 3000])
@pytest.mark.parametrize(
    "name", ["deer", "quasi_deer", "quasi_elk", "elk", "picard", "jacobi"]
)
def test_long_sequences(name, length, dtype):
    """Long trajectories, more examples."""

    @examples(2 * EXAMPLES)
    @given(d=draws())
    def prop(d):
        run(SOLVERS[name], d, LAYOUTS["vector"], DTYPES[dtype], length)

    prop()


# --- determinism --------------------------------------------------------------------


def _bits(sol):
    return [np.asarray(x).tobytes() for x in jtu.tree_leaves((sol.value, sol.stats))]


@pytest.mark.parametrize(
    "name, recompile",
    [
        ("deer", False),
        ("elk", False),
        ("quasi_deer_stochastic", False),
        ("quasi_deer_stochastic", True),
    ],
)
def test_reruns_are_bit_identical(name, recompile):
    """The same inputs give bit-identical trajectories, results and statistics on a
    second run, also after recompiling (the stochastic diagonal with the same key
    included)."""
    d = Draw("chaotic", 5, False, 0.0, 2.5, 1.0, 1.0)  # many iterations
    y0, inputs, params = build(d, LAYOUTS["vector"], jnp.float32, 32)

    def solve():
        return pdyn.solve(cell, SOLVERS[name], y0, inputs, params, throw=False)

    first = solve()
    if recompile:
        jax.clear_caches()
    second = solve()
    assert _bits(second) == _bits(first)
    assert bool(second.result == first.result)


# --- minimal cases of the properties above, fixed draws ------------------------------


def _tanh_map(y, x, gain):
    return jnp.tanh(gain * y + x)


def test_jacobi_does_not_stop_early_on_a_scalar_tanh_rnn():
    xs = jnp.asarray(np.random.default_rng(14).standard_normal((64, 1)))
    y0, gain = jnp.zeros(1), jnp.asarray(2.0)
    sol = pdyn.solve(_tanh_map, pdyn.Jacobi(), y0, xs, gain, throw=False)
    expected = scan_reference(_tanh_map, y0, xs, gain)
    assert sol.result == optx.RESULTS.successful
    assert int(sol.stats["num_steps"]) < 64  # stopped by its error estimate
    tol = np.finfo(np.float64).eps ** 0.7
    error = np.max(np.abs(sol.value - expected) / (tol * (1 + np.abs(expected))))
    assert error <= 10, f"error {error:.3g} x the tolerance"


def test_picard_exhausting_its_iterations_is_verified():
    """Picard on a contracting map in float32 blows its iterates up to ~1e15 before
    the converged prefix reaches the end; after T iterations (exact in exact
    arithmetic) the last states carry rounding errors of ~1e-3. `solve` verifies such
    trajectories and reports `nonlinear_divergence`, not success."""
    d = Draw("contracting", 1, False, 0.0, 0.4, 0.0, 0.0)
    y0, inputs, params = build(d, LAYOUTS["vector"], jnp.float32, 64)
    sol = pdyn.solve(cell, pdyn.Picard(), y0, inputs, params, throw=False)
    assert int(sol.stats["num_steps"]) == 64
    assert sol.result == optx.RESULTS.nonlinear_divergence
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    with pytest.raises(Exception, match="used all T iterations.*pdyn.DEER"):
        pdyn.solve(cell, pdyn.Picard(), y0, inputs, params)
    # DEER converges on the same problem.
    sol = pdyn.solve(cell, pdyn.DEER(), y0, inputs, params, throw=False)
    assert sol.result == optx.RESULTS.successful
