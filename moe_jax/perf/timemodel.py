"""The time model: compiled cost × hardware → TTFT, TPOT, throughput, MFU, MBU, with the assumptions stated.

- Per op (from the compiled HLO, loop trip counts included):
  ``max(flops / achievable FLOP/s, bytes / achievable HBM bandwidth)``, summed. An op
  whose first term wins is compute time, otherwise memory time.
- Per collective: ``call overhead + hops × hop latency + bytes × factor / link bandwidth``
  on the link tier its replica group spans (inside one node, or across nodes; device
  ids are mesh positions and ``tp`` is innermost, so tp groups stay inside a node first).
  Factors (ring algorithms): all-reduce 2(n−1)/n, all-gather and reduce-scatter (n−1)/n,
  all-to-all (n−1)/n of the local buffer, collective-permute 1.
- The pipeline schedule is inside the compiled program: every tick of M + pp − 1 runs,
  so the bubble is already in the time; its fraction is reported beside it.
- Two bounds: no overlap (compute + memory + communication) and full overlap (the
  larger of the two). The prediction quoted is the no-overlap bound.
- Floors: decode must read every local weight and the local KV cache once from HBM at
  the datasheet bandwidth; prefill must do its useful FLOPs at peak. No prediction is
  reported below its floor; when the model's raw number is lower, the check says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from moe_jax.costs.types import CollectiveCost, CostReport, PhaseCost, WeightsRead
from moe_jax.hardware.presets import Hardware, LinkTier
from moe_jax.names import Backend

_HOPS = {"all-reduce": lambda n: 2 * (n - 1), "all-gather": lambda n: n - 1, "reduce-scatter": lambda n: n - 1,
         "all-to-all": lambda n: n - 1, "collective-permute": lambda n: 1, "ragged-all-to-all": lambda n: n - 1,
         "collective-broadcast": lambda n: n - 1}
_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
           "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
           "ragged-all-to-all": lambda n: (n - 1) / n, "collective-permute": lambda n: 1.0,
           "collective-broadcast": lambda n: (n - 1) / n}


def op_time(flops: float, nbytes: float, hw: Hardware) -> tuple[float, str]:
    """Roofline time of one op execution and what bounds it ('compute' or 'memory')."""
    compute = flops / hw.achievable_flops
    memory = nbytes / hw.achievable_hbm
    return (compute, "compute") if compute >= memory else (memory, "memory")


def link_for(group: list[int], hw: Hardware, physical_order: list[int] | None = None) -> LinkTier:
    """The node tier when every device of the group sits in one node, else the network tier.

    group: partition ids; physical_order maps each to the device's index in the topology
    (nodes are runs of `devices_per_node` consecutive devices there); without it the
    partition ids are taken as that index.
    """
    if not group:
        return hw.network_link
    where = (lambda d: physical_order[d]) if physical_order else (lambda d: d)
    nodes = {where(d) // hw.devices_per_node for d in group}
    return hw.node_link if len(nodes) == 1 else hw.network_link


def collective_time(kind: str, nbytes: float, group_size: int, link: LinkTier) -> float:
    """Seconds for one call of a collective moving `nbytes` (payload per device) over `link`."""
    n = max(group_size, 2) if kind == "collective-permute" else group_size
    if n <= 1:
        return 0.0
    return (link.call_overhead_s + _HOPS[kind](n) * link.latency_s
            + nbytes * _FACTOR[kind](n) / link.bandwidth)


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
    """Per (kind, mesh axes, link): calls, bytes, seconds, share of the no-overlap time."""
    floor_s: float = 0.0
    floor_detail: str = ""

    @property
    def no_overlap_s(self) -> float:
        return self.compute_s + self.memory_s + self.comm_s

    @property
    def full_overlap_s(self) -> float:
        return max(self.compute_s + self.memory_s, self.comm_s)

    @property
    def raw_s(self) -> float:
        """The model's prediction before the floor (no-overlap bound)."""
        return self.no_overlap_s

    @property
    def total_s(self) -> float:
        """The prediction: the no-overlap bound, never below the floor."""
        return max(self.no_overlap_s, self.floor_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(no_overlap_s=self.no_overlap_s, full_overlap_s=self.full_overlap_s, total_s=self.total_s)
        return d


def phase_time(cost: PhaseCost, hw: Hardware, floor_s: float = 0.0, floor_detail: str = "",
               physical_order: list[int] | None = None) -> PhaseTime:
    """Roofline over the compiled ops plus the collectives on their link tiers (see `link_for`)."""
    compute = memory = 0.0
    for op in cost.ops:
        if op.collective:
            continue
        seconds, bound = op_time(op.flops, op.bytes, hw)
        if bound == "compute":
            compute += seconds * op.count
        else:
            memory += seconds * op.count
    comm, groups = 0.0, defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})
    for c in cost.collectives:
        link = link_for(c.group, hw, physical_order)
        seconds = collective_time(c.kind, c.bytes_per_call, c.group_size, link) * c.calls
        comm += seconds
        g = groups[(c.kind, tuple(c.axes), link.name)]
        g["calls"] += c.calls
        g["bytes"] += c.total_bytes
        g["seconds"] += seconds
    total = compute + memory + comm
    breakdown = [{"kind": k, "axes": list(a), "link": link, **v, "share": v["seconds"] / total if total else 0.0}
                 for (k, a, link), v in sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])]
    return PhaseTime(cost.phase, compute, memory, comm, breakdown, floor_s, floor_detail)


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


def predict(report: CostReport, hw: Hardware, batch: int, gen_len: int) -> Prediction:
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
                                             f"{hw.peak_flops:.3e} FLOP/s", report.physical_order)
    decode = phase_time(dec, hw, dec_floor, f"(weights read {read.bytes:,} B: {read.detail}; + local KV "
                                            f"cache {dec.memory.kv_cache:,} B) / peak HBM "
                                            f"{hw.hbm_bandwidth:.3e} B/s", report.physical_order)
    ttft, tpot = prefill.total_s, decode.total_s
    assumptions = [
        f"achievable {hw.flops_efficiency:.0%} of peak FLOP/s and {hw.hbm_efficiency:.0%} of HBM bandwidth",
        f"links: {hw.node_link.name} {hw.node_link.bandwidth / 1e9:.0f} GB/s inside a node of "
        f"{hw.devices_per_node}, {hw.network_link.name} {hw.network_link.bandwidth / 1e9:.0f} GB/s across nodes",
        "no overlap of communication with compute in the quoted numbers (the full-overlap bound is shown beside)",
        f"FLOPs, bytes and collectives from the {report.backend} compile ({report.target})",
    ]
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


__all__ = ["op_time", "link_for", "collective_time", "phase_time", "predict", "PhaseTime", "Prediction",
           "CollectiveCost"]
