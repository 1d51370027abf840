"""The categories of the operations of a compiled solve (GRU problem): the step and
its Jacobian, the linear solve, the update, checks and control, copies, work
outside the loop. `classify` decides from an instruction's place in the program,
its `op_name` and what it computes (see `benchmarks.hlo`).
"""

from __future__ import annotations

from .hlo import CONTROL_FLOW, Instruction


CATEGORIES = {
    "step + Jacobian": "the step evaluated for all t at once and its derivative "
    "(op_name under `vmap(` or `jvp(`), the extraction of the diagonal and the "
    "fusions mostly made of them included; in `lax.scan`, the step itself "
    "(`eqx.nn.GRUCell`)",
    "linear solve (scan)": "the linear recurrence: the `while` of the linear "
    "solve (or the `call` XLA compiles it into) and what runs inside it",
    "residual and update": "elementwise arithmetic of the Newton update in "
    "fusions of its own: the update y - delta (the residual y - f(y_prev) is fused "
    "with the step's output, and counted with the step)",
    "checks and control": "finiteness checks, the stopping test's norms, selects, "
    "and the scalar operations of the loops (counters, conditions)",
    "copies and buffers": "copies, broadcasts (zero-filled buffers, the initial "
    "guess), slices, pads, concatenations and dynamic (update) slices: the shifted "
    "trajectory, the loop carries, the batches",
    "outside the loop": "operations of the entry computation, outside the solver's "
    "`while` (XLA hoists loop-invariant work there, such as the inputs' product "
    "with the GRU's input weights, whatever its op_name)",
    "other": "none of the above",
}
MOVES = {
    "copy",
    "broadcast",
    "broadcast_in_dim",
    "slice",
    "pad",
    "concatenate",
    "scatter",
    "gather",
    "transpose",
    "dynamic-slice",
    "dynamic_slice",
    "dynamic-update-slice",
    "dynamic_update_slice",
    "reshape",
    "bitcast",
}
CHECKS = ("is_finite", "is-finite", "reduce_and", "reduce_max", "select_n", "/cond/")
UPDATES = {"sub", "add", "mul", "add_any", "neg", "subtract", "multiply"}


def _is_step(op_name: str) -> bool:
    """Under the vmapped step or its derivative, or the GRU's own module (the step
    in `lax.scan`), and not in the linear solve."""
    step = "vmap(" in op_name or "jvp(" in op_name or "eqx.nn.GRUCell" in op_name
    return step and "linear_solve" not in op_name


def step_fraction(instruction: Instruction) -> float:
    """The fraction of the instructions it calls (a fusion's, a loop's body) that
    belong to the step (`_is_step`)."""
    inner = instruction.inner
    return sum(map(_is_step, inner)) / len(inner) if inner else 0.0


def classify(instruction: Instruction) -> str:
    """The category of an instruction; the first rule that matches wins:

    1. `outside the loop`: in the entry computation (depth 0), unless it is a loop
       that XLA compiles into one operation (`lax.scan` at D = 4): rules 2 and 3;
    2. `linear solve (scan)`: the `while` or `call` of the linear solve (op_name
       under `linear_solve`) and everything it runs; a copy of the solve's operands
       before its loop is a copy (rule 7);
    3. `step + Jacobian`: op_name under `vmap(` or `jvp(` (the vmapped step, its
       derivative, the diagonal's extraction), or naming `eqx.nn.GRUCell`
       (`lax.scan`'s step, not vmapped); or a fusion, `while` or `call` at least half
       of whose instructions are (a fusion's op_name is its root's: DEER's Jacobian
       blocks fused with their write into the `(T, D, D)` buffer are the
       Jacobian, not a copy);
    4. `checks and control`: any instruction with a scalar result (counters,
       conditions, the stopping decision);
    5. `copies and buffers`: a copy or data movement (broadcast, slice, pad,
       concatenation, dynamic slice, scatter...) by its opcode;
    6. `checks and control`: op_name naming finiteness, `reduce_and`,
       `reduce_max`, a select or a loop's condition;
    7. `copies and buffers`: a fusion whose root is a data movement, or op_name
       ending in one;
    8. `checks and control`: another reduction (the stopping test's norm);
    9. `residual and update`: elementwise subtraction, addition, product;
    10. `other`.
    """
    op = instruction.op_name
    last = op.rsplit("/", 1)[-1]
    if instruction.depth == 0 and instruction.opcode not in CONTROL_FLOW:
        return "outside the loop"
    if any("linear_solve" in loop for loop in instruction.enclosing) or (
        instruction.opcode in CONTROL_FLOW and "linear_solve" in op
    ):
        return "linear solve (scan)"
    if _is_step(op) or step_fraction(instruction) >= 0.5:
        return "step + Jacobian"
    if instruction.scalar:
        return "checks and control"
    if instruction.opcode in MOVES:  # its op_name may be its users'
        return "copies and buffers"
    if any(check in op for check in CHECKS):
        return "checks and control"
    if instruction.root in MOVES or last in MOVES:
        return "copies and buffers"
    if last.startswith("reduce"):
        return "checks and control"
    if last in UPDATES:
        return "residual and update"
    return "other"


def short_op_name(op_name: str, width: int = 64) -> str:
    """The op_name without its leading `jit(...)` components, at most `width`
    characters (the end kept)."""
    parts = op_name.split("/")
    while len(parts) > 1 and parts[0].startswith("jit("):
        parts = parts[1:]
    text = "/".join(parts)
    return text if len(text) <= width else "..." + text[-(width - 3) :]
