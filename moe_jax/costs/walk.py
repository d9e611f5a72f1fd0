"""The cost report: per-device memory, loop-corrected FLOPs and bytes, and every collective, per phase.

Three sources, each labelled:
- ``memory_analysis()`` of the compiled program (argument, output, alias, temporary bytes);
- our own walk of the optimized HLO (`moe_jax.costs.hlo.Module`): dot/convolution FLOPs from
  shapes, elementwise FLOPs and transcendentals per result element, HBM bytes per
  top-level op (operands + result; a sliced operand counts its slice, an in-place
  update its update), every while body multiplied by its trip count;
- ``cost_analysis()`` where the backend has one (not on a deviceless GPU compile), kept
  raw as a cross-check: XLA counts a loop body once.

Checked against XLA's own HloCostAnalysis on loop-free programs for the cpu, tpu and gpu
compiles (`tests/test_walk_xla.py`): FLOPs agree exactly (non-matmul ops follow XLA's
rules: a reduce applies its reducer input - output times, a reduce-window window - 1
times per output, an all-reduce one FLOP per element, a sort n·⌈log2 n⌉; a cuBLAS gemm
custom call, which XLA counts as -1, gets 2·M·N·K from its operands). Bytes agree exactly
once these deliberate differences are restated XLA's way: a fusion's parameter is read
only as far as it is sliced, gathered or read after an in-place update, looking through
bitcasts (XLA stops at a bitcast and reads a gathered table whole: an embedding lookup);
an async ``*-start``/``*-done`` pair moves its data once; tuples, partition-id and
cuBLAS workspaces move nothing. Fixed on the way: an in-place update whose result is then
read in the same fusion (decode attention on the GPU writes the new token into the KV
cache and reads the cache) counted no read of the cache at all; a reduce-scatter-start
counted its input as written; reduce-window, argmax-style reducers, all-reduce and sort
FLOPs; array constants inside fusions and top-level iota were not counted. Not modelled:
memory spaces (on TPU, operands prefetched into VMEM by ``copy-start`` count as HBM
traffic, 15-25% of a small model's bytes) and the FLOPs of other custom calls (cuDNN).

Model phases come from ``jax.named_scope``: attention, router, dispatch, experts,
combine, shared_experts, embed, head, pipeline.

The records it fills (`PhaseCost`, `OpCost`, `CollectiveCost`, `MemoryBreakdown`, `WalkResult`,
`CostReport`) live in `moe_jax.costs.types`; the figures from the config alone set beside them
come from `moe_jax.costs.analytic.analytic_report`.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import CompiledPhase, CompiledProgram, Workload, compile_program
from moe_jax.costs.hlo import (
    Collective,
    Instruction,
    Module,
    arrays,
    collective_axes,
    dtype_bytes,
    parse_replica_groups,
    shape_bytes,
    tuple_parts,
)
from moe_jax.costs.types import (
    CollectiveCost,
    CostReport,
    DroplessRouting,
    MemoryBreakdown,
    OpCost,
    PhaseCost,
    WalkResult,
    WalkTotals,
)
from moe_jax.model import flash, scopes
from moe_jax.model.moe import grouped_kernel, receive_rows
from moe_jax.names import DTYPES, Backend, Dispatch
from moe_jax.parallel.mesh import Strategy

_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "add-dependency", "opt-barrier"}
# elementwise ops as XLA's HloCostAnalysis counts them: one transcendental or one FLOP per result element
_TRANSCENDENTAL = {"exponential", "log", "tanh", "logistic", "rsqrt", "sqrt", "power", "sine", "cosine",
                   "exponential-minus-one", "log-plus-one", "erf", "cbrt", "atan2", "tan", "acosh"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare",
                "select", "and", "or", "xor", "not", "clamp", "remainder", "sign", "floor", "ceil",
                "round-nearest-even", "round-nearest-afz", "convert", "shift-left", "shift-right-logical",
                "shift-right-arithmetic", "popcnt", "count-leading-zeros", "is-finite", "reduce-precision",
                "real", "imag", "complex"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
"""Ops whose result aliases operand 0: they write (and read) only the updated part."""
_COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                     "ragged-all-to-all", "collective-broadcast")
_SLICING = {"dynamic-slice", "slice", "gather"}


def model_phase(op_name: str) -> str:
    """The innermost model scope named in an op_name path, or 'other'."""
    for part in reversed(op_name.split("/")):
        if part in scopes.MODEL_PHASE:
            return scopes.MODEL_PHASE[part]
    return "other"


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([\d,]*)\}}", attrs)
    return [int(x) for x in m[1].split(",") if x] if m else []


@dataclass(frozen=True)
class RaggedHints:
    """What the walk needs to read a dropless program (``dispatch="dropless"``), from the config and mesh.

    groups: local experts, when each grouped matmul is a loop of dense matmuls over all rows,
    one per local expert (the CPU program: `moe_jax.model.moe.dropless.grouped_matmul`), so its dots
    count groups × the real FLOPs; the walk divides those dots by it. 1 where the backend
    has a real grouped matmul.
    row_fraction: with ep > 1, each shard receives rows into a buffer of R rows
    (`moe_jax.model.moe.receive_rows`: the worst case, ep · T · min(k, E/ep), or the
    ``dropless_buffer`` bound); under uniform routing it holds T · k of them. Grouped
    matmuls over the buffer count that fraction of their FLOPs and row bytes (a
    grouped-matmul kernel stops at the last row of the last group).
    block_fraction: on a backend without ragged all-to-all (XLA:CPU), rows move in dense
    blocks of P rows per source and destination; a shard sends T · k rows in ep blocks,
    T · k / (ep · P) of them. The blocks count that fraction as the expected payload, the
    whole block as the worst case.
    """

    groups: int = 1
    row_fraction: float = 1.0
    block_fraction: float = 1.0
    looped: bool = False
    """The program is the CPU one: grouped matmuls are loops of `groups` dense matmuls."""

    @classmethod
    def for_program(cls, cfg: ModelConfig, strategy: Strategy, platform: str) -> RaggedHints | None:
        """The hints for `cfg` compiled under `strategy` for devices of `platform` (cpu, tpu, gpu);
        None unless dispatch is dropless."""
        if cfg.dispatch != Dispatch.DROPLESS:
            return None
        local = cfg.num_experts // strategy.ep
        cpu = platform == Backend.CPU
        if strategy.ep == 1:
            return cls(groups=local if cpu else 1, looped=cpu)
        # The model's worst-case buffer per token a shard holds (T = 1): R rows, blocks of P rows per source;
        # T·k of them are filled under uniform routing. A dropless_buffer bound f caps R at f·T·k rows.
        worst_rows, worst_block = receive_rows(cfg.replace(dropless_buffer=None), 1, strategy.ep)
        strict = cfg.top_k / worst_rows
        strict_block = cfg.top_k / (strategy.ep * worst_block)
        bound = cfg.dropless_buffer
        rows = strict if bound is None else min(1.0, max(strict, 1 / bound))
        block = strict_block if bound is None else min(1.0, max(strict_block, 1 / (strategy.ep * bound)))
        return cls(groups=local if cpu else 1, row_fraction=rows, block_fraction=block, looped=cpu)


def _dot_flops(instr: Instruction, comp) -> int:
    lhs = comp.by_name.get(instr.operands[0])
    if lhs is None:
        return 0
    (_, lhs_dims), = arrays(lhs.shape)[:1] or [("", ())]
    contracting = math.prod(lhs_dims[d] for d in _dims(instr.attrs, "lhs_contracting_dims"))
    return 2 * instr.elements * contracting


_DTYPE_BY_HLO = {d.hlo: d.name for d in DTYPES.values()}


def memory_op_kind(instr: Instruction, comp, module: Module | None = None) -> str:
    """What an op's bytes move as (`OpCost.kind`): ``transpose`` when it (or an op it fuses) transposes at least
    half of its result's elements, else ``convert`` when it converts that many to another element type, else
    ``copy``. XLA names a fusion for a few of its ops: XLA:CPU's ``copy_bitcast_fusion`` that upcasts a layer's
    expert weights and transposes them for the dot ran at the transpose's rate, 5x slower than a copy's."""
    least = _first_elements(instr.shape) // 2
    found = set()

    def visit(i: Instruction, where) -> None:
        if i.opcode in ("transpose", "convert") and _first_elements(i.shape) >= least:
            source = where.by_name.get(i.operands[0]) if i.operands else None
            if i.opcode == "transpose" or source is None or _first_type(source.shape) != _first_type(i.shape):
                found.add(i.opcode)
        if i.opcode == "fusion" and module is not None:
            for role, callee in module.calls(i):
                if role == "calls":
                    inner = module.computations[callee]
                    for sub in inner.instructions:
                        visit(sub, inner)

    visit(instr, comp)
    return "transpose" if "transpose" in found else "convert" if "convert" in found else "copy"


def _first_type(shape: str) -> str:
    """The element type of a (possibly tuple) shape's first array, "" for none."""
    found = arrays(shape)
    return found[0][0] if found else ""


