"""The cost report: per-device memory, loop-corrected FLOPs and bytes, and every collective, per phase.

Three sources, each labelled:
- ``memory_analysis()`` of the compiled program (argument, output, alias, temporary bytes);
- our own walk of the optimized HLO (`moe_jax.hlo.Module`): dot/convolution FLOPs from
  shapes, elementwise FLOPs and transcendentals per result element, HBM bytes per
  top-level op (operands + result; a sliced operand counts its slice, an in-place
  update its update), every while body multiplied by its trip count;
- ``cost_analysis()`` where the backend has one (not on a deviceless GPU compile), kept
  raw as a cross-check: XLA counts a loop body once.

Model phases come from ``jax.named_scope``: attention, router, dispatch, experts,
combine, shared_experts, embed, head, pipeline.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from moe_jax.compile import CompiledPhase, CompiledProgram, Workload, compile_program
from moe_jax.config import ModelConfig
from moe_jax.hlo import (Collective, Instruction, Module, arrays, collective_axes, parse_replica_groups,
                         shape_bytes)
from moe_jax.mesh import Strategy

_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "add-dependency", "opt-barrier", "iota"}
_TRANSCENDENTAL = {"exponential", "log", "tanh", "logistic", "rsqrt", "sqrt", "power", "sine", "cosine",
                   "exponential-minus-one", "log-plus-one", "erf", "cbrt", "atan2", "tan"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare",
                "select", "and", "or", "xor", "not", "clamp", "remainder", "sign", "floor", "ceil",
                "round-nearest-even", "round-nearest-afz", "convert"}
_COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                     "ragged-all-to-all", "collective-broadcast")
_SLICING = {"dynamic-slice", "slice", "gather"}
_SCOPES = {"attention": "attention", "route": "router", "dispatch": "dispatch", "experts": "experts",
           "combine": "combine", "shared_experts": "shared_experts", "embed": "embed", "head": "head",
           "pipeline_handoff": "pipeline", "pipeline_output": "pipeline", "moe": "moe"}


def model_phase(op_name: str) -> str:
    """The innermost model scope named in an op_name path, or 'other'."""
    for part in reversed(op_name.split("/")):
        if part in _SCOPES:
            return _SCOPES[part]
    return "other"


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([\d,]*)\}}", attrs)
    return [int(x) for x in m[1].split(",") if x] if m else []


def _dot_flops(instr: Instruction, comp) -> int:
    lhs = comp.by_name.get(instr.operands[0])
    if lhs is None:
        return 0
    (_, lhs_dims), = arrays(lhs.shape)[:1] or [("", ())]
    contracting = math.prod(lhs_dims[d] for d in _dims(instr.attrs, "lhs_contracting_dims"))
    return 2 * instr.elements * contracting


def _conv_flops(instr: Instruction, comp) -> int:
    rhs = comp.by_name.get(instr.operands[1]) if len(instr.operands) > 1 else None
    if rhs is None:
        return 0
    kernel = math.prod(arrays(rhs.shape)[0][1])
    out_features = arrays(instr.shape)[0][1][-1] if arrays(instr.shape)[0][1] else 1
    return 2 * instr.elements * max(1, kernel // max(1, out_features))


def _operand_bytes(instr: Instruction, comp, module: Module) -> int:
    """HBM bytes read for the operands of a top-level op (slices count their slice)."""
    fused = None
    if instr.opcode == "fusion":
        callee = [c for role, c in module.calls(instr) if role == "calls"]
        fused = module.computations[callee[0]] if callee else None
    total = 0
    for index, name in enumerate(instr.operands):
        src = comp.by_name.get(name)
        if src is None:
            continue
        full = src.bytes
        if instr.opcode in _SLICING and index == 0:
            full = min(full, instr.bytes)
        elif instr.opcode == "dynamic-update-slice" and index == 0:
            full = 0                                        # updated in place
        elif fused is not None:
            param = fused.parameter(index)
            users = fused.users(param.name) if param else []
            if users and all(u.opcode in _SLICING and u.operands[0] == param.name for u in users):
                full = min(full, sum(u.bytes for u in users))
            elif users and all(u.opcode == "dynamic-update-slice" and u.operands[0] == param.name for u in users):
                full = 0
        total += full
    return total


def _result_bytes(instr: Instruction, comp, module: Module) -> int:
    """HBM bytes written by a top-level op (an in-place update writes its update only)."""
    root = instr
    inner = comp
    if instr.opcode == "fusion":
        callee = [c for role, c in module.calls(instr) if role == "calls"]
        if callee:
            inner = module.computations[callee[0]]
            root = inner.root
    parts = [root] if root.opcode != "tuple" else [inner.by_name.get(n) for n in root.operands]
    total = 0
    for part in parts:
        if part is None:
            continue
        if part.opcode == "dynamic-update-slice" and len(part.operands) > 1 and part.operands[1] in inner.by_name:
            total += inner.by_name[part.operands[1]].bytes
        else:
            total += part.bytes
    return total if instr.opcode == "fusion" or instr.opcode == "dynamic-update-slice" else instr.bytes


def _collective_payload(instr: Instruction, comp, kind: str) -> int:
    """Bytes of the data a collective moves per device per call (before any algorithm factor)."""
    parts = [shape_bytes(f"{d}[{','.join(map(str, dims))}]") for d, dims in arrays(instr.shape)]
    if instr.opcode.endswith("-start"):
        if kind == "all-gather":
            return max(parts)
        if kind in ("collective-permute", "all-to-all"):
            return parts[0]
        return sum(parts)
    if kind == "reduce-scatter":
        return sum(comp.by_name[n].bytes for n in instr.operands if n in comp.by_name)
    return sum(parts)


@dataclass
class CollectiveCost:
    """One collective instruction of the compiled program."""

    kind: str
    axes: list[str]
    """Mesh axes its groups span (dp/pp/ep/tp)."""
    group_size: int
    bytes_per_call: int
    """Payload per device per call (result bytes; operand bytes for reduce-scatter)."""
    calls: int
    """Executions per program run (loop trip counts included)."""
    phase: str
    """Model scope it came from."""
    name: str

    @property
    def total_bytes(self) -> int:
        """bytes_per_call × calls."""
        return self.bytes_per_call * self.calls


@dataclass
class MemoryBreakdown:
    """Per-device memory of one compiled program (bytes), and who reported it."""

    weights: int
    kv_cache: int
    tokens: int
    arguments: int
    """memory_analysis().argument_size_in_bytes."""
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    source: str

    @property
    def peak(self) -> int:
        """arguments + outputs + temporaries − aliased."""
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @property
    def arguments_unexplained(self) -> int:
        """arguments − (weights + KV cache + tokens): padding/alignment the compiler added."""
        return self.arguments - self.weights - self.kv_cache - self.tokens


@dataclass
class PhaseCost:
    """Cost of one compiled program (prefill or decode), per device."""

    phase: str
    backend: str
    fits: bool
    error: str = ""
    memory: MemoryBreakdown | None = None
    flops: int = 0
    """dot + convolution + elementwise FLOPs, loop-corrected (our HLO walk)."""
    matmul_flops: int = 0
    """dot + convolution FLOPs only."""
    transcendentals: int = 0
    hbm_bytes: int = 0
    """Bytes read and written by top-level ops, loop-corrected (our HLO walk)."""
    flops_by_scope: dict[str, int] = field(default_factory=dict)
    bytes_by_scope: dict[str, int] = field(default_factory=dict)
    collectives: list[CollectiveCost] = field(default_factory=list)
    xla_cost: dict[str, float] | None = None
    """cost_analysis() as XLA reports it (loop bodies counted once); None when unavailable."""
    walk_uncorrected: dict[str, int] = field(default_factory=dict)
    """Our walk with every loop counted once: comparable with xla_cost."""
    unknown_trip_loops: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0

    def collective_summary(self) -> list[dict]:
        """Collectives grouped by (kind, axes, phase): calls and bytes."""
        groups: dict[tuple, dict] = {}
        for c in self.collectives:
            key = (c.kind, tuple(c.axes), c.phase)
            g = groups.setdefault(key, {"kind": c.kind, "axes": list(c.axes), "phase": c.phase,
                                        "group_size": c.group_size, "calls": 0, "bytes": 0})
            g["calls"] += c.calls
            g["bytes"] += c.total_bytes
        return sorted(groups.values(), key=lambda g: -g["bytes"])


def walk(hlo_text: str, mesh_shape: dict[str, int]) -> dict:
    """FLOPs, transcendentals, HBM bytes and collectives of optimized HLO, loop-corrected.

    Returns a dict with flops, matmul_flops, transcendentals, hbm_bytes, by-scope
    splits, collectives, the same totals uncorrected (each loop once), and loops whose
    trip count is unknown.
    """
    module = Module.parse(hlo_text)
    runs, kind, unknown = module.multipliers()
    out = {"flops": 0, "matmul_flops": 0, "transcendentals": 0, "hbm_bytes": 0,
           "flops_by_scope": defaultdict(int), "bytes_by_scope": defaultdict(int), "collectives": [],
           "uncorrected": {"flops": 0, "hbm_bytes": 0, "transcendentals": 0}, "unknown": unknown}
    for name, comp in module.computations.items():
        n, role = runs.get(name, 0), kind.get(name)
        if n == 0 or role == "reducer":
            continue
        for instr in comp.instructions:
            op = instr.opcode
            flops = matmul = trans = 0
            if op == "dot":
                flops = matmul = _dot_flops(instr, comp)
            elif op == "convolution":
                flops = matmul = _conv_flops(instr, comp)
            elif op in _ELEMENTWISE:
                flops = instr.elements
            elif op in ("reduce", "reduce-window"):
                src = comp.by_name.get(instr.operands[0]) if instr.operands else None
                flops = src.elements if src else 0
            elif op in _TRANSCENDENTAL:
                trans = instr.elements
            scope = model_phase(instr.op_name)
            out["flops"] += n * flops
            out["matmul_flops"] += n * matmul
            out["transcendentals"] += n * trans
            out["flops_by_scope"][scope] += n * flops
            out["uncorrected"]["flops"] += flops
            out["uncorrected"]["transcendentals"] += trans
            if role != "control" or op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            moved = _operand_bytes(instr, comp, module) + _result_bytes(instr, comp, module)
            out["hbm_bytes"] += n * moved
            out["bytes_by_scope"][scope] += n * moved
            out["uncorrected"]["hbm_bytes"] += moved
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in _COLLECTIVE_KINDS:
                groups = parse_replica_groups(instr.opcode + " " + instr.attrs)
                c = Collective(base, instr.name, instr.shape, tuple(tuple(g) for g in groups), instr.op_name)
                size = 2 if base == "collective-permute" else (len(groups[0]) if groups else
                                                               math.prod(mesh_shape.values()))
                out["collectives"].append(CollectiveCost(
                    base, list(collective_axes(c, mesh_shape)), size, _collective_payload(instr, comp, base),
                    n, model_phase(instr.op_name), instr.name))
    out["flops_by_scope"] = dict(out["flops_by_scope"])
    out["bytes_by_scope"] = dict(out["bytes_by_scope"])
    return out


def phase_cost(phase: CompiledPhase, backend: str, mesh_shape: dict[str, int]) -> PhaseCost:
    """Read one compiled program: memory, FLOPs, bytes, collectives."""
    if not phase.fits:
        return PhaseCost(phase.phase, backend, False, phase.error, compile_seconds=phase.compile_seconds)
    ma = phase.compiled.memory_analysis()
    memory = MemoryBreakdown(
        weights=phase.input_bytes["weights"], kv_cache=phase.input_bytes["kv_cache"],
        tokens=phase.input_bytes["tokens"], arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
        aliased=ma.alias_size_in_bytes, temporaries=ma.temp_size_in_bytes,
        generated_code=ma.generated_code_size_in_bytes, source=f"{backend} memory_analysis()")
    try:
        raw = phase.compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning None
        raw = None
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    xla = None if not raw else {k: float(raw[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in raw}
    w = walk(phase.hlo_text, mesh_shape)
    return PhaseCost(
        phase.phase, backend, True, memory=memory, flops=w["flops"], matmul_flops=w["matmul_flops"],
        transcendentals=w["transcendentals"], hbm_bytes=w["hbm_bytes"], flops_by_scope=w["flops_by_scope"],
        bytes_by_scope=w["bytes_by_scope"], collectives=w["collectives"], xla_cost=xla,
        walk_uncorrected=w["uncorrected"], unknown_trip_loops=w["unknown"], compile_seconds=phase.compile_seconds)


@dataclass
class CostReport:
    """What the compiler produced for one model, strategy, workload and backend."""

    model: str
    strategy: str
    compiled_strategy: str
    workload: dict
    backend: str
    target: str
    devices: int
    phases: dict[str, PhaseCost]
    notes: list[str]
    analytic: dict
    """Cross-checks computed from the config alone (see `analytic_flops`, placement)."""

    def to_dict(self) -> dict:
        """JSON-ready (memory peaks and collective summaries included)."""
        data = asdict(self)
        for name, phase in self.phases.items():
            if phase.memory:
                data["phases"][name]["memory"]["peak"] = phase.memory.peak
            data["phases"][name]["collective_summary"] = phase.collective_summary()
        return data

    def to_json(self, **kw) -> str:
        """`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), **kw)


def analytic_flops(cfg: ModelConfig, workload: Workload, phase: str, batch_shards: int = 1) -> dict:
    """FLOPs over all devices from the config: useful matmuls, attention, and capacity-dispatch overhead.

    useful: 2 × (matmul parameters one token uses, head included, embedding lookup excluded) × tokens.
    attention: QKᵀ and PV as computed (prefill: full S×S, masked; decode: all T cache positions).
    capacity: expert FLOPs spent on padded slots plus the dispatch and combine einsums, for
    the token groups capacity dispatch forms when the batch is split `batch_shards` ways.
    """
    from moe_jax.model.moe import group_size

    L, D, H, K, Dh = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B = workload.batch
    S = workload.prompt_len if phase == "prefill" else 1
    T = S if phase == "prefill" else workload.cache_len
    tokens = B * S
    per_token = (L * (D * H * Dh + 2 * D * K * Dh + H * Dh * D + D * cfg.num_experts
                      + (cfg.top_k + cfg.num_shared_experts) * cfg.expert_params) + D * cfg.vocab_size)
    useful = 2 * per_token * tokens
    attention = L * 4 * B * H * S * T * Dh
    capacity = 0
    if cfg.dispatch == "capacity":
        Sg = group_size(tokens, batch_shards, cfg.moe_group_size)
        G, C = tokens // Sg, cfg.capacity(Sg)
        slots = cfg.num_experts * G * C
        padded = max(0, slots - cfg.top_k * tokens) * 2 * cfg.expert_params * L
        dispatch_combine = 2 * (2 * G * Sg * cfg.num_experts * C * D) * L
        capacity = padded + dispatch_combine
    return {"useful": useful, "attention": attention, "capacity_overhead": capacity,
            "total": useful + attention + capacity}


def analyze_cost(cfg: ModelConfig, strategy: Strategy, workload: Workload, backend: str = "cpu",
                 **compile_kw) -> CostReport:
    """Compile prefill and decode ahead of time and read their cost (the Python API)."""
    from moe_jax.placement import describe
    from moe_jax.sharding import Layout

    program: CompiledProgram = compile_program(cfg, strategy, workload, backend=backend, **compile_kw)
    mesh_shape = program.compiled_strategy.mesh_shape
    phases = {name: phase_cost(p, backend, mesh_shape) for name, p in program.phases.items()}
    placement = describe(cfg, program.compiled_strategy)
    analytic = {"weights_per_device_placement": placement.weight_bytes_per_device}
    devices = program.compiled_strategy.num_devices
    shards = Layout.for_strategy(cfg, program.compiled_strategy).shards("batch", program.workload.batch)
    for name, cost in phases.items():
        expected = analytic_flops(cfg, program.workload, name, shards)
        # matmul FLOPs on both sides; elementwise work is reported separately (cost.flops)
        compiled = cost.matmul_flops * devices if cost.fits else None
        analytic[name] = {**expected, "compiled_matmul_total": compiled,
                          "compiled_over_analytic": compiled / expected["total"] if compiled else None}
    return CostReport(cfg.name, strategy.name, program.compiled_strategy.name, program.workload.to_dict(),
                      backend, program.target, devices, phases, program.notes, analytic)
