import functools as ft

import equinox.internal as eqxi
import lineax as lx
import optimistix as optx
from optimistix.internal import implicit_jvp

from ._linear_solver.scan import AutoScan
from ._linear_solver.sharded import ShardedScan


def default_adjoint_solver(solver: optx.AbstractRootFinder) -> lx.AbstractLinearSolver:
    """The dense transposed scan for every solver: exact to rounding in both
    precisions. (The memory-lean [`parallel_dynamics.IterativeScan`][] is opt-in: in
    float32 on long, weakly contracting maps its tolerance-based stop can leave errors
    of order 1e-2 in the gradient.) A solver whose scans are sharded over devices
    ([`parallel_dynamics.ShardedScan`][]) gets the same sharded scan for its adjoint,
    so that gradients stay sharded along time."""
    linear_solver = getattr(solver, "linear_solver", None)
    if isinstance(linear_solver, ShardedScan):
        return linear_solver
    return AutoScan()


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
    `lineax.JacobianLinearOperator`. Two kinds fit:

    - a scan solver ([`parallel_dynamics.AutoScan`][],
      [`parallel_dynamics.ParallelScan`][], ...) recovers the dense blocks $J_t$ with
      $D$ Jacobian-vector products and runs one (reverse) scan: exact, memory
      $O(T D^2)$;
    - [`parallel_dynamics.IterativeScan`][] refines with true Jacobian-vector (or
      vector-Jacobian) products, preconditioned by the diagonal blocks: exact to its
      tolerance (and exactly after $T$ iterations), memory $O(T D)$.

    By default (`linear_solver=None`) every solver uses `AutoScan()`: exact to
    rounding in both precisions. Pass `IterativeScan()` for $O(T D)$ memory (large
    $D$); in float32 on long, weakly contracting maps, tighten its tolerances.
    """

    linear_solver: lx.AbstractLinearSolver | None = None

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        linear_solver = self.linear_solver
        if linear_solver is None:
            _, solver, *_ = inputs
            linear_solver = default_adjoint_solver(solver)
        inputs = inputs + (ft.partial(eqxi.while_loop, kind="lax"),)
        return implicit_jvp(primal_fn, rewrite_fn, inputs, tags, linear_solver)


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: the Lineax solver for the linear systems of the tangent and
    cotangent passes; `None` (default) for the dense scan, as above.
"""