def dot_dtype(instr: Instruction, comp, module: Module | None = None) -> str:
    """The dtype a dot, convolution or grouped matmul multiplies in (`OpCost.matmul_dtype`): its operands' element
    type when both agree, else the wider one's; for a fusion, that of the first such op inside; "" for none."""
    if instr.opcode == "fusion" and module is not None:
        for role, callee in module.calls(instr):
            if role == "calls":
                inner = module.computations[callee]
                for i in inner.instructions:
                    found = dot_dtype(i, inner, module)
                    if found:
                        return found
        return ""
    if instr.opcode not in ("dot", "convolution", "ragged-dot") and not _is_grouped_kernel(instr) \
            and _flash_cost(instr, comp) is None:
        return ""
    types = []
    for name in instr.operands[:2]:
        operand = comp.by_name.get(name)
        found = arrays(operand.shape)[:1] if operand is not None else []
        if found:
            types.append(found[0][0])
    if not types:
        return ""
    widest = max(types, key=dtype_bytes)
    return _DTYPE_BY_HLO.get(widest, widest)


def _valid_taps(out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int,
                size_in: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that land on a real input element."""
    count = 0
    for o in range(out):
        for k in range(size):
            pos = o * stride + k * rhs_dilate - pad_lo
            if 0 <= pos <= (size_in - 1) * lhs_dilate and pos % lhs_dilate == 0:
                count += 1
    return count


def _conv_flops(instr: Instruction, comp) -> int:
    """2 × batch × output features × input features per group × valid taps over the spatial dims.

    TPU lowers every matmul to a convolution (``bf_io->bf``) and batched matmuls to
    convolutions whose window runs over a batch dimension with padding; counting only the
    taps that hit real input (as XLA's cost analysis does) gives the matmul's FLOPs.
    """
    lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
    rhs = comp.by_name.get(instr.operands[1]) if len(instr.operands) > 1 else None
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if lhs is None or rhs is None or not labels or not arrays(lhs.shape) or not arrays(instr.shape):
        return 0
    lhs_dims, out_dims = arrays(lhs.shape)[0][1], arrays(instr.shape)[0][1]
    lhs_l, _, out_l = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", instr.attrs)
    attrs = dict(kv.split("=", 1) for kv in window[1].split()) if window else {}
    spatial = [c for c in lhs_l if c.isdigit()]

    def per_dim(key, default):
        return [int(x) for x in attrs[key].split("x")] if key in attrs else [default] * len(spatial)

    size, stride = per_dim("size", 1), per_dim("stride", 1)
    lhs_dilate, rhs_dilate = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pads = ([tuple(int(v) for v in p.split("_")) for p in attrs["pad"].split("x")] if "pad" in attrs
            else [(0, 0)] * len(spatial))
    taps = 1
    for i, ch in enumerate(spatial):
        taps *= _valid_taps(out_dims[out_l.index(ch)], size[i], stride[i], pads[i][0], lhs_dilate[i],
                            rhs_dilate[i], lhs_dims[lhs_l.index(ch)])
    groups = re.search(r"feature_group_count=(\d+)", instr.attrs)
    in_features = lhs_dims[lhs_l.index("f")] // (int(groups[1]) if groups else 1)
    return 2 * out_dims[out_l.index("b")] * out_dims[out_l.index("f")] * in_features * taps


def _update_bytes(instr: Instruction, comp) -> int:
    """Bytes of the update an in-place op writes: a dynamic-update-slice's operand 1, a scatter's updates."""
    if instr.opcode == "scatter":
        n = (len(instr.operands) - 1) // 2                  # scatter(operands..., indices, updates...)
        names = instr.operands[n + 1:]
    else:
        names = instr.operands[1:2]
    return sum(comp.by_name[n].bytes for n in names if n in comp.by_name)


def _operand_bytes(instr: Instruction, comp, module: Module) -> int:
    """HBM bytes read for the operands of a top-level op (slices count their slice; an in-place update does not
    read the buffer it updates, and a scatter reads only the rows it combines into)."""
    fused = None
    if instr.opcode == "fusion":
        callee = [c for role, c in module.calls(instr) if role == "calls"]
        fused = module.computations[callee[0]] if callee else None
    total = 0
    base = instr.opcode.removesuffix("-start")             # an async slice-start slices as a slice does
    for index, name in enumerate(instr.operands):
        src = comp.by_name.get(name)
        if src is None:
            continue
        full = src.bytes
        if base in _SLICING and index == 0:
            full = min(full, instr.bytes if base == instr.opcode else _async_result_bytes(instr.shape, instr.widths))
        elif instr.opcode == "dynamic-update-slice" and index == 0:
            full = 0                                        # updated in place
        elif instr.opcode == "scatter" and index == 0:
            full = min(full, _update_bytes(instr, comp))
        elif fused is not None:
            param = fused.parameter(index)
            read = _read_bytes(fused, param.name, module) if param else None
            if read is not None:
                full = min(full, read)
        total += full
    if fused is not None:                                   # array constants inside the fusion are read too
        total += sum(i.bytes for i in fused.instructions if i.opcode == "constant" and i.elements > 1)
    return total


def _relayout_only(instr: Instruction, module: Module) -> bool:
    """Whether `instr` is a fusion nested in another that only changes its one operand's layout (a copy,
    through bitcasts): computed window by window as its user reads it, not written whole."""
    if instr.opcode != "fusion" or len(instr.operands) != 1:
        return False
    callee = [c for role, c in module.calls(instr) if role == "calls"]
    fused = module.computations.get(callee[0]) if callee else None
    return fused is not None and all(i.opcode in ("parameter", "copy", "bitcast") for i in fused.instructions)


def _read_bytes(comp, name: str, module: Module, depth: int = 0, updated: bool = False) -> int | None:
    """Bytes a fused computation reads of value `name` when it only slices it or updates it in place.

    Follows bitcasts and nested fusions (TPU nests the slice one fusion deeper). None
    when some use reads the whole value. A value updated in place (dynamic-update-slice,
    scatter) is not read for the update, but what is read of the updated value afterwards
    counts: decode attention writes the new token into the KV cache and then reads the
    cache in the same fusion. `updated`: `name` is such an updated value; reaching the
    fusion's output costs no read (the output counts the update's write).
    """
    users = comp.users(name)
    if depth > 8:
        return None
    if not users:
        return 0 if updated else None
    total = 0
    for u in users:
        if updated and u.opcode == "tuple" and u.is_root:
            continue                                        # the in-place output of a multi-output fusion
        if u.opcode in _SLICING and u.operands[0] == name:
            # a slice sliced again (a layer's experts, then the few gathered by id) reads the narrower one
            further = _read_bytes(comp, u.name, module, depth + 1)
            inner = u.bytes if further is None else min(u.bytes, further)
        elif u.opcode in _IN_PLACE and u.operands[0] == name:
            inner = _read_bytes(comp, u.name, module, depth + 1, updated=True)
            if inner is not None and u.opcode == "scatter":
                inner += min(u.bytes, _update_bytes(u, comp))   # the rows it combines into
        elif u.opcode == "convert" and not updated:
            # an elementwise convert ahead of a slice (XLA:GPU's in-place product of an unrolled layer's weight:
            # the whole stacked operand converted, then the layer sliced) is computed only where it is read
            further = _read_bytes(comp, u.name, module, depth + 1)
            source = comp.by_name.get(name)
            inner = None if further is None or source is None else further * source.bytes // max(u.bytes, 1)
        elif u.opcode in ("bitcast", "reshape") or _relayout_only(u, module):
            # XLA:TPU nests a tiling change of a stacked weight ([L, ...] f8 from T(32,128) to T(8,128)) one
            # fusion deeper, ahead of the layer's dynamic-slice: the fusion re-tiles the windows it reads, the
            # layer's slice (libtpu's own estimated_cycles do not grow with L), so follow what is read of it
            inner = _read_bytes(comp, u.name, module, depth + 1, updated)
        elif u.opcode == "fusion":
            callee = [c for role, c in module.calls(u) if role == "calls"]
            nested = module.computations[callee[0]] if callee else None
            param = nested.parameter(u.operands.index(name)) if nested else None
            inner = _read_bytes(nested, param.name, module, depth + 1, updated) if param else None
        else:
            return None
        if inner is None:
            return None
        total += inner
    return total


def _result_bytes(instr: Instruction, comp, module: Module) -> int:
    """HBM bytes written by a top-level op (an in-place update writes its update only).

    An async ``*-start`` returns (input, output, context...): only the output is written.
    A cuBLAS/cuDNN custom call returns (result, workspace): only the result counts.
    """
    if instr.opcode.endswith("-start") and instr.shape.startswith("("):
        return _async_result_bytes(instr.shape, instr.widths)
    if _is_library_call(instr) and instr.shape.startswith("("):
        parts = tuple_parts(instr.shape)
        if re.match(r"[su]8\[\d+\]", parts[-1]):                   # the workspace (scratch), last
            parts = parts[:-1]
        return sum(instr.bytes_of(p) for p in parts)
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
        if part.opcode in _IN_PLACE and len(part.operands) > 1:
            total += min(part.bytes, _update_bytes(part, inner))   # a scatter may drop rows: at most its output
        else:
            total += part.bytes
    return total if instr.opcode == "fusion" or instr.opcode in _IN_PLACE else instr.bytes


def _async_result_bytes(shape: str, widths: Mapping[str, float] | None = None) -> int:
    """Bytes an async ``*-start`` writes. Its tuple holds (operands, results[, context]): all-gather and the
    async wrappers (all-to-all, reduce-scatter) nest their operands in a tuple, the results follow it (a
    reduce-scatter writes 1/n of what it reads); copy-start and collective-permute-start hold one array each
    way, of the same size."""
    parts = tuple_parts(shape)
    if parts[0].startswith("("):
        results = [p for p in parts[1:] if not re.fullmatch(r"[us]32\[\](\{[^}]*\})?", p)]   # not a context
        return sum(shape_bytes(p, widths) for p in results)
    return max(shape_bytes(f"{d}[{','.join(map(str, dims))}]", widths) for d, dims in arrays(shape))


def _ragged_bytes(instr: Instruction, comp, result: int) -> tuple[int, int]:
    """(worst-case, expected) bytes of a ragged all-to-all (operand 0: the rows to send; result: the buffer).

    Dropless exchanges rows between this shard's T·k assignments and a receive buffer sized
    for the worst case, in both directions: the smaller of the two is what moves when
    routing is uniform (every shard receives as many rows as it sends), the larger is the
    most that can move (one shard receives every row).
    """
    src = comp.by_name.get(instr.operands[0]) if instr.operands else None
    sent = src.bytes if src is not None else result
    return max(sent, result), min(sent, result)


def _collective_payload(instr: Instruction, comp, kind: str) -> int:
    """Bytes of the data a collective moves per device per call (before any algorithm factor)."""
    parts = [instr.bytes_of(f"{d}[{','.join(map(str, dims))}]") for d, dims in arrays(instr.shape)]
    if kind == "reduce-scatter":
        return sum(comp.by_name[n].bytes for n in instr.operands if n in comp.by_name)
    if instr.opcode.endswith("-start") and instr.shape.startswith("("):
        return max(parts)                                   # (input, output[, context]): the data moved
    return sum(parts)


def _is_grouped_kernel(instr: Instruction) -> bool:
    """A backend's own grouped matmul: the ``ragged-dot`` op, or the custom call a TPU lowers it to."""
    return instr.opcode == "ragged-dot" or (instr.opcode == "custom-call" and (
        scopes.within(instr.op_name, scopes.GROUPED_MATMUL) or instr.name.startswith("ragged-dot")))


