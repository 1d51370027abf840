"""The classification of `benchmarks.classify`, on the compiled program of a small
quasi-DEER solve: every instruction gets a category, and the parts of an iteration
land where the profile says they do."""

import collections

import equinox as eqx
import jax
import jax.numpy as jnp

import parallel_dynamics as pdyn
from benchmarks.classify import CATEGORIES, classify
from benchmarks.hlo import CONTROL_FLOW, parse_hlo, PLUMBING


def test_every_instruction_of_a_solve_is_classified():
    cell = eqx.nn.GRUCell(3, 3, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (16, 3))
    step = lambda h, x, cell: cell(x, h)
    solve = jax.jit(
        lambda y0, xs, cell: (
            pdyn.solve(
                step, pdyn.QuasiDEER(), y0, xs, cell, max_steps=3, throw=False
            ).value
        )
    )
    program = parse_hlo(solve.lower(jnp.zeros(3), xs, cell).compile().as_text())
    categories = collections.defaultdict(list)
    for instruction in program.instructions.values():
        if instruction.opcode in PLUMBING:  # no time of their own in a trace
            continue
        category = classify(instruction)
        assert category in CATEGORIES
        categories[category].append(instruction)
    # A loop's time is its body's; only the operations themselves must be known.
    unknown = [i.name for i in categories["other"] if i.opcode not in CONTROL_FLOW]
    assert not unknown, unknown
    assert any("linear_solve" in i.op_name for i in categories["linear solve (scan)"])
    assert any("GRUCell" in i.op_name for i in categories["step + Jacobian"])
    assert categories["checks and control"]
    # The linear solve's loop is not counted as the solver's own loop.
    loops = [i for i in program.instructions.values() if i.opcode == "while"]
    assert loops and all(classify(i) != "step + Jacobian" for i in loops)
