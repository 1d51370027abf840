"""Coarse-grid initial guesses for parallel-in-time differential equation solves.

The fine solve needs a guess for $y_1, \\dots, y_N$. A sequential solve on a coarser
grid, with the same (or a cheaper) Diffrax solver, interpolated onto the fine grid
with that solver's dense output, is a guess within the coarse solver's global error
of the fine solution: the nested iteration of multigrid, and the first sweep of
Parareal's coarse propagator. The coarse grid is either chosen by an adaptive step
size controller (few steps where the solution is smooth, short ones where it is
not) or every $k$-th time of the fine grid.
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree


# `factor=None`: about sqrt(N) coarse steps, but never a coarse step more than this many
# fine steps (the coarse solver must still resolve the dynamics the fine grid resolves),
# and at least 2 fine steps per coarse step.
_MAX_AUTO_FACTOR = 20


def automatic_factor(num_steps: int) -> int:
    """The coarsening factor $k$ chosen when `CoarseGuess(factor=None)`:
    $k = \\min(\\max(2, \\lfloor\\sqrt{N}/4\\rfloor), 20)$ for $N$ fine steps, e.g.
    $k = 11$ for $N = 2000$ and $k = 20$ for $N = 20\\,000$."""
    return int(min(max(2, math.isqrt(num_steps) // 4), _MAX_AUTO_FACTOR))


def automatic_tolerance(dtype) -> float:
    """The tolerances `rtol = atol` of the adaptive coarse solve chosen when
    `CoarseGuess(stepsize_controller=None)`: $\\max(10^{-6}, \\sqrt{\\varepsilon})$ for
    the state's dtype ($10^{-6}$ in float64, $3.5 \\cdot 10^{-4}$ in float32)."""
    return float(max(1e-6, math.sqrt(float(jnp.finfo(dtype).eps))))