def _weight_operands(instr: Instruction, comp) -> list:
    """The rank-3 operands of a grouped matmul: the stacked weights [G, K, N]."""
    return [comp.by_name[n] for n in instr.operands
            if n in comp.by_name and any(len(dims) == 3 for _, dims in arrays(comp.by_name[n].shape))]


def _grouped_matmul_flops(instr: Instruction, comp) -> int:
    """A backend's own grouped matmul (TPU custom call, ``ragged-dot``): 2 · M · N · K.

    Result [M, N]; K from the lhs [M, K] (operand 0 of ``ragged-dot``) or, for a custom
    call whose operands include metadata, from the rank-3 weights [G, K, N].
    """
    lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
    if instr.opcode == "ragged-dot" and lhs is not None and arrays(lhs.shape):
        return 2 * instr.elements * arrays(lhs.shape)[0][1][-1]
    weights = _weight_operands(instr, comp)
    return 2 * instr.elements * arrays(weights[0].shape)[0][1][1] if weights else 0


def _is_library_call(instr: Instruction) -> bool:
    """A cuBLAS or cuDNN custom call (XLA:GPU's library matmuls and convolutions)."""
    return instr.opcode == "custom-call" and bool(re.search(r'custom_call_target="__(cublas|cudnn)\$', instr.attrs))


