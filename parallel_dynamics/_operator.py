import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, Scalar

from ._blocks import AbstractBlocks, map_time


def shift_backward(x: Array) -> Array:
    """$(x_2, \\dots, x_T, 0)$ along the leading (time) axis: each step sees its
    successor."""
    return jnp.concatenate([x[1:], jnp.zeros_like(x[:1])], axis=0)


def successor_blocks(blocks: AbstractBlocks) -> AbstractBlocks:
    """The blocks $A_{t+1}^\\top$ at position $t$, as used by the transposed system.

    Position $T$ gets a zero block: it only multiplies $v_{T+1} = 0$, and $A_1$, which
    appears nowhere in the operator, may be non-finite (inf times 0 is NaN).
    """
    return map_time(shift_backward, blocks.transpose())


class BlockBidiagonalOperator(lx.AbstractLinearOperator):
    """The block bidiagonal operator of a linear recurrence over a time axis.

    With blocks $A_1, \\dots, A_T$ (an [`parallel_dynamics.AbstractBlocks`][]) acting on
    vectors $v = (v_1, \\dots, v_T)$ stored as a `(T, D)` array, the lower operator is

    $$(L v)_t = v_t - A_t v_{t-1}, \\qquad v_0 = 0,$$

    i.e. identity blocks on the diagonal and $-A_t$ on the sub-diagonal. It is the
    Jacobian $\\partial F / \\partial Y$ of the residual
    $F(Y)_t = y_t - f(y_{t-1}, x_t)$ of a recurrence when $A_t = \\partial f/\\partial y$.
    Solving $L v = b$ is the recurrence $v_t = A_t v_{t-1} + b_t$, which the solvers in
    this library do with parallel, chunked or sequential scans. $A_1$ multiplies
    $v_0 = 0$ and so never matters.

    Its transpose is the upper operator
    $(L^\\top g)_t = g_t - A_{t+1}^\\top g_{t+1}$, $g_{T+1} = 0$, whose solve is the
    reverse recurrence used for gradients.

    !!! Example

        ```python
        import jax.numpy as jnp
        import lineax as lx
        import parallel_dynamics as pdyn

        a = 0.9 * jnp.ones((5, 3))
        operator = pdyn.BlockBidiagonalOperator(pdyn.DiagonalBlocks(a))
        v = lx.linear_solve(operator, jnp.ones((5, 3)), pdyn.ParallelScan()).value
        ```
    """

    blocks: AbstractBlocks
    lower: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not isinstance(self.blocks, AbstractBlocks):
            raise TypeError(
                "`blocks` must be a `parallel_dynamics.AbstractBlocks`, got "
                f"{type(self.blocks).__name__}."
            )

    def _structure(self) -> jax.ShapeDtypeStruct:
        matrices = jax.eval_shape(self.blocks.as_matrices)
        return jax.ShapeDtypeStruct(matrices.shape[:2], matrices.dtype)

    def mv(self, vector):
        # $A_1$ is left out rather than applied to $v_0 = 0$: it may be non-finite.
        coupling = map_time(lambda x: x[1:], self.blocks)
        zero = jnp.zeros_like(vector[:1])
        if self.lower:
            coupled = [zero, coupling.apply(vector[:-1])]
        else:
            coupled = [coupling.transpose().apply(vector[1:]), zero]
        return vector - jnp.concatenate(coupled, axis=0)

    def as_matrix(self):
        matrices = self.blocks.as_matrices()
        length, size = matrices.shape[:2]
        dense = jnp.eye(length * size, dtype=matrices.dtype)
        coupling = jnp.zeros((length, size, length, size), matrices.dtype)
        steps = np.arange(1, length)
        coupling = coupling.at[steps, :, steps - 1, :].set(-matrices[1:])
        dense = dense + coupling.reshape(length * size, length * size)
        return dense if self.lower else dense.T

    def transpose(self):
        return BlockBidiagonalOperator(self.blocks, lower=not self.lower)

    def in_structure(self):
        return self._structure()

    def out_structure(self):
        return self._structure()


# Lineax's single-dispatch structure queries. The diagonal is the identity; the
# operator is triangular (lower, or upper once transposed) and never symmetric unless
# the coupling vanishes.


def _decoupled(operator: BlockBidiagonalOperator) -> bool:
    return operator.blocks.is_zero()


@lx.linearise.register(BlockBidiagonalOperator)
@lx.materialise.register(BlockBidiagonalOperator)
def _(operator):
    return operator


@lx.diagonal.register(BlockBidiagonalOperator)
def _(operator):
    structure = operator.in_structure()
    return jnp.ones(structure.shape[0] * structure.shape[1], structure.dtype)


