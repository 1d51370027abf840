"""Sequence parallelism: [`parallel_dynamics.ShardedScan`][] on 4 emulated CPU devices.

The pytest process has already initialised JAX with one CPU device, so every check
runs in one subprocess started with `--xla_force_host_platform_device_count=4`, which
prints its measurements as JSON; the assertions are made here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest


_SCRIPT = textwrap.dedent(
    """
    import json

    import jax
    import jax.numpy as jnp
    import lineax as lx
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import parallel_dynamics as pdyn

    jax.config.update("jax_enable_x64", True)
    out = {"devices": jax.device_count()}
    mesh = jax.make_mesh((4,), ("time",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("time"))
    scan = pdyn.ShardedScan(mesh)
    D = 4
    keys = jax.random.split(jax.random.key(0), 4)

    def err(a, b):
        return float(jnp.max(jnp.abs(a - b)))

    def spec(x):
        return [str(s) for s in x.sharding.spec]

    def shards(x):
        return sorted(s.data.shape[0] for s in x.addressable_shards)

    # 1. The linear solves, forward and transposed, for every block structure.
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if not isinstance(x, jax.Array):
            return jax.tree.map(place, x)
        # A time axis not divisible by 4 cannot be sharded as a `jax.Array`: such
        # inputs are placed on the mesh unsharded, and the scans pad internally.
        if x.shape[0] % 4:
            return jax.device_put(x, replicated)
        return pdyn.internal.shard_time(x, mesh)

    try:
        pdyn.internal.shard_time(jnp.zeros((13, D)), mesh)
        out["uneven_error"] = ""
    except ValueError as e:
        out["uneven_error"] = str(e)

    for T in (16, 13):
        b = place(jax.random.normal(keys[0], (T, D)))
        names = ("diagonal", "dense", "block", "identity", "zero") if T == 16 else ()
        all_blocks = {
            "diagonal": pdyn.DiagonalBlocks(jax.random.normal(keys[1], (T, D))),
            "dense": pdyn.DenseBlocks(0.5 * jax.random.normal(keys[1], (T, D, D))),
            "block": pdyn.BlockDiagonalBlocks(
                0.5 * jax.random.normal(keys[1], (T, 2, 2, 2))
            ),
            "identity": pdyn.IdentityBlocks(T, D, jnp.float64),
            "zero": pdyn.ZeroBlocks(T, D, jnp.float64),
        }
        # T = 13: the padded path, for the two structures with different summaries.
        names = names or ("diagonal", "dense")
        all_blocks = {name: all_blocks[name] for name in names}

        @jax.jit
        def solves(all_blocks, b):
            results = {}
            for name, blocks in all_blocks.items():
                for lower in (True, False):
                    op = pdyn.BlockBidiagonalOperator(blocks, lower=lower)
                    for label, solver in (("ref", pdyn.SequentialScan()), ("sh", scan)):
                        sol = lx.linear_solve(op, b, solver, throw=False)
                        results[(name, lower, label)] = sol.value
            return results

        results = solves(all_blocks, b)
        for name in all_blocks:
            for lower in (True, False):
                ref, got = results[(name, lower, "ref")], results[(name, lower, "sh")]
                out[f"linear/{T}/{name}/{lower}"] = err(ref, got)
                if T == 16:
                    out[f"linear_spec/{name}/{lower}"] = spec(got)

    # 2. Solves: DEER and quasi-DEER, T divisible by 4 or not.
    def step(y, x, w):
        return jnp.tanh(w @ y + x)

    w = 0.5 * jax.random.normal(keys[2], (D, D))
    y0 = 0.1 * jnp.ones(D)
    for T in (32, 30):
        xs = jax.random.normal(keys[3], (T, D))
        ref = pdyn.solve(step, pdyn.Sequential(), y0, xs, w).value
        xs_sharded = place(xs)
        solvers = [("deer", pdyn.DEER(linear_solver=scan))]
        if T == 32:
            solvers.append(("quasi", pdyn.QuasiDEER(linear_solver=scan)))
        for name, solver in solvers:
            sol = pdyn.solve(step, solver, y0, xs_sharded, w, throw=False)
            out[f"solve/{T}/{name}"] = err(sol.value, ref)
            out[f"solve_result/{T}/{name}"] = int(sol.result._value)
            out[f"solve_spec/{T}/{name}"] = spec(sol.value)
            out[f"solve_shards/{T}/{name}"] = shards(sol.value)
        if T == 32:
            # throw=True (the default) gives the same values.
            sol = pdyn.solve(step, pdyn.DEER(linear_solver=scan), y0, xs_sharded, w)
            out["solve_throw"] = err(sol.value, ref)

    # 2b. D = 3: on these emulated devices `shift_forward(y).at[0].set(y0)` comes out
    # zero at the first step of every shard but the first (for D = 1, 2, 3, 5; not
    # for D = 4 or 8). `Recurrence.previous` written that way makes every solve
    # converge to a wrong trajectory with `successful`.
    D3 = 3
    w3 = 0.5 * jax.random.normal(keys[2], (D3, D3))
    y3 = 0.1 * jnp.ones(D3)
    xs3 = jax.random.normal(keys[3], (32, D3))
    ref3 = pdyn.solve(step, pdyn.Sequential(), y3, xs3, w3).value
    for name, solver in (
        ("deer", pdyn.DEER(linear_solver=scan)),
        ("quasi", pdyn.QuasiDEER(linear_solver=scan)),
    ):
        sol = pdyn.solve(step, solver, y3, place(xs3), w3, throw=False)
        out[f"solve_d3/{name}"] = err(sol.value, ref3)
        out[f"solve_d3_result/{name}"] = int(sol.result._value)

    # 3. Gradients through the implicit adjoint, whose reverse scan is sharded too.
    def loss(w, xs, y0, solver, adjoint):
        sol = pdyn.solve(step, solver, y0, xs, w, adjoint=adjoint, throw=False)
        return jnp.sum(jnp.sin(sol.value))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    g_ref = grad(w3, xs3, y3, pdyn.Sequential(), pdyn.ImplicitAdjoint())
    g = grad(
        w3,
        place(xs3),
        y3,
        pdyn.QuasiDEER(linear_solver=scan),
        pdyn.ImplicitAdjoint(linear_solver=scan),
    )
    out["grad_d3"] = max(err(a, b) for a, b in zip(g, g_ref))
    for T in (32, 30):
        xs = jax.random.normal(keys[3], (T, D))
        g_ref = grad(w, xs, y0, pdyn.Sequential(), pdyn.ImplicitAdjoint())
        g = grad(
            w,
            place(xs),
            y0,
            pdyn.QuasiDEER(linear_solver=scan),
            pdyn.ImplicitAdjoint(linear_solver=scan),
        )
        out[f"grad/{T}"] = max(err(a, b) for a, b in zip(g, g_ref))
        out[f"grad_spec/{T}"] = spec(g[1]) if T % 4 == 0 else []

    # 4. ELK: one damped step (the sharded Kalman smoother and filter) and full solves.
    smoother = pdyn.KalmanSmoother(mesh=mesh)
    for T in (16, 13):
        r = jax.random.normal(keys[0], (T, D))
        s_ = jax.random.normal(keys[2], (T, D))
        lam = jnp.exp(jax.random.normal(keys[3], (T,)))
        all_blocks = {
            "dense": pdyn.DenseBlocks(1.2 * jax.random.normal(keys[1], (T, D, D))),
            "diagonal": pdyn.DiagonalBlocks(1.5 * jax.random.normal(keys[1], (T, D))),
            "block": pdyn.BlockDiagonalBlocks(
                jax.random.normal(keys[1], (T, 2, 2, 2))
            ),
        }
        cases = [
            (pdyn.KalmanSmoother, True),
            (pdyn.KalmanSmoother, False),
            (pdyn.KalmanFilter, True),
        ]

        def damped(all_blocks, r, s_, lam, mesh=None):
            results = {}
            for name, blocks in all_blocks.items():
                op = pdyn.DampedBidiagonalOperator(
                    pdyn.BlockBidiagonalOperator(blocks), lam
                )
                for cls, parallel in cases:
                    solver = cls(parallel=parallel, mesh=mesh)
                    sol = lx.linear_solve(op, (r, s_), solver, throw=False)
                    results[f"{name}/{cls.__name__}/{parallel}"] = sol.value
            return results

        # The references on one device, outside the mesh.
        refs = jax.jit(damped)(all_blocks, r, s_, lam)
        got = jax.jit(lambda *a: damped(*a, mesh=mesh))(
            *map(place, (all_blocks, r, s_, lam))
        )
        for key in refs:
            out[f"damped/{T}/{key}"] = err(refs[key], got[key])
            if T == 16:
                out[f"damped_spec/{key}"] = spec(got[key])

    # Dense blocks with 256 steps per device: the batched LAPACK solves of the
    # smoother's combines, run by the 4 shards at once, can deadlock XLA:CPU's shared
    # intra-op thread pool (the program hangs after compiling). D = 8: with D = 4 the
    # batches are too small to be split over the pool.
    T, D8 = 1024, 8
    long_dense = pdyn.DenseBlocks(jax.random.normal(keys[1], (T, D8, D8)) / D8)
    long_r = jax.random.normal(keys[0], (T, D8))
    long_obs = jax.random.normal(keys[2], (T, D8))
    for parallel in (False, True):
        for smooth in (True, False):
            ref = pdyn.internal.kalman_smooth(
                long_dense, long_r, long_obs, 1.0, parallel=parallel, smooth=smooth
            )
            got = jax.jit(
                lambda *a: pdyn.internal.kalman_smooth(
                    *a, 1.0, parallel=parallel, smooth=smooth, mesh=mesh
                )
            )(*map(place, (long_dense, long_r, long_obs)))
            out[f"long_dense/{parallel}/{smooth}"] = err(got, ref)

    for T in (32, 30):
        xs = jax.random.normal(keys[3], (T, D))
        for name, cls in (("elk", pdyn.ELK), ("quasi_elk", pdyn.QuasiELK)):
            ref = pdyn.solve(step, cls(), y0, xs, w, throw=False)
            run = jax.jit(
                lambda xs, w: pdyn.solve(  # throw=True (the default)
                    step, cls(linear_solver=smoother), y0, xs, w
                )
            )
            sol = run(place(xs), w)
            out[f"elk/{T}/{name}"] = err(sol.value, ref.value)
            out[f"elk_steps/{T}/{name}"] = [
                int(sol.stats["num_steps"]),
                int(ref.stats["num_steps"]),
            ]
            out[f"elk_spec/{T}/{name}"] = spec(sol.value)
            out[f"elk_shards/{T}/{name}"] = shards(sol.value)

    # 5. throw=True keeps the trajectory sharded, and failures still raise.
    xs = place(jax.random.normal(keys[3], (32, D)))
    run = jax.jit(lambda xs: pdyn.solve(step, pdyn.DEER(linear_solver=scan), y0, xs, w))
    sol = run(xs)
    out["throw_spec"] = spec(sol.value)
    out["throw_shards"] = shards(sol.value)
    try:
        failing = jax.jit(
            lambda xs: pdyn.solve(
                step, pdyn.QuasiDEER(linear_solver=scan), y0, xs, w, max_steps=2
            ).value
        )
        jax.block_until_ready(failing(xs))
        out["throw_raises"] = ""
    except Exception as e:  # noqa: BLE001
        out["throw_raises"] = str(e)

    # 6. Gradients through a sharded ELK solve (the adjoint's reverse scan sharded).
    for T, solvers in ((32, (("elk", pdyn.ELK), ("quasi_elk", pdyn.QuasiELK))),
                       (30, (("elk", pdyn.ELK),))):
        xs = jax.random.normal(keys[3], (T, D))
        g_ref = grad(w, xs, y0, pdyn.Sequential(), pdyn.ImplicitAdjoint())
        for name, cls in solvers:
            g = grad(
                w,
                place(xs),
                y0,
                cls(linear_solver=smoother),
                pdyn.ImplicitAdjoint(linear_solver=scan),
            )
            out[f"elk_grad/{T}/{name}"] = max(err(a, b) for a, b in zip(g, g_ref))
            out[f"elk_grad_spec/{T}/{name}"] = spec(g[1]) if T % 4 == 0 else []

    # 7. diffeqsolve with a sharded parallel solver, saving every step.
    import diffrax as dfx

    def vector_field(t, y, args):
        return -y + jnp.sin(t) * jnp.tanh(y[::-1])

    term = dfx.ODETerm(vector_field)
    ode_y0 = jnp.array([1.0, -0.5, 0.25, 2.0])
    for name, parallel in (
        ("deer", pdyn.DEER(linear_solver=scan, rtol=1e-12, atol=1e-12)),
        ("elk", pdyn.ELK(linear_solver=smoother, rtol=1e-12, atol=1e-12)),
    ):
        # T = 32 steps, divisible by the 4 devices: the saved steps stay sharded.
        saveats = [
            ("steps", dfx.SaveAt(steps=True), False),
            ("steps_throw", dfx.SaveAt(steps=True), True),
        ]
        if name == "deer":
            saveats.append(("ts", dfx.SaveAt(ts=jnp.linspace(0.1, 1.0, 8)), False))
        for saveat_name, saveat, throw in saveats:
            kwargs = dict(saveat=saveat, throw=throw)
            ref = pdyn.diffeqsolve(
                term, dfx.Heun(), 0.0, 1.0, 1 / 32, ode_y0, parallel=pdyn.DEER(
                    rtol=1e-12, atol=1e-12
                ), **kwargs
            )
            run = jax.jit(
                lambda y0: pdyn.diffeqsolve(
                    term, dfx.Heun(), 0.0, 1.0, 1 / 32, y0, parallel=parallel, **kwargs
                )
            )
            sol = run(jax.device_put(ode_y0, replicated))
            out[f"ode/{name}/{saveat_name}"] = err(sol.ys, ref.ys)
            out[f"ode_spec/{name}/{saveat_name}"] = spec(sol.ys)
            out[f"ode_shards/{name}/{saveat_name}"] = shards(sol.ys)

    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    return json.loads(line[len("RESULT") :])


def test_four_devices(results):
    assert results["devices"] == 4


@pytest.mark.parametrize(
    "length, structure",
    [(16, s) for s in ("diagonal", "dense", "block", "identity", "zero")]
    + [(13, "diagonal"), (13, "dense")],
)
@pytest.mark.parametrize("lower", [True, False])
def test_linear_solve_matches_sequential(results, length, structure, lower):
    assert results[f"linear/{length}/{structure}/{lower}"] < 1e-10


@pytest.mark.parametrize("structure", ["diagonal", "dense", "block", "identity"])
@pytest.mark.parametrize("lower", [True, False])
def test_linear_solve_sharded_along_time(results, structure, lower):
    assert results[f"linear_spec/{structure}/{lower}"][0] == "time"


@pytest.mark.parametrize("length, solver", [(32, "deer"), (32, "quasi"), (30, "deer")])
def test_solve_matches_single_device(results, length, solver):
    assert results[f"solve_result/{length}/{solver}"] == 0
    assert results[f"solve/{length}/{solver}"] < 1e-10


@pytest.mark.parametrize("solver", ["deer", "quasi"])
def test_solve_with_three_state_components_matches_single_device(results, solver):
    assert results[f"solve_d3_result/{solver}"] == 0
    assert results[f"solve_d3/{solver}"] < 1e-10


def test_gradients_with_three_state_components_match_single_device(results):
    assert results["grad_d3"] < 1e-10


def test_solve_with_throw_matches_single_device(results):
    assert results["solve_throw"] < 1e-10


@pytest.mark.parametrize("solver", ["deer", "quasi"])
def test_solution_sharded_along_time(results, solver):
    # T = 32 on 4 devices: 8 time steps per device, each its own shard.
    assert results[f"solve_spec/32/{solver}"][0] == "time"
    assert results[f"solve_shards/32/{solver}"] == [8, 8, 8, 8]


def test_uneven_length_raises_clear_error(results):
    # A `jax.Array` cannot be split unevenly, so `shard_time` refuses T = 13 on 4
    # devices and says how to pad; the solves above with T = 30 (inputs unsharded,
    # the scans padding to 32 inside) still match the single-device solve.
    assert "pad" in results["uneven_error"]
    assert "4 devices" in results["uneven_error"]


@pytest.mark.parametrize("length", [32, 30])
def test_gradients_match_single_device(results, length):
    assert results[f"grad/{length}"] < 1e-10
    if length == 32:
        assert results[f"grad_spec/{length}"][0] == "time"


def test_argument_errors():
    import jax
    from jax.sharding import AxisType

    import parallel_dynamics as pdyn

    mesh = jax.make_mesh((1,), ("time",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        pdyn.ShardedScan(mesh, axis_name="batch")
    with pytest.raises(TypeError, match="single-device scan solver"):
        pdyn.ShardedScan(mesh, local=pdyn.ShardedScan(mesh))
    explicit = jax.make_mesh((1,), ("time",), axis_types=(AxisType.Explicit,))
    with pytest.raises(ValueError, match="AxisType.Auto"):
        pdyn.ShardedScan(explicit)


_DAMPED = [
    f"{name}/{cls}/{parallel}"
    for name in ("dense", "diagonal", "block")
    for cls, parallel in (
        ("KalmanSmoother", True),
        ("KalmanSmoother", False),
        ("KalmanFilter", True),
    )
]


@pytest.mark.parametrize("length", [16, 13])
@pytest.mark.parametrize("case", _DAMPED)
def test_sharded_kalman_step_matches_single_device(results, length, case):
    assert results[f"damped/{length}/{case}"] < 1e-10
    if length == 16:
        assert results[f"damped_spec/{case}"][0] == "time"


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("smooth", [True, False])
def test_long_dense_sharded_kalman_matches_single_device(results, parallel, smooth):
    # T = 1024, 256 steps per device: large enough for XLA:CPU's batched LAPACK
    # kernels inside `shard_map` to split over the thread pool, where they can
    # deadlock.
    assert results[f"long_dense/{parallel}/{smooth}"] < 1e-10


@pytest.mark.parametrize("length", [32, 30])
@pytest.mark.parametrize("solver", ["elk", "quasi_elk"])
def test_sharded_elk_matches_single_device(results, length, solver):
    assert results[f"elk/{length}/{solver}"] < 1e-10
    steps, reference_steps = results[f"elk_steps/{length}/{solver}"]
    assert steps == reference_steps
    if length == 32:
        # throw=True (the default): the trajectory stays sharded, 8 steps per device.
        assert results[f"elk_spec/{length}/{solver}"][0] == "time"
        assert results[f"elk_shards/{length}/{solver}"] == [8, 8, 8, 8]


def test_throw_keeps_value_sharded_and_still_raises(results):
    assert results["throw_spec"][0] == "time"
    assert results["throw_shards"] == [8, 8, 8, 8]
    assert "did not converge within `max_steps`" in results["throw_raises"]


@pytest.mark.parametrize(
    "length, solver", [(32, "elk"), (32, "quasi_elk"), (30, "elk")]
)
def test_sharded_elk_gradients_match_single_device(results, length, solver):
    assert results[f"elk_grad/{length}/{solver}"] < 1e-10
    if length == 32:
        assert results[f"elk_grad_spec/{length}/{solver}"][0] == "time"


@pytest.mark.parametrize(
    "case",
    ["deer/steps", "deer/steps_throw", "deer/ts", "elk/steps", "elk/steps_throw"],
)
def test_diffeqsolve_with_sharded_solver_matches_single_device(results, case):
    assert results[f"ode/{case}"] < 1e-10
    if "steps" in case:
        # 32 steps over 4 devices: the inputs are constrained to be sharded along
        # time, and the saved trajectory stays sharded (also with `throw=True`, whose
        # checks run on a scalar token rather than gathering the trajectory).
        assert results[f"ode_spec/{case}"][0] == "time"
        assert results[f"ode_shards/{case}"] == [8, 8, 8, 8]


def test_kalman_argument_errors():
    import jax
    from jax.sharding import AxisType

    import parallel_dynamics as pdyn

    mesh = jax.make_mesh((1,), ("time",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        pdyn.KalmanSmoother(mesh=mesh, axis_name="batch")
    explicit = jax.make_mesh((1,), ("time",), axis_types=(AxisType.Explicit,))
    with pytest.raises(ValueError, match="AxisType.Auto"):
        pdyn.KalmanFilter(mesh=explicit)


def _mesh(axis_type="Auto"):
    import jax
    from jax.sharding import AxisType

    axis_type = getattr(AxisType, axis_type)
    return jax.make_mesh((1,), ("time",), axis_types=(axis_type,))


def test_time_sharding_argument_errors():
    import parallel_dynamics as pdyn

    mesh = _mesh()
    assert pdyn.TimeSharding(mesh).axis_name == "time"
    assert pdyn.TimeSharding(mesh).num_devices == 1
    with pytest.raises(TypeError, match="`mesh` must be a `jax.sharding.Mesh`"):
        pdyn.TimeSharding("time")  # pyright: ignore
    with pytest.raises(ValueError, match="`axis_name='batch'` is not an axis"):
        pdyn.TimeSharding(mesh, axis_name="batch")
    with pytest.raises(ValueError, match="AxisType.Auto"):
        pdyn.TimeSharding(_mesh("Explicit"))


def _sharded_solvers():
    import parallel_dynamics as pdyn

    mesh = _mesh()
    scan = pdyn.ShardedScan(mesh)
    smoother = pdyn.KalmanSmoother(mesh=mesh)
    return {
        "Newton": pdyn.Newton(linear_solver=scan),
        "DEER": pdyn.DEER(linear_solver=scan),
        "QuasiDEER": pdyn.QuasiDEER(linear_solver=scan),
        "BlockQuasiDEER": pdyn.BlockQuasiDEER(2, linear_solver=scan),
        "Picard": pdyn.Picard(linear_solver=scan),
        "Jacobi": pdyn.Jacobi(linear_solver=scan),
        "TrustRegionNewton": pdyn.TrustRegionNewton(linear_solver=scan),
        "TrustDEER": pdyn.TrustDEER(linear_solver=scan),
        "QuasiTrustDEER": pdyn.QuasiTrustDEER(linear_solver=scan),
        "LevenbergMarquardt": pdyn.LevenbergMarquardt(linear_solver=smoother),
        "ELK": pdyn.ELK(linear_solver=smoother),
        "ELK/filter": pdyn.ELK(linear_solver=pdyn.KalmanFilter(mesh=mesh)),
        "QuasiELK": pdyn.QuasiELK(linear_solver=smoother),
    }


@pytest.mark.parametrize("name", list(_sharded_solvers()))
def test_solver_reports_time_sharding_of_its_linear_solver(name):
    import parallel_dynamics as pdyn

    solver = _sharded_solvers()[name]
    sharding = solver.time_sharding
    assert isinstance(sharding, pdyn.TimeSharding)
    assert sharding == pdyn.TimeSharding(_mesh(), "time")
    assert sharding == solver.linear_solver.time_sharding


def test_solver_without_sharded_linear_solver_reports_none():
    import parallel_dynamics as pdyn

    solvers = [
        pdyn.Sequential(),
        pdyn.DEER(),
        pdyn.QuasiDEER(linear_solver=pdyn.ParallelScan()),
        pdyn.DEER(linear_solver=pdyn.MatrixFreeScan()),
        pdyn.DEER(linear_solver=pdyn.IterativeScan()),
        pdyn.Picard(),
        pdyn.Jacobi(),
        pdyn.TrustDEER(),
        pdyn.ELK(),
        pdyn.QuasiELK(linear_solver=pdyn.KalmanFilter()),
    ]
    for solver in solvers:
        assert solver.time_sharding is None, solver
    for linear_solver in (pdyn.AutoScan(), pdyn.ChunkedScan(4), pdyn.KalmanSmoother()):
        assert linear_solver.time_sharding is None
