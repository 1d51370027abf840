"""A reader of XLA's optimised HLO text (`jitted.lower(...).compile().as_text()`):
every instruction with its opcode, `op_name` metadata, result shape, the operations
it calls and the `while`/`call`/`conditional` instructions that run it.

Only what `benchmarks.profile` needs to classify the operations of a compiled solve;
XLA's text format is not a stable interface, and `benchmarks/tests/test_hlo.py`
checks the reader on a fixed text and on a compiled program.
"""

from __future__ import annotations

import collections
import dataclasses
import re


CONTROL_FLOW = {"while", "call", "conditional"}
PLUMBING = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction of the compiled program, as far as classifying it needs.

    - `op_name`: its own, or when it has none the most common one of the
      instructions it calls (a fusion's), or of its users (XLA drops it from some
      rewritten dots);
    - `inner`: the op_names of the instructions it calls (a fusion's, a loop's
      body), transitively, plumbing left out;
    - `shape`: its result's shape, e.g. `f32[10000,16]{1,0}`;
    - `root`: what a fusion's computation returns (its root's opcode);
    - `enclosing`: the op_names of the `while`/`call` instructions that run it,
      outermost first (none: the entry computation);
    - `condition`: whether it belongs to a loop's condition rather than its body.
    """

    name: str
    opcode: str
    op_name: str
    shape: str = ""
    inner: tuple[str, ...] = ()
    root: str = ""
    scalar: bool = False
    enclosing: tuple[str, ...] = ()
    condition: bool = False

    @property
    def depth(self) -> int:
        """0: the entry computation; 1: the body of a loop there; 2: a loop in it."""
        return len(self.enclosing)


@dataclasses.dataclass(frozen=True)
class Program:
    """The instructions of a compiled program by name (names are unique within an
    HLO module), and for every `while`/`call`/`conditional` the instructions it
    runs, transitively."""

    instructions: dict[str, Instruction]
    bodies: dict[str, frozenset[str]]


_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\(")
_CALLED = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations)=%([\w.-]+)"
)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r"%([\w.-]+)")
_SCALAR = re.compile(r"[a-z]+[0-9]*\[\](\{\})?")


def parse_hlo(text: str) -> Program:
    """The program of an optimised HLO module's text
    (`jitted.lower(...).compile().as_text()`)."""
    raw, computations, roots, entry = _read(text)
    enclosing, conditions = _control_flow(raw, computations, entry)
    users = collections.defaultdict(list)
    for name, r in raw.items():
        for operand in r["operands"]:
            users[operand].append(name)
    instructions, bodies = {}, {}
    for name, r in raw.items():
        called = [c for _, c in r["called"]]
        inside = _members(called, raw, computations)
        inner = [
            raw[n]["op_name"]
            for n in inside
            if raw[n]["op_name"] and raw[n]["opcode"] not in PLUMBING
        ]
        op_name = r["op_name"] or _most_common(inner)
        op_name = op_name or _most_common(raw[u]["op_name"] for u in users[name])
        instructions[name] = Instruction(
            name=name,
            opcode=r["opcode"],
            op_name=op_name,
            shape=r["shape"],
            inner=tuple(inner),
            root=roots.get(called[0], "") if r["opcode"] == "fusion" and called else "",
            scalar=_SCALAR.fullmatch(r["shape"]) is not None,
            enclosing=enclosing.get(r["computation"], ()),
            condition=r["computation"] in conditions,
        )
        if r["opcode"] in CONTROL_FLOW:
            bodies[name] = frozenset(inside)
    return Program(instructions, bodies)


def _read(text: str):
    """The instructions of every computation of an HLO module's text: their opcode,
    op_name, result shape, the computations they call and their
    operands; each computation's root opcode; the entry computation's name."""
    raw: dict[str, dict] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    roots: dict[str, str] = {}
    entry = current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            entry = current if header.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if match is None or current is None:
            continue
        is_root, name, shape, opcode = match.groups()
        op_name = _OP_NAME.search(line)
        raw[name] = {
            "opcode": opcode,
            "op_name": op_name.group(1) if op_name else "",
            "shape": shape,
            "called": _CALLED.findall(line),
            "operands": _OPERAND.findall(line[match.end() :].split("), ", 1)[0]),
            "computation": current,
        }
        computations[current].append(name)
        if is_root:
            roots[current] = opcode
    return raw, computations, roots, entry


def _control_flow(raw, computations, entry) -> tuple[dict, set[str]]:
    """For every computation that `while`/`call`/`conditional` instructions run
    (fusions' computations excluded), the op_names of those instructions from the
    entry computation down; and the computations that are loop conditions."""
    enclosing = {entry: ()}
    conditions = set()
    pending = [entry]
    while pending:
        computation = pending.pop()
        for name in computations[computation]:
            if raw[name]["opcode"] not in CONTROL_FLOW:
                continue
            for role, called in raw[name]["called"]:
                if role == "condition":
                    conditions.add(called)
                if called not in enclosing:
                    enclosing[called] = (*enclosing[computation], raw[name]["op_name"])
                    pending.append(called)
    return enclosing, conditions


def _members(called, raw, computations) -> list[str]:
    """The instructions of the computations `called`, and of those they call."""
    members = []
    pending, seen = list(called), set()
    while pending:
        computation = pending.pop()
        if computation in seen:
            continue
        seen.add(computation)
        for name in computations.get(computation, []):
            members.append(name)
            pending.extend(c for _, c in raw[name]["called"])
    return members


def _most_common(names) -> str:
    counts = collections.Counter(name for name in names if name)
    return counts.most_common(1)[0][0] if counts else ""
