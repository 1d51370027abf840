import functools as ft

import equinox.internal as eqxi
import lineax as lx
import optimistix as optx
from optimistix.internal import implicit_jvp

from ._linear_solver.scan import ParallelScan


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
    `lineax.JacobianLinearOperator`. The default [`parallel_dynamics.ParallelScan`][]
    recovers the dense blocks $J_t$ with $D$ Jacobian-vector products (memory
    $O(T D^2)$) and runs the (reverse) parallel scan.
    """

    linear_solver: lx.AbstractLinearSolver = ParallelScan()

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        inputs = inputs + (ft.partial(eqxi.while_loop, kind="lax"),)
        return implicit_jvp(primal_fn, rewrite_fn, inputs, tags, self.linear_solver)


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `linear_solver`: the Lineax solver for the linear systems of the tangent and
    cotangent passes. Defaults to [`parallel_dynamics.ParallelScan`][].
"""
