"""The Diffrax bridge: fixed-step ODE and SDE solves, parallel over time.

A fixed-step solver step $\\Phi(t_n, t_{n+1}, y_n)$ of any Diffrax solver is a
discrete map with inputs $x_n = (t_n, t_{n+1})$, so the whole discrete solution is the
trajectory of a recurrence, which [`parallel_dynamics.solve`][] evaluates in parallel
over time. [`parallel_dynamics.diffeqsolve`][] mirrors `diffrax.diffeqsolve` for fixed
step sizes and returns the same `diffrax.Solution`.

- `step.py`: the step map, [`parallel_dynamics.DiffraxStep`][];
- `grid.py`: the step times, from `dt0` or `diffrax.StepTo(ts)`, as Diffrax's;
- `saveat.py`: the values saved by `diffrax.SaveAt`, and the dense output;
- `solve.py`: [`parallel_dynamics.diffeqsolve`][];
- `version.py`: the supported Diffrax versions, checked here on import, before the
    modules that use Diffrax internals are imported.
"""

from .version import check_diffrax_version


check_diffrax_version()

from .solve import diffeqsolve as diffeqsolve  # noqa: E402
from .step import DiffraxStep as DiffraxStep  # noqa: E402
