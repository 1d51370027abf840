"""The step of Levenberg–Marquardt on a window: a damped least-squares solve, or the
undamped (Newton) solve that verifies a converged trajectory."""

import lineax as lx
from jaxtyping import Array, Inexact, Scalar

from ..._linear_solver.scan_solvers import AutoScan
from ..._linear_solver.smoother import AbstractKalmanSolver, DampedBidiagonalOperator
from ..._operator import BlockBidiagonalOperator


def damped_step(
    bidiagonal: BlockBidiagonalOperator,
    residual: Inexact[Array, "T D"],
    damping: Scalar | Inexact[Array, " T"],
    linear_solver: lx.AbstractLinearSolver,
) -> Inexact[Array, "T D"]:
    """The minimiser $\\Delta$ of $\\lVert F - L\\Delta \\rVert^2 + \\lambda
    \\lVert \\Delta \\rVert^2$, with $L$ = `bidiagonal` and $\\lambda$ = `damping` (per
    time step), by `linear_solver` (a Kalman smoother or filter)."""
    operator = DampedBidiagonalOperator(bidiagonal, damping)
    zeros = residual * 0
    return lx.linear_solve(
        operator, (residual, zeros), linear_solver, throw=False
    ).value


def newton_step(
    bidiagonal: BlockBidiagonalOperator,
    residual: Inexact[Array, "T D"],
    linear_solver: lx.AbstractLinearSolver,
) -> Inexact[Array, "T D"]:
    """The solution $\\Delta$ of $L \\Delta = F$ by the undamped counterpart of
    `linear_solver`: a plain scan, which unlike a Kalman filter without damping
    propagates no covariances, so that it stays finite on chaotic maps in double
    precision."""
    return lx.linear_solve(
        bidiagonal, residual, undamped_solver(linear_solver), throw=False
    ).value


def undamped_solver(linear_solver: lx.AbstractLinearSolver) -> lx.AbstractLinearSolver:
    """The scan that solves the undamped system with the configuration (sequential or
    parallel, sharded or not) of the damped `linear_solver`."""
    if isinstance(linear_solver, AbstractKalmanSolver):
        return linear_solver.undamped()
    return AutoScan()
