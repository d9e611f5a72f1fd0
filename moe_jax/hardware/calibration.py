"""Measured figures of one machine (``moe-jax calibrate``): the data, its validation, its TOML form, and the
lookups a time model asks of it.

A `Calibration` holds what the microbenchmarks of `moe_jax.runtime.calibrate` measured on the devices at hand:

- `Curve`: the time of one kind of op against its size (FLOPs for a matmul, bytes moved for a memory op),
  interpolated between the measured sizes; per dtype for matmuls, and for a stream copy and a read-reduce;
- ``op_overhead_s``: the fixed cost of one tiny op (dispatch / launch);
- ``fresh_buffer``: what a program call pays for each buffer it allocates anew, against its bytes;
- `CollectiveFit`: each collective kind over a group size of devices on one link tier, fitted to
  ``latency_s + bytes_per_device / bandwidth``, with the raw samples it was fitted to;
- ``meta``: when, where and with what it was measured.

It lives in a hardware TOML as a ``[calibration]`` table beside the figures `Hardware` already has
(`write_hardware_toml` writes such a file; `moe_jax.hardware.presets.get_hardware` reads it back).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moe_jax.errors import MoeJaxError, nearest
from moe_jax.names import DTYPES

if TYPE_CHECKING:
    from moe_jax.hardware.presets import Hardware

COLLECTIVE_KINDS: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
"""The collective kinds measured, named as the cost walk names them (HLO opcodes)."""
TIERS: tuple[str, ...] = ("node", "network")
"""Which `LinkTier` of the `Hardware` a collective fit refines."""

MAX_SIZE = 1e30
"""The largest size (FLOPs or bytes) a curve point may have: far above any op, far below overflow."""
MAX_SECONDS = 1e6
"""The longest time a sample may have (about 11 days): a measurement, not a mistake, stays far below it."""
MIN_BANDWIDTH, MAX_BANDWIDTH = 1e6, 1e15
"""A fitted collective bandwidth lies in (1 MB/s, 1 PB/s], the range a hardware file accepts for a link; a fit
whose time does not grow with the size (the sampled sizes all latency-bound) gets the upper end."""
MAX_GROUP = 1 << 20
_META_SCALARS = (str, int, float, bool)


def check_number(value, where: str, low: float, high: float, *, low_open: bool = True) -> float:
    """`value` as a float if it is a finite number in the range; else a MoeJaxError naming `where`."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise MoeJaxError(f"{where}={value!r} must be a finite number {bound}"[:400])
    return float(value)


def _check_keys(table: dict, where: str, keys: tuple[str, ...], *, required: int) -> None:
    """Refuse a key of `table` not in `keys` (naming the nearest) and any of the first `required` keys missing."""
    bad = [k for k in table if k not in keys]
    if bad:
        raise MoeJaxError(f"{where}: unknown key {bad[0]!r}{nearest(bad[0], keys)}; valid: {', '.join(keys)}")
    missing = [k for k in keys[:required] if k not in table]
    if missing:
        raise MoeJaxError(f"{where}: missing {', '.join(missing)}")


def _curves_by(value, where: str, name: str, valid: tuple[str, ...], what: str, *, required: bool) -> dict:
    """A table of curves keyed by one of `valid` (`what` names them: a dtype, an op kind), validated."""
    if not isinstance(value, dict) or (required and not value):
        raise MoeJaxError(f"{where}: {name} must be a table of curves by {what} ({', '.join(valid)})")
    for key in value:
        if key not in valid:
            raise MoeJaxError(f"{where}: {name}.{key}: unknown {what}{nearest(key, valid)}; "
                              f"valid: {', '.join(valid)}")
    return {k: Curve(_points(v, f"{where} {name}.{k}")) for k, v in value.items()}


def _points(value, where: str) -> tuple[tuple[float, float], ...]:
    """Validated curve points: a non-empty list of [size, seconds], sizes increasing, seconds not decreasing."""
    if not isinstance(value, (list, tuple)) or not value:
        raise MoeJaxError(f"{where} must be a non-empty array of [size, seconds] pairs, not {value!r}"[:400])
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise MoeJaxError(f"{where}[{i}]={pair!r} must be a [size, seconds] pair"[:400])
        size = check_number(pair[0], f"{where}[{i}] size", 0.0, MAX_SIZE)
        seconds = check_number(pair[1], f"{where}[{i}] seconds", 0.0, MAX_SECONDS)
        if out and size <= out[-1][0]:
            raise MoeJaxError(f"{where}[{i}] size {size:g} must be larger than the size before it ({out[-1][0]:g}): "
                              "points are sorted by size, each size once")
        if out and seconds < out[-1][1]:
            raise MoeJaxError(f"{where}[{i}] seconds {seconds:g} is less than at the smaller size before it "
                              f"({out[-1][1]:g}): a curve's time must not decrease with size")
        out.append((size, seconds))
    return tuple(out)