class CoarseGuess(eqx.Module):
    """The initial guess of [`parallel_dynamics.diffeqsolve`][] from a sequential solve
    on a coarser grid (the default of `diffeqsolve`).

    The coarse solution is computed sequentially, and its dense output (the solver's
    own interpolation, as `diffrax.SaveAt(ts=...)` uses) gives the guess at the end of
    every fine step. The coarse grid is one of:

    - **adaptive** (the default for ODEs with an explicit solver that estimates its
        error, such as `diffrax.Tsit5()`): the steps a `diffrax.PIDController` chooses on
        $[t_0, t_N]$. It takes long steps where the solution is smooth and short ones
        where it is not (the periapsis of an eccentric orbit), so the guess is
        accurate everywhere at a small sequential cost. It may take twice as many
        steps as the automatic uniform grid below, and at most $N$; where it needs
        more (a low-order solver at a tight tolerance, stiffness), the uniform grid's
        guess is used instead.
    - **uniform** (`stepsize_controller=diffrax.ConstantStepSize()`, or a `factor`,
        or `levels > 1`; the default for SDEs, implicit solvers and solvers without an
        error estimate): every
        $k$-th time of the fine grid $t_0, \\dots, t_N$ (and $t_N$), $\\lceil N / k
        \\rceil$ steps of $k$ fine steps each (for `stepsize_controller=
        diffrax.StepTo(ts)` in the solve, every $k$-th of the given times). With
        `levels=L > 1` the coarse problem is itself solved in parallel, from a guess on
        a grid $k$ times coarser again, down to $L$ levels: only the coarsest level
        ($N / k^L$ steps) is sequential.

    The guess carries no gradient (the solution does not depend on it). Where the
    coarse solve produces non-finite values (a step too large for an explicit solver
    on a stiff problem) or stops early (an adaptive solve out of steps), the guess is
    $y_0$ there instead.

    !!! Example

        ```python
        import diffrax
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        def lotka_volterra(t, y, args):
            prey, predator = y
            return jnp.stack(
                [1.5 * prey - prey * predator, prey * predator - 3 * predator]
            )

        sol = pdyn.diffeqsolve(
            diffrax.ODETerm(lotka_volterra), diffrax.Tsit5(), 0.0, 20.0, 0.01,
            jnp.array([10.0, 1.0]), coarse=pdyn.CoarseGuess(factor=10),
        )
        sol.stats["num_parallel_iterations"]  # a few, against tens with coarse=None
        ```
    """

    factor: int | None = eqx.field(default=None, static=True)
    solver: dfx.AbstractSolver | None = None
    levels: int = eqx.field(default=1, static=True)
    stepsize_controller: dfx.AbstractStepSizeController | None = None

    def __check_init__(self):
        if self.factor is not None and (
            isinstance(self.factor, bool)
            or not isinstance(self.factor, (int, np.integer))
            or self.factor < 2
        ):
            raise ValueError(
                "`CoarseGuess(factor=...)` must be an int >= 2 (fine steps per coarse "
                f"step) or None to choose it from the number of steps; got "
                f"{self.factor!r}."
            )
        if self.solver is not None and not isinstance(self.solver, dfx.AbstractSolver):
            raise TypeError(
                "`CoarseGuess(solver=...)` must be a Diffrax solver such as "
                f"`diffrax.Heun()`, or None for the fine solver; got {self.solver!r}."
            )
        if (
            isinstance(self.levels, bool)
            or not isinstance(self.levels, (int, np.integer))
            or self.levels < 1
        ):
            raise ValueError(
                "`CoarseGuess(levels=...)` must be an int >= 1 (1: the coarse solve is "
                f"sequential); got {self.levels!r}."
            )
        controller = self.stepsize_controller
        if controller is not None and not isinstance(
            controller,
            (dfx.ConstantStepSize, dfx.AbstractAdaptiveStepSizeController),
        ):
            raise TypeError(
                "`CoarseGuess(stepsize_controller=...)` must be an adaptive Diffrax "
                "controller such as `diffrax.PIDController(rtol=1e-6, atol=1e-6)`, "
                "`diffrax.ConstantStepSize()` for every k-th time of the fine grid, or "
                f"None to choose; got {controller!r}."
            )
        if isinstance(controller, dfx.AbstractAdaptiveStepSizeController) and (
            self.factor is not None or self.levels > 1
        ):
            raise ValueError(
                "`CoarseGuess(factor=..., levels=...)` describe a uniform coarse grid "
                "and cannot be combined with an adaptive `stepsize_controller`."
            )

    def factor_for(self, num_steps: int) -> int:
        """The coarsening factor used for a grid of `num_steps` fine steps."""
        return automatic_factor(num_steps) if self.factor is None else int(self.factor)

    def adaptive_controller(
        self, dtype, can_adapt: bool
    ) -> dfx.AbstractAdaptiveStepSizeController | None:
        """The controller of an adaptive coarse solve, or None for the uniform grid.
        `can_adapt`: the terms are ODE terms and the coarse solver estimates its
        error."""
        controller = self.stepsize_controller
        if isinstance(controller, dfx.AbstractAdaptiveStepSizeController):
            return controller
        if controller is None and self.factor is None and self.levels == 1:
            if can_adapt:
                tolerance = automatic_tolerance(dtype)
                return dfx.PIDController(rtol=tolerance, atol=tolerance)
        return None


