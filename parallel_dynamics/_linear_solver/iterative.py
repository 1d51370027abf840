from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._blocks import AbstractBlocks, DiagonalBlocks, ZeroBlocks
from .._operator import BlockBidiagonalOperator, successor_blocks
from .._scan import parallel_scan
from .._stopping import converged, default_tolerance, scaled
from .._validation import check_count


_PRECONDITIONERS = ("exact", "stochastic", "none")


def _coupling_diagonal(operator: lx.AbstractLinearOperator) -> Array:
    """The diagonals of the blocks $A_t$ of a (lower) block bidiagonal operator, from
    $D$ matrix-vector products done one after the other, so that memory stays
    $O(T D)$: $(L e_j)_t[j] = 1 - (A_t)_{jj}$."""
    length, size = operator.in_structure().shape
    dtype = operator.in_structure().dtype

    def column(j):
        probe = jnp.zeros((length, size), dtype).at[:, j].set(1)
        return 1 - operator.mv(probe)[:, j]

    return lax.map(column, jnp.arange(size)).T


def _stochastic_coupling_diagonal(
    operator: lx.AbstractLinearOperator, num_probes: int, key: PRNGKeyArray
) -> Array:
    """Hutchinson estimate of the diagonals of the $A_t$: with random $v$,
    $A_t v_{t-1} = v_t - (L v)_t$, and $\\mathbb{E}[v \\odot A v] = \\operatorname{diag} A$.
    """
    structure = operator.in_structure()
    probes = jr.rademacher(key, (num_probes,) + structure.shape, dtype=structure.dtype)

    def estimate(v):
        coupled = v - operator.mv(v)  # A_t v_{t-1} at position t
        previous = jnp.concatenate([jnp.zeros_like(v[:1]), v[:-1]])
        return previous * coupled

    return jnp.mean(lax.map(estimate, probes), axis=0)