@dataclass(frozen=True)
class Curve:
    """Measured time of one op against its size: FLOPs for matmuls, bytes moved for memory ops."""

    points: tuple[tuple[float, float], ...]
    """(size, seconds), sorted by size, sizes > 0, seconds > 0 and not decreasing with size."""

    def __post_init__(self):
        object.__setattr__(self, "points", _points(self.points, "curve points"))

    @classmethod
    def fit(cls, samples: Iterable[tuple[float, float]]) -> Curve:
        """The curve through measured (size, seconds) samples: sorted, one point per size (the fastest sample of
        a size repeated), and made monotone by a running maximum (a larger op never predicted faster than a
        smaller one; a dip comes from noise or a better kernel at one shape, not from more work being cheaper)."""
        best: dict[float, float] = {}
        for size, seconds in samples:
            best[float(size)] = min(float(seconds), best.get(float(size), math.inf))
        if not best:
            raise MoeJaxError("a curve needs at least one measured (size, seconds) sample")
        points, peak = [], 0.0
        for size in sorted(best):
            peak = max(peak, best[size])
            points.append((size, peak))
        return cls(tuple(points))

    def seconds(self, size: float) -> float:
        """Time of an op of `size`: log-log interpolation between the measured points; below the smallest, the
        smallest point's time (the fixed cost floor); above the largest, scaled linearly from it (the largest
        size's throughput held)."""
        pts = self.points
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1] * size / pts[-1][0]
        i = bisect.bisect_right([p[0] for p in pts], size)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        frac = math.log(size / x0) / math.log(x1 / x0)
        # clamped to the segment: exp(log(y)) may round below y, and the curve must never decrease
        return min(max(math.exp(math.log(y0) + frac * math.log(y1 / y0)), y0), y1)

    def throughput(self, size: float) -> float:
        """Size per second at `size` (FLOP/s for a matmul curve, bytes/s for a memory curve)."""
        return size / self.seconds(size)

    @property
    def peak_throughput(self) -> float:
        """The best size per second among the measured points."""
        return max(s / t for s, t in self.points)

    def to_toml(self) -> list[list[float]]:
        return [[s, t] for s, t in self.points]