CoarseGuess.__init__.__doc__ = """**Arguments:**

- `factor`: $k$, the number of fine steps per coarse step of the uniform grid (an
    int $\\geq 2$), or `None` (default) to choose it from the number of fine steps $N$:
    $k = \\min(\\max(2, \\lfloor\\sqrt{N}/4\\rfloor), 20)$, a coarse step of at most
    20 fine steps, so that the coarse solver still resolves what the fine grid
    resolves. A larger $k$ means fewer sequential coarse steps and a worse guess.
- `solver`: the Diffrax solver of the coarse solve; `None` (default) uses the fine
    solver. A cheaper one (e.g. `diffrax.Heun()` for a `diffrax.Dopri8()` solve)
    makes a cheaper and worse guess; it must interpolate (`diffrax.Euler()` does so
    linearly).
- `levels`: $L \\geq 1$ (uniform grid). With $L = 1$ (default) the coarse solve is
    sequential; with $L > 1$ it is solved in parallel by the same parallel solver,
    from its own coarse guess with the same factor, down to $L$ levels (multilevel,
    as the nested iteration of multigrid). The recursion stops early at a level
    whose next coarser grid would have fewer than 2 steps.
- `stepsize_controller`: how the coarse grid is chosen. `None` (default): adaptive
    steps of `diffrax.PIDController(rtol=tol, atol=tol)` with
    $\\mathrm{tol} = \\max(10^{-6}, \\sqrt{\\varepsilon})$ for the state's dtype, when
    `factor` and `levels` are not given, the terms are ODE terms and the coarse solver
    is explicit and estimates its error; otherwise the uniform grid. (On stiff
    problems the uniform grid of an implicit solver gives the better guess: an
    adaptive implicit solve at the default tolerance can give a guess from which
    the iterates reach states where a step's root finder fails.) An adaptive Diffrax controller
    (e.g. `diffrax.PIDController(rtol=1e-4, atol=1e-7)`) always takes adaptive
    steps; `diffrax.ConstantStepSize()` always takes the uniform grid.
"""


def _stop_gradient(tree):
    return jtu.tree_map(
        lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree
    )


def coarse_indices(num_steps: int, factor: int) -> np.ndarray:
    """The indices of the coarse grid's times in the fine grid $t_0, \\dots, t_N$:
    every `factor`-th, and $N$."""
    return np.unique(np.concatenate([np.arange(0, num_steps, factor), [num_steps]]))


def coarse_guess(
    coarse: CoarseGuess,
    fine_step,
    parallel,
    times: Array,
    direction,
    y0: PyTree[Array],
    args: PyTree,
    make_step,
) -> tuple[PyTree[Array], dict]:
    """The guess for $y_1, \\dots, y_N$ at the fine `times` (normalised), and the
    statistics of the coarse solves.

    `make_step(solver)` builds the step map of a Diffrax solver (a `DiffraxStep`);
    `fine_step` is the fine one, used when `coarse.solver` is None.
    """
    from ._solve import solve

    num_steps = times.shape[0] - 1
    step = fine_step if coarse.solver is None else make_step(coarse.solver)
    step, y0, args = _stop_gradient((step, y0, args))
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    controller = coarse.adaptive_controller(
        dtype,
        _is_ode(step.terms)
        and not step.implicit
        and _estimates_error(step, times, direction, y0, args),
    )
    factor = coarse.factor_for(num_steps)
    level_iterations = []

    def trajectory_on(level_times: Array, level: int):
        """The guess at level_times[1:], from the grid `factor` times coarser."""
        n = level_times.shape[0] - 1
        indices = coarse_indices(n, factor)
        grid = level_times[indices]
        num_coarse = grid.shape[0] - 1
        inputs = step.inputs(grid * direction)
        if level < coarse.levels and num_coarse >= 2 * factor:
            init = trajectory_on(grid, level + 1)
            sol = solve(step, parallel, y0, inputs, args, init=init, throw=False)
            ys = sol.value
            level_iterations.append(sol.stats["num_steps"])
            previous = jtu.tree_map(
                lambda a, b: jnp.concatenate([a[None], b[:-1]]), y0, ys
            )
            _, infos, _ = jax.vmap(lambda y, x: step.full_step(y, x, args))(
                previous, inputs
            )
            sequential_steps = None
        else:

            def body(y, x):
                y_next, info, _ = step.full_step(y, x, args)
                return y_next, (y_next, info)

            _, (ys, infos) = lax.scan(body, y0, inputs)
            sequential_steps = num_coarse
        fine = level_times[1:]
        segment = jnp.clip(
            jnp.searchsorted(grid[1:], fine, side="left"), 0, num_coarse - 1
        )

        def evaluate(t, a, b, info):
            return step.solver.interpolation_cls(t0=a, t1=b, **info).evaluate(t)

        infos = jtu.tree_map(lambda x: x[segment], infos)
        guess = jax.vmap(evaluate)(fine, grid[segment], grid[segment + 1], infos)
        # The coarse nodes themselves: the coarse solution, not its interpolation.
        at_node = jnp.asarray(np.isin(np.arange(1, n + 1), indices))
        node_values = jtu.tree_map(lambda y: y[segment], ys)
        guess = jtu.tree_map(
            lambda g, v: jnp.where(_expand(at_node, g), v, g), guess, node_values
        )
        guess = jtu.tree_map(
            lambda g, y: jnp.where(jnp.isfinite(g), g, y[None]), guess, y0
        )
        if sequential_steps is not None:
            stats["num_coarse_steps"] = jnp.array(sequential_steps)
        return guess

    stats: dict = {}
    if controller is not None:
        return _adaptive_guess(
            step,
            controller,
            times,
            direction,
            y0,
            args,
            max_steps=adaptive_budget(num_steps),
            fallback=lambda: (
                trajectory_on(times, 1),
                jnp.array(coarse_indices(num_steps, factor).size - 1),
            ),
        )
    guess = trajectory_on(times, 1)
    stats["coarse_parallel_iterations"] = (
        jnp.stack(level_iterations) if level_iterations else jnp.zeros((0,), jnp.int32)
    )
    stats["coarse_factor"] = factor
    return guess, stats


