"""The time model: compiled cost × hardware → TTFT, TPOT, throughput, MFU, MBU, with the assumptions stated.

- Per op (from the compiled HLO, loop trip counts included): ``max(flops / achievable FLOP/s,
  bytes / achievable HBM bandwidth)``. On a calibrated hardware file (``moe-jax calibrate``)
  the op's matmul FLOPs and bytes are timed on the measured curves instead (small matmuls
  and copies run far below peak), and no op takes less than the measured cost of one tiny
  op. An op whose compute term wins is compute time, else memory time (or overhead time).
- Per collective: its own algorithm on the link tiers its replica group spans
  (`moe_jax.perf.collectives`: pairwise all-to-all, ring or tree all-reduce by size,
  hierarchical across nodes; a calibrated fit where measured). Device ids are mesh
  positions mapped to the topology (`physical_order`).
- The program's schedule (`moe_jax.perf.schedule`): ops run in the compiled order on one
  compute stream, a collective the compiler started asynchronously runs beside them until
  its ``done``; the prediction quoted is that critical path. The no-overlap bound (compute
  + memory + communication) and the full-overlap bound (the larger of the two) stay beside
  it. Without the program text (a cached plan), the no-overlap bound is quoted.
- The pipeline schedule is inside the compiled program: every tick of M + pp − 1 runs,
  so the bubble is already in the time; its fraction is reported beside it.
- Floors: decode must read every local weight and the local KV cache once from HBM at
  the datasheet bandwidth; prefill must do its useful FLOPs at peak. No prediction is
  reported below its floor; when the model's raw number is lower, the check says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from moe_jax.costs.types import CollectiveCost, CostReport, OpCost, PhaseCost, WeightsRead
from moe_jax.hardware.presets import Hardware, LinkTier
from moe_jax.model import flash
from moe_jax.model.moe import grouped_kernel
from moe_jax.names import FP8, Backend
from moe_jax.perf.collectives import collective_seconds, collective_time, group_span


def op_time(flops: float, nbytes: float, hw: Hardware, matmul_flops: float = 0.0,
            matmul_dtype: str = "") -> tuple[float, str]:
    """Roofline time of one op execution and what bounds it ('compute' or 'memory').

    matmul_flops of the flops multiply in `matmul_dtype` (`OpCost.matmul_dtype`): at the hardware's FP8 peak
    when that is ``float8_e4m3fn`` and the chip has FP8 units (`Hardware.matmul_peak`), else, with the rest,
    at the achievable bf16 peak; the other flops (elementwise ops, reductions, decode's in-place products) at the
    achievable vector rate (`Hardware.achievable_vector_flops`)."""
    fp8 = matmul_flops if matmul_dtype == FP8 else 0.0
    vector = max(flops - matmul_flops, 0.0)
    compute = (matmul_flops - fp8) / hw.achievable_flops + fp8 / hw.achievable_matmul_flops(FP8) \
        + vector / hw.achievable_vector_flops
    memory = nbytes / hw.achievable_hbm
    return (compute, "compute") if compute >= memory else (memory, "memory")


def memory_kind(op: OpCost) -> str:
    """Which measured memory curve an op's bytes run at: ``convert`` for a dtype conversion, ``transpose`` for a
    transpose, else ``copy``. The walk reads it from the ops a fusion holds (`OpCost.kind`); without a program
    (an estimate), from the op's name, which XLA builds from some of the ops it fused (``wrapped_convert``,
    ``transpose_copy_fusion``)."""
    if op.matmul_flops:
        return "copy"
    if op.kind:
        return op.kind
    if "convert" in op.name:
        return "convert"
    if "transpose" in op.name or op.opcode == "transpose":
        return "transpose"
    return "copy"


def kernel_efficiency(hw: Hardware, kernel: str = flash.NAME) -> float:
    """The fraction of the matmul peak a Pallas kernel (`OpCost.kernel`) reaches on `hw`: its
    `Hardware.fused_attention_efficiency` (prefill's fused attention) or `grouped_matmul_efficiency` (dropless
    experts' grouped matmul), else its `flops_efficiency`."""
    own = hw.grouped_matmul_efficiency if kernel == grouped_kernel.NAME else hw.fused_attention_efficiency
    return own or hw.flops_efficiency


def kernel_seconds(op: OpCost, hw: Hardware) -> tuple[float, str]:
    """Seconds of one call of a Pallas kernel (`OpCost.kernel`): its FLOPs at `kernel_efficiency` of the matmul
    peak, or its bytes at the achievable bandwidth where those take longer; never under the least time of an op.
    A calibration measures XLA's gemms, not this kernel: its curves are not used here."""
    compute = op.flops / (hw.matmul_peak(op.matmul_dtype or "bfloat16") * kernel_efficiency(hw, op.kernel))
    memory = op.bytes / hw.achievable_hbm
    seconds, bound = (compute, "compute") if compute >= memory else (memory, "memory")
    least = hw.calibration.op_overhead_s if hw.calibration is not None else hw.op_floor_s
    return (least, "overhead") if seconds < least else (seconds, bound)


def op_seconds(op: OpCost, hw: Hardware, dtype: str = "bfloat16") -> tuple[float, str]:
    """Seconds of one execution of a compiled op and what bounds it ('compute', 'memory' or 'overhead').

    Datasheet presets: the roofline of `op_time` (matmul FLOPs at the rate of the dtype the op's matmul
    multiplies in). Calibrated hardware: matmul FLOPs on the measured curve of `dtype`, the model's compute
    dtype, or of FP8 for an op whose matmul multiplies FP8 operands (`OpCost.matmul_dtype`; a CPU-compiled
    program's f32 matmuls stand for the compute dtype, so no other dtype is taken from the op), other FLOPs at
    the achievable peak, transcendentals on their measured curve, bytes on the measured curve of the op's kind
    (`memory_kind`), and never less than the measured cost of one tiny op."""
    if op.kernel:
        return kernel_seconds(op, hw)
    cal = hw.calibration
    if cal is None:
        seconds, bound = op_time(op.flops, op.bytes, hw, op.matmul_flops, op.matmul_dtype)
        return (hw.op_floor_s, "overhead") if seconds < hw.op_floor_s else (seconds, bound)
    dot_dtype = FP8 if op.matmul_dtype == FP8 else dtype
    compute = (cal.matmul_seconds(op.matmul_flops, dot_dtype) if op.matmul_flops > 0 else 0.0) \
        + max(op.flops - op.matmul_flops, 0) / hw.achievable_vector_flops \
        + (cal.transcendental.seconds(op.transcendentals) if cal.transcendental and op.transcendentals else 0.0)
    memory = cal.kind_seconds(memory_kind(op), op.bytes) if op.bytes > 0 else 0.0
    seconds, bound = (compute, "compute") if compute >= memory else (memory, "memory")
    if seconds < cal.op_overhead_s:
        return cal.op_overhead_s, "overhead"
    return seconds, bound


def link_for(group: list[int], hw: Hardware, physical_order: list[int] | None = None) -> LinkTier:
    """The node tier when every device of the group sits in one node, else the network tier.

    group: partition ids; physical_order maps each to the device's index in the topology
    (nodes are runs of `devices_per_node` consecutive devices there); without it the
    partition ids are taken as that index.
    """
    if not group:
        return hw.network_link
    return hw.node_link if group_span(group, hw, physical_order).nodes == 1 else hw.network_link


@dataclass
class PhaseTime:
    """Predicted time of one program run on one device."""

    phase: str
    compute_s: float
    """Ops bound by FLOPs."""
    memory_s: float
    """Ops bound by HBM bytes."""
    comm_s: float
    comm_breakdown: list[dict] = field(default_factory=list)
    """Per (kind, mesh axes, algorithm and links): calls, bytes, seconds, share of the no-overlap time."""
    floor_s: float = 0.0
    floor_detail: str = ""
    overhead_s: float = 0.0
    """Ops shorter than the least time one op takes (the calibration's measured op overhead, else the
    hardware's `op_floor_s`), counted at that time."""
    scheduled_s: float | None = None
    """The critical path of the compiled schedule (collectives overlapping the compute the program runs
    beside them); None when the program text was not kept."""
    exposed_comm_s: float | None = None
    """Of comm_s, the seconds the compute stream waits for collectives in that schedule."""
    call_s: float = 0.0
    """The host's cost of calling the program and waiting for it: a decode step's `Hardware.decode_step_overhead_s`,
    or the calibration's fixed cost plus one per argument array where larger; in every bound."""
    fresh_s: float = 0.0
    """What the call pays for the buffers it allocates anew (its temporaries, outputs not aliased to an argument),
    on the calibration's measured curve (`Calibration.fresh_buffer`: page faults on XLA:CPU); 0 uncalibrated.
    In every bound."""

    @property
    def no_overlap_s(self) -> float:
        return self.compute_s + self.memory_s + self.overhead_s + self.comm_s + self.call_s + self.fresh_s

    @property
    def full_overlap_s(self) -> float:
        return max(self.compute_s + self.memory_s + self.overhead_s, self.comm_s) + self.call_s + self.fresh_s

    @property
    def raw_s(self) -> float:
        """The model's prediction before the floor: the scheduled critical path, else the no-overlap bound."""
        return self.no_overlap_s if self.scheduled_s is None else self.scheduled_s + self.call_s + self.fresh_s

    @property
    def total_s(self) -> float:
        """The prediction, never below the floor."""
        return max(self.raw_s, self.floor_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(no_overlap_s=self.no_overlap_s, full_overlap_s=self.full_overlap_s, total_s=self.total_s)
        return d


def phase_timing(cost: PhaseCost, hw: Hardware, physical_order: list[int] | None = None,
                 dtype: str = "bfloat16") -> tuple[dict[str, tuple[float, str]], dict[str, tuple[float, str]]]:
    """Per HLO instruction name: (seconds of one execution, bound) of each op, and (seconds of one call,
    algorithm) of each collective (`moe_jax.perf.collectives`)."""
    ops = {op.name: op_seconds(op, hw, dtype) for op in cost.ops if not op.collective}
    colls = {}
    for c in cost.collectives:
        span = group_span(c.group, hw, physical_order, c.group_size)
        colls[c.name] = collective_seconds(c.kind, c.bytes_per_call, span, hw)
    return ops, colls


def phase_time(cost: PhaseCost, hw: Hardware, floor_s: float = 0.0, floor_detail: str = "",
               physical_order: list[int] | None = None, dtype: str = "bfloat16", schedule: bool = True) -> PhaseTime:
    """Ops and collectives timed one by one (see `phase_timing`), summed by bound, and the compiled schedule
    simulated over them when the program text is there (`moe_jax.perf.schedule.simulate`)."""
    op_times, coll_times = phase_timing(cost, hw, physical_order, dtype)
    parts = {"compute": 0.0, "memory": 0.0, "overhead": 0.0}
    for op in cost.ops:
        if not op.collective:
            seconds, bound = op_times[op.name]
            parts[bound] += seconds * op.count
    comm, groups = 0.0, defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})
    for c in cost.collectives:
        one, algorithm = coll_times[c.name]
        seconds = one * c.calls
        comm += seconds
        g = groups[(c.kind, tuple(c.axes), algorithm)]
        g["calls"] += c.calls
        g["bytes"] += c.total_bytes
        g["seconds"] += seconds
    total = sum(parts.values()) + comm
    breakdown = [{"kind": k, "axes": list(a), "link": algo, **v, "share": v["seconds"] / total if total else 0.0}
                 for (k, a, algo), v in sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])]
    scheduled = exposed = None
    if schedule and cost.hlo_text:
        sim = simulate_phase(cost, op_times, coll_times, max_events=0)    # the times only (`program_trace` draws)
        scheduled, exposed = sim.total_s, sim.exposed_comm_s
    call = hw.decode_step_overhead_s if cost.phase == "decode" else 0.0
    if hw.calibration is not None and cost.hlo_text:
        call = max(call, hw.calibration.call_seconds(program_arguments(cost.hlo_text)))
    return PhaseTime(cost.phase, parts["compute"], parts["memory"], comm, breakdown, floor_s, floor_detail,
                     parts["overhead"], scheduled, exposed, call, fresh_seconds(cost, hw))


