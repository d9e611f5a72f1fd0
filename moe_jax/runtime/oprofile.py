"""Each op of a compiled program timed on the devices, set beside the time model's prediction of it.

`measure_ops` runs a function under ``jax.profiler`` and reads the trace it writes (the Perfetto JSON):
on XLA:CPU every top-level instruction of the program is one traced event named as the HLO
instruction, so the measured seconds per program call can be joined with the cost walk's `OpCost`
by name. `compare_ops` does that join and sums both sides by op category (matmuls, dtype conversions,
in-place updates, copies and transposes, other fusions, small ops), which says which term of a
prediction is off when a whole-program prediction misses.

GPU and TPU traces name kernels, not HLO instructions: there the join finds little, and says so.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
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
        found = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not found:
            return {}
        with gzip.open(found[0]) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] * 1e-6 / calls
    return dict(total)


def category(op: OpCost) -> str:
    """The kind of work an op does, for summing measured against predicted."""
    name = op.name
    if op.matmul_flops:
        return "matmul"
    kind = memory_kind(op)                     # the time model's own reading of the name: what it is timed as
    if kind == "convert":
        return "dtype conversion"
    if "dynamic-update-slice" in name or "scatter" in name:
        return "in-place update"
    if kind == "transpose" or op.opcode == "copy" or name.startswith("copy"):
        return "copy / transpose"
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


def compare_ops(ops: list[OpCost], predicted: dict[str, float], measured: dict[str, float]) -> list[OpComparison]:
    """Sum, per `category`, the measured seconds (`measure_ops`) and the predicted seconds of one execution
    (`predicted`, by op name) times the op's executions per call. Ops the trace does not name count as
    measured 0 (a category with predicted time and no measurement means the join failed)."""
    rows: dict[str, list] = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])
    for op in ops:
        if op.collective:
            continue
        r = rows[category(op)]
        r[0] += 1
        r[1] += measured.get(op.name, 0.0)
        r[2] += predicted.get(op.name, 0.0) * op.count
        r[3] += op.bytes * op.count
        r[4] += op.flops * op.count
    return sorted((OpComparison(k, *v) for k, v in rows.items()), key=lambda c: -max(c.measured_s, c.predicted_s))


__all__ = ["measure_ops", "category", "OpComparison", "compare_ops"]