def _gemm_call_flops(instr: Instruction, comp) -> int:
    """A cuBLAS gemm custom call (``__cublas$gemm``, ``__cublas$lt$matmul...``): 2 × result elements × contracted
    size, the dimension numbers read from its gemm_backend_config. XLA's own cost analysis counts a custom call
    as unknown (-1)."""
    lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
    if lhs is None or m is None or not arrays(lhs.shape) or not arrays(instr.shape):
        return 0
    lhs_dims = arrays(lhs.shape)[0][1]
    contracting = math.prod(lhs_dims[int(d)] for d in re.findall(r"\d+", m[1]))
    return 2 * math.prod(arrays(instr.shape)[0][1]) * contracting


def _flash_cost(instr: Instruction, comp) -> dict | None:
    """`moe_jax.model.flash.kernel_cost` of a call to prefill's fused attention kernel (a Triton custom call whose
    name carries its tiles and window), from its q, k, v operands; None for any other instruction."""
    if instr.opcode != "custom-call" or flash.NAME not in instr.op_name:
        return None
    params = flash.parse_kernel_name(instr.op_name)
    shapes = [arrays(comp.by_name[n].shape) for n in instr.operands[:3] if n in comp.by_name]
    if params is None or len(shapes) != 3 or not all(shapes):
        return None
    (dtype, (B, S, H, Dh)), (_, (_, K, _, _)), (_, (_, _, Dv, _)) = (s[0] for s in shapes)   # k, v as cached
    return flash.kernel_cost(B, S, H, K, Dh, Dv, dtype_bytes(dtype), params["bq"], params["bk"], params["window"])


