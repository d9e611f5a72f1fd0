"""Capacity: how many concurrent sequences a strategy's devices hold at the compiled context length.

Read from one compiled program pair (the analyze JSON of `moe_jax.perf.analysis`), per phase, per device:

- **fixed bytes**: the weights, plus any argument padding the compiler added (arguments − weights − KV cache −
  tokens, at least 0);
- **bytes per sequence**: the KV cache one sequence adds (the placement's count of every cache array,
  `moe_jax.programs.placement.Placement.kv_cache_bytes_per_device`, divided by the compiled batch: exact), plus
  the compiled program's temporaries, tokens and non-aliased outputs divided by the compiled batch.

Two methods, the one used named in the result (``method``):

- ``per-sequence at the compiled batch`` (one compile; `analyze` and the plan's compiled strategies): every
  temporary is taken to scale with the batch. Temporaries that do not (a gathered weight, a fixed workspace)
  are then counted once per sequence, so the capacity is a lower bound, tightest when the program was compiled
  at a batch near it; no second compile is needed, so the planner's compiled (and cached) programs give it.
- ``two compiled batches`` (when the same strategy and context were compiled at two batches, as the load
  sweep does): bytes per sequence are the slope of the peak between them (never below the KV cache per
  sequence), fixed bytes what the larger one's peak leaves (never below weights and padding), so temporaries
  that do not grow with the batch count once.

With `headroom` (a fraction of device memory kept free: allocator fragmentation, the runtime's own buffers),
a phase holds ``floor((memory × (1 − headroom) − fixed) / per_sequence)`` sequences; the capacity is the smaller
of the two phases, rounded down to a batch the strategy accepts (a multiple of dp), and never above
`moe_jax.costs.compile.MAX_BATCH`. Sequences are counted over the strategy's devices (the batch the programs
are compiled for); a data-parallel replica holds ``max_concurrency / dp`` of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moe_jax.costs.compile import MAX_BATCH
from moe_jax.errors import MoeJaxError

DEFAULT_HEADROOM = 0.10
"""Share of device memory kept free when sizing the capacity."""

METHOD = "per-sequence at the compiled batch"
"""How bytes per sequence are derived from one compile (see the module docstring)."""
TWO_BATCHES = "two compiled batches"
"""How bytes per sequence are derived from two compiles of one strategy at different batches."""


def check_headroom(headroom: float) -> float:
    """`headroom` if it is a fraction in [0, 1); a `MoeJaxError` naming it otherwise."""
    if not (isinstance(headroom, int | float) and 0 <= headroom < 1):
        raise MoeJaxError(f"--headroom {headroom!r} must be a fraction of device memory in [0, 1), e.g. 0.1 for 10%")
    return float(headroom)


@dataclass(frozen=True)
class PhaseCapacity:
    """One compiled phase's memory split into a fixed part and a part per sequence (bytes per device)."""

    phase: str
    fixed_bytes: int
    """Weights plus the compiler's argument padding."""
    per_sequence_bytes: float
    """What one more sequence adds: KV cache (from the cache layout) + temporaries, tokens and outputs / batch."""
    kv_per_sequence_bytes: float
    """The KV cache part of `per_sequence_bytes`."""
    max_sequences: int
    """Sequences this phase holds within the usable memory (before rounding to the strategy's batch unit)."""


@dataclass(frozen=True)
class Capacity:
    """The largest number of concurrent sequences one strategy holds, with the inputs it came from."""

    strategy: str
    devices: int
    dp: int
    prompt_len: int
    gen_len: int
    context_len: int
    """prompt + generated tokens: the KV cache positions each sequence holds."""
    compiled_batch: int
    """The (larger) batch the programs were compiled at."""
    memory_bytes: int
    """Device memory (the hardware's)."""
    headroom: float
    headroom_bytes: int
    usable_bytes: int
    """memory_bytes − headroom_bytes."""
    fixed_bytes: int
    """Of the limiting phase."""
    per_sequence_bytes: float
    """Of the limiting phase, per device for each sequence of the batch."""
    kv_per_sequence_bytes: float
    limiting_phase: str
    max_concurrency: int
    """Sequences the strategy's devices hold (a multiple of dp; 0: not even dp of them fit)."""
    per_replica: int
    """max_concurrency / dp: the sequences one data-parallel replica holds."""
    phases: dict[str, PhaseCapacity]
    capped: bool = False
    """The memory would hold more: `max_concurrency` stopped at `moe_jax.costs.compile.MAX_BATCH`."""
    method: str = METHOD
    other_batch: int | None = None
    """With ``two compiled batches``: the smaller batch compiled."""

    def to_dict(self) -> dict:
        """The JSON ``max_concurrency`` object."""
        d = asdict(self)
        d["phases"] = {k: asdict(v) for k, v in self.phases.items()}
        return d


def phase_capacity(phase: str, memory: dict, kv_bytes: int, batch: int, usable: int) -> PhaseCapacity:
    """Split one phase's compiled memory (`memory`: the analyze JSON's ``phases[phase]["memory"]``) at
    `batch` sequences into fixed and per-sequence bytes; `kv_bytes` is the cache layout's KV cache per device."""
    padding = max(0, memory["arguments"] - memory["weights"] - memory["kv_cache"] - memory["tokens"])
    fixed = memory["weights"] + padding
    outputs = max(0, memory["outputs"] - memory["aliased"])      # the cache comes back aliased: counted once
    kv = kv_bytes / batch
    per_sequence = kv + (memory["temporaries"] + memory["tokens"] + outputs) / batch
    return PhaseCapacity(phase, fixed, per_sequence, kv, _count(usable - fixed, per_sequence))