@dataclass(frozen=True)
class CollectiveFit:
    """One collective kind over `group_size` devices on one link tier: seconds = latency_s + bytes / bandwidth."""

    kind: str
    """all-reduce, all-gather, reduce-scatter, all-to-all or collective-permute."""
    tier: str
    """``node`` or ``network``: which `LinkTier` of the `Hardware` it refines."""
    group_size: int
    latency_s: float
    """Fitted fixed seconds per call (>= 0)."""
    bandwidth: float
    """Fitted payload bytes/s per device. The payload is what the cost walk calls bytes_per_call: the result
    bytes per device (operand bytes for reduce-scatter)."""
    samples: tuple[tuple[float, float], ...] = ()
    """(bytes per device, median seconds) measured."""

    def seconds(self, nbytes: float) -> float:
        """Predicted seconds of one call moving `nbytes` of payload per device."""
        return self.latency_s + nbytes / self.bandwidth

    @classmethod
    def fit(cls, kind: str, tier: str, group_size: int, samples: Iterable[tuple[float, float]]) -> CollectiveFit:
        """Least squares of seconds = latency + bytes / bandwidth over `samples`, weighted by 1 / seconds²
        (relative error: the small latency-bound sizes count as much as the large bandwidth-bound ones).
        The latency is kept >= 0 (refitted through the origin when the free fit's intercept is negative);
        a slope <= 0 (every size latency-bound) gives `MAX_BANDWIDTH`."""
        pts = tuple((float(b), float(t)) for b, t in samples)
        if not pts:
            raise MoeJaxError(f"{kind} over {group_size} devices: no samples to fit")
        w = [1.0 / t ** 2 for _, t in pts]
        sw = sum(w)
        sx = sum(wi * x for wi, (x, _) in zip(w, pts, strict=True))
        sy = sum(wi * y for wi, (_, y) in zip(w, pts, strict=True))
        sxx = sum(wi * x * x for wi, (x, _) in zip(w, pts, strict=True))
        sxy = sum(wi * x * y for wi, (x, y) in zip(w, pts, strict=True))
        det = sw * sxx - sx * sx
        if len({x for x, _ in pts}) >= 2 and det > 0:
            slope = (sw * sxy - sx * sy) / det
            latency = (sy - slope * sx) / sw
        else:
            slope, latency = 0.0, sy / sw
        if latency < 0:
            latency, slope = 0.0, sxy / sxx
        if slope <= 0:
            latency, slope = sy / sw, 0.0
        bandwidth = MAX_BANDWIDTH if slope <= 1 / MAX_BANDWIDTH else max(1 / slope, MIN_BANDWIDTH * (1 + 1e-9))
        return cls(kind, tier, int(group_size), min(latency, 1.0), bandwidth, pts)

    @classmethod
    def from_toml_table(cls, table, where: str) -> CollectiveFit:
        if not isinstance(table, dict):
            raise MoeJaxError(f"{where} must be a table, not {table!r}"[:400])
        _check_keys(table, where, ("kind", "tier", "group_size", "latency_s", "bandwidth", "samples"), required=5)
        kind, tier, group = table["kind"], table["tier"], table["group_size"]
        if kind not in COLLECTIVE_KINDS:
            raise MoeJaxError(f"{where}: kind={kind!r}{nearest(str(kind), COLLECTIVE_KINDS)}; "
                              f"valid: {', '.join(COLLECTIVE_KINDS)}"[:400])
        if tier not in TIERS:
            raise MoeJaxError(f"{where}: tier={tier!r}; valid: {', '.join(TIERS)}"[:400])
        if not isinstance(group, int) or isinstance(group, bool) or not 2 <= group <= MAX_GROUP:
            raise MoeJaxError(f"{where}: group_size={group!r} must be a whole number from 2 to {MAX_GROUP}"[:400])
        latency = check_number(table["latency_s"], f"{where} latency_s", 0.0, 1.0, low_open=False)
        bandwidth = check_number(table["bandwidth"], f"{where} bandwidth", MIN_BANDWIDTH, MAX_BANDWIDTH)
        raw = table.get("samples", [])
        if not isinstance(raw, list):
            raise MoeJaxError(f"{where}: samples={raw!r} must be an array of [bytes, seconds] pairs"[:400])
        samples = []
        for i, pair in enumerate(raw):
            if not isinstance(pair, list) or len(pair) != 2:
                raise MoeJaxError(f"{where} samples[{i}]={pair!r} must be a [bytes, seconds] pair"[:400])
            samples.append((check_number(pair[0], f"{where} samples[{i}] bytes", 0.0, MAX_SIZE),
                            check_number(pair[1], f"{where} samples[{i}] seconds", 0.0, MAX_SECONDS)))
        return cls(kind, tier, group, latency, bandwidth, tuple(samples))

    def to_toml_table(self) -> dict:
        return {"kind": self.kind, "tier": self.tier, "group_size": self.group_size, "latency_s": self.latency_s,
                "bandwidth": self.bandwidth, "samples": [[b, t] for b, t in self.samples]}


OP_KINDS = ("convert", "transpose")
"""Memory-op kinds with a curve of their own (`Calibration.kinds`)."""