def _tiled_cost(instr: Instruction, comp) -> dict | None:
    """`moe_jax.model.moe.grouped_kernel.kernel_cost` of a call to dropless experts' grouped matmul kernel (a
    Triton custom call named for its tiles), from its operands (tiles, rows [P, K], weights [E, N, K], or stacked
    [L, E, N, K] of which it reads one layer); None for any other instruction."""
    if instr.opcode != "custom-call" or grouped_kernel.NAME not in instr.op_name:
        return None
    shapes = [arrays(comp.by_name[n].shape) for n in instr.operands[:3] if n in comp.by_name]
    if len(shapes) != 3 or not all(shapes):
        return None
    (dtype, (P, K)), (w_dtype, (*_, E, N, _)) = shapes[1][0], shapes[2][0]
    return grouped_kernel.kernel_cost(P, N, K, E, dtype_bytes(dtype), dtype_bytes(w_dtype))


def kernel_of(instr: Instruction, comp) -> str:
    """The name prefix of the Pallas kernel an instruction calls (`moe_jax.model.flash.NAME`,
    `moe_jax.model.moe.grouped_kernel.NAME`), or "" for XLA's own ops."""
    if _flash_cost(instr, comp) is not None:
        return flash.NAME
    return grouped_kernel.NAME if _tiled_cost(instr, comp) is not None else ""


def _first_elements(shape: str) -> int:
    """Elements of the first array of a (possibly tuple) shape."""
    found = arrays(shape)
    return math.prod(found[0][1]) if found else 0


def _applied_cost(module: Module | None, instr: Instruction) -> tuple[int, int]:
    """(flops, transcendentals) of one application of the computation an op applies (its to_apply reducer)."""
    callee = next((c for role, c in module.calls(instr) if role == "to_apply"), None) if module else None
    if callee is None:
        return 1, 0
    flops = trans = 0
    for sub in module.computations[callee].instructions:
        f, _, t = _instr_flops(sub, module.computations[callee])
        flops, trans = flops + f, trans + t
    return flops, trans


def _window_applications(instr: Instruction) -> int:
    """Applications of a reduce-window's reducer: (window elements - 1) per output element, as XLA counts them
    (and its special case: a window spanning a whole padded dimension is a reduce followed by a broadcast)."""
    m = re.search(r"window=\{([^}]*)\}", instr.attrs)
    attrs = dict(kv.split("=", 1) for kv in m[1].split()) if m else {}
    size = [int(x) for x in attrs["size"].split("x")] if "size" in attrs else []
    pads = [tuple(int(v) for v in p.split("_")) for p in attrs["pad"].split("x")] if "pad" in attrs else []
    pads = pads or [(0, 0)] * len(size)
    window, out = math.prod(size), _first_elements(instr.shape)
    reduced = [d for d, n in enumerate(size) if n != 1]
    padded = [d for d, (lo, hi) in enumerate(pads) if lo or hi]
    if len(reduced) == 1 and len(padded) == 1 and not instr.shape.startswith("("):
        d = reduced[0]
        lo, hi = pads[d]
        out_dims = arrays(instr.shape)[0][1]
        if lo and lo == hi and size[d] == 2 * lo + 1 and lo == out_dims[d] - 1:
            return out // out_dims[d] + out_dims[d] - 1
    return (window - 1) * out


def _applications(instr: Instruction, comp) -> int:
    """How many times a reduce, reduce-window or scatter applies its computation (as XLA's HloCostAnalysis counts)."""
    if instr.opcode == "reduce-window":
        return _window_applications(instr)
    if instr.opcode == "scatter":
        n = (len(instr.operands) - 1) // 2
        update = comp.by_name.get(instr.operands[n + 1]) if len(instr.operands) > n + 1 else None
        return _first_elements(update.shape) if update else 0
    src = comp.by_name.get(instr.operands[0]) if instr.operands else None
    return max((_first_elements(src.shape) if src else 0) - _first_elements(instr.shape), 0)


def _sliced_elements(instr: Instruction, comp) -> int | None:
    """Elements of a fused elementwise op that are computed, when every use slices it: a fusion's emitter
    computes an element only where it is read (XLA:GPU's in-place product of an unrolled layer's weight
    converts the whole stacked operand, then slices the layer). None: every element is computed."""
    if instr.opcode not in _ELEMENTWISE or not instr.elements:
        return None
    users = comp.users(instr.name)
    if not users or any(u.opcode not in _SLICING or u.operands[0] != instr.name for u in users):
        return None
    return min(sum(u.elements for u in users), instr.elements)


