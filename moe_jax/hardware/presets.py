"""Accelerator presets: memory, peak FLOP/s, HBM bandwidth, achievable fractions, and link tiers.

Figures and sources are those of ``docs/hardware.md``. Peaks are dense
bf16 (no 2:4 sparsity); link bandwidths are one direction, per device. Achievable
fractions turn peaks into predictions (measured on one H200: bf16 matmul at 80% of
peak, device copy at 90% of HBM bandwidth); MFU and MBU are quoted against the peaks.

Two link tiers: ``node`` (NVLink/Infinity Fabric inside a GPU server; ICI inside a TPU
slice) and ``network`` (InfiniBand/RoCE between servers; DCN between TPU slices). A
collective whose group stays inside one node uses the first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moe_jax.errors import MoeJaxError, nearest
from moe_jax.hardware.calibration import Calibration, check_number
from moe_jax.names import FP8

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class LinkTier:
    """One level of the interconnect, as a device sees it, and how a collective library drives it.

    Two protocols, as NCCL has (LL/LL128 and Simple): a low-latency one for small messages
    (`latency_s` per step, `small_efficiency` of the bandwidth) and a bulk one (`bulk_latency_s`
    per step, `efficiency` of the bandwidth); a call takes whichever is faster
    (`moe_jax.perf.collectives`). With small_efficiency 0 there is one protocol.
    """

    name: str
    """e.g. NVLink4, InfiniBand NDR, ICI, DCN."""
    bandwidth: float
    """Bytes/s one device can send into a collective (one direction, line rate)."""
    latency_s: float
    """Seconds per algorithm step (ring step, tree level) of the low-latency protocol."""
    call_overhead_s: float = 0.0
    """Fixed seconds per collective call (launch, synchronisation)."""
    efficiency: float = 1.0
    """Fraction of `bandwidth` the bulk protocol reaches on large messages (bus bandwidth over line rate)."""
    source: str = ""
    """The published measurements the latency, overhead and efficiencies come from."""
    bulk_latency_s: float = 0.0
    """Seconds per step of the bulk protocol (0: the same as latency_s)."""
    small_efficiency: float = 0.0
    """Fraction of `bandwidth` the low-latency protocol reaches (0: no such protocol)."""
    all_reduce_efficiency: float = 0.0
    """For all-reduce only, the bulk protocol's fraction when the fabric reduces in the switch (NVLink SHARP
    reaches a bus bandwidth above line rate); 0: `efficiency`."""
    per_peer_s: float = 0.0
    """Seconds per peer of a pairwise exchange (all-to-all): the cost of addressing each one."""


@dataclass(frozen=True)
class Hardware:
    """One accelerator and the system it sits in."""

    name: str
    memory_bytes: float
    """HBM per device."""
    peak_flops: float
    """Dense bf16 FLOP/s per device (datasheet)."""
    hbm_bandwidth: float
    """HBM bytes/s per device (datasheet)."""
    devices_per_node: int
    """Devices that share the fast tier (a GPU server; a TPU slice of up to this many chips)."""
    node_link: LinkTier
    network_link: LinkTier
    flops_efficiency: float = 0.8
    """Achievable fraction of peak FLOP/s for large matmuls."""
    hbm_efficiency: float = 0.9
    """Achievable fraction of HBM bandwidth for streaming reads and writes."""
    kind: str = "gpu"
    """gpu or tpu (selects the deviceless compile target)."""
    compile_target: str = ""
    """TPU generation for a topology name (v5p, ...), or the GPU target description compiled for: a
    shipped one by name (h100, ...) or a ``.txtpb`` file (relative to the hardware TOML's folder)."""
    vendor: str = "nvidia"
    """nvidia, amd or google: whose compiler builds programs for this chip."""
    sm_count: int = 0
    """Streaming multiprocessors (GPU datasheet; 0 when not a GPU or not known)."""
    compute_capability: str = ""
    """CUDA compute capability, e.g. 9.0 (NVIDIA GPUs)."""
    source: str = ""
    """Where the figures come from."""
    assumptions: str = ""
    """What the preset assumes where its source says nothing."""
    calibration: Calibration | None = None
    """Measurements of this machine (``moe-jax calibrate``): matmul and memory curves, op overhead, collective
    fits; None for a datasheet preset."""
    peak_flops_fp8: float = 0.0
    """Dense FP8 (E4M3) matmul FLOP/s per device (datasheet); 0 where the chip has no FP8 matmul units (A100,
    TPU v4/v5e/v5p/v6e, whose 8-bit peaks are int8): there FP8 weights are dequantized and multiplied at the
    bf16 rate."""
    peak_vector_flops: float = 0.0
    """FP32 FLOP/s of the units that run everything but matmuls (CUDA cores, vector units), per device
    (datasheet); 0 where none is published (TPUs, the seed's GPU): those FLOPs are then timed at `peak_flops`,
    an optimistic bound the report's assumptions name. Decode's in-place products (a weight multiplied as
    an f32 product and sum, `moe_jax.model.layers.weight_einsum`) and every elementwise op run here."""
    vector_efficiency: float = 0.0
    """The fraction of `peak_vector_flops` that non-matmul FLOPs reach; 0: `flops_efficiency`. Measured on one
    H200: XLA:GPU's reduction kernels, which run decode's in-place products, reached 5.0-6.5 TFLOP/s (0.09)."""
    op_floor_s: float = 0.0
    """The least time one compiled op takes on the device (a GPU kernel, launched from a CUDA graph), whatever
    its size; 0 where not measured (TPUs). A decode step runs ~35 ops per layer, most of them tiny."""
    decode_step_overhead_s: float = 0.0
    """The host's cost of one greedy decode step beyond its kernels: dispatching the step and the next token's
    argmax, and waiting on the token; 0 where not measured (TPUs)."""
    fused_attention_efficiency: float = 0.0
    """The fraction of the matmul peak that prefill's fused attention kernel (`moe_jax.model.flash`, its QKᵀ and PV
    FLOPs, exponentials included) reaches; 0: `flops_efficiency`."""
    grouped_matmul_efficiency: float = 0.0
    """The fraction of the matmul peak that dropless experts' grouped matmul kernel (`moe_jax.model.moe.
    grouped_kernel`) reaches; 0: `flops_efficiency`."""

    @property
    def achievable_flops(self) -> float:
        return self.peak_flops * self.flops_efficiency

    @property
    def achievable_vector_flops(self) -> float:
        """FLOP/s of non-matmul work: `peak_vector_flops` at `vector_efficiency` (or, where that is 0,
        `flops_efficiency`); where no vector peak is given, the achievable matmul rate."""
        if not self.peak_vector_flops:
            return self.achievable_flops
        return self.peak_vector_flops * (self.vector_efficiency or self.flops_efficiency)

    def matmul_peak(self, dtype: str = "bfloat16") -> float:
        """Datasheet FLOP/s of a matmul multiplying in `dtype`: the FP8 peak for ``float8_e4m3fn`` operands where
        the chip has one, else `peak_flops` (a chip without FP8 units, and every wider dtype)."""
        return self.peak_flops_fp8 if dtype == FP8 and self.peak_flops_fp8 > 0 else self.peak_flops

    def achievable_matmul_flops(self, dtype: str = "bfloat16") -> float:
        """`matmul_peak` at the achievable fraction (`flops_efficiency`, measured for bf16, taken for FP8 too)."""
        return self.matmul_peak(dtype) * self.flops_efficiency

    @property
    def achievable_hbm(self) -> float:
        return self.hbm_bandwidth * self.hbm_efficiency

    def to_dict(self) -> dict:
        """JSON-ready."""
        return dataclasses.asdict(self)


# Link constants: fitted to published measurements, each named (bench/published_collectives.toml holds every
# point, bench/collectives_published.py holds the model against them).
_AZURE = "Azure/AI-benchmarking-guide ND_H100_v5/ND_H200_v5 results (nccl-tests all_reduce_perf, NVLS)"
_MLENG = "stas00/ml-engineering network/benchmarks (nccl-tests on 8x H200, 8x A100, B200)"
_NCCL212 = "NVIDIA/nccl-tests#212 (NCCL maintainer: 450 GB/s line rate, ~370 GB/s effective, ~480 GB/s NVLS busBw)"


def _nvlink4(name="NVLink4"):
    # 8x H100/H200: small all-reduce 18-30 us (ml-engineering 32 KiB 17.9 us; Azure 1 KB 26-30 us); ring,
    # all-gather, reduce-scatter reach 361-367 GB/s bus bandwidth (82% of 450); NVLS all-reduce 480 GB/s
    # (107%); 16 MiB all-reduce 121-125 us (the low-latency protocol gives way to the bulk one near 1-2 MiB).
    return LinkTier(name, 450 * GB, 1e-6, 16e-6, efficiency=0.82, bulk_latency_s=4e-6, small_efficiency=0.4,
                    all_reduce_efficiency=1.07, source=f"{_MLENG}; {_AZURE}; {_NCCL212}")


def _nvlink3():
    # 8x A100: 32 KiB all-reduce 43.8 us, 1 MiB 101.9 us, 16 MiB 276.6 us, 16 GiB at 234.9 GB/s busBw (78%)
    return LinkTier("NVLink3", 300 * GB, 1e-6, 38e-6, efficiency=0.78, bulk_latency_s=8e-6, small_efficiency=0.12,
                    source=_MLENG)


def _nvlink5():
    # 8x B200: 32 KiB all-reduce 47.8 us; 16 GiB at 846 GB/s busBw (94% of 900). The low-latency protocol's
    # share and the per-step latencies are not published for B200: taken as H100's.
    return LinkTier("NVLink5", 900 * GB, 1e-6, 41e-6, efficiency=0.82, bulk_latency_s=4e-6, small_efficiency=0.4,
                    all_reduce_efficiency=0.94, source=f"{_MLENG}; per-step latencies as NVLink4 (assumed)")


def _infinity_fabric():
    return LinkTier("Infinity Fabric", 448 * GB, 1e-6, 16e-6, efficiency=0.82, bulk_latency_s=4e-6,
                    small_efficiency=0.4, source="not measured: NVLink4's protocol figures assumed")


def _ib(bw=50 * GB, name="InfiniBand NDR 400 Gb/s"):
    # ConnectX-7 400 Gb/s, ~50 GB/s per GPU (DeepEP). DeepEP's low-latency dispatch of 7.6 MB per GPU takes
    # 155-194 us at EP32-EP256 (combine, 14.7 MB: 273-369 us): 92% of 50 GB/s, plus ~0.1 us per peer; a
    # 16-rank all-reduce of 512 B takes 46.6 us (NVIDIA/nccl#1244: 2 x 8 H20, CX7 NDR).
    return LinkTier(name, bw, 5e-6, 10e-6, efficiency=0.92, per_peer_s=0.1e-6,
                    source="deepseek-ai/DeepEP docs (low-latency kernel tables, CX7 400 Gb/s ~50 GB/s); "
                           "NVIDIA/nccl#1244 (2x8 H20 small all-reduce)")


def _ici(per_link, links_per_axis=2):
    # a torus axis with wraparound is a bidirectional ring: two links per device carry a ring collective; an
    # axis without wraparound (v5e/v6e slices smaller than the full 16) has one. Scaling-book sharding.md:
    # ~1 us per hop; v5e all-gather of 32 MiB over an axis of 4 measured 680 us against 560 us at line rate
    # (82%), 128 KiB in ~8 us.
    name = f"ICI ({links_per_axis} x {per_link / GB:.0f} GB/s per axis)"
    return LinkTier(name, links_per_axis * per_link, 1e-6, 4e-6, efficiency=0.82,
                    source="jax-ml/scaling-book sharding.md (measured v5e all-gather, per-hop latency)")


def _dcn(bw=25 * GB):
    return LinkTier("DCN", bw, 10e-6, 10e-6, source="not measured: assumed")


_GPU_OVERHEADS = {"op_floor_s": 1.3e-6, "decode_step_overhead_s": 1.1e-3, "vector_efficiency": 0.09}
"""Measured on one H200 with jax 0.11.2 (bench/RESULTS-gpu.md): kernels in the decode step's CUDA graphs took at
least 1.2-1.4 us (moe-jax calibrate: 1.24 us per op); a timed greedy step took 1.0-1.3 ms more than its kernels
over 8 cases (qwen3-30b-a3b, mixtral-8x7b, seed-30b, batch 1-8); the reduction kernels of decode's in-place
products (1 to 5 rows per weight matrix) ran at 5.0-6.5 TFLOP/s, 0.09 of the FP32 peak. Host and compiler
costs: taken for the other NVIDIA presets too (their own not measured)."""

_GPU_KERNELS = {"fused_attention_efficiency": 0.4, "grouped_matmul_efficiency": 0.4}
"""Not measured on moe-jax's kernels yet. The attention kernel's is taken from a published one: Triton's fused
attention forward on an H100 SXM5 at head dim 128 and 2k positions, without a causal mask, ran at 563 TFLOP/s, 0.57
of the 989 peak (FlashAttention-3, Shah et al. 2024, figure 5). moe-jax's Pallas kernel has none of that kernel's
Hopper tuning and computes its diagonal blocks whole, so 0.4 is taken: the `bench/gpu_validate.py` prefill cases
measure it when an H200 is lent. The grouped matmul's is taken as the same 0.4 (the same Triton toolchain without
Hopper tuning; half of the 0.8 XLA's own gemms reached on one H200): `bench/flash_kernel.py` measures it."""

# NVIDIA memory: the bytes the CUDA driver reports (XLA's device specs, the shipped target descriptions),
# which is what a program can allocate; datasheets round it to "80 GB" or "141 GB".
_PRESETS = {h.name: h for h in [
    Hardware("seed-gpu", 64 * GB, 400 * TB, 1.8 * TB, 8, _nvlink4("assumed NVLink-class (as NVLink4)"), _ib(),
             source="the seed report (64 GB, 400 TFLOP/s, 1.8 TB/s)",
             assumptions="links not given: assumed 8 GPUs per node on a 450 GB/s NVLink-class fabric and "
                         "50 GB/s per GPU between nodes (H100-class); achievable 80% of peak FLOP/s and 90% of "
                         "HBM bandwidth, as measured on an H200; compiled for an H100 target "
                         "(the seed names no GPU; same "
                         "80 GiB-class Hopper part as the nearest shipped description); the op floor and "
                         "decode-step overhead of XLA:GPU as measured on an H200", compile_target="h100",
             op_floor_s=_GPU_OVERHEADS["op_floor_s"], decode_step_overhead_s=_GPU_OVERHEADS["decode_step_overhead_s"],
             **_GPU_KERNELS),
    Hardware("a100-80g", 85_100_068_864, 312 * TB, 2.039 * TB, 8, _nvlink3(), _ib(25 * GB, "HDR IB"),
             source="NVIDIA A100 datasheet (80 GB; 79.3 GiB usable as the CUDA driver reports it, 108 SMs, sm_80); "
                    "jax-ml/scaling-book gpus.md; FP32 (non-tensor) 19.5 TFLOP/s", compile_target="a100", sm_count=108,
             compute_capability="8.0", peak_vector_flops=19.5 * TB, **_GPU_OVERHEADS, **_GPU_KERNELS),
    Hardware("h100", 84_942_979_072, 989 * TB, 3.35 * TB, 8, _nvlink4(), _ib(),
             source="NVIDIA H100 SXM datasheet (80 GB; 79.1 GiB usable as the CUDA driver reports it, 132 SMs, sm_90); "
                    "jax-ml/scaling-book gpus.md; FP8 1979 TFLOP/s dense (datasheet 3958 with sparsity); "
                    "FP32 (non-tensor) 67 TFLOP/s", compile_target="h100", sm_count=132, compute_capability="9.0",
             peak_flops_fp8=1979 * TB, peak_vector_flops=67 * TB, **_GPU_OVERHEADS, **_GPU_KERNELS),
    Hardware("h200", 151_397_597_184, 989 * TB, 4.8 * TB, 8, _nvlink4(), _ib(),
             source="NVIDIA H200 SXM datasheet (141 GB; 141 GiB usable as the CUDA driver reports it, 132 SMs, sm_90); "
                    "scaling-book; MLCommons H200 "
                    "system description; achievable fractions measured on one H200 (bf16 matmul 788 TFLOP/s, "
                    "copy 4.3 TB/s); FP8 1979 TFLOP/s dense (datasheet 3958 with sparsity); FP32 (non-tensor) 67 "
                    "TFLOP/s; op floor and decode-step overhead measured on one H200 (bench/RESULTS-gpu.md)",
             compile_target="h200", sm_count=132, compute_capability="9.0", peak_flops_fp8=1979 * TB,
             peak_vector_flops=67 * TB, **_GPU_OVERHEADS, **_GPU_KERNELS),
    Hardware("b200", 191_514_411_008, 2250 * TB, 8 * TB, 8, _nvlink5(), _ib(),
             source="NVIDIA B200 datasheet (180 GB; 178.4 GiB usable as the CUDA driver reports it, 148 SMs, sm_100); "
                    "jax-ml/scaling-book gpus.md; FP8 4.5 PFLOP/s dense (datasheet 9 with sparsity); FP32 (non-tensor) "
                    "80 TFLOP/s (HGX B200 at 1,000 W)", compile_target="b200", sm_count=148,
             compute_capability="10.0", peak_flops_fp8=4500 * TB, peak_vector_flops=80 * TB, **_GPU_OVERHEADS,
             **_GPU_KERNELS),
    Hardware("mi300x", 192 * GB, 1307 * TB, 5.3 * TB, 8, _infinity_fabric(), _ib(),
             source="secondary sources (AMD MI300X figures); FP8 2615 TFLOP/s dense (AMD MI300X data sheet, 5230 "
                    "with sparsity); FP32 vector 163.4 TFLOP/s", compile_target="mi300", vendor="amd",
             peak_flops_fp8=2615 * TB, peak_vector_flops=163.4 * TB),
    Hardware("tpu-v4", 32 * 2**30, 275 * TB, 1.2 * TB, 4096, _ici(45 * GB), _dcn(), kind="tpu", vendor="google",
             source="Cloud TPU docs; scaling-book tpus.md (3D torus, 6 links of 45 GB/s per direction)",
             compile_target="v4"),
    Hardware("tpu-v5e", 16 * GB, 197 * TB, 0.82 * TB, 256, _ici(45 * GB, 1), _dcn(), kind="tpu", vendor="google",
             source="Cloud TPU docs (2D torus, 4 links of 45 GB/s per direction; 8-bit peak: int8 393 TOPS, no FP8 "
                    "listed)", compile_target="v5e"),
    Hardware("tpu-v5p", 95 * GB, 459 * TB, 2.77 * TB, 8960, _ici(90 * GB), _dcn(), kind="tpu", vendor="google",
             source="Cloud TPU docs; scaling-book (3D torus, 6 links of 90 GB/s per direction)",
             compile_target="v5p"),
    Hardware("tpu-v6e", 32 * GB, 918 * TB, 1.64 * TB, 256, _ici(90 * GB, 1), _dcn(), kind="tpu", vendor="google",
             source="Cloud TPU docs (2D torus, 4 links of 90 GB/s per direction; 8-bit peak: int8 1836 TOPS, no FP8 "
                    "listed)", compile_target="v6e"),
]}


def hardware_names() -> list[str]:
    """Preset names."""
    return list(_PRESETS)


_TOML_KEYS = {f.name for f in dataclasses.fields(Hardware)} - {"node_link", "network_link"}
RANGES: dict[str, tuple[float, float]] = {
    "memory_bytes": (1e6, 1e15),
    "peak_flops": (1e9, 1e19),
    "peak_flops_fp8": (0.0, 1e19),
    "peak_vector_flops": (0.0, 1e19),
    "op_floor_s": (0.0, 1.0),
    "vector_efficiency": (0.0, 1.0),
    "decode_step_overhead_s": (0.0, 10.0),
    "fused_attention_efficiency": (0.0, 1.0),
    "grouped_matmul_efficiency": (0.0, 1.0),
    "hbm_bandwidth": (1e8, 1e16),
    "bandwidth": (1e6, 1e15),
    "latency_s": (0.0, 1.0),
    "call_overhead_s": (0.0, 1.0),
    "flops_efficiency": (0.0, 1.0),
    "hbm_efficiency": (0.0, 1.0),
    "efficiency": (0.0, 1.0),
    "bulk_latency_s": (0.0, 1.0),
    "small_efficiency": (0.0, 1.0),
    "all_reduce_efficiency": (0.0, 2.0),
    "per_peer_s": (0.0, 1.0),
}
"""Accepted range of each figure of a hardware file: wide enough for any accelerator, past or
foreseeable (1 MB to 1 PB of memory, 1 GFLOP/s to 10 EFLOP/s, link latency up to a second), and
narrow enough that no time, ratio or byte count derived from them overflows to inf or NaN."""
MAX_DEVICES_PER_NODE = 1 << 16
_LINK_KEYS = {f.name for f in dataclasses.fields(LinkTier)}


def _from_toml(path: Path) -> Hardware:
    from moe_jax.files import read_toml

    data = read_toml(path, "hardware file")
    table = data.get("hardware", data)
    if not isinstance(table, dict):
        raise MoeJaxError(f"hardware file {str(path)!r}: [hardware] must be a table of keys, "
                          f"not {type(table).__name__} {table!r}"[:300])
    table = dict(table)
    calibration = table.pop("calibration", None)
    if "hardware" in data and "calibration" in data:          # [calibration] beside a [hardware] table
        if calibration is not None:
            raise MoeJaxError(f"hardware file {str(path)!r}: two calibrations ([calibration] and "
                              "[hardware.calibration]); keep one")
        calibration = data["calibration"]
    links = {}
    for tier in ("node_link", "network_link"):
        link = table.pop(tier, None)
        if not isinstance(link, dict):
            raise MoeJaxError(f"hardware file {str(path)!r}: missing [{tier}] table with "
                              f"{', '.join(sorted(_LINK_KEYS))}")
        bad = [k for k in link if k not in _LINK_KEYS]
        if bad:
            raise MoeJaxError(f"hardware file {str(path)!r}: unknown key {bad[0]!r} in [{tier}]"
                              f"{nearest(bad[0], _LINK_KEYS)}")
        if not isinstance(link.get("name", tier), str):
            raise MoeJaxError(f"hardware file {str(path)!r}: [{tier}] name={link['name']!r} must be a string")
        try:
            links[tier] = LinkTier(**{"name": tier, **link})
        except TypeError as e:
            raise MoeJaxError(f"hardware file {str(path)!r}: [{tier}]: {e}") from None
    bad = [k for k in table if k not in _TOML_KEYS]
    if bad:
        raise MoeJaxError(f"hardware file {str(path)!r}: unknown key {bad[0]!r}{nearest(bad[0], _TOML_KEYS)}; "
                          f"valid: {', '.join(sorted(_TOML_KEYS))}")
    required = ("name", "memory_bytes", "peak_flops", "hbm_bandwidth", "devices_per_node")
    missing = [k for k in required if k not in table]
    if missing:
        raise MoeJaxError(f"hardware file {str(path)!r}: missing {', '.join(missing)}")
    def number(value, where: str, key: str, low_open: bool = True) -> None:
        check_number(value, f"hardware file {str(path)!r}: {where}", *RANGES[key], low_open=low_open)

    for key in ("memory_bytes", "peak_flops", "hbm_bandwidth", "flops_efficiency", "hbm_efficiency"):
        if key in table:
            number(table[key], key, key)
    for key in ("peak_flops_fp8", "peak_vector_flops", "op_floor_s", "decode_step_overhead_s",
                "vector_efficiency", "fused_attention_efficiency", "grouped_matmul_efficiency"):   # 0: none
        if key in table:
            number(table[key], key, key, low_open=False)
    if not isinstance(table["devices_per_node"], int) or isinstance(table["devices_per_node"], bool) \
            or not 1 <= table["devices_per_node"] <= MAX_DEVICES_PER_NODE:
        raise MoeJaxError(f"hardware file {str(path)!r}: devices_per_node={table['devices_per_node']!r} must be a "
                          f"whole number from 1 to {MAX_DEVICES_PER_NODE}")
    for tier, link in links.items():
        number(link.bandwidth, f"[{tier}] bandwidth", "bandwidth")
        number(link.latency_s, f"[{tier}] latency_s", "latency_s", low_open=False)
        number(link.call_overhead_s, f"[{tier}] call_overhead_s", "call_overhead_s", low_open=False)
        number(link.efficiency, f"[{tier}] efficiency", "efficiency")
        for key in ("bulk_latency_s", "small_efficiency", "all_reduce_efficiency", "per_peer_s"):
            number(getattr(link, key), f"[{tier}] {key}", key, low_open=False)
        if not isinstance(link.source, str):
            raise MoeJaxError(f"hardware file {str(path)!r}: [{tier}] source={link.source!r} must be a string")
    for key, valid in (("kind", ("gpu", "tpu")), ("vendor", ("nvidia", "amd", "google"))):
        if key in table and table[key] not in valid:
            raise MoeJaxError(f"hardware file {str(path)!r}: {key}={table[key]!r}; valid: {', '.join(valid)}")
    for key in ("compile_target", "compute_capability", "name", "source", "assumptions"):
        if key in table and not isinstance(table[key], str):
            raise MoeJaxError(f"hardware file {str(path)!r}: {key}={table[key]!r} must be a string")
    if "sm_count" in table and (not isinstance(table["sm_count"], int) or isinstance(table["sm_count"], bool)
                                or not 0 <= table["sm_count"] <= 1 << 20):
        raise MoeJaxError(f"hardware file {str(path)!r}: sm_count={table['sm_count']!r} must be a whole number >= 0")
    if table.get("kind") == "tpu":
        table.setdefault("vendor", "google")
    target = table.get("compile_target", "")
    if target.endswith(".txtpb") and not Path(target).expanduser().is_absolute():
        table["compile_target"] = str(path.parent / target)     # a description beside the TOML file
    table.setdefault("source", f"user file {path}")
    if calibration is not None:
        table["calibration"] = Calibration.from_toml_table(calibration, f"hardware file {str(path)!r}")
    try:
        return Hardware(**table, **links)
    except TypeError as e:
        raise MoeJaxError(f"hardware file {str(path)!r}: {e}") from None


def get_hardware(spec: str | Path | Hardware) -> Hardware:
    """A preset by name, or a TOML file describing one (see README)."""
    if isinstance(spec, Hardware):
        return spec
    text = str(spec)
    try:
        is_file = Path(text).is_file()
    except (OSError, ValueError):
        is_file = False
    if text.endswith(".toml") or is_file:
        return _from_toml(Path(text))
    try:
        return _PRESETS[text.strip().lower()]
    except KeyError:
        raise MoeJaxError(f"unknown hardware {text!r}{nearest(text, _PRESETS)}; presets: "
                          f"{', '.join(_PRESETS)}; or a TOML file") from None