@lx.tridiagonal.register(BlockBidiagonalOperator)
def _(operator):
    if not lx.is_tridiagonal(operator):
        raise ValueError("A `BlockBidiagonalOperator` is tridiagonal only when D = 1.")
    # From the blocks, not `as_matrix`: that would be (T D)^2 entries.
    structure = operator.in_structure()
    size = structure.shape[0] * structure.shape[1]
    diagonal = jnp.ones(size, structure.dtype)
    zeros = jnp.zeros(max(size - 1, 0), structure.dtype)
    if _decoupled(operator):
        return diagonal, zeros, zeros
    coupling = -operator.blocks.as_matrices()[1:, 0, 0]  # D = 1
    return (
        (diagonal, coupling, zeros) if operator.lower else (diagonal, zeros, coupling)
    )


@lx.is_symmetric.register(BlockBidiagonalOperator)
@lx.is_diagonal.register(BlockBidiagonalOperator)
def _(operator):
    return _decoupled(operator)


@lx.is_tridiagonal.register(BlockBidiagonalOperator)
def _(operator):
    return _decoupled(operator) or operator.in_structure().shape[1] == 1


@lx.has_unit_diagonal.register(BlockBidiagonalOperator)
def _(operator):
    return True


@lx.is_lower_triangular.register(BlockBidiagonalOperator)
def _(operator):
    return operator.lower or _decoupled(operator)


@lx.is_upper_triangular.register(BlockBidiagonalOperator)
def _(operator):
    return (not operator.lower) or _decoupled(operator)


@lx.is_positive_semidefinite.register(BlockBidiagonalOperator)
def _(operator):
    return _decoupled(operator)


@lx.is_negative_semidefinite.register(BlockBidiagonalOperator)
def _(operator):
    return False


@lx.conj.register(BlockBidiagonalOperator)
def _(operator):
    return BlockBidiagonalOperator(operator.blocks.conj(), lower=operator.lower)


class DampedBidiagonalOperator(lx.AbstractLinearOperator):
    """The operator of a damped (Levenberg–Marquardt) step on a recurrence:

    $$\\Delta \\mapsto \\begin{pmatrix} L \\Delta \\\\ \\sqrt{\\lambda}\\, \\Delta
    \\end{pmatrix},$$

    with $L$ a lower [`parallel_dynamics.BlockBidiagonalOperator`][] with blocks $A_t$
    and $\\lambda > 0$ the damping: a scalar, or one value $\\lambda_t$ per time step
    (shape `(T,)`). Its least-squares solution against $(r, s)$,

    $$\\min_\\Delta \\lVert L \\Delta - r \\rVert^2 + \\lVert \\sqrt{\\lambda}\\,\\Delta - s
    \\rVert^2,$$

    is the posterior mean of a linear-Gaussian state-space model, computed by
    [`parallel_dynamics.KalmanSmoother`][]. This mirrors how `optimistix` poses damped
    Newton steps, as the linear least-squares problem
    $[J; \\sqrt{\\lambda} I]\\,\\Delta = [F; 0]$.
    """

    bidiagonal: BlockBidiagonalOperator
    damping: Scalar

    def __check_init__(self):
        if not self.bidiagonal.lower:
            raise ValueError(
                "`DampedBidiagonalOperator` needs a lower bidiagonal operator."
            )

    def _root_damping(self):
        damping = jnp.sqrt(self.damping)
        return damping[:, None] if jnp.ndim(damping) == 1 else damping

    def mv(self, vector):
        return self.bidiagonal.mv(vector), self._root_damping() * vector

    def as_matrix(self):
        matrix = self.bidiagonal.as_matrix()
        structure = self.in_structure()
        root = jnp.broadcast_to(self._root_damping(), structure.shape).reshape(-1)
        return jnp.concatenate([matrix, jnp.diag(root).astype(matrix.dtype)], axis=0)

    def transpose(self):
        def transposed_mv(vector):
            residual, damped = vector
            return self.bidiagonal.T.mv(residual) + self._root_damping() * damped

        return lx.FunctionLinearOperator(transposed_mv, self.out_structure())

    def in_structure(self):
        return self.bidiagonal.in_structure()

    def out_structure(self):
        structure = self.bidiagonal.out_structure()
        return structure, structure


@lx.linearise.register(DampedBidiagonalOperator)
@lx.materialise.register(DampedBidiagonalOperator)
def _(operator):
    return operator


@lx.is_symmetric.register(DampedBidiagonalOperator)
@lx.is_diagonal.register(DampedBidiagonalOperator)
@lx.is_tridiagonal.register(DampedBidiagonalOperator)
@lx.has_unit_diagonal.register(DampedBidiagonalOperator)
@lx.is_lower_triangular.register(DampedBidiagonalOperator)
@lx.is_upper_triangular.register(DampedBidiagonalOperator)
@lx.is_positive_semidefinite.register(DampedBidiagonalOperator)
@lx.is_negative_semidefinite.register(DampedBidiagonalOperator)
def _(operator):
    return False


@lx.conj.register(DampedBidiagonalOperator)
def _(operator):
    return DampedBidiagonalOperator(lx.conj(operator.bidiagonal), operator.damping)