def fresh_seconds(cost: PhaseCost, hw: Hardware) -> float:
    """What one call of the compiled phase pays for the buffers it allocates anew, on `hw`'s calibrated curve:
    its temporaries (one allocation: XLA packs them) and its outputs not aliased to an argument, from the
    compiled memory analysis. 0 without a calibration that measured it, or without a compiled memory analysis."""
    cal, m = hw.calibration, cost.memory
    if cal is None or cal.fresh_buffer is None or m is None or not m.source.endswith("memory_analysis()"):
        return 0.0
    return cal.fresh_seconds(m.temporaries) + cal.fresh_seconds(max(m.outputs - m.aliased, 0))


def program_arguments(hlo_text: str) -> int:
    """The argument arrays of a compiled program: the parameters of its ENTRY computation."""
    count, inside = 0, False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            inside = True
        elif inside and line.startswith("}"):
            break
        elif inside and " parameter(" in line:
            count += 1
    return count


def simulate_phase(cost: PhaseCost, op_times: dict, coll_times: dict, *, max_events: int = 200_000):
    """The compiled program of `cost` simulated over its schedule with these per-op and per-collective times
    (`phase_timing`): a `moe_jax.perf.schedule.Schedule`."""
    from moe_jax.perf.schedule import simulate

    scopes = {op.name: op.scope for op in cost.ops}
    scopes.update({c.name: c.phase for c in cost.collectives})
    return simulate(cost.hlo_text, lambda name: op_times.get(name, (0.0, ""))[0],
                    lambda name: coll_times.get(name, (0.0, ""))[0],
                    scope_of=lambda name: scopes.get(name, "other"), max_events=max_events)