def _is_ode(terms) -> bool:
    leaves = jtu.tree_leaves(terms, is_leaf=lambda x: isinstance(x, dfx.AbstractTerm))
    return all(isinstance(term, dfx.ODETerm) for term in leaves)


def _estimates_error(step, times: Array, direction, y0, args) -> bool:
    """Whether the solver of `step` returns an error estimate (which an adaptive
    controller needs): `diffrax.Euler` does not, Runge--Kutta pairs do."""
    solver, terms = step.solver, step.terms
    t0, t1 = times[0] * direction, times[1] * direction

    def one_step():
        state = solver.init(terms, t0, t1, y0, args)
        return solver.step(terms, t0, t1, y0, args, state, made_jump=False)[1]

    return eqx.filter_eval_shape(one_step) is not None


def adaptive_budget(num_steps: int) -> int:
    """The most steps the adaptive coarse solve may take for `num_steps` fine steps:
    twice the steps of the automatic uniform grid, and at most $N$."""
    return min(num_steps, 2 * -(-num_steps // automatic_factor(num_steps)))


def _adaptive_guess(
    step, controller, times: Array, direction, y0, args, *, max_steps, fallback
):
    """The guess from a sequential solve with adaptive steps, saved at the fine times
    by the solver's dense output; `fallback()` (the uniform grid's guess and its
    number of steps) where the adaptive solve does not reach $t_N$ within
    `max_steps`."""
    sol = dfx.diffeqsolve(
        step.terms,
        step.solver,
        times[0] * direction,
        times[-1] * direction,
        None,
        y0,
        args,
        saveat=dfx.SaveAt(ts=times[1:] * direction),
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
    )
    finished = sol.result == dfx.RESULTS.successful
    adaptive = jtu.tree_map(
        lambda g, y: jnp.where(jnp.isfinite(g), g, y[None]), sol.ys, y0
    )
    guess, fallback_steps = lax.cond(
        finished, lambda: (adaptive, jnp.array(0)), lambda: fallback()
    )
    stats = {
        "num_coarse_steps": sol.stats["num_steps"] + fallback_steps,
        "coarse_parallel_iterations": jnp.zeros((0,), jnp.int32),
    }
    return guess, stats


def _expand(mask: Array, like: Array) -> Array:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
