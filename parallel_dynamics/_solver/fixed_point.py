from collections.abc import Callable

import lineax as lx
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .._jacobian import AbstractJacobian, IdentityJacobian, ZeroJacobian
from .._linear_solver.scan_solvers import AutoScan
from .newton import AbstractNewton


class Picard(AbstractNewton):
    """Picard iteration: the Newton-type update with $A_t = I$.

    $\\Delta = $ the cumulative sum of the residual, so each iteration costs one
    evaluation of the step and a cumulative sum, with no derivatives. Converges in at
    most $T$ iterations (the prefix property), quickly when $f(y) - y$ is small (e.g.
    an ODE step with a small step size).
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    linear_solver: lx.AbstractLinearSolver = AutoScan()
    verbose: bool = False

    @property
    def jacobian(self) -> AbstractJacobian:
        return IdentityJacobian()


class Jacobi(AbstractNewton):
    """Jacobi (plain fixed-point) iteration: $y_t \\leftarrow f(y_{t-1}, x_t)$ for every
    $t$ at once, the Newton-type update with $A_t = 0$.

    One evaluation of the step per iteration, no derivatives, no scan. Converges in at
    most $T$ iterations; quickly for strongly contracting maps.
    """

    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    linear_solver: lx.AbstractLinearSolver = AutoScan()
    verbose: bool = False

    @property
    def jacobian(self) -> AbstractJacobian:
        return ZeroJacobian()


_doc = """**Arguments:**

- `rtol`: relative tolerance on the update and the residual (default: $\\varepsilon^{0.7}$
    of the state's dtype).
- `atol`: absolute tolerance, with the same default.
- `norm`: the norm used in the stopping test; `optimistix.max_norm` by default.
- `linear_solver`: the Lineax solver of the (trivial) linear system.
- `verbose`: print the residual norm and the scaled update at every iteration.
"""
Picard.__init__.__doc__ = _doc
Jacobi.__init__.__doc__ = _doc