class IterativeScan(lx.AbstractLinearSolver):
    """Solves a block bidiagonal system $L x = b$ in $O(T D)$ memory, by iterative
    refinement preconditioned with the diagonal of the blocks.

    With $M$ the bidiagonal operator of the diagonal blocks
    $\\operatorname{diag}(A_t)$, each iteration takes one matrix-vector product with the
    true operator (a Jacobian-vector or vector-Jacobian product when $L$ is the
    Jacobian of a recurrence residual) and one elementwise parallel scan:

    $$x \\leftarrow x + M^{-1}(b - L x).$$

    This is quasi-Newton applied to a linear system, so it inherits the prefix
    property: $I - M^{-1} L$ is strictly block lower (upper) triangular, after $k$
    iterations the first (last) $k$ steps are exact, and $T$ iterations solve the
    system exactly whatever the preconditioner. Contracting recurrences converge in far
    fewer.

    This is the memory-lean adjoint: used as the `linear_solver` of
    [`parallel_dynamics.ImplicitAdjoint`][] it gives the exact gradient (to `rtol`)
    without ever storing the $T$ dense $D \\times D$ Jacobian blocks.

    `preconditioner` chooses $\\operatorname{diag}(A_t)$: `"exact"` ($D$ operator
    products in `init`, one after the other), `"stochastic"` (`num_probes` Rademacher
    probes) or `"none"` ($A_t \\approx 0$: plain Jacobi refinement).
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None
    preconditioner: str = "exact"
    num_probes: int = 4
    key: PRNGKeyArray = eqx.field(default_factory=lambda: jr.key(0))

    def __check_init__(self):
        if self.preconditioner not in _PRECONDITIONERS:
            raise ValueError(
                f"`preconditioner` must be one of {_PRECONDITIONERS}, got "
                f"{self.preconditioner!r}."
            )
        check_count("num_probes", self.num_probes)
        check_count("max_steps", self.max_steps, optional=True)

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        structure = operator.in_structure()
        if not isinstance(structure, jax.ShapeDtypeStruct) or len(structure.shape) != 2:
            raise ValueError(
                "`IterativeScan` needs an operator on `(T, D)` arrays; got input "
                f"structure {structure}."
            )
        if isinstance(operator, BlockBidiagonalOperator) and not operator.lower:
            # Work with the lower operator and transpose the state.
            state = self.init(operator.transpose(), {})
            return self.transpose(state, {})[0]
        operator = lx.linearise(operator)
        length, size = structure.shape
        if self.preconditioner == "exact":
            blocks = DiagonalBlocks(_coupling_diagonal(operator))
        elif self.preconditioner == "stochastic":
            blocks = DiagonalBlocks(
                _stochastic_coupling_diagonal(operator, self.num_probes, self.key)
            )
        else:
            blocks = ZeroBlocks(length, size, np.dtype(structure.dtype))
        return operator, blocks, True

    def compute(
        self,
        state: tuple[lx.AbstractLinearOperator, AbstractBlocks, bool],
        vector,
        options,
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        del options
        operator, blocks, lower = state
        length = vector.shape[0]
        # Tighter than the nonlinear solvers' default: as the adjoint's linear solve
        # its error adds to that of the trajectory.
        tolerance = default_tolerance(vector.dtype, exponent=0.8)
        rtol = tolerance if self.rtol is None else self.rtol
        atol = tolerance if self.atol is None else self.atol
        max_steps = length if self.max_steps is None else self.max_steps
        if lower:
            precondition = lambda r: parallel_scan(blocks, r)
        else:
            precondition = lambda r: parallel_scan(
                successor_blocks(blocks), r, reverse=True
            )

        def size_of(update, x):
            return jnp.max(jnp.abs(scaled(update, x, rtol, atol)), initial=0)

        # Stop on the size of the corrections, with the error left after the last one
        # estimated from the observed contraction rate, as the nonlinear solvers do
        # (`parallel_dynamics._stopping.converged`, for a linearly convergent
        # iteration): a small residual alone is not enough on weakly contracting maps,
        # where the error is the residual amplified by up to 1 / (1 - θ). A zero
        # correction is a fixed point: the solution.
        def done(size, size_prev, step):
            num_updates = step - 1  # `step` counts the preconditioned start
            by_rate = converged(
                num_updates, size, size_prev, superlinear=False, rounding=False
            )
            return (size == 0) | by_rate

        def cond(carry):
            _, size, size_prev, step = carry
            return ~done(size, size_prev, step) & (step < max_steps)

        def body(carry):
            x, size, _, step = carry
            update = precondition(vector - operator.mv(x))
            x = x + update
            return x, size_of(update, x), size, step + 1

        x0 = precondition(vector)
        inf = jnp.array(jnp.inf, np.finfo(vector.dtype).dtype)  # real if complex
        x, size, size_prev, steps = lax.while_loop(
            cond, body, (x0, inf, inf, jnp.array(1))
        )
        # A stop on `max_steps` (>= T) is exact by the prefix property.
        result = lx.RESULTS.where(
            ~done(size, size_prev, steps) & (steps < length),
            lx.RESULTS.max_steps_reached,
            lx.RESULTS.successful,
        )
        return x, result, {"num_steps": steps}

    def transpose(self, state, options: dict[str, Any]):
        operator, blocks, lower = state
        return (operator.transpose(), blocks, not lower), options

    def conj(self, state, options: dict[str, Any]):
        operator, blocks, lower = state
        return (lx.conj(operator), blocks.conj(), lower), options

    def assume_full_rank(self):
        return True


IterativeScan.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: stop when the error left after the last correction $\\delta$,
    estimated from the contraction rate $\\theta$ of the last two corrections as
    $\\delta\\theta / (1 - \\theta)$, is below $\\text{atol} + \\text{rtol}\\,|x|$
    componentwise (and so is $\\delta$), or when a correction is exactly zero; the
    stopping test of the nonlinear solvers for linearly convergent iterations.
    Default $\\varepsilon^{0.8}$ of the dtype.
- `max_steps`: the maximum number of refinement iterations; defaults to $T$, which is
    always exact.
- `preconditioner`: `"exact"` (default), `"stochastic"` or `"none"`.
- `num_probes`, `key`: the probes of the stochastic preconditioner.
"""
