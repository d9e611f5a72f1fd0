"""Reading optimized HLO text: its computations and instructions, loop trip counts, and the
collectives a compiled program performs with the mesh axes they span.

Replica groups print in three forms, all handled:
- explicit: ``replica_groups={{0,1},{2,3}}``
- iota: ``replica_groups=[4,2]<=[2,2,2]T(0,2,1)`` (iota over the bracketed dims, transposed, reshaped)
- mesh: ``replica_groups=mesh['axis_0'=4,'axis_1'=2] device_ids=([2,4]T(1,0)) {'axis_0'}``
  (devices laid out on the named mesh; a group is the devices along the braced axes)
Async pairs count once: ``*-start`` is counted, ``*-done`` skipped.
Device numbers are partition ids: positions in the mesh's flattened device array.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                    "ragged-all-to-all", "collective-broadcast")

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
                 r"(?P<kind>" + "|".join(sorted(COLLECTIVE_KINDS, key=len, reverse=True)) +
                 r")(?P<start>-start)?\(")
_IOTA = re.compile(r"\[(?P<out>[\d,]+)\]<=\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?")
_MESH = re.compile(r"mesh\[(?P<axes>[^\]]*)\](?:,?\s*device_ids=\((?P<ids>[^)]*\)?)\))?\s*\{(?P<sel>[^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    kind: str
    """all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, ..."""
    name: str
    """HLO instruction name."""
    shape: str
    """Result shape text as printed."""
    groups: tuple[tuple[int, ...], ...]
    """Replica groups (partition ids); for collective-permute, the (source, target) pairs."""
    op_name: str
    """The jax op_name metadata (names the named_scope the op came from), '' if absent."""


def _iota_groups(text: str) -> list[list[int]]:
    m = _IOTA.fullmatch(text.strip())
    if not m:
        raise ValueError(f"unrecognised iota replica groups {text!r}")
    out = [int(x) for x in m["out"].split(",")]
    dims = [int(x) for x in m["dims"].split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m["perm"]:
        ids = ids.transpose([int(x) for x in m["perm"].split(",")])
    return ids.reshape(out).tolist()


def _mesh_groups(m: re.Match) -> list[list[int]]:
    sizes = [int(part.split("=")[1]) for part in m["axes"].split(",") if part.strip()]
    names = [part.split("=")[0].strip().strip("'") for part in m["axes"].split(",") if part.strip()]
    n = int(np.prod(sizes))
    ids = np.arange(n)
    if m["ids"]:
        ids_text = m["ids"].strip()
        if ids_text.startswith("["):
            dims_perm = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", ids_text)
            dims = [int(x) for x in dims_perm[1].split(",")]
            ids = np.arange(n).reshape(dims)
            if dims_perm[2]:
                ids = ids.transpose([int(x) for x in dims_perm[2].split(",")])
        else:
            ids = np.array([int(x) for x in re.findall(r"\d+", ids_text)])
    ids = ids.reshape(sizes)
    selected = [names.index(s.strip().strip("'")) for s in m["sel"].split(",") if s.strip()]
    rest = [i for i in range(len(sizes)) if i not in selected]
    group = int(np.prod([sizes[i] for i in selected]))
    return ids.transpose(rest + selected).reshape(-1, group).tolist()


def parse_replica_groups(line: str) -> list[list[int]]:
    """Replica groups of one HLO instruction line ([] when the line has none: all devices)."""
    if "source_target_pairs=" in line:
        body = line.split("source_target_pairs=", 1)[1]
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", body.split("}}", 1)[0] + "}")]
    if "replica_groups=" not in line:
        return []
    body = line.split("replica_groups=", 1)[1]
    if body.startswith("mesh["):
        m = _MESH.match(body)
        if not m:
            raise ValueError(f"unrecognised mesh replica groups in {line.strip()[:200]!r}")
        return _mesh_groups(m)
    if body.startswith("["):
        return _iota_groups(re.match(r"\S+?(?=,\s|\s|$)", body)[0])
    if body.startswith("{}"):
        return []
    text = body[: body.index("}}") + 2] if "}}" in body else body.split(",", 1)[0]
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", text)]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in optimized HLO text (async ones counted at their start)."""
    found = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        op_name = _OP_NAME.search(line)
        groups = tuple(tuple(g) for g in parse_replica_groups(line))
        found.append(Collective(m["kind"], m["name"], m["shape"], groups, op_name[1] if op_name else ""))
    return found