def phase_capacity_two(phase: str, low: dict, high: dict, kv_bytes: int, batches: tuple[int, int],
                       usable: int) -> PhaseCapacity:
    """One phase's memory split from two compiles (`low` at the smaller batch, `high` at the larger): bytes per
    sequence the peak's slope, at least the KV cache per sequence; fixed bytes what the larger peak leaves."""
    one = phase_capacity(phase, high, kv_bytes, batches[1], usable)
    slope = (high["peak"] - low["peak"]) / (batches[1] - batches[0])
    per_sequence = max(slope, one.kv_per_sequence_bytes)
    fixed = max(one.fixed_bytes, math.ceil(high["peak"] - per_sequence * batches[1]))
    return PhaseCapacity(phase, fixed, per_sequence, one.kv_per_sequence_bytes, _count(usable - fixed, per_sequence))


def _count(room: float, per_sequence: float) -> int:
    """Sequences of `per_sequence` bytes in `room` bytes, at most MAX_BATCH."""
    if room <= 0:
        return 0
    return MAX_BATCH if per_sequence <= 0 else min(MAX_BATCH, math.floor(room / per_sequence))


def capacity(analysis: dict, *, headroom: float = DEFAULT_HEADROOM, other: dict | None = None) -> Capacity | None:
    """The capacity of the compiled strategy `analysis` (analyze JSON) at its workload's context length;
    None when a phase did not compile (there is no memory to read).

    other: the same strategy and context compiled at another batch; the two give the ``two compiled batches``
    method (see the module docstring)."""
    headroom = check_headroom(headroom)
    if other is not None and other["workload"]["batch"] > analysis["workload"]["batch"]:
        analysis, other = other, analysis                     # `analysis` is the larger batch
    phases = analysis["phases"]
    if any(p["memory"] is None for p in phases.values()):
        return None
    s, w = analysis["strategy"], analysis["workload"]
    memory_bytes = int(analysis["hardware"]["memory_bytes"])
    headroom_bytes = math.ceil(memory_bytes * headroom)
    usable = memory_bytes - headroom_bytes
    kv_bytes = analysis["placement"]["kv_cache_bytes_per_device"]
    low = None
    if other is not None and other["workload"]["batch"] != w["batch"] and all(
            other["phases"].get(name, {}).get("memory") for name in phases):
        same = (other["strategy"]["name"], other["workload"]["prompt_len"], other["workload"]["gen_len"])
        if same != (s["name"], w["prompt_len"], w["gen_len"]):
            raise MoeJaxError(f"capacity from two compiles needs one strategy and context: {s['name']} at "
                              f"{w['prompt_len']}+{w['gen_len']} and {same[0]} at {same[1]}+{same[2]}")
        low = other
    if low is None:
        per_phase = {name: phase_capacity(name, p["memory"], kv_bytes, w["batch"], usable)
                     for name, p in phases.items()}
    else:
        batches = (low["workload"]["batch"], w["batch"])
        per_phase = {name: phase_capacity_two(name, low["phases"][name]["memory"], p["memory"], kv_bytes, batches,
                                              usable) for name, p in phases.items()}
    limit = min(per_phase.values(), key=lambda c: c.max_sequences)
    count = limit.max_sequences // s["dp"] * s["dp"]              # a batch the strategy accepts: dp divides it
    return Capacity(s["name"], s["devices"], s["dp"], w["prompt_len"], w["gen_len"], w["prompt_len"] + w["gen_len"],
                    w["batch"], memory_bytes, headroom, headroom_bytes, usable, limit.fixed_bytes,
                    limit.per_sequence_bytes, limit.kv_per_sequence_bytes, limit.phase, count, count // s["dp"],
                    per_phase, capped=limit.max_sequences >= MAX_BATCH, method=METHOD if low is None else TWO_BATCHES,
                    other_batch=None if low is None else low["workload"]["batch"])


def farthest(analyses: dict[tuple[str, int], dict], name: str, batch: int) -> dict | None:
    """Of `analyses` ((strategy, batch) → analyze JSON), the one of strategy `name` whose batch is farthest
    (by ratio) from `batch`: the widest base for the two-batch slope; None when there is no other batch."""
    others = [(b, a) for (n, b), a in analyses.items() if n == name and b != batch]
    if not others:
        return None
    return max(others, key=lambda ba: max(ba[0] / batch, batch / ba[0]))[1]


def attach_capacity(result, headroom: float = DEFAULT_HEADROOM,
                    others: dict[tuple[str, int], dict] | None = None) -> None:
    """Fill `result.capacity` (a `moe_jax.planner.result.PlanResult`) for every compiled strategy; `others`
    ((strategy, batch) → analyze JSON, e.g. the load sweep's compiles) gives the two-batch method where it holds
    the same strategy at another batch."""
    result.headroom = check_headroom(headroom)
    caps = {}
    for name, entry in result.compiled.items():
        a = entry["analysis"]
        caps[name] = capacity(a, headroom=headroom, other=farthest(others or {}, name, a["workload"]["batch"]))
    result.capacity = {name: c.to_dict() for name, c in caps.items() if c is not None}