def _instr_flops(instr: Instruction, comp, hints: RaggedHints | None = None,
                 module: Module | None = None) -> tuple[int, int, int]:
    """(flops, matmul flops, transcendentals) of one instruction, not looking into called computations
    (except the reducer a reduce, reduce-window or scatter applies, which needs `module`).

    Non-matmul ops follow XLA's HloCostAnalysis: one FLOP (or transcendental) per result element of an
    elementwise op; a reduce applies its reducer (input - output) times, a reduce-window (window - 1) times
    per output element, a scatter once per update element, each application costing the reducer's own ops;
    an all-reduce one FLOP per element; a sort n·⌈log2 n⌉ comparisons.
    """
    op = instr.opcode
    if op == "dot":
        f = _dot_flops(instr, comp)
        if hints is not None and scopes.within(instr.op_name, scopes.GROUPED_MATMUL):
            f = int(f / hints.groups * hints.row_fraction)
        return f, f, 0
    tiled = _tiled_cost(instr, comp)
    if tiled is not None:    # the kernel skips tiles past the last filled row: with hints, their fraction
        f = int(tiled["flops"] * (hints.row_fraction if hints else 1.0))
        return f, f, 0
    if _is_grouped_kernel(instr):
        f = int(_grouped_matmul_flops(instr, comp) * (hints.row_fraction if hints else 1.0))
        return f, f, 0
    if op == "convolution":
        f = _conv_flops(instr, comp)
        return f, f, 0
    if op == "custom-call" and re.search(r'custom_call_target="__cublas\$', instr.attrs):
        f = _gemm_call_flops(instr, comp)
        return f, f, 0
    kernel = _flash_cost(instr, comp)
    if kernel is not None:
        return kernel["flops"], kernel["flops"], kernel["transcendentals"]
    if op in _ELEMENTWISE:
        return instr.elements, 0, 0
    if op in ("reduce", "reduce-window", "scatter"):
        n = _applications(instr, comp)
        flops, trans = _applied_cost(module, instr)
        return n * flops, 0, n * trans
    if op in ("all-reduce", "all-reduce-start"):
        return instr.elements, 0, 0
    if op == "sort":
        src = comp.by_name.get(instr.operands[0]) if instr.operands else None
        n = _first_elements(src.shape) if src else 0
        return n * max(n - 1, 0).bit_length(), 0, 0
    if op in _TRANSCENDENTAL:
        return 0, 0, instr.elements
    return 0, 0, 0


_CONVERSION_ONLY = {"parameter", "constant", "bitcast", "convert", "copy", "reshape", "slice", "dynamic-slice",
                    "dynamic-update-slice", "tuple", "get-tuple-element"}


def walk(hlo_text: str, mesh_shape: dict[str, int], cpu_native_dtype: str | None = None,
         hints: RaggedHints | None = None) -> WalkResult:
    """FLOPs, transcendentals, HBM bytes and collectives of optimized HLO, loop-corrected.

    Returns the totals, by-scope splits, the top-level ops (`OpCost`), collectives
    (`CollectiveCost`), the same totals uncorrected (each loop once), and loops whose trip
    count is unknown (`WalkResult`).

    cpu_native_dtype (an HLO element type, e.g. "bf16"): the program came from XLA's CPU
    compiler, which computes 16-bit floats in f32. Bytes are then counted as a GPU or TPU
    program of that dtype would move them: f32 arrays at the native width
    (`moe_jax.costs.hlo.Module.counted_as`), and fusions that only convert between the two
    precisions (with slicing/copies around the convert) dropped. `raw_hbm_bytes` keeps the
    CPU program's own figure; the uncorrected totals stay raw (they cross-check XLA's own
    count of the same CPU program).

    hints: for a dropless program (see `RaggedHints`); ragged all-to-alls then carry their
    worst-case bytes beside the expected ones.
    """
    module = Module.parse(hlo_text)
    raw = _walk(module, mesh_shape, skip_conversions=False, hints=hints)
    if not cpu_native_dtype:
        return raw
    native = _walk(module.counted_as({"f32": dtype_bytes(cpu_native_dtype)}), mesh_shape, skip_conversions=True,
                   hints=hints)
    native.uncorrected = raw.uncorrected
    native.raw_hbm_bytes = raw.hbm_bytes
    return native


def _grouped_matmul_bytes(instr: Instruction, comp, moved: int, hints: RaggedHints) -> int:
    """HBM bytes of a backend's grouped matmul over the worst-case buffer: the weights (rank 3) in full,
    the rows (lhs and result) at row_fraction: the kernel stops after the last group's last row."""
    weights = sum(w.bytes for w in _weight_operands(instr, comp))
    return weights + int((moved - weights) * hints.row_fraction)


def _in_grouped_matmul(instr: Instruction, module: Module) -> bool:
    """Whether an op belongs to a grouped matmul (its own op_name, or for a fusion without one, its body's)."""
    if instr.op_name:
        return scopes.within(instr.op_name, scopes.GROUPED_MATMUL)
    callee = [c for role, c in module.calls(instr) if role == "calls"]
    return bool(callee) and any(scopes.within(i.op_name, scopes.GROUPED_MATMUL)
                                for i in module.computations[callee[0]].instructions)


def _looped_group_bytes(instr: Instruction, comp, module: Module, moved: int, hints: RaggedHints) -> int:
    """HBM bytes of one op of a grouped matmul written as a loop over the groups (the CPU program).

    Each of the `groups` iterations touches every row; a grouped-matmul kernel touches each
    filled row once and each group's weights once. So the matmul of one iteration counts its
    weights [K, N] in full and its rows (lhs [M, K], result [M, N]) at row_fraction / groups;
    the loop's other ops (masking, accumulating) count row_fraction / groups of their bytes.
    """
    dot = instr if instr.opcode == "dot" else None
    inner = comp
    if dot is None and instr.opcode == "fusion":
        for role, callee in module.calls(instr):
            if role == "calls":
                inner = module.computations[callee]
                dot = next((i for i in inner.instructions if i.opcode == "dot"), None)
    rows = hints.row_fraction / hints.groups
    if dot is None or len(dot.operands) < 2 or dot.operands[1] not in inner.by_name:
        return int(moved * rows)
    lhs, rhs = inner.by_name.get(dot.operands[0]), inner.by_name[dot.operands[1]]
    return int(((lhs.bytes if lhs else 0) + dot.bytes) * rows) + rhs.bytes


def _index_arithmetic(instr: Instruction) -> bool:
    """An integer or predicate scalar: a slice position computed inside a fusion (e.g. a wrapped cache index)."""
    return instr.shape.split("[")[0] in ("pred", "s32", "s64", "u32", "u64") and instr.elements <= 1


def _conversion_only(instr: Instruction, module: Module) -> bool:
    if instr.opcode == "convert":
        return True
    if instr.opcode != "fusion":
        return False
    callee = [c for role, c in module.calls(instr) if role == "calls"]
    ops = {i.opcode for i in module.computations[callee[0]].instructions if not _index_arithmetic(i)} \
        if callee else set()
    return "convert" in ops and ops <= _CONVERSION_ONLY