@dataclass
class Prediction:
    """Headline numbers for one strategy on one hardware and workload."""

    prefill: PhaseTime
    decode: PhaseTime
    ttft_s: float
    """Prefill of the whole batch (every replica in parallel)."""
    tpot_s: float
    """One decode step."""
    throughput_tok_s: float
    """Decode tokens per second over all replicas: batch / TPOT."""
    request_latency_s: float
    """TTFT + gen_len × TPOT."""
    mfu: float
    """Prefill: useful model FLOPs / (devices × peak FLOP/s × TTFT)."""
    mbu: float
    """Decode: (weights a step must read + local KV cache) / (peak HBM bandwidth × TPOT); dropless reads only the
    experts a batch is expected to route to."""
    decode_mfu: float
    assumptions: list[str]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("prefill", "decode")}
        d["prefill"] = self.prefill.to_dict()
        d["decode"] = self.decode.to_dict()
        return d


def program_trace(report: CostReport, hw: Hardware, dtype: str = "bfloat16") -> dict:
    """The predicted timeline of each compiled phase as one Chrome / Perfetto trace (a process per phase, a
    track per stream, ops named by instruction and model scope); phases without program text are left out."""
    from moe_jax.perf.schedule import chrome_trace, merge_traces

    traces = []
    for pid, (name, cost) in enumerate(report.phases.items()):
        if not (cost.fits and cost.hlo_text):
            continue
        op_times, coll_times = phase_timing(cost, hw, report.physical_order, dtype)
        sim = simulate_phase(cost, op_times, coll_times)
        traces.append(chrome_trace(sim, process_name=f"{name}: {report.model} {report.strategy} on {hw.name} "
                                                     f"({report.backend} compile)", pid=pid))
    return merge_traces(traces)


