"""Each op of a compiled program timed on the devices, set beside the time model's prediction of it.

`measure_ops` runs a function under ``jax.profiler`` and reads the trace it writes (the Perfetto JSON):
on XLA:CPU every top-level instruction of the program is one traced event named as the HLO
instruction, so the measured seconds per program call can be joined with the cost walk's `OpCost`
by name. `compare_ops` does that join and sums both sides by op category (matmuls, dtype conversions,
in-place updates, copies and transposes, other fusions, small ops), which says which term of a
prediction is off when a whole-program prediction misses.

On a GPU the trace names kernels: XLA names each of its own kernels after the fusion it runs, with the
fusion's ``.N`` written ``_N`` (`device_kernel_seconds` maps them back), so those join too; cuBLAS kernels and
the memcpy of a dynamic-slice copy inside a CUDA graph name no op, and `compare_ops` counts them in their
category (matmul, copy / transpose), anything else as unjoined.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from moe_jax.costs.types import OpCost
from moe_jax.perf.timemodel import memory_kind


def measure_ops(fn: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """Seconds per call of each traced event (by name) over `calls` calls of `fn` (which must block until its
    result is ready), from a ``jax.profiler`` trace. Profiling adds a little to each event."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        found = perfetto_traces(tmp)
        if not found:
            return {}
        events = read_trace(found[0])
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] * 1e-6 / calls
    return dict(total)


def quiet_profile_options():
    """``jax.profiler`` options with the Python tracer off: a trace of the device's kernels and the host's
    dispatch, not of every Python call."""
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options


def perfetto_traces(where: str | os.PathLike) -> list[str]:
    """The ``perfetto_trace.json.gz`` files a ``jax.profiler.trace(where, create_perfetto_trace=True)`` wrote."""
    return glob.glob(os.path.join(where, "**", "perfetto_trace.json.gz"), recursive=True)


def read_trace(trace_file: str | os.PathLike) -> list[dict]:
    """The events of a Perfetto trace (``perfetto_trace.json.gz``)."""
    with gzip.open(trace_file) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


_LIBRARY_GEMMS = ("nvjet", "cutlass", "sm90_", "sm80_", "ampere_", "cublas")
"""Kernel names of cuBLAS / CUTLASS gemms, which run a gemm custom call inside a CUDA graph (whose trace event
names the graph, not the call): their time joins the matmul category, not one op. (XLA's own Triton gemms are
``gemm_fusion_dot_N``: they name their op.)"""


def device_kernel_seconds(trace_file: str, module: str, calls: int) -> dict[str, float]:
    """Seconds per call of each device kernel of HLO module `module` (``jit__decode``) in a ``jax.profiler``
    Perfetto trace (a ``perfetto_trace.json.gz``) that ran it `calls` times, keyed by the HLO instruction each
    runs: the event's ``hlo_op``, or, for a kernel inside a CUDA graph (whose ``hlo_op`` names the graph), the
    instruction XLA named the kernel after (kernel ``input_reduce_fusion_2`` runs ``input_reduce_fusion.2``);
    library kernels and copies inside a graph keep their own names."""
    total: dict[str, float] = defaultdict(float)
    for e in read_trace(trace_file):
        args = e.get("args", {})
        if e.get("ph") == "X" and "dur" in e and args.get("hlo_module") == module:
            op = args.get("hlo_op", "")         # inside a CUDA graph: the graph's name, not the kernel's op
            total[op if op and not op.startswith("command_buffer") else _hlo_name(e["name"])] += e["dur"] * 1e-6 / calls
    return dict(total)


def _hlo_name(kernel: str) -> str:
    """The HLO instruction name XLA:GPU gave a kernel it emitted (``gemm_fusion_dot_22`` → ``gemm_fusion_dot.22``);
    a name without a numeric suffix (``wrapped_transpose``, ``nvjet_sm90_...``) as it is."""
    m = re.fullmatch(r"(.+?)_(\d+)", kernel)
    library = kernel.startswith(_LIBRARY_GEMMS) or _is_memcpy(kernel)
    return f"{m[1]}.{m[2]}" if m and not library else kernel


def _is_memcpy(kernel: str) -> bool:
    return kernel.lower().startswith("memcpy")


def category(op: OpCost) -> str:
    """The kind of work an op does, for summing measured against predicted."""
    name = op.name
    if op.matmul_flops:
        return "matmul"
    kind = memory_kind(op)                     # the time model's own reading of the name: what it is timed as
    if kind == "convert":
        return "dtype conversion"
    plain = name.replace("_", "-")             # fusion names spell the fused ops with underscores
    if "dynamic-update-slice" in plain or "scatter" in name:
        return "in-place update"
    if kind == "transpose" or op.opcode == "copy" or name.startswith("copy") or "dynamic-slice" in plain:
        return "copy / transpose"          # a dynamic-slice fusion copies a layer's slice out (a memcpy on a GPU)
    if op.bytes < 64 << 10 and op.flops < 1 << 16:
        return "small op"
    return "other fusion"


@dataclass(frozen=True)
class OpComparison:
    """Measured against predicted seconds per program call, summed over one category of ops."""

    category: str
    ops: int
    measured_s: float
    predicted_s: float
    bytes: int
    flops: int


def compare_ops(ops: list[OpCost], predicted: dict[str, float], measured: dict[str, float],
                unjoined: bool = False) -> list[OpComparison]:
    """Sum, per `category`, the measured seconds (`measure_ops`, `device_kernel_seconds`) and the predicted
    seconds of one execution (`predicted`, by op name) times the op's executions per call. Ops the trace does
    not name count as measured 0 (a category with predicted time and no measurement means the join failed);
    with `unjoined` (a device trace, which holds kernels only), measured kernels that no op names join their
    category by kind (library gemms: matmul; memcpy: copy / transpose, where the dynamic-slice fusions they run
    sit), and the rest are one more row, `UNJOINED`."""
    rows: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])
    joined = set()
    for op in ops:
        if op.collective:
            continue
        r = rows[category(op)]
        r[0] += 1
        r[1] += measured.get(op.name, 0.0)
        r[2] += predicted.get(op.name, 0.0) * op.count
        r[3] += op.bytes * op.count
        r[4] += op.flops * op.count
        joined.add(op.name)
    alone = {k: v for k, v in measured.items() if k not in joined} if unjoined else {}
    for name, seconds in alone.items():   # kernels no op names: a library gemm, a slice copy's memcpy, or neither
        kind = "matmul" if name.startswith(_LIBRARY_GEMMS) else "copy / transpose" if _is_memcpy(name) else UNJOINED
        rows[kind][1] += seconds
        rows[kind][0] += kind == UNJOINED
    return sorted((OpComparison(k, *v) for k, v in rows.items()), key=lambda c: -max(c.measured_s, c.predicted_s))


UNJOINED = "kernels not joined"
"""`compare_ops`'s row for measured kernels that no op of the program names and that are neither a library gemm
nor a memcpy (their prediction sits in the row of whichever op launched them)."""


__all__ = ["measure_ops", "quiet_profile_options", "perfetto_traces", "read_trace", "device_kernel_seconds",
           "category", "OpComparison", "compare_ops", "UNJOINED"]
