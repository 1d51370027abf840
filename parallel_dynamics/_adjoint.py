import functools as ft

import equinox.internal as eqxi
import lineax as lx
import optimistix as optx
from optimistix.internal import implicit_jvp

from ._linear_solver.matrix_free import MatrixFreeScan
from ._linear_solver.sharded_scan import ShardedScan
from ._solver import AbstractRecurrenceSolver


def default_adjoint_solver(solver: optx.AbstractRootFinder) -> lx.AbstractLinearSolver:
    """The adjoint's linear solver when none is given:
    [`parallel_dynamics.MatrixFreeScan`][] (exact, memory $O(T D)$) for every solver,
    except that a solver whose time axis is sharded over devices (its
    `time_sharding`: a [`parallel_dynamics.ShardedScan`][], or a Kalman smoother with
    a `mesh`) gets a sharded scan over the same mesh axis, so that gradients stay
    sharded along time: its own `ShardedScan`, or one with the default local scan."""
    if not isinstance(solver, AbstractRecurrenceSolver):
        return MatrixFreeScan()
    sharding = solver.time_sharding
    if sharding is None:
        return MatrixFreeScan()
    linear_solver = solver.linear_solver  # pyright: ignore
    if isinstance(linear_solver, ShardedScan):
        return linear_solver
    return ShardedScan(sharding.mesh, sharding.axis_name)  # pyright: ignore


class ImplicitAdjoint(optx.AbstractAdjoint):
    """Differentiates [`parallel_dynamics.solve`][] by the implicit function theorem,
    without backpropagating through the solver's iterations.

    At the solution $F(Y^*, \\theta) = 0$, so
    $\\frac{\\mathrm{d}Y^*}{\\mathrm{d}\\theta} = -(\\partial_Y F)^{-1} \\partial_\\theta F$.
    $\\partial_Y F$ is block lower-bidiagonal with the *true* Jacobians $J_t$, so

    - forward mode (`jax.jvp`) solves $\\dot y_t = J_t \\dot y_{t-1} +
      \\partial_\\theta f\\, \\dot\\theta$ with a scan;
    - reverse mode (`jax.grad`) solves the transposed system
      $g_t = \\partial L / \\partial y_t + J_{t+1}^\\top g_{t+1}$ with a reverse scan,
      then takes one batched vector-Jacobian product of the step for $\\theta$, the
      inputs and $y_0$.

    The result equals backpropagation through the sequential loop at the solution,
    whichever solver found it (the quasi solvers included), with $O(\\log T)$ depth and
    no stored iterations.

    `linear_solver` solves those systems; it receives the Jacobian of the residual as a
    `lineax.JacobianLinearOperator`. Three kinds fit:

    - a scan solver ([`parallel_dynamics.AutoScan`][],
      [`parallel_dynamics.ParallelScan`][], ...) recovers the dense blocks $J_t$ with
      $D$ Jacobian-vector products and runs one (reverse) scan: exact, memory
      $O(T D^2)$;
    - [`parallel_dynamics.MatrixFreeScan`][] runs a chunked scan whose blocks are
      applied through Jacobian-vector (vector-Jacobian) products of the step,
      recomputed chunk by chunk: exact, memory $O(T D)$;
    - [`parallel_dynamics.IterativeScan`][] refines with true Jacobian-vector (or
      vector-Jacobian) products, preconditioned by the diagonal blocks: exact to its
      tolerance (and exactly after $T$ iterations), memory $O(T D)$. Its
      tolerance-based stop can be fooled in float32 on long, weakly contracting maps
      (relative gradient errors far above the tolerance), so it is never the
      default.

    By default (`linear_solver=None`) every solver uses `MatrixFreeScan()`, or the
    solver's own [`parallel_dynamics.ShardedScan`][] when its scans are sharded. It is
    exact whichever solver found the trajectory, its memory is that of the quasi
    solves, and it avoids the dense scan's $O(T D^2)$ buffers; the measured times and
    errors against backpropagation through `lax.scan` are on the Gradients and
    Benchmarks pages of the documentation (`python -m benchmarks.run --only
    gradients`).
    """

    linear_solver: lx.AbstractLinearSolver | None = None

    def __check_init__(self):
        # Otherwise a wrong value only fails when the solve is differentiated.
        solver = self.linear_solver
        if solver is not None and not isinstance(solver, lx.AbstractLinearSolver):
            hint = (
                f": construct one, e.g. `{solver.__name__}()`"
                if isinstance(solver, type)
                else ""
            )
            raise TypeError(
                "`linear_solver` must be a Lineax solver instance or `None`, got "
                f"{solver!r}{hint}."
            )

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        linear_solver = self.linear_solver
        if linear_solver is None:
            _, solver, *_ = inputs
            linear_solver = default_adjoint_solver(solver)
        inputs = inputs + (ft.partial(eqxi.while_loop, kind="lax"),)
        return implicit_jvp(primal_fn, rewrite_fn, inputs, tags, linear_solver)


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: the Lineax solver for the linear systems of the tangent and
    cotangent passes; `None` (default) for the choice per solver described above.
"""
