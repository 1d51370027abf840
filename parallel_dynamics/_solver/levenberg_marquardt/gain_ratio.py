"""The gain ratio: how much of the decrease of the merit that the linear model
predicts a trial step achieves."""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Inexact, Scalar


def gain_ratio(
    residual: Inexact[Array, "T D"],
    model_residual: Inexact[Array, "T D"],
    trial_residual: Inexact[Array, "T D"],
    where: Bool[Array, " T"],
) -> tuple[Scalar, Scalar, Scalar]:
    """The ratio $\\rho$ of the actual to the predicted decrease of
    $\\lVert F \\rVert^2$ over the times `where`, and $\\lVert F \\rVert^2$ there at
    the iterate and at the trial.

    With $F$ the residual at the current iterate, $F - L\\Delta$ the residual the
    linear model predicts for the step $\\Delta$ and $F'$ the residual at the trial,

    $$\\rho = \\frac{\\lVert F \\rVert^2 - \\lVert F' \\rVert^2}
    {\\lVert F \\rVert^2 - \\lVert F - L\\Delta \\rVert^2}.$$

    $\\rho = 0$ where the model predicts no decrease.
    """
    mask = where[:, None]
    merit = jnp.sum(jnp.where(mask, residual, 0) ** 2)
    predicted = merit - jnp.sum(jnp.where(mask, model_residual, 0) ** 2)
    trial_merit = jnp.sum(jnp.where(mask, trial_residual, 0) ** 2)
    ratio = (merit - trial_merit) / jnp.where(predicted > 0, predicted, jnp.inf)
    return ratio, merit, trial_merit