def group_axes(group, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes along which the devices of one replica group differ.

    mesh_shape: axis name → size in mesh order (e.g. Strategy.mesh_shape). For a
    collective-permute pair, the axes the hop crosses.
    """
    coords = np.array(np.unravel_index(np.asarray(group), tuple(mesh_shape.values()))).T  # [n, axes]
    varying = (coords != coords[:1]).any(axis=0)
    return tuple(name for name, v in zip(mesh_shape, varying, strict=True) if v)


def collective_axes(c: Collective, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Union of the mesh axes spanned by a collective's groups (all axes when it has no groups)."""
    if not c.groups:
        return tuple(a for a, n in mesh_shape.items() if n > 1)
    axes = set()
    for g in c.groups:
        axes.update(group_axes(g, mesh_shape))
    return tuple(a for a in mesh_shape if a in axes)


# --- the module: computations, instructions, shapes, loop multipliers ---------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|c64|c128|f8\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?P<root>ROOT\s+)?%(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a (possibly tuple) shape."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape_text)]


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of an HLO element type (``bf16``: 2; f8 types 1, s4 and u4 half)."""
    return _DTYPE_BYTES.get(dtype, 1)


def shape_bytes(shape_text: str, widths: Mapping[str, float] | None = None) -> int:
    """Bytes of every array in a shape (f8 types 1 byte).

    widths: bytes per element for some element types, counted instead of their own (the
    walk counts an XLA:CPU program's f32 arrays at the width of the model's 16-bit dtype).
    """
    total = 0.0
    for dtype, dims in arrays(shape_text):
        width = widths[dtype] if widths and dtype in widths else _DTYPE_BYTES.get(dtype, 1)
        total += width * int(np.prod(dims, dtype=np.int64))
    return int(total)


def tuple_parts(shape_text: str) -> list[str]:
    """The top-level elements of a tuple shape (``(a, (b, c), u32[])`` -> ``a``, ``(b, c)``, ``u32[]``);
    an array shape is its own single part."""
    text = shape_text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text[1:-1], start=1):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:-1].strip())
    return [p for p in parts if p]


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclass
class Instruction:
    """One HLO instruction."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    is_root: bool
    widths: Mapping[str, float] | None = field(default=None, repr=False, compare=False)
    """Element widths counted instead of the types' own (`Module.counted_as`); None: the types' own."""

    @property
    def bytes(self) -> int:
        """Bytes of the result."""
        return shape_bytes(self.shape, self.widths)

    def bytes_of(self, shape_text: str) -> int:
        """Bytes of another shape (a part of this one's) at the element widths this instruction counts."""
        return shape_bytes(shape_text, self.widths)

    @property
    def elements(self) -> int:
        """Elements of the result (all arrays of a tuple)."""
        return int(sum(np.prod(dims, dtype=np.int64) for _, dims in arrays(self.shape)))

    @property
    def op_name(self) -> str:
        """jax's op_name metadata ('' if none)."""
        m = _OP_NAME.search(self.attrs)
        return m[1] if m else ""


@dataclass
class Computation:
    """One HLO computation: its instructions by name, in order."""

    name: str
    is_entry: bool
    instructions: list[Instruction] = field(default_factory=list)
    by_name: dict[str, Instruction] = field(default_factory=dict)

    @property
    def root(self) -> Instruction:
        """The ROOT instruction (the last one when none is marked)."""
        return next((i for i in self.instructions if i.is_root), self.instructions[-1])

    def parameter(self, index: int) -> Instruction | None:
        """The parameter(index) instruction."""
        return next((i for i in self.instructions if i.opcode == "parameter" and i.operands == [str(index)]), None)

    def users(self, name: str) -> list[Instruction]:
        """Instructions that take `name` as an operand."""
        return [i for i in self.instructions if name in i.operands]


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m["rest"]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _balanced(rest, op.end() - 1)
    inner = rest[op.end():end - 1]
    operands = [t.strip().lstrip("%") for t in re.sub(r"/\*.*?\*/", "", inner).split(",") if t.strip()]
    return Instruction(m["name"], shape, op[1], operands, rest[end:], bool(m["root"]))


def _name_tuple_elements(comp: Computation) -> None:
    """Newer XLA prints an element of a tuple-valued instruction as the operand ``%t#k`` (no
    get-tuple-element of its own): each such operand gets one in `Computation.by_name`, with the element's
    shape, so its bytes and users are found as for a printed one."""
    for instr in list(comp.instructions):
        for operand in instr.operands:
            whole, sep, index = operand.rpartition("#")
            if not sep or operand in comp.by_name or not index.isdigit() or whole not in comp.by_name:
                continue
            parts = tuple_parts(comp.by_name[whole].shape)
            if int(index) < len(parts):
                comp.by_name[operand] = Instruction(operand, parts[int(index)], "get-tuple-element", [whole],
                                                    f", index={index}", False, comp.by_name[whole].widths)


@dataclass
class Module:
    """A parsed HLO module."""

    computations: dict[str, Computation]
    entry: str

    @classmethod
    def parse(cls, text: str) -> Module:
        """Parse optimized HLO text (``compiled.as_text()``)."""
        comps, current, entry = {}, None, ""
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header:
                current = Computation(header["name"], bool(header["entry"]))
                comps[current.name] = current
                if current.is_entry:
                    entry = current.name
                continue
            if current is None:
                continue
            if line.startswith("}"):
                _name_tuple_elements(current)
                current = None
                continue
            instr = _parse_instruction(line)
            if instr:
                current.instructions.append(instr)
                current.by_name[instr.name] = instr
        if not entry:
            raise ValueError("no ENTRY computation in HLO text")
        return cls(comps, entry)

    def counted_as(self, widths: Mapping[str, float]) -> Module:
        """The same module with every array of the given element types counted at the given bytes per element
        (e.g. ``{"f32": 2}``: XLA:CPU's f32 arrays as the bf16 a GPU or TPU program moves). Shapes, and so
        element counts and FLOPs, are unchanged."""
        comps = {}
        for name, comp in self.computations.items():
            instrs = [replace(i, widths=widths) for i in comp.instructions]
            comps[name] = Computation(comp.name, comp.is_entry, instrs, {i.name: i for i in instrs})
        return Module(comps, self.entry)

    def calls(self, instr: Instruction) -> list[tuple[str, str]]:
        """(role, callee) for each computation `instr` calls."""
        found = [(role, name) for role, name in _CALLEE.findall(instr.attrs)]
        for group in _BRANCHES.findall(instr.attrs):
            found += [("branch", n.strip().lstrip("%")) for n in group.split(",") if n.strip()]
        return [(role, name) for role, name in found if name in self.computations]

    def trip_count(self, loop: Instruction) -> int | None:
        """Iterations of a while loop: XLA's known_trip_count, else a `counter < constant` condition.

        The fallback (TPU prints no known_trip_count) assumes the counter starts at 0 and
        steps by 1, as jax's scan and fori_loop lower.
        """
        trip = _TRIP.search(loop.attrs)
        if trip:
            return int(trip[1])
        cond = next((self.computations[c] for role, c in self.calls(loop) if role == "condition"), None)
        if cond is None or cond.root.opcode != "compare" or "direction=LT" not in cond.root.attrs:
            return None
        bound = cond.by_name.get(cond.root.operands[1]) if len(cond.root.operands) > 1 else None
        if bound is None or bound.opcode != "constant":
            return None
        if not self._counter_starts_at_zero(loop, cond):
            return None
        value = re.fullmatch(r"-?\d+", bound.operands[0].strip()) if bound.operands else None
        return int(value[0]) if value else None

    def _counter_starts_at_zero(self, loop: Instruction, cond: Computation) -> bool:
        """The loop counter's initial value, where it is a visible constant, is 0."""
        counter = cond.by_name.get(cond.root.operands[0])
        index = re.search(r"index=(\d+)", counter.attrs) if counter and counter.opcode == "get-tuple-element" else None
        caller = next((c for c in self.computations.values() if loop.name in c.by_name), None)
        init = caller.by_name.get(loop.operands[0]) if caller and loop.operands else None
        if index is None or init is None or init.opcode != "tuple":
            return True                                     # not visible: jax's loops start at 0
        start = caller.by_name.get(init.operands[int(index[1])])
        if start is None or start.opcode != "constant":
            return True
        return start.operands[:1] == ["0"]

    def multipliers(self) -> tuple[dict[str, int], dict[str, str], list[str]]:
        """How often each computation runs per program execution, and how it is called.

        Returns (runs, kind, unknown) with kind in {control, fused, reducer}: control
        computations (entry, loop bodies, branches) touch HBM per instruction; fused ones
        are inside a fusion; reducers are applied by reduce/all-reduce/sort. A while body
        runs known_trip_count times (its condition once more); `unknown` lists loops
        without a known trip count (counted once).
        """
        runs = {name: 0 for name in self.computations}
        kind = {self.entry: "control"}
        order, seen = [], set()

        def visit(name):  # post-order over the call graph (a DAG)
            if name in seen:
                return
            seen.add(name)
            for instr in self.computations[name].instructions:
                for _, callee in self.calls(instr):
                    visit(callee)
            order.append(name)

        visit(self.entry)
        runs[self.entry] = 1
        unknown = []
        for name in reversed(order):
            for instr in self.computations[name].instructions:
                n = self.trip_count(instr) if instr.opcode == "while" else 1
                if n is None:
                    unknown.append(instr.name)
                    n = 1
                if instr.opcode == "conditional":
                    unknown.append(f"{instr.name} (conditional: every branch counted as taken)")
                for role, callee in self.calls(instr):
                    times = {"body": n, "condition": n + 1}.get(role, 1)
                    runs[callee] += runs[name] * times
                    if role == "calls" and instr.opcode == "fusion":
                        kind.setdefault(callee, "fused")
                    elif role == "to_apply" and instr.opcode != "call":
                        kind.setdefault(callee, "reducer")
                    else:
                        kind.setdefault(callee, "fused" if kind.get(name) == "fused" else "control")
        return runs, kind, unknown


_NOT_BUFFERS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call", "conditional",
                "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}


def largest_results(hlo_text: str, n: int = 3) -> list[tuple[int, str, str]]:
    """The `n` largest buffers the program creates: (bytes, opcode, op_name) of top-level results.

    Top-level means in the entry computation, loop bodies and branches (not inside a fusion):
    each is a buffer the program allocates, so these are the largest temporaries a reader
    should check (a weight-sized one in a decode step is a copy of the weights)."""
    module = Module.parse(hlo_text)
    _, kind, _ = module.multipliers()
    found = [(i.bytes, i.opcode, i.op_name) for name, comp in module.computations.items()
             if kind.get(name) == "control" for i in comp.instructions if i.opcode not in _NOT_BUFFERS]
    return sorted(found, key=lambda t: -t[0])[:n]
