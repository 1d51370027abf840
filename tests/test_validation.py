"""Wrong arguments raise at trace time with a `TypeError` or `ValueError` naming the
argument; the edge cases that are valid work. The docs' "Failure modes" page lists
this matrix."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import parallel_dynamics as pdyn


def step(y, x, args):
    return jnp.tanh(0.5 * y + x)


XS = jnp.ones((10, 3))
Y0 = jnp.zeros(3)


def call(**kwargs):
    arguments = dict(step=step, solver=pdyn.DEER(), y0=Y0, inputs=XS)
    arguments.update(kwargs)
    positional = [arguments.pop(k) for k in ("step", "solver", "y0", "inputs")]
    return pdyn.solve(*positional, **arguments)


# Every row: the changed arguments, the error, and a pattern its message must match
# (which names the argument).
MATRIX = {
    # --- y0 ---
    "y0 integer": (dict(y0=jnp.zeros(3, jnp.int32)), TypeError, r"`y0`.*floating"),
    "y0 boolean": (dict(y0=jnp.zeros(3, bool)), TypeError, r"`y0`.*floating"),
    "y0 integer leaf in a dict": (
        dict(y0={"a": Y0, "b": jnp.zeros(2, jnp.int64)}),
        TypeError,
        r"`y0`.*\['b'\].*int64",
    ),
    "y0 Python float leaf": (dict(y0=(Y0, 1.0)), TypeError, r"`y0`.*\[1\].*float"),
    "y0 string leaf": (dict(y0={"s": "state"}), TypeError, r"`y0`.*str"),
    "y0 complex": (dict(y0=jnp.zeros(3, jnp.complex64)), TypeError, "Complex.*`y0`"),
    "y0 float16": (dict(y0=jnp.zeros(3, jnp.float16)), TypeError, "Half.*`y0`"),
    "y0 bfloat16": (dict(y0=jnp.zeros(3, jnp.bfloat16)), TypeError, "Half.*`y0`"),
    "y0 empty": (dict(y0=()), ValueError, "`y0`"),
    # --- step ---
    "step not callable": (dict(step=3), TypeError, "`step` must be callable"),
    "step returns a tuple": (
        dict(step=lambda y, x, a: (y, y)),
        ValueError,
        "`step`.*structure",
    ),
    "step returns a dict": (
        dict(step=lambda y, x, a: {"y": y}),
        ValueError,
        "`step`.*structure",
    ),
    "step returns None": (dict(step=lambda y, x, a: None), ValueError, "`step`"),
    "step returns another shape": (
        dict(step=lambda y, x, a: jnp.concatenate([y, y])),
        ValueError,
        r"`step`.*shapes.*float64\[6\].*float64\[3\]",
    ),
    "step returns a broadcast shape": (
        dict(step=lambda y, x, a: y + jnp.zeros((2, 3))),
        ValueError,
        "`step`.*shapes",
    ),
    "step returns float32 for float64": (
        dict(step=lambda y, x, a: y.astype(jnp.float32)),
        TypeError,
        "`step`.*dtypes",
    ),
    "step returns integers": (
        dict(step=lambda y, x, a: jnp.round(y).astype(jnp.int32)),
        TypeError,
        "`step`.*dtypes",
    ),
    "step returns a Python float": (
        dict(step=lambda y, x, a: 1.0, y0=jnp.zeros(())),
        TypeError,
        "`step`.*float",
    ),
    # --- inputs and length ---
    "inputs without a time axis": (dict(inputs=jnp.ones(())), ValueError, "`inputs`"),
    "inputs leaf without a time axis": (
        dict(inputs=(XS, jnp.ones(()))),
        ValueError,
        r"`inputs`.*time axis.*\[1\]",
    ),
    "inputs of different lengths": (
        dict(inputs=(XS, jnp.ones((9, 3)))),
        ValueError,
        r"`inputs`.*lengths \[9, 10\]",
    ),
    "inputs a list of floats": (dict(inputs=[1.0] * 10), TypeError, "`inputs`"),
    "no inputs and no length": (dict(inputs=None), ValueError, "`inputs`.*`length"),
    "T = 0 from inputs": (dict(inputs=jnp.ones((0, 3))), ValueError, "at least 1"),
    "T = 0 from length": (dict(inputs=None, length=0), ValueError, "at least 1"),
    "negative length": (dict(inputs=None, length=-2), ValueError, "at least 1"),
    "length conflicts with inputs": (dict(length=11), ValueError, "`length=11`"),
    "length a float": (dict(length=2.0), TypeError, "`length`"),
    "length a bool": (dict(inputs=None, length=True), TypeError, "`length`"),
    "length an array of floats": (
        dict(inputs=None, length=jnp.array(3.0)),
        TypeError,
        "`length`",
    ),
    # --- init ---
    "init too short": (dict(init=jnp.zeros((9, 3))), ValueError, "`init`.*10"),
    "init without the time axis": (dict(init=jnp.zeros(3)), ValueError, "`init`"),
    "init with another state shape": (
        dict(init=jnp.zeros((10, 4))),
        ValueError,
        "`init`",
    ),
    "init with another structure": (
        dict(init=(jnp.zeros((10, 3)),)),
        ValueError,
        "`init`",
    ),
    "init with another dtype": (
        dict(init=jnp.zeros((10, 3), jnp.float32)),
        ValueError,
        r"`init`.*float64\[10, 3\].*float32\[10, 3\]",
    ),
    "init a list": (dict(init=[[0.0] * 3] * 10), TypeError, "`init`.*list|`init`"),
    # --- max_steps, throw ---
    "max_steps zero": (dict(max_steps=0), ValueError, "`max_steps`"),
    "max_steps negative": (dict(max_steps=-3), ValueError, "`max_steps`"),
    "max_steps a float": (dict(max_steps=2.5), TypeError, "`max_steps`"),
    "max_steps a bool": (dict(max_steps=True), TypeError, "`max_steps`"),
    # Above the range of the iteration counter JAX would raise an OverflowError about
    # an argument `y`.
    "max_steps beyond int64": (dict(max_steps=2**63), ValueError, "`max_steps`"),
    "throw a string": (dict(throw="yes"), TypeError, "`throw`"),
    # --- solver, adjoint ---
    "solver a string": (dict(solver="DEER"), TypeError, "`solver`"),
    "solver a class": (dict(solver=pdyn.DEER), TypeError, r"`solver`.*`DEER\(\)`"),
    "solver optimistix Newton": (
        dict(solver=optx.Newton(1e-6, 1e-6)),
        TypeError,
        "`solver`.*recurrence solver.*optimistix.Newton",
    ),
    "solver optimistix BFGS": (
        dict(solver=optx.BFGS(1e-6, 1e-6)),
        TypeError,
        "`solver`.*optimistix.BFGS",
    ),
    "solver a Lineax solver": (
        dict(solver=pdyn.ParallelScan()),
        TypeError,
        "`solver`.*ParallelScan",
    ),
    "solver rtol negative": (dict(solver=pdyn.DEER(rtol=-1.0)), ValueError, "`rtol`"),
    "solver atol negative": (
        dict(solver=pdyn.QuasiDEER(atol=-1e-3)),
        ValueError,
        "`atol`",
    ),
    "solver rtol NaN": (dict(solver=pdyn.Picard(rtol=np.nan)), ValueError, "`rtol`"),
    "ELK rtol negative": (dict(solver=pdyn.ELK(rtol=-1.0)), ValueError, "`rtol`"),
    "Sequential rtol negative": (
        dict(solver=pdyn.Sequential(rtol=-1.0)),
        ValueError,
        "`rtol`",
    ),
    "block size not dividing D": (
        dict(solver=pdyn.BlockQuasiDEER(2)),
        ValueError,
        "`block_size`.*D = 3",
    ),
    "adjoint None": (dict(adjoint=None), TypeError, "`adjoint`"),
    "adjoint a class": (
        dict(adjoint=pdyn.ImplicitAdjoint),
        TypeError,
        r"`adjoint`.*`ImplicitAdjoint\(\)`",
    ),
    "adjoint optimistix ImplicitAdjoint": (
        dict(adjoint=optx.ImplicitAdjoint()),
        ValueError,
        r"`adjoint=optimistix.ImplicitAdjoint\(\)`.*dense.*`pdyn.ImplicitAdjoint\(\)`",
    ),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_arguments_raise_naming_the_argument(case):
    kwargs, error, match = MATRIX[case]
    with pytest.raises(error, match=match):
        call(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: pdyn.QuasiDEER(diagonal="stochastic", num_probes=0), "num_probes"),
        (lambda: pdyn.QuasiELK(diagonal="stochastic", num_probes=0), "num_probes"),
        (lambda: pdyn.QuasiDEER(diagonal="bogus"), "diagonal"),
        (lambda: pdyn.BlockQuasiDEER(0), "block_size"),
        (lambda: pdyn.ChunkedScan(chunk_size=-1), "chunk_size"),
        (lambda: pdyn.MatrixFreeScan(chunk_size=0), "chunk_size"),
        (lambda: pdyn.IterativeScan(max_steps=0), "max_steps"),
        (lambda: pdyn.FixedDamping(0.0), "damping"),
        (lambda: pdyn.AdaptiveDamping(initial=-1.0), "initial"),
        (lambda: pdyn.AdaptiveDamping(accept_ratio=1.0), "accept_ratio"),
    ],
)
def test_bad_solver_options_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: pdyn.BlockQuasiDEER(2.5), "block_size"),
        (lambda: pdyn.BlockDiagonalJacobian(True), "block_size"),
        (lambda: pdyn.StochasticDiagonalJacobian(num_probes=2.5), "num_probes"),
        (lambda: pdyn.ChunkedScan(chunk_size=8.0), "chunk_size"),
        (lambda: pdyn.MatrixFreeScan(chunk_size=True), "chunk_size"),
        (lambda: pdyn.IterativeScan(max_steps=2.5), "max_steps"),
    ],
)
def test_integer_options_reject_floats_and_bools(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_integer_options_accept_numpy_integers():
    assert pdyn.BlockQuasiDEER(np.int64(2)).jacobian.block_size == 2
    assert pdyn.MatrixFreeScan(np.int32(4)).chunk_size == 4


TOLERANCE_SOLVERS = [
    lambda r: pdyn.DEER(rtol=r, atol=r),
    lambda r: pdyn.QuasiDEER(rtol=r, atol=r),
    lambda r: pdyn.QuasiELK(rtol=r, atol=r),
    lambda r: pdyn.Picard(rtol=r, atol=r),
]


@pytest.mark.parametrize("make", TOLERANCE_SOLVERS)
def test_negative_array_tolerances_raise_naming_the_argument(make):
    """Array tolerances are traced inside the solve's `jit`, where their check failed
    with a `TracerBoolConversionError`: `solve` checks them before."""
    for tolerance in (jnp.array(-1.0), np.float64(-1.0)):
        with pytest.raises(ValueError, match="`rtol`"):
            pdyn.solve(step, make(tolerance), Y0, XS)


@pytest.mark.parametrize("make", TOLERANCE_SOLVERS)
def test_array_tolerances(make):
    """Optimistix accepts array tolerances; so must the recurrence solvers."""
    reference = pdyn.solve(step, pdyn.Sequential(), Y0, XS).value
    for tolerance in (jnp.array(1e-10), np.float64(1e-10)):
        value = pdyn.solve(step, make(tolerance), Y0, XS).value
        np.testing.assert_allclose(value, reference, rtol=1e-8, atol=1e-8)


def test_float32_state_promoted_to_float64_under_x64():
    """A strongly typed float64 constant promotes a float32 state; a Python float (a
    weak type) does not."""
    y0 = jnp.zeros(3, jnp.float32)

    def promoting(y, x, args):
        return y + np.float64(1.0)

    def weak(y, x, args):
        return 0.5 * y + 1.0

    with pytest.raises(TypeError, match=r"`step`.*float32.*float64\[3\]"):
        pdyn.solve(promoting, pdyn.QuasiDEER(), y0, length=4)
    sol = pdyn.solve(weak, pdyn.QuasiDEER(), y0, length=4)
    assert sol.value.dtype == jnp.float32


def test_errors_raise_under_jit():
    @jax.jit
    def solve(y0):
        bad_step = lambda y, x, args: jnp.concatenate([y, x])
        return pdyn.solve(bad_step, pdyn.DEER(), y0, jnp.ones((5, 2))).value

    with pytest.raises(ValueError, match="`step`.*shapes"):
        solve(jnp.zeros(3))


@pytest.mark.parametrize("name", ["length", "max_steps"])
def test_traced_static_arguments_are_refused(name):
    @jax.jit
    def solve(n):
        return pdyn.solve(
            step, pdyn.DEER(), Y0, None if name == "length" else XS, **{name: n}
        )

    with pytest.raises(TypeError, match=f"`{name}`.*static"):
        solve(5)


def test_solvers_refuse_args_that_are_not_a_recurrence():
    with pytest.raises(TypeError, match="Recurrence"):
        optx.root_find(lambda y, a: y, pdyn.DEER(), jnp.zeros((3, 2)), args=None)


# --- valid edge cases -------------------------------------------------------------


def test_numpy_integers_and_arrays_are_accepted():
    def linear(y, x, args):
        return 0.5 * y + x

    sol = pdyn.solve(
        linear,
        pdyn.DEER(),
        np.zeros(3),
        np.ones((6, 3)),
        length=np.int64(6),
        max_steps=np.int32(6),
        throw=np.bool_(True),
    )
    assert sol.result == optx.RESULTS.successful
    no_input = lambda y, x, args: 0.5 * y
    sol = pdyn.solve(no_input, pdyn.DEER(), Y0, None, length=jnp.array(4))
    assert sol.value.shape == (4, 3)


def test_integer_inputs_and_pytree_inputs():
    def embed(y, x, table):
        return jnp.tanh(0.5 * y + table[x["token"]] + x["bias"])

    table = jax.random.normal(jax.random.key(0), (5, 3))
    inputs = {"token": jnp.arange(8) % 5, "bias": jnp.ones((8, 3))}
    sol = pdyn.solve(embed, pdyn.QuasiDEER(), Y0, inputs, table)
    expected = jax.lax.scan(lambda y, x: (embed(y, x, table),) * 2, Y0, inputs)[1]
    np.testing.assert_allclose(sol.value, expected, rtol=1e-9, atol=1e-10)


def test_mixed_dtypes_and_empty_leaves_in_the_state():
    """Leaves of several float dtypes keep their dtypes; empty leaves are carried."""

    def mixed(state, x, args):
        a, b, empty = state
        return (jnp.tanh(0.5 * a + x), (0.5 * b + 1).astype(b.dtype), empty)

    y0 = (Y0, jnp.ones(2, jnp.float32), jnp.zeros((0, 4)))
    sol = pdyn.solve(mixed, pdyn.DEER(), y0, XS)
    assert sol.result == optx.RESULTS.successful
    assert [x.dtype for x in sol.value] == [jnp.float64, jnp.float32, jnp.float64]
    assert [x.shape for x in sol.value] == [(10, 3), (10, 2), (10, 0, 4)]
    expected = jax.lax.scan(lambda y, x: (mixed(y, x, None),) * 2, y0, XS)[1]
    for got, want in zip(sol.value, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_state_of_empty_arrays_only():
    sol = pdyn.solve(lambda y, x, a: y, pdyn.DEER(), jnp.zeros((0,)), XS)
    assert sol.value.shape == (10, 0)
    assert sol.result == optx.RESULTS.successful


def test_a_minimiser_or_least_squares_solver_is_not_mistaken_for_one():
    # A sanity check that the isinstance test is on the recurrence solvers.
    assert not isinstance(optx.GaussNewton(1e-6, 1e-6), pdyn.AbstractRecurrenceSolver)
    with pytest.raises(TypeError, match="`solver`"):
        call(solver=optx.GaussNewton(1e-6, 1e-6))
    with pytest.raises(TypeError, match="`solver`"):
        call(solver=lx.LU())