@dataclass(frozen=True)
class Calibration:
    """What `moe-jax calibrate` measured on one machine; see the module docstring."""

    matmul: dict[str, Curve]
    """Matmul time against FLOPs (2·M·N·K), by dtype name as in `moe_jax.names.DTYPES` (bfloat16, float32)."""
    memory: Curve
    """Stream copy (y = x + 1): time against bytes read + written."""
    read_reduce: Curve
    """Read-reduce (sum of an array): time against bytes read."""
    op_overhead_s: float
    """Fixed cost of one tiny op (dispatch / launch), median."""
    collectives: tuple[CollectiveFit, ...] = ()
    meta: dict = field(default_factory=dict)
    """date (ISO), machine, jax version, backend, device kind and count, process count, moe-jax version,
    command line, and notes (emulated devices, what was not measured)."""
    call_s: float = 0.0
    """Fixed host cost of calling one compiled program and waiting for its result (dispatch and
    synchronisation), beyond the ops it runs; 0: not measured."""
    call_per_argument_s: float = 0.0
    """Host cost per argument array of such a call (a model's program takes hundreds: every weight)."""
    kinds: dict[str, Curve] = field(default_factory=dict)
    """Memory ops of a kind that runs at its own rate, time against bytes read + written: ``convert``
    (bf16 <-> f32, slow on a CPU) and ``transpose`` (a strided copy); see `OP_KINDS`."""

    transcendental: Curve | None = None
    """Time of an op evaluating n transcendental functions (exp: softmax, SiLU), against n; None: not
    measured (they are then timed as elementwise FLOPs)."""
    fresh_buffer: Curve | None = None
    """What a program call pays for one buffer it allocates anew (its temporaries, an output not aliased to an
    argument), against the buffer's bytes: on XLA:CPU a buffer above malloc's mmap threshold page-faults on
    every call; None: not measured (counted as free)."""

    def fresh_seconds(self, nbytes: float) -> float:
        """Seconds one call pays for a fresh buffer of `nbytes` (0 for none, or when not measured)."""
        return self.fresh_buffer.seconds(nbytes) if self.fresh_buffer is not None and nbytes > 0 else 0.0

    def kind_seconds(self, kind: str, nbytes: float) -> float:
        """Seconds of a memory op of `kind` moving `nbytes`: its own curve where measured, else the copy's."""
        curve = self.kinds.get(kind)
        return (curve or self.memory).seconds(nbytes)

    def call_seconds(self, arguments: int) -> float:
        """Host seconds of one program call with `arguments` argument arrays."""
        return self.call_s + arguments * self.call_per_argument_s

    def __post_init__(self):
        if not self.matmul:
            raise MoeJaxError("a calibration needs at least one matmul curve")
        unknown = [d for d in self.matmul if d not in DTYPES]
        if unknown:
            raise MoeJaxError(f"matmul curve for unknown dtype {unknown[0]!r}{nearest(unknown[0], DTYPES)}; "
                              f"valid: {', '.join(DTYPES)}")
        object.__setattr__(self, "collectives", tuple(self.collectives))

    def __hash__(self):
        # frozen, but with dict fields: hash what identifies the measurements (meta only describes them)
        return hash((tuple(sorted(self.matmul.items())), self.memory, self.read_reduce, self.op_overhead_s,
                     self.collectives, self.call_s, self.call_per_argument_s, tuple(sorted(self.kinds.items())),
                     self.transcendental, self.fresh_buffer))

    def matmul_curve(self, dtype: str) -> Curve:
        """The curve of `dtype`, else that of the nearest dtype measured: the same element width first (float16
        for bfloat16), then the closest width."""
        if dtype in self.matmul:
            return self.matmul[dtype]
        width = DTYPES[dtype].bytes if dtype in DTYPES else 2
        order = list(DTYPES)
        best = min(self.matmul, key=lambda d: (abs(DTYPES[d].bytes - width), order.index(d)))
        return self.matmul[best]

    def matmul_seconds(self, flops: float, dtype: str) -> float:
        """Seconds of a matmul of `flops` in `dtype` (see `matmul_curve` for a dtype not measured)."""
        return self.matmul_curve(dtype).seconds(flops)

    def memory_seconds(self, nbytes: float) -> float:
        """Seconds to stream `nbytes` (read + written) through device memory."""
        return self.memory.seconds(nbytes)

    def collective(self, kind: str, tier: str, group_size: int) -> CollectiveFit | None:
        """The fit of (kind, tier, group_size); else the same kind and tier at the nearest measured group size
        (nearest by ratio; on a tie the larger group); else None."""
        same = [c for c in self.collectives if c.kind == kind and c.tier == tier]
        if not same:
            return None
        for c in same:
            if c.group_size == group_size:
                return c
        size = max(group_size, 1)
        return min(same, key=lambda c: (abs(math.log(c.group_size / size)), -c.group_size))

    @classmethod
    def from_toml_table(cls, table, where: str) -> Calibration:
        """A `Calibration` from its TOML table (as `to_toml_table` writes it); any bad key or value is a
        MoeJaxError naming `where` (e.g. the file) and the key."""
        where = f"{where} [calibration]"
        if not isinstance(table, dict):
            raise MoeJaxError(f"{where} must be a table, not {type(table).__name__}")
        _check_keys(table, where, ("matmul", "memory", "read_reduce", "op_overhead_s", "collective", "meta", "call_s",
                                   "call_per_argument_s", "kinds", "transcendental", "fresh_buffer"), required=4)
        curves = _curves_by(table["matmul"], where, "matmul", tuple(DTYPES), "dtype", required=True)
        memory = Curve(_points(table["memory"], f"{where} memory"))
        read_reduce = Curve(_points(table["read_reduce"], f"{where} read_reduce"))
        overhead = check_number(table["op_overhead_s"], f"{where} op_overhead_s", 0.0, 1.0)
        raw = table.get("collective", [])
        if not isinstance(raw, list):
            raise MoeJaxError(f"{where}: collective must be an array of tables ([[calibration.collective]])")
        fits, seen = [], set()
        for i, t in enumerate(raw):
            fit = CollectiveFit.from_toml_table(t, f"{where} collective[{i}]")
            key = (fit.kind, fit.tier, fit.group_size)
            if key in seen:
                raise MoeJaxError(f"{where} collective[{i}]: a second fit of {fit.kind} on the {fit.tier} tier "
                                  f"over {fit.group_size} devices; give each (kind, tier, group_size) once")
            seen.add(key)
            fits.append(fit)
        meta = table.get("meta", {})
        if not isinstance(meta, dict):
            raise MoeJaxError(f"{where}: meta must be a table, not {meta!r}"[:400])
        for k, v in meta.items():
            ok = isinstance(v, _META_SCALARS) or (isinstance(v, list) and all(isinstance(x, _META_SCALARS)
                                                                               for x in v))
            if not ok:
                raise MoeJaxError(f"{where}: meta.{k}={v!r} must be a string, number, boolean or an array "
                                  "of them"[:400])
        call = check_number(table.get("call_s", 0.0), f"{where} call_s", 0.0, 1.0, low_open=False)
        per_arg = check_number(table.get("call_per_argument_s", 0.0), f"{where} call_per_argument_s", 0.0, 1.0,
                          low_open=False)
        kind_curves = _curves_by(table.get("kinds", {}), where, "kinds", OP_KINDS, "op kind", required=False)
        transcendental = (Curve(_points(table["transcendental"], f"{where} transcendental"))
                          if "transcendental" in table else None)
        fresh = (Curve(_points(table["fresh_buffer"], f"{where} fresh_buffer"))
                 if "fresh_buffer" in table else None)
        return cls(curves, memory, read_reduce, overhead, tuple(fits), dict(meta), call, per_arg, kind_curves,
                   transcendental, fresh)

    def to_toml_table(self) -> dict:
        """The ``[calibration]`` table: curves as arrays of [size, seconds], the fits as ``[[calibration.collective]]``
        with their raw samples, meta as a table."""
        return {"op_overhead_s": self.op_overhead_s,
                "call_s": self.call_s,
                "call_per_argument_s": self.call_per_argument_s,
                "memory": self.memory.to_toml(),
                "read_reduce": self.read_reduce.to_toml(),
                "kinds": {k: c.to_toml() for k, c in self.kinds.items()},
                **({"transcendental": self.transcendental.to_toml()} if self.transcendental else {}),
                **({"fresh_buffer": self.fresh_buffer.to_toml()} if self.fresh_buffer else {}),
                "matmul": {d: c.to_toml() for d, c in self.matmul.items()},
                "meta": dict(self.meta),
                "collective": [c.to_toml_table() for c in self.collectives]}