def _converted_update_bytes(instr: Instruction, comp, module: Module) -> int | None:
    """XLA:CPU updates a bf16 buffer in f32: a fusion convert(dynamic-update-slice(convert(buffer), update))
    reads and writes the whole buffer, where a GPU or TPU program writes the update in place (as `walk` drops
    XLA:CPU's conversion-only fusions; this one also computes the update, e.g. a KV cache write of a projection
    scaled by its FP8 weight's scales). Its bytes as in place: the other operands read, the update written;
    None for any other op."""
    callee = [c for role, c in module.calls(instr) if role == "calls"]
    fused = module.computations[callee[0]] if callee else None
    root = fused.root if fused else None
    dus = fused.by_name.get(root.operands[0]) if root is not None and root.opcode == "convert" else None
    buffer = fused.by_name.get(dus.operands[0]) if dus is not None and dus.opcode == "dynamic-update-slice" else None
    if buffer is None or buffer.opcode != "convert" or len(fused.users(buffer.name)) != 1:
        return None
    index = next((i for i in range(len(instr.operands)) if getattr(fused.parameter(i), "name", None)
                  == buffer.operands[0]), None)
    update = fused.by_name.get(dus.operands[1])
    if index is None or update is None or len(fused.users(buffer.operands[0])) != 1:
        return None
    others = sum(comp.by_name[n].bytes for i, n in enumerate(instr.operands) if i != index and n in comp.by_name)
    return others + update.elements * root.bytes // max(root.elements, 1)


