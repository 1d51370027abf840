"""The HLO reader (`benchmarks.hlo`), the classifier (`benchmarks.classify`) and the
trace reader (`benchmarks.trace`) on fixed inputs, without compiling anything."""

from benchmarks.classify import classify, short_op_name, step_fraction
from benchmarks.hlo import Instruction, parse_hlo, Program
from benchmarks.trace import op_durations


HLO = """\
HloModule jit_solve, entry_computation_layout={(f32[10,4]{1,0})->f32[10,4]{1,0}}

%fused_step (param_0: f32[10,4]) -> f32[10,4] {
  %param_0 = f32[10,4]{1,0} parameter(0)
  ROOT %tanh.1 = f32[10,4]{1,0} tanh(%param_0), metadata={op_name="jit(solve)/while/body/vmap(step)/tanh"}
}

%body (arg: (s32[], f32[10,4])) -> (s32[], f32[10,4]) {
  %arg = (s32[], f32[10,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %y = f32[10,4]{1,0} get-tuple-element(%arg), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one), metadata={op_name="jit(solve)/while/body/add"}
  %step = f32[10,4]{1,0} fusion(%y), kind=kLoop, calls=%fused_step
  %copy.1 = f32[10,4]{1,0} copy(%step), metadata={op_name="jit(solve)/while/body/copy"}
  ROOT %out = (s32[], f32[10,4]{1,0}) tuple(%next, %copy.1)
}

%cond (arg.1: (s32[], f32[10,4])) -> pred[] {
  %arg.1 = (s32[], f32[10,4]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%arg.1), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %three), direction=LT, metadata={op_name="jit(solve)/while/cond/lt"}
}

ENTRY %main (p: f32[10,4]) -> f32[10,4] {
  %p = f32[10,4]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[10,4]{1,0}) tuple(%zero, %p)
  %loop = (s32[], f32[10,4]{1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(solve)/while"}
  ROOT %result = f32[10,4]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_parse_hlo_reads_places_names_and_bodies():
    program = parse_hlo(HLO)
    ops = program.instructions
    assert ops["loop"].opcode == "while" and ops["loop"].depth == 0
    # Inside the loop's body and condition, one level down.
    assert ops["next"].enclosing == ("jit(solve)/while",)
    assert ops["lt"].condition and not ops["next"].condition
    # A fusion without op_name takes the most common one of what it calls.
    assert ops["step"].op_name == "jit(solve)/while/body/vmap(step)/tanh"
    assert ops["step"].root == "tanh"
    assert ops["step"].inner == ("jit(solve)/while/body/vmap(step)/tanh",)
    assert ops["next"].scalar and not ops["copy.1"].scalar
    assert ops["copy.1"].shape == "f32[10,4]{1,0}"
    # The loop runs its body and its condition, transitively.
    assert {"next", "step", "tanh.1", "lt"} <= program.bodies["loop"]


def test_classify_rules():
    ops = parse_hlo(HLO).instructions
    assert step_fraction(ops["step"]) == 1.0
    assert classify(ops["step"]) == "step + Jacobian"
    assert classify(ops["next"]) == "checks and control"  # a scalar
    assert classify(ops["copy.1"]) == "copies and buffers"
    assert classify(ops["p"]) == "outside the loop"
    solve = Instruction(
        name="x",
        opcode="add",
        op_name="jit(solve)/while/body/jit(linear_solve)/add",
        shape="f32[10,4]",
        enclosing=("jit(solve)/while", "jit(solve)/while/body/jit(linear_solve)"),
    )
    assert classify(solve) == "linear solve (scan)"
    update = Instruction(
        name="y",
        opcode="fusion",
        op_name="jit(solve)/while/body/sub",
        shape="f32[10,4]",
        enclosing=("jit(solve)/while",),
    )
    assert classify(update) == "residual and update"
    assert short_op_name("jit(solve)/jit(inner)/while/body/add") == "while/body/add"


def test_op_durations_keep_leaves_only():
    program = Program(
        instructions={
            name: Instruction(name=name, opcode=opcode, op_name="")
            for name, opcode in [("loop", "while"), ("a", "add"), ("b", "copy")]
        },
        bodies={"loop": frozenset({"a", "b"})},
    )
    events = [
        {"name": "loop", "dur": 10.0},
        {"name": "a", "dur": 3.0},
        {"name": "a", "dur": 4.0},
        {"name": "b", "dur": 2.0},
        {"name": "ThunkExecutor::Execute", "dur": 1.0},
    ]
    assert op_durations(events, program) == {"a": [3.0, 4.0], "b": [2.0]}