def hardware_toml_table(hw: Hardware, calibration: Calibration | None = None) -> dict:
    """`hw` (and `calibration`) as the tables of a hardware TOML: top-level figures, [node_link], [network_link],
    [calibration]; the layout `moe_jax.hardware.presets.get_hardware` reads."""
    import dataclasses

    table = {}
    for f in dataclasses.fields(hw):
        value = getattr(hw, f.name)
        if f.name in ("node_link", "network_link"):
            value = {k.name: getattr(value, k.name) for k in dataclasses.fields(value)}
        elif f.name == "calibration":
            continue
        table[f.name] = value
    cal = calibration if calibration is not None else getattr(hw, "calibration", None)
    if cal is not None:
        table["calibration"] = cal.to_toml_table()
    # scalars before tables: TOML puts a table's keys after its header, so the figures must come first
    return dict(sorted(table.items(), key=lambda kv: isinstance(kv[1], dict)))


def write_hardware_toml(hw: Hardware, calibration: Calibration | None, path: str | Path, *,
                        overwrite: bool = False) -> None:
    """Write `hw` with `calibration` as a complete hardware TOML at `path` (atomically). An existing file is
    replaced only with `overwrite` (the CLI's --force); otherwise it is a MoeJaxError and the file is untouched."""
    import tomli_w

    from moe_jax.files import write_atomic

    path = Path(path)
    if path.exists() and not overwrite:
        raise MoeJaxError(f"{str(path)!r} exists; moe-jax does not overwrite it without --force "
                          "(or choose another --output)")
    if path.is_dir():
        raise MoeJaxError(f"{str(path)!r} is a directory; give a file name")
    cal = calibration if calibration is not None else getattr(hw, "calibration", None)
    date = cal.meta.get("date", "") if cal is not None else ""
    head = (f"# Hardware description written by moe-jax calibrate{' on ' + date if date else ''}.\n"
            "# Use it with --hardware THIS_FILE; [calibration] holds the measurements and every raw sample.\n\n")
    write_atomic(path, head + tomli_w.dumps(hardware_toml_table(hw, calibration)))
