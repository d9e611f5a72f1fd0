"""The cost types: what the compiled walk (`moe_jax.costs.walk`) and the analytic estimate
(`moe_jax.costs.analytic`) produce, and what the time model (`moe_jax.perf.timemodel`) reads.

Per program (prefill or decode, per device): `PhaseCost`, made of `OpCost` (top-level ops),
`CollectiveCost` (collectives) and `MemoryBreakdown`; `WalkResult` is the walk of one HLO
module before it is joined with the compiler's memory figures. Per model, strategy and
workload: `CostReport`, carrying beside the phases the figures computed from the config
alone (`AnalyticReport`: an `Analytic` per phase, the decode floor's `WeightsRead`, and for
dropless dispatch its `DroplessRouting` assumption).

Serialised through `CostReport.to_dict` (the JSON schema of the README): field names are
the JSON keys, in order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace


@dataclass
class OpCost:
    """One top-level op of a compiled program (a fusion counts its fused computation's FLOPs)."""

    name: str
    opcode: str
    scope: str
    flops: int
    """Per execution."""
    matmul_flops: int
    transcendentals: int
    bytes: int
    """HBM bytes read + written per execution."""
    count: int
    """Executions per program run (loop trip counts included)."""
    collective: bool = False
    matmul_dtype: str = ""
    """The dtype its matmul multiplies in, as `moe_jax.names.DTYPES` names it (``bfloat16``, ``float8_e4m3fn``):
    both operands' when they agree, else the wider one's (an FP8 weight multiplied by bf16 activations runs at
    the bf16 rate); empty for an op without a matmul."""
    kernel: str = ""
    """The Pallas kernel the op calls (`moe_jax.model.flash.NAME`: prefill's fused attention, timed at the
    hardware's `fused_attention_efficiency`; `moe_jax.model.moe.grouped_kernel.NAME`: dropless experts' grouped
    matmul, at its `grouped_matmul_efficiency`); empty for XLA's own ops."""
    kind: str = ""
    """What its bytes move as, read from the ops it fuses (`moe_jax.costs.walk.memory_op_kind`): ``transpose``,
    ``convert`` or ``copy``; empty where no program was read (then `moe_jax.perf.timemodel.memory_kind` reads the
    name)."""


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
    group: list[int] = field(default_factory=list)
    """One replica group (partition ids = positions in the mesh); for a permute, one (source, target) pair."""
    worst_bytes_per_call: int | None = None
    """Ragged all-to-all (dropless): the receive buffer, sized for every row of every shard landing on
    one shard. bytes_per_call is then the expected payload (rows sent, uniform routing)."""

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


@dataclass(frozen=True)
class WalkTotals:
    """The walk's totals with every loop body counted once: what XLA's ``cost_analysis()`` counts."""

    flops: int
    hbm_bytes: int
    transcendentals: int


@dataclass
class WalkResult:
    """FLOPs, bytes and collectives of one optimized HLO module, loop-corrected (`moe_jax.costs.walk.walk`)."""

    flops: int
    """dot + convolution + elementwise FLOPs."""
    matmul_flops: int
    """dot + convolution FLOPs only."""
    transcendentals: int
    hbm_bytes: int
    """Bytes read and written by top-level ops (on the cpu backend at the model's dtype width, see `walk`)."""
    raw_hbm_bytes: int
    """The same as the compiled program itself moves them."""
    flops_by_scope: dict[str, int]
    bytes_by_scope: dict[str, int]
    ops: list[OpCost]
    collectives: list[CollectiveCost]
    unknown: list[str]
    """Loops whose trip count is unknown (counted once)."""
    uncorrected: WalkTotals
    """Each loop once, before any cpu normalisation: comparable with XLA's own count."""


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
    """Bytes read and written by top-level ops, loop-corrected (our HLO walk; on the cpu backend
    normalised to the model's dtype, see `walk`)."""
    raw_hbm_bytes: int = 0
    """The same as the compiled program itself moves them (before any cpu normalisation)."""
    flops_by_scope: dict[str, int] = field(default_factory=dict)
    bytes_by_scope: dict[str, int] = field(default_factory=dict)
    collectives: list[CollectiveCost] = field(default_factory=list)
    ops: list[OpCost] = field(default_factory=list, repr=False)
    """Top-level ops with their FLOPs and bytes (for the per-op roofline); not serialised."""
    xla_cost: dict[str, float] | None = None
    """cost_analysis() as XLA reports it (loop bodies counted once); None when unavailable."""
    walk_uncorrected: WalkTotals | None = None
    """Our walk with every loop counted once: comparable with xla_cost (None when the program did not compile;
    serialised as {})."""
    unknown_trip_loops: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    hlo_text: str = field(default="", repr=False)
    """The optimized HLO (for --dump-hlo); not serialised."""

    def collective_summary(self) -> list[dict]:
        """Collectives grouped by (kind, axes, phase): calls and bytes (JSON-ready)."""
        groups: dict[tuple, dict] = {}
        for c in self.collectives:
            key = (c.kind, tuple(c.axes), c.phase)
            g = groups.setdefault(key, {"kind": c.kind, "axes": list(c.axes), "phase": c.phase,
                                        "group_size": c.group_size, "calls": 0, "bytes": 0})
            g["calls"] += c.calls
            g["bytes"] += c.total_bytes
            if c.worst_bytes_per_call is not None:      # ragged: the most it can move (one shard takes all)
                g["worst_bytes"] = g.get("worst_bytes", 0) + c.worst_bytes_per_call * c.calls
        return sorted(groups.values(), key=lambda g: -g["bytes"])


# --- figures from the config alone ---------------------------------------------------------

@dataclass(frozen=True)
class Analytic:
    """One phase's FLOPs over all devices from the config (`moe_jax.costs.analytic.analytic_flops`), and the
    compiled program's matmul FLOPs beside them where there is one."""

    useful: int
    """2 × matmul parameters a token uses × tokens, plus the output head on the positions it sees."""
    attention: int
    """QKᵀ and PV as computed (prefill: full S×S, masked; decode: every cache position)."""
    capacity_overhead: int
    """Capacity dispatch: expert FLOPs on padded slots plus the dispatch and combine einsums (0 otherwise)."""
    compiled_matmul_total: int | None = None
    """The compiled program's matmul FLOPs × devices (None: no compiled program, or it did not fit)."""
    compiled_over_analytic: float | None = None
    """compiled_matmul_total / total."""

    @property
    def total(self) -> int:
        """useful + attention + capacity_overhead."""
        return self.useful + self.attention + self.capacity_overhead

    @property
    def model_flops(self) -> int:
        """The FLOPs the model needs: useful + attention (what MFU and the prefill floor count)."""
        return self.useful + self.attention

    def with_compiled(self, compiled_matmul_total: int | None) -> Analytic:
        """A copy with the compiled program's matmul FLOPs (over all devices) and their ratio to `total`."""
        return replace(self, compiled_matmul_total=compiled_matmul_total,
                       compiled_over_analytic=compiled_matmul_total / self.total if compiled_matmul_total else None)

    def to_dict(self) -> dict:
        """JSON-ready: useful, attention, capacity_overhead, total, compiled_matmul_total, compiled_over_analytic."""
        return {"useful": self.useful, "attention": self.attention, "capacity_overhead": self.capacity_overhead,
                "total": self.total, "compiled_matmul_total": self.compiled_matmul_total,
                "compiled_over_analytic": self.compiled_over_analytic}


@dataclass(frozen=True)
class WeightsRead:
    """Weight bytes a decode step must read per device, with the arithmetic (`moe_jax.costs.routing`)."""

    bytes: int
    detail: str
    touched_fraction: float | None = None
    """Dropless: the expected fraction of local experts the step's tokens route to (None: every expert)."""
    tokens: int | None = None
    """Dropless: decode tokens per data-parallel replica."""

    def to_dict(self) -> dict:
        """JSON-ready (the dropless figures only where set)."""
        routed = {} if self.touched_fraction is None else {"touched_fraction": self.touched_fraction,
                                                           "tokens": self.tokens}
        return {"bytes": self.bytes, **routed, "detail": self.detail}


@dataclass(frozen=True)
class DroplessRouting:
    """What a dropless program's figures assume about routing."""

    assumption: str
    row_fraction: float
    """Of the receive buffer's rows, the share uniform routing fills (`moe_jax.costs.walk.RaggedHints`)."""
    buffer: float | None
    """`ModelConfig.dropless_buffer` (None: sized for the worst case)."""
    imbalance: dict[str, float]
    """Per phase: rows on the busiest expert shard over the mean."""


@dataclass
class AnalyticReport:
    """Cross-checks computed from the config alone, beside a compiled or estimated program."""

    phases: dict[str, Analytic]
    """Per phase (prefill, decode)."""
    weights_per_device_placement: int | None = None
    """Weight bytes per device, from the placement."""
    decode_weights_read: WeightsRead | None = None
    dropless: DroplessRouting | None = None

    @property
    def prefill(self) -> Analytic:
        """The prefill's figures."""
        return self.phases["prefill"]

    @property
    def decode(self) -> Analytic:
        """The decode step's figures."""
        return self.phases["decode"]

    def to_dict(self) -> dict:
        """JSON-ready: weights_per_device_placement, decode_weights_read, dropless (where set), then each phase."""
        out: dict = {}
        if self.weights_per_device_placement is not None:
            out["weights_per_device_placement"] = self.weights_per_device_placement
        if self.decode_weights_read is not None:
            out["decode_weights_read"] = self.decode_weights_read.to_dict()
        if self.dropless is not None:
            out["dropless"] = asdict(self.dropless)
        out.update({name: a.to_dict() for name, a in self.phases.items()})
        return out


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
    analytic: AnalyticReport
    """Cross-checks computed from the config alone (see `moe_jax.costs.analytic.analytic_report`)."""
    topology: str = ""
    """The devices or topology compiled on (e.g. 'the first 6 of 8 chips of v5p:2x2x2')."""
    physical_order: list[int] = field(default_factory=list)
    """Per partition id, the device's index in the topology's order (links are assigned from it)."""
    compiled_for: dict = field(default_factory=dict)
    """Which compiler produced the numbers and why (`moe_jax.costs.backends.Compiler.to_dict`); set by analyze."""

    def to_dict(self) -> dict:
        """JSON-ready (memory peaks and collective summaries included; ops and HLO text left out)."""
        data = asdict(self)
        data["analytic"] = self.analytic.to_dict()
        for name, phase in self.phases.items():
            out = data["phases"][name]
            out.pop("ops", None)
            out.pop("hlo_text", None)
            if out["walk_uncorrected"] is None:
                out["walk_uncorrected"] = {}
            if phase.memory:
                out["memory"]["peak"] = phase.memory.peak
            out["collective_summary"] = phase.collective_summary()
        return data

    def to_json(self, **kw) -> str:
        """`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), **kw)