def _walk(module: Module, mesh_shape: dict[str, int], skip_conversions: bool,
          hints: RaggedHints | None = None) -> WalkResult:
    """One pass over the module's control computations (see `walk`); raw_hbm_bytes is this pass's own."""
    runs, kind, unknown = module.multipliers()
    fused_cache: dict[str, tuple] = {}

    def fused(name: str):
        """(flops, matmul, transcendentals, flops by scope) of one execution of a fused computation."""
        if name in fused_cache:
            return fused_cache[name]
        comp = module.computations[name]
        total, by_scope = [0, 0, 0], defaultdict(int)
        for instr in comp.instructions:
            parts = _instr_flops(instr, comp, hints, module)
            read = _sliced_elements(instr, comp)
            if read is not None:                # computed only where its slices read it
                parts = tuple(p * read // instr.elements for p in parts)
            by_scope[model_phase(instr.op_name)] += parts[0]
            if instr.opcode == "fusion":
                for role, callee in module.calls(instr):
                    if role == "calls":
                        inner = fused(callee)
                        parts = tuple(a + b for a, b in zip(parts, inner[:3], strict=True))
                        for k, v in inner[3].items():
                            by_scope[k] += v
            total = [a + b for a, b in zip(total, parts, strict=True)]
        fused_cache[name] = (*total, dict(by_scope))
        return fused_cache[name]

    ops, collectives = [], []
    flops_by_scope, bytes_by_scope = defaultdict(int), defaultdict(int)
    for name, comp in module.computations.items():
        n = runs.get(name, 0)
        if n == 0 or kind.get(name) != "control":
            continue
        for instr in comp.instructions:
            op = instr.opcode
            if skip_conversions and _conversion_only(instr, module):
                continue
            flops, matmul, trans = _instr_flops(instr, comp, hints, module)
            by_scope = {model_phase(instr.op_name): flops}
            if op == "fusion":
                for role, callee in module.calls(instr):
                    if role == "calls":
                        flops, matmul, trans, by_scope = fused(callee)
            moved = 0
            # a generic async-start runs the computation it wraps (newer XLA:GPU runs a layer's dynamic-slice
            # copy so): that computation is walked as control flow, its ops counted there, not here again
            wraps = op == "async-start" and any(role == "calls" for role, _ in module.calls(instr))
            if op not in _NO_TRAFFIC and not op.endswith("-done") and not wraps:
                moved = _operand_bytes(instr, comp, module) + _result_bytes(instr, comp, module)
                if (tiled := _tiled_cost(instr, comp)) is not None:   # its weights: one layer's of stacked ones
                    moved = tiled["bytes"]
                elif hints is not None and hints.looped and _in_grouped_matmul(instr, module):
                    moved = _looped_group_bytes(instr, comp, module, moved, hints)
                elif hints is not None and _is_grouped_kernel(instr):
                    moved = _grouped_matmul_bytes(instr, comp, moved, hints)
                elif op == "ragged-all-to-all":   # reads the rows it sends, writes them at the receiver
                    moved = 2 * _ragged_bytes(instr, comp, _result_bytes(instr, comp, module))[1]
                elif skip_conversions and op == "fusion":
                    moved = min(moved, _converted_update_bytes(instr, comp, module) or moved)
            if not (flops or trans or moved):
                continue
            scope = model_phase(instr.op_name)
            if scope == "other" and any(v for k, v in by_scope.items() if k != "other"):
                scope = max((k for k in by_scope if k != "other"), key=lambda k: by_scope[k])
            for k, v in by_scope.items():
                flops_by_scope[k] += n * v
            bytes_by_scope[scope] += n * moved
            base = op[:-len("-start")] if op.endswith("-start") else op
            is_collective = base in _COLLECTIVE_KINDS
            ops.append(OpCost(instr.name, op, scope, flops, matmul, trans, moved, n, is_collective,
                              dot_dtype(instr, comp, module) if matmul else "",
                              kernel_of(instr, comp), memory_op_kind(instr, comp, module)))
            if is_collective:
                groups = parse_replica_groups(instr.opcode + " " + instr.attrs)
                c = Collective(base, instr.name, instr.shape, tuple(tuple(g) for g in groups), instr.op_name)
                size = 2 if base == "collective-permute" else (len(groups[0]) if groups else
                                                               math.prod(mesh_shape.values()))
                payload, worst = _collective_payload(instr, comp, base), None
                if base == "ragged-all-to-all":
                    worst, payload = _ragged_bytes(instr, comp, payload)
                elif hints is not None and scopes.within(instr.op_name, scopes.RAGGED_AS_DENSE):
                    base, worst = "ragged-all-to-all", payload
                    payload = int(payload * hints.block_fraction)
                collectives.append(CollectiveCost(
                    base, list(collective_axes(c, mesh_shape)), size, payload,
                    n, scope, instr.name, list(groups[0]) if groups else [], worst))
    hbm_bytes = sum(o.bytes * o.count for o in ops)
    return WalkResult(
        flops=sum(o.flops * o.count for o in ops), matmul_flops=sum(o.matmul_flops * o.count for o in ops),
        transcendentals=sum(o.transcendentals * o.count for o in ops), hbm_bytes=hbm_bytes, raw_hbm_bytes=hbm_bytes,
        flops_by_scope=dict(flops_by_scope), bytes_by_scope=dict(bytes_by_scope), ops=ops, collectives=collectives,
        unknown=unknown,
        uncorrected=WalkTotals(flops=sum(o.flops for o in ops), hbm_bytes=sum(o.bytes for o in ops),
                               transcendentals=sum(o.transcendentals for o in ops)))


def phase_cost(phase: CompiledPhase, backend: str, mesh_shape: dict[str, int],
               cpu_native_dtype: str | None = None, hints: RaggedHints | None = None) -> PhaseCost:
    """Read one compiled program: memory, FLOPs, bytes, collectives (see `walk` for cpu_native_dtype, hints)."""
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
    w = walk(phase.hlo_text, mesh_shape, cpu_native_dtype if backend == Backend.CPU else None, hints)
    return PhaseCost(
        phase.phase, backend, True, memory=memory, flops=w.flops, matmul_flops=w.matmul_flops,
        transcendentals=w.transcendentals, hbm_bytes=w.hbm_bytes, raw_hbm_bytes=w.raw_hbm_bytes,
        flops_by_scope=w.flops_by_scope, bytes_by_scope=w.bytes_by_scope, collectives=w.collectives, ops=w.ops,
        xla_cost=xla, walk_uncorrected=w.uncorrected, unknown_trip_loops=w.unknown,
        compile_seconds=phase.compile_seconds, hlo_text=phase.hlo_text)


def analyze_cost(cfg: ModelConfig, strategy: Strategy, workload: Workload, backend: str = Backend.CPU,
                 **compile_kw) -> CostReport:
    """Compile prefill and decode ahead of time and read their cost (the Python API)."""
    from moe_jax.costs.analytic import analytic_report
    from moe_jax.costs.routing import UNIFORM, shard_imbalance
    from moe_jax.programs.placement import describe

    program: CompiledProgram = compile_program(cfg, strategy, workload, backend=backend, **compile_kw)
    mesh_shape = program.compiled_strategy.mesh_shape
    native = DTYPES[cfg.dtype].hlo if cfg.dtype_bytes < 4 else None
    import jax

    platform = jax.default_backend() if backend == Backend.REAL else backend
    hints = RaggedHints.for_program(cfg, program.compiled_strategy, platform)
    phases = {name: phase_cost(p, backend, mesh_shape, native, hints) for name, p in program.phases.items()}
    if hints is not None:
        program.notes.append(
            f"dropless: each shard's receive buffer is sized for "
            f"{'the worst case' if cfg.dropless_buffer is None else f'{cfg.dropless_buffer:g}x the expected rows'}"
            "; grouped-matmul FLOPs count the "
            f"{hints.row_fraction:.3g} of its rows uniform routing fills, and every local expert's weights are read "
            "(kernels that skip experts with no rows read fewer; the decode floor counts only the experts a batch is "
            "expected to touch)")
    if hints is not None and hints.looped:
        program.notes.append(
            f"dropless on the cpu backend: XLA:CPU has no grouped matmul; the program loops over the {hints.groups} "
            f"local experts with a dense matmul each (counted here as one grouped matmul: FLOPs divided by "
            f"{hints.groups}, weights once per expert, rows once) and has "
            "no ragged all-to-all, so rows move in dense worst-case blocks: counted as ragged all-to-alls with the "
            f"block as the worst case and {hints.block_fraction:.3g} of it (uniform routing) as the expected bytes")
    if backend == Backend.CPU and native:
        program.notes.append(f"cpu backend: XLA's CPU compiler computes {cfg.dtype} in f32; HBM bytes and collective "
                             f"payloads are counted at {cfg.dtype} width and precision-conversion fusions are "
                             "dropped, as a GPU or TPU program would move them (raw_hbm_bytes keeps the CPU figure)")
    placement = describe(cfg, program.compiled_strategy)
    compiled = program.compiled_strategy
    analytic = analytic_report(cfg, compiled, program.workload, placement.weight_bytes_per_device,
                               phases=phases, microbatches={name: compile_kw.get(f"{name}_microbatches")
                                                            for name in phases})
    if hints is not None:
        seqs = max(program.workload.batch // compiled.dp, 1)                   # routed within one ep group
        per_replica = {"prefill": seqs * program.workload.prompt_len, "decode": seqs}
        analytic.dropless = DroplessRouting(UNIFORM, hints.row_fraction, cfg.dropless_buffer,
                                            {ph: shard_imbalance(cfg, compiled, n) for ph, n in per_replica.items()})
    devices = compiled.num_devices
    for name, cost in phases.items():
        # matmul FLOPs on both sides; elementwise work is reported separately (cost.flops)
        analytic.phases[name] = analytic.phases[name].with_compiled(cost.matmul_flops * devices if cost.fits else None)
    return CostReport(cfg.name, strategy.name, compiled.name, program.workload.to_dict(),
                      backend, program.target, devices, phases, program.notes, analytic,
                      topology=program.topology, physical_order=program.physical_order)