def _link_text(link: LinkTier) -> str:
    eff = f" (collectives reach {link.efficiency:.0%})" if link.efficiency < 1 else ""
    return (f"{link.name} {link.bandwidth / 1e9:.0f} GB/s{eff}, {link.latency_s * 1e6:g} us per step + "
            f"{link.call_overhead_s * 1e6:g} us per call")


def predict(report: CostReport, hw: Hardware, batch: int, gen_len: int, dtype: str = "bfloat16") -> Prediction:
    """Time the compiled prefill and decode of `report` on `hw`.

    batch: sequences over all replicas (when the cpu backend compiled one replica, the report's
    per-device figures stand for every replica).
    """
    pre, dec = report.phases["prefill"], report.phases["decode"]
    n = report.devices                                  # devices of the compiled program
    useful_pre = report.analytic.prefill.model_flops
    useful_dec = report.analytic.decode.model_flops
    pre_floor = useful_pre / n / hw.peak_flops
    read = report.analytic.decode_weights_read or WeightsRead(dec.memory.weights, "local weights")
    stream = read.bytes + dec.memory.kv_cache
    dec_floor = stream / hw.hbm_bandwidth
    prefill = phase_time(pre, hw, pre_floor, f"useful FLOPs per device {useful_pre / n:.3e} / peak "
                                             f"{hw.peak_flops:.3e} FLOP/s", report.physical_order, dtype)
    decode = phase_time(dec, hw, dec_floor, f"(weights read {read.bytes:,} B: {read.detail}; + local KV "
                                            f"cache {dec.memory.kv_cache:,} B) / peak HBM "
                                            f"{hw.hbm_bandwidth:.3e} B/s", report.physical_order, dtype)
    ttft, tpot = prefill.total_s, decode.total_s
    cal = hw.calibration
    scheduled = pre.hlo_text and dec.hlo_text
    assumptions = [
        (f"ops timed on the curves measured by moe-jax calibrate ({cal.meta.get('date', 'undated')}, "
         f"{cal.meta.get('machine', 'machine not named')}): matmuls by their FLOPs ({dtype}), HBM traffic by its "
         f"bytes, at least {cal.op_overhead_s * 1e6:.1f} us per op" if cal is not None else
         f"achievable {hw.flops_efficiency:.0%} of peak FLOP/s and {hw.hbm_efficiency:.0%} of HBM bandwidth "
         "for every op, whatever its size" + (f", at least {hw.op_floor_s * 1e6:.1f} us per op" if hw.op_floor_s
                                              else "")),
        (f"non-matmul FLOPs (elementwise, reductions, in-place decode products) at {hw.achievable_vector_flops:.3g} "
         f"FLOP/s ({hw.vector_efficiency or hw.flops_efficiency:.0%} of the FP32 vector units' "
         f"{hw.peak_vector_flops:.3g})" if hw.peak_vector_flops else
         "non-matmul FLOPs at the matmul peak: no vector-unit figure is published for this hardware (optimistic "
         "for elementwise-heavy ops)"),
        f"links: {_link_text(hw.node_link)} inside a node of {hw.devices_per_node}, "
        f"{_link_text(hw.network_link)} across nodes; each collective by its algorithm (pairwise all-to-all, "
        "ring or tree all-reduce by size, hierarchical across nodes)",
        ("communication overlaps compute where the compiled schedule starts a collective before the ops it runs "
         "beside (the critical path of that schedule is quoted; the no-overlap and full-overlap bounds are shown "
         "beside)" if scheduled else
         "no overlap of communication with compute in the quoted numbers (the program text was not kept, so its "
         "schedule was not simulated; the full-overlap bound is shown beside)"),
        f"FLOPs, bytes and collectives from the {report.backend} compile ({report.target})",
    ]
    if hw.decode_step_overhead_s:
        assumptions.append(f"each decode step costs the host {hw.decode_step_overhead_s * 1e3:.2g} ms beyond its "
                           "kernels (dispatch, the next token's argmax, the wait), as measured in moe-jax's own "
                           "greedy loop; a server that overlaps steps hides some of it")
    kernels = {op.kernel for phase in report.phases.values() for op in phase.ops if op.kernel}
    if flash.NAME in kernels:
        assumptions.append(f"prefill's fused attention kernel (a Pallas Triton custom call XLA cannot see into) "
                           f"runs at {kernel_efficiency(hw, flash.NAME):.0%} of the matmul peak"
                           + (" (taken from a published kernel's figure, not measured on this one: see "
                              "moe_jax/hardware/presets.py)" if hw.fused_attention_efficiency else
                              " (this hardware gives no figure for it: its large-matmul efficiency, optimistic)")
                           + "; its FLOPs and bytes are counted from its shapes, tiles and window")
    if grouped_kernel.NAME in kernels:
        assumptions.append(f"dropless experts' grouped matmul kernel (a Pallas Triton custom call) runs at "
                           f"{kernel_efficiency(hw, grouped_kernel.NAME):.0%} of the matmul peak"
                           + (" (assumed, not measured: see moe_jax/hardware/presets.py)"
                              if hw.grouped_matmul_efficiency else
                              " (this hardware gives no figure for it: its large-matmul efficiency, optimistic)")
                           + "; its FLOPs count every row tile of its static bound (at most one tile of padding "
                             "per expert more than it multiplies)")
    if hw.assumptions:
        assumptions.append(hw.assumptions)
    if report.backend == Backend.CPU:
        assumptions.append("cpu backend: XLA's CPU compiler computes bf16 in f32; bytes are counted at the model's "
                           "width, but its temporaries overstate a GPU's activations, and its collectives may "
                           "differ from a GPU or TPU compile")
    return Prediction(
        prefill=prefill, decode=decode, ttft_s=ttft, tpot_s=tpot, throughput_tok_s=batch / tpot,
        request_latency_s=ttft + gen_len * tpot,
        mfu=useful_pre / (n * hw.peak_flops * ttft), mbu=stream / (hw.hbm_bandwidth * tpot),
        decode_mfu=useful_dec / (n * hw.peak_flops * tpot), assumptions=assumptions)


__all__ = ["op_time", "memory_kind", "kernel_efficiency", "kernel_seconds", "op_seconds",
           "link_for", "collective_time", "phase_timing", "phase_time", "fresh_seconds",
           "simulate_phase", "predict", "program_trace", "PhaseTime", "Prediction", "CollectiveCost"]
