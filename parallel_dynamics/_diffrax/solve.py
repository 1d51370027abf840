"""The solve: [`parallel_dynamics.diffeqsolve`][], which mirrors `diffrax.diffeqsolve`
for fixed step sizes and returns the same `diffrax.Solution`, solving the recurrence of
the solver's steps in parallel over time.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx

# Diffrax's check that the terms suit the solver, with its error messages. It matches
# the terms against the solver's `term_structure` with Diffrax's own type machinery,
# and no public function runs it short of tracing a whole `diffrax.diffeqsolve`. A
# private name, imported without a fallback: the supported Diffrax versions are
# checked on import.
from diffrax._integrate import _assert_term_compatible
from jaxtyping import ArrayLike, PyTree

from .._adjoint import ImplicitAdjoint
from .._coarse import coarse_guess, CoarseGuess
from .._failure import raise_on_failure
from .._slices import fill_slices, num_slices, slice_ends, slice_inputs, SliceStep
from .._solve import check_recurrence_solver, solve
from .._solver import TrustDEER
from .grid import _Grid, _make_grid, _promote_state
from .saveat import dense_interpolation, interpolate, save
from .step import _check_solver, _solver_nodes, DiffraxStep


# Diffrax's marker of an implicit solver's root finder whose tolerances come from an
# adaptive step size controller, as its public constructor makes it.
_USE_STEPSIZE_TOL = dfx.with_stepsize_controller_tols(optx.Newton)().rtol


def _check_terms(terms, solver, t0, y0, args) -> None:
    """Diffrax's own check that `terms` suit `solver` (e.g. an SDE solver needs
    `MultiTerm(ODETerm, ControlTerm)`), with its error messages."""
    _assert_term_compatible(
        t0,
        y0,
        args,
        terms,
        solver.term_structure,
        solver.term_compatible_contr_kwargs,
    )


# --- results --------------------------------------------------------------------------


def _diffrax_result(result: optx.RESULTS) -> dfx.RESULTS:
    """Optimistix results of the parallel solve as Diffrax results: exhausting the
    iterations is Diffrax's `max_steps_reached` (our `max_steps` counts iterations);
    everything else (`successful`, `nonfinite`, ...) keeps its meaning."""
    promoted = dfx.RESULTS.promote(result)
    return dfx.RESULTS.where(
        result == optx.RESULTS.nonlinear_max_steps_reached,
        dfx.RESULTS.max_steps_reached,
        promoted,
    )


_MAX_STEPS_MESSAGE = (
    "parallel_dynamics.diffeqsolve: the parallel solver did not converge within "
    "`max_steps` iterations (here `max_steps` counts iterations over the whole "
    "trajectory, not solver steps). `max_steps=None` allows as many iterations as there "
    "are steps, which always suffices. Chaotic or stiff dynamics converge slowly (see "
    "`pdyn.lyapunov_exponent`): try a more accurate initial guess (`coarse="
    "pdyn.CoarseGuess(stepsize_controller=diffrax.PIDController(rtol=1e-8, "
    "atol=1e-8))`), `parallel=pdyn.TrustDEER()` if this was a quasi or damped solver, "
    "`parallel=pdyn.Sequential()`, or `diffrax.diffeqsolve`; pass `throw=False` to "
    "inspect the result."
)
_NONFINITE_MESSAGE = (
    "parallel_dynamics.diffeqsolve: the solve produced non-finite values (inf or NaN), "
    "either in the solution itself (a blow-up, or a step size too large for the "
    "solver) or in the iterates of the parallel solver (Newton's method from a poor "
    "initial guess on oscillating, stiff-nonlinear or chaotic dynamics). Try "
    "`parallel=pdyn.TrustDEER()` (the default) if this was another solver, a better "
    "initial guess (the default `coarse=pdyn.CoarseGuess()`, or a more accurate "
    "one: `coarse=pdyn.CoarseGuess(stepsize_controller=diffrax.PIDController("
    "rtol=1e-8, atol=1e-8))`), a shorter interval, or "
    "`parallel=pdyn.Sequential()`; pass `throw=False` to inspect the result."
)
_FAILURES = (
    (dfx.RESULTS.nonfinite, _NONFINITE_MESSAGE),
    (dfx.RESULTS.max_steps_reached, _MAX_STEPS_MESSAGE),
)


# --- diffeqsolve ----------------------------------------------------------------------


def diffeqsolve(
    terms: PyTree[dfx.AbstractTerm],
    solver: dfx.AbstractSolver,
    t0: ArrayLike,
    t1: ArrayLike,
    dt0: ArrayLike | None,
    y0: PyTree[ArrayLike],
    args: PyTree = None,
    *,
    saveat: dfx.SaveAt = dfx.SaveAt(t1=True),
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    parallel: optx.AbstractRootFinder = TrustDEER(),
    max_steps: int | None = None,
    init: PyTree[ArrayLike] | None = None,
    coarse: CoarseGuess | bool | None = CoarseGuess(),
    steps_per_slice: int = 1,
    adjoint: optx.AbstractAdjoint = ImplicitAdjoint(),
    throw: bool = True,
) -> dfx.Solution:
    """Solves a differential equation with fixed steps, in parallel over time.

    This mirrors `diffrax.diffeqsolve` for fixed step sizes and returns the same
    `diffrax.Solution`. Each step of the Diffrax `solver`,
    $y_{n+1} = \\Phi(t_n, t_{n+1}, y_n)$, is one step of a recurrence with inputs
    $x_n = (t_n, t_{n+1})$ (the step map [`parallel_dynamics.DiffraxStep`][]), and the
    whole discrete solution $y_1, \\dots, y_N$ is found at once by
    [`parallel_dynamics.solve`][] with the `parallel` root finder: the same numbers as
    the sequential solve, to that solver's tolerance. ODEs and SDEs alike: an SDE with
    a fixed Brownian path (e.g. a `diffrax.VirtualBrownianTree` with a fixed key) has
    deterministic steps.

    The step times are Diffrax's: from `dt0`, the first step is
    $[t_0, t_0 + \\Delta t_0]$ and step $k \\geq 2$ ends at
    $t_0 + (t_1 - t_0)\\,k / N$ with $N = \\lceil (t_1 - t_0) / \\Delta t_0 \\rceil$,
    exactly as `diffrax.ConstantStepSize` (so a $\\Delta t_0$ that does not divide
    $t_1 - t_0$ gives a first step of $\\Delta t_0$ and $N - 1$ equal steps after
    it); or the given times with `stepsize_controller=diffrax.StepTo(ts)`.

    **Arguments:**

    - `terms`: the terms of the differential equation, as for `diffrax.diffeqsolve`.
    - `solver`: any one-step Diffrax solver: explicit Runge--Kutta (`Euler`, `Heun`,
        `Tsit5`, `Dopri5`, `Dopri8`, ...), implicit (`ImplicitEuler`, `Kvaerno5`, ...,
        with the tolerances of their root finder set explicitly, as Diffrax requires
        for fixed steps, and set tightly: the parallel solver differentiates through
        the steps), and SDE solvers (`Euler`, `Heun`, `ShARK`, `SEA`, ...). Multistep
        and reversible solvers (`LeapfrogMidpoint`, `ReversibleHeun`) carry state
        between steps and are rejected.
    - `t0`, `t1`: the start and end of the integration; `t1 < t0` integrates backwards
        in time (with `dt0 < 0`), as in Diffrax.
    - `dt0`: the step size, or `None` with `stepsize_controller=diffrax.StepTo(ts)`.
        With `dt0`, the values of `t0`, `t1` and `dt0` must be concrete (not traced)
        since they fix the number of steps.
    - `y0`: the initial state: any PyTree of floating arrays.
    - `args`: passed to the vector fields (and differentiated like them).
    - `saveat`: a `diffrax.SaveAt` with any of `t0`, `t1`, `ts`, `steps`, `fn`, `subs`
        and `dense`. Values at `ts` between step times are interpolated with the
        solver's own dense output, exactly as Diffrax does. `steps=n` returns exactly
        the saved steps, i.e. what Diffrax returns with `max_steps` equal to the number
        of steps (Diffrax pads its output to `max_steps` with `inf`). `solver_state`,
        `controller_state` and `made_jump` are not supported (a parallel solve has no
        final solver state); `sol.interpolation` is `None` unless `dense=True`.
        Keyword only.
    - `stepsize_controller`: `None` or `diffrax.ConstantStepSize()` for the grid from
        `dt0`, or `diffrax.StepTo(ts)` for given step times. Parallel evaluation needs
        the grid before the solve starts, so adaptive controllers
        (`diffrax.PIDController`) are rejected. Keyword only.
    - `parallel`: the root finder of [`parallel_dynamics.solve`][]:
        [`parallel_dynamics.TrustDEER`][] (default: Newton's method with a trust
        region in time, which converges on oscillators and orbits from the default
        initial guess), [`parallel_dynamics.DEER`][],
        [`parallel_dynamics.QuasiTrustDEER`][] or [`parallel_dynamics.QuasiDEER`][]
        (cheaper iterations for large states), [`parallel_dynamics.ELK`][],
        [`parallel_dynamics.Sequential`][], ....
        Quasi-DEER keeps only the diagonal of each step's Jacobian, which suits
        dissipative, weakly coupled systems; for oscillators (whose components are
        coupled by rotation, e.g. Lotka--Volterra) its iterates can blow up, and
        DEER (Newton) is the one to use for small states. Keyword only.
    - `max_steps`: the maximum number of iterations of `parallel` (not of solver
        steps). `None` (default) allows as many iterations as there are steps, which
        always suffices. Keyword only.
    - `init`: an initial guess for the values $y_1, \\dots, y_N$ at the ends of the
        steps (the structure of `y0` with a leading axis $N$), e.g. the solution of a
        nearby problem. Defaults to the `coarse` guess, or to $y_0$ everywhere with
        `coarse=None`. A given `init` is used as it is, and `coarse` is then
        ignored. Keyword only.
    - `coarse`: the [`parallel_dynamics.CoarseGuess`][] that makes the initial guess
        (default `pdyn.CoarseGuess()`; `True` means the same): a sequential solve on a
        coarser grid, interpolated onto the steps with the solver's dense output. By
        default the coarse grid is chosen by an adaptive step size controller (for
        ODEs with an explicit solver that estimates its error), otherwise every
        $k$-th time of
        the grid. On oscillators and orbits it cuts Newton's iterations from tens to
        two or three, at the price of a few hundred sequential steps at most. `None`
        (or `False`): no coarse solve, $y_0$ everywhere. Keyword only.
    - `steps_per_slice`: $m$, the number of steps grouped into one time slice
        (multiple shooting): the parallel solver solves for the states at the ends
        of the $\\lceil N/m \\rceil$ slices, each slice's step map running its $m$
        steps sequentially, and the states inside the slices follow from one more
        pass over every slice at once. $m = 1$ (default) is the fine-grained
        parallel solve, $m \\geq N$ the sequential one; in between, fewer and cheaper
        scans against $m$ sequential steps per iteration. Keyword only.
    - `adjoint`: how [`parallel_dynamics.solve`][] is differentiated;
        [`parallel_dynamics.ImplicitAdjoint`][] (default) differentiates the discrete
        solution by the implicit function theorem, which equals backpropagation
        through the sequential solve. Keyword only.
    - `throw`: if `True`, a failed solve raises; if `False`, `sol.result` says what
        happened. Keyword only.

    **Returns:**

    A `diffrax.Solution` with `ts` and `ys` as Diffrax saves them, `t0`, `t1`, `result`
    (a `diffrax.RESULTS`: `successful`; `max_steps_reached` when `parallel` ran out of
    iterations; `nonfinite` for inf/NaN; or the failure of an implicit solver's root
    finder in some step), `interpolation` (with `saveat.dense`) and `stats`:
    `num_steps` (solver steps, all accepted), `num_accepted_steps`,
    `num_rejected_steps` (0), `max_steps` (the iteration limit),
    `num_parallel_iterations` and `residual_norm` (of the recurrence at the returned
    trajectory; of the slices' recurrence with `steps_per_slice > 1`); with a
    `coarse` guess also `num_coarse_steps` (the sequential steps of the coarse solve:
    of the coarsest level, or every step an adaptive solve tried) and
    `coarse_parallel_iterations` (the iterations of the parallel solves of the
    intermediate levels, coarsest first; empty for one level), and on a uniform
    coarse grid `coarse_factor` ($k$).

    !!! Example

        ```python
        import diffrax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        def lotka_volterra(t, y, args):
            alpha, beta, gamma, delta = args
            prey, predator = y
            return jnp.stack([
                alpha * prey - beta * prey * predator,
                delta * prey * predator - gamma * predator,
            ])

        sol = pdyn.diffeqsolve(
            diffrax.ODETerm(lotka_volterra), diffrax.Tsit5(), 0.0, 10.0, 0.01,
            jnp.array([1.0, 1.0]), (2 / 3, 4 / 3, 1.0, 1.0),
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 10.0, 11)),
            parallel=pdyn.DEER(),
        )
        sol.ys  # (11, 2), as diffrax.diffeqsolve with the same solver and dt0
        sol.stats["num_parallel_iterations"]
        ```
    """
    # --- arguments
    _check_solver(solver)
    check_recurrence_solver("parallel", parallel)
    if not isinstance(throw, (bool, np.bool_)):
        raise TypeError(f"`throw` must be a bool, got {throw!r}.")
    if isinstance(adjoint, dfx.AbstractAdjoint):
        raise TypeError(
            f"`adjoint={type(adjoint).__name__}()` is a Diffrax adjoint; this solve is "
            "differentiated as a parallel root find. Pass an Optimistix adjoint such "
            "as `pdyn.ImplicitAdjoint()` (the default), which gives the gradients of "
            "the discrete solution, as backpropagation through `diffrax.diffeqsolve` "
            "does."
        )
    if not isinstance(adjoint, optx.AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be an `optimistix.AbstractAdjoint`, got {adjoint!r}."
        )
    if not isinstance(saveat, dfx.SaveAt):
        raise TypeError(f"`saveat` must be a `diffrax.SaveAt`, got {saveat!r}.")
    if saveat.solver_state or saveat.controller_state or saveat.made_jump:
        raise ValueError(
            "`SaveAt(solver_state=True)`, `SaveAt(controller_state=True)` and "
            "`SaveAt(made_jump=True)` are not supported: a parallel solve has no final "
            "solver or controller state to continue from. Continue a solve from its "
            "last `ys` instead."
        )
    if saveat.subs is None and not saveat.dense:
        raise ValueError(
            "`saveat` saves nothing: set `t0`, `t1`, `ts`, `steps` or `dense`."
        )
    if stepsize_controller is None:
        stepsize_controller = dfx.ConstantStepSize()
    if isinstance(stepsize_controller, dfx.AbstractAdaptiveStepSizeController):
        raise ValueError(
            f"`stepsize_controller={type(stepsize_controller).__name__}(...)` adapts "
            "its steps to the solution as it goes, but a parallel-in-time solve needs "
            "the whole grid of step times before it starts. Use fixed steps: "
            "`dt0=...` with `stepsize_controller=diffrax.ConstantStepSize()` (or "
            "`None`), or `stepsize_controller=diffrax.StepTo(ts)` with `dt0=None`, "
            "for instance with the step times that an adaptive `diffrax.diffeqsolve` "
            "chose on a cheaper version of the problem (`SaveAt(t0=True, steps=True)`, "
            "without the trailing `inf` padding of its `ts`)."
        )
    if not isinstance(stepsize_controller, (dfx.ConstantStepSize, dfx.StepTo)):
        raise ValueError(
            "`stepsize_controller` must be `None`, `diffrax.ConstantStepSize()` or "
            "`diffrax.StepTo(ts)`: a parallel-in-time solve needs a fixed grid of step "
            f"times; got {type(stepsize_controller).__name__}."
        )
    if isinstance(stepsize_controller, dfx.ConstantStepSize) and dt0 is None:
        raise ValueError(
            "Constant step size solvers cannot select step size automatically; please "
            "pass a value for `dt0` (or the step times with "
            "`stepsize_controller=diffrax.StepTo(ts)` and `dt0=None`)."
        )
    if isinstance(stepsize_controller, dfx.StepTo) and dt0 is not None:
        raise ValueError(
            "`dt0` should be `None`. Step location is already determined by "
            "StepTo(ts=...)."
        )
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
            raise TypeError(f"`max_steps` must be a positive int, got {max_steps!r}.")
        if max_steps < 1:
            raise ValueError(f"`max_steps` must be at least 1, got {max_steps}.")
        max_steps = int(max_steps)
    if coarse is True:
        coarse = CoarseGuess()
    elif coarse is False:
        coarse = None
    if coarse is not None and not isinstance(coarse, CoarseGuess):
        raise TypeError(
            "`coarse` must be a `pdyn.CoarseGuess(...)` (or True for "
            f"`pdyn.CoarseGuess()`), or None for no coarse guess; got {coarse!r}."
        )
    if coarse is not None and coarse.solver is not None:
        _check_solver(coarse.solver)
    if (
        isinstance(steps_per_slice, bool)
        or not isinstance(steps_per_slice, (int, np.integer))
        or steps_per_slice < 1
    ):
        raise ValueError(
            "`steps_per_slice` must be a positive int (the number of fine steps "
            f"grouped into one step of the parallel solve), got {steps_per_slice!r}."
        )
    coarse_solver = () if coarse is None or coarse.solver is None else (coarse.solver,)
    for implicit in _solver_nodes((solver, *coarse_solver), dfx.AbstractImplicitSolver):
        if any(
            getattr(implicit.root_finder, name, None) is _USE_STEPSIZE_TOL
            for name in ("rtol", "atol", "norm")
        ):
            name = type(implicit).__name__
            raise ValueError(
                f"`solver={name}()` is implicit and its root finder takes its "
                "tolerances from an adaptive step size controller, which a "
                "parallel-in-time solve cannot use. Set them explicitly and tightly "
                "(the parallel solver differentiates through each step), e.g. "
                f"`diffrax.{name}(root_finder=optimistix.Newton(rtol=1e-10, "
                "atol=1e-10))` in float64, or `diffrax.VeryChord(rtol=1e-8, "
                "atol=1e-8, norm=optimistix.max_norm)` (which may report divergence at "
                "tolerances near rounding error)."
            )

    grid = _make_grid(t0, t1, dt0, saveat, stepsize_controller)
    y0 = _promote_state(y0, grid.t0.dtype)
    _check_terms(terms, solver, grid.t0, y0, args)
    step = DiffraxStep(terms, solver, grid.direction)
    return _diffeqsolve(
        step,
        grid,
        y0,
        args,
        parallel=parallel,
        max_steps=max_steps,
        init=init,
        coarse=coarse,
        steps_per_slice=int(steps_per_slice),
        adjoint=adjoint,
        throw=bool(throw),
    )


@eqx.filter_jit
def _diffeqsolve(
    step: DiffraxStep,
    step_grid: _Grid,
    y0,
    args,
    *,
    parallel,
    max_steps,
    init,
    coarse,
    steps_per_slice,
    adjoint,
    throw,
) -> dfx.Solution:
    direction = step_grid.direction
    t0, t1, saveat = step_grid.t0, step_grid.t1, step_grid.saveat
    grid = step_grid.times  # normalised
    all_infos = None
    num_steps = grid.shape[0] - 1

    if num_steps == 0:
        trajectory = jtu.tree_map(lambda y: y[None][:0], y0)
        result = dfx.RESULTS.successful
        stats = {"num_parallel_iterations": jnp.array(0)}
        max_steps = 0
    else:
        coarse_stats = {}
        if init is None and coarse is not None:
            init, coarse_stats = coarse_guess(
                coarse,
                step,
                parallel,
                grid,
                direction,
                y0,
                args,
                lambda solver: DiffraxStep(step.terms, solver, step.direction),
            )
        if steps_per_slice == 1:
            inputs = _shard_inputs(step.inputs(grid * direction), parallel, num_steps)
            sol = solve(
                step,
                parallel,
                y0,
                inputs,
                args,
                max_steps=max_steps,
                init=init,
                adjoint=adjoint,
                throw=False,
            )
            trajectory = sol.value
        else:
            inputs = step.inputs(grid * direction)
            slice_step = SliceStep(step)
            sliced = slice_inputs(inputs, num_steps, steps_per_slice)
            sliced = _shard_inputs(
                sliced, parallel, num_slices(num_steps, steps_per_slice)
            )
            if init is not None:
                init = slice_ends(init, num_steps, steps_per_slice)
            sol = solve(
                slice_step,
                parallel,
                y0,
                sliced,
                args,
                max_steps=max_steps,
                init=init,
                adjoint=adjoint,
                throw=False,
            )
            trajectory = fill_slices(slice_step, y0, sol.value, sliced, args, num_steps)
        result = _diffrax_result(sol.result)
        stats = {"num_parallel_iterations": sol.stats["num_steps"], **coarse_stats}
        if "residual_norm" in sol.stats:
            stats["residual_norm"] = sol.stats["residual_norm"]
        max_steps = sol.stats["max_steps"]

        def steps_at(indices):
            """(dense_info, result) of the steps with the given indices, recomputed at
            the solution."""
            previous = jtu.tree_map(
                lambda y_0, ys: jnp.concatenate([y_0[None], ys[:-1]])[indices],
                y0,
                trajectory,
            )
            x = jtu.tree_map(lambda u: u[indices], inputs)
            _, infos, results = jax.vmap(lambda y, x: step.full_step(y, x, args))(
                previous, x
            )
            return infos, results

        # Implicit solvers report the failure of their root finder per step (explicit
        # ones are successful by construction, and need no extra pass).
        x_first = jtu.tree_map(lambda u: u[0], inputs)
        traced_result = eqx.filter_eval_shape(
            lambda: step.full_step(y0, x_first, args)[2].is_traced()
        )
        if traced_result or saveat.dense:
            all_infos, all_results = steps_at(jnp.arange(num_steps))
            if traced_result:
                failed = all_results != dfx.RESULTS.successful
                first = jtu.tree_map(lambda r: r[jnp.argmax(failed)], all_results)
                result = dfx.RESULTS.where(
                    dfx.is_okay(result) & jnp.any(failed), first, result
                )

    def infos_at(indices):
        if all_infos is None:
            infos, _ = steps_at(indices)
        else:
            infos = jtu.tree_map(lambda x: x[indices], all_infos)
        return infos

    ts, ys = save(
        step_grid,
        y0,
        trajectory,
        args,
        lambda ts: interpolate(step, step_grid, y0, infos_at, ts),
    )
    if saveat.dense:
        interpolation = dense_interpolation(step, step_grid, y0, args, all_infos)
    else:
        interpolation = None

    stats = {
        "num_steps": jnp.array(num_steps),
        "num_accepted_steps": jnp.array(num_steps),
        "num_rejected_steps": jnp.array(0),
        "max_steps": max_steps,
        **stats,
    }
    sol = dfx.Solution(
        t0=t0,
        t1=t1,
        ts=ts,
        ys=ys,
        interpolation=interpolation,
        stats=stats,
        result=result,
        solver_state=None,
        controller_state=None,
        made_jump=None,
        event_mask=None,
    )
    if throw:
        sol = raise_on_failure(
            sol, sol.result, dfx.is_okay, _FAILURES, parallel.time_sharding
        )
    return sol


def _shard_inputs(inputs, parallel, num_steps: int):
    """Constrains the inputs of the steps to be sharded along time over the mesh of
    a sharded parallel solver, when the number of steps splits evenly over its
    devices.

    The inputs are computed from the time grid inside the (jitted) solve, so without
    a constraint XLA lays them out, and with them the trajectory, replicated.
    """
    sharding = parallel.time_sharding
    if sharding is None or sharding.num_devices == 1:
        return inputs
    if num_steps % sharding.num_devices:
        return inputs

    def constrain(x):
        if jnp.ndim(x) >= 1 and jnp.shape(x)[0] == num_steps:
            return sharding.shard(x)
        return x

    return jtu.tree_map(constrain, inputs)
