from collections.abc import Callable

import jax.numpy as jnp
import optimistix as optx
from jaxtyping import PyTree, Scalar

from .base import AbstractRecurrenceSolver, all_finite, as_recurrence, IterationState


class Sequential(AbstractRecurrenceSolver):
    """Evaluates the recurrence one step at a time with `jax.lax.scan`.

    The exact reference for every other solver, and usually the fastest choice on a
    CPU, where there is little parallel hardware to exploit. Takes one iteration.
    Gradients through [`parallel_dynamics.solve`][] still use the implicit adjoint of
    the `adjoint` argument.

    !!! Example

        ```python
        import jax.numpy as jnp
        import parallel_dynamics as pdyn

        step = lambda y, x, args: 0.5 * y + x
        sol = pdyn.solve(step, pdyn.Sequential(), jnp.zeros(2), jnp.ones((10, 2)))
        ```
    """

    # Not read by the solve, which is exact: `optimistix.AbstractRootFinder` declares
    # `rtol`, `atol` and `norm` for every root finder.
    rtol: float | None = None
    atol: float | None = None
    norm: Callable[[PyTree], Scalar] = optx.max_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, f_struct, aux_struct, tags
        return self.init_state(y)

    def step(self, fn, y, args, options, state: IterationState, tags):
        del fn, y, options, tags
        recurrence = as_recurrence(args, self)
        new_y = recurrence.sequential()
        finite = all_finite(new_y)
        zero = jnp.array(0.0, new_y.dtype)
        new_state = IterationState(
            step=state.step + 1,
            diffsize=zero,
            diffsize_prev=zero,
            residual_norm=zero,
            result=optx.RESULTS.where(
                finite, optx.RESULTS.successful, optx.RESULTS.nonfinite
            ),
        )
        return new_y, new_state, None

    def terminate(self, fn, y, args, options, state: IterationState, tags):
        del fn, y, args, options, tags
        return state.step >= 1, state.result


Sequential.__init__.__doc__ = """**Arguments:**

- `rtol`, `atol`: not used, as the result is exact. Every Optimistix root finder has
    them (`optimistix.AbstractRootFinder` declares `rtol`, `atol` and `norm`), so
    `Sequential` stands wherever another solver does; like theirs, they are checked
    to be non-negative.
- `norm`: the norm reported as `sol.stats["residual_norm"]`.
"""
