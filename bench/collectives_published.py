"""The time model's collective times against published measurements of the same collective, size, group and hardware.

Every point of bench/published_collectives.toml (nccl-tests all-reduce inside 8-GPU NVLink nodes and across
nodes, DeepEP's expert-parallel dispatch / combine at 8 to 256 GPUs, a TPU v5e ICI all-gather) is predicted
with moe-jax's time model on the named preset and compared with the published time:

    .venv/bin/python bench/collectives_published.py [--data PATH] [--no-append]

Where a source publishes only a bandwidth, the time is derived from it by the definition the point names
(nccl-tests: algbw = bytes / time, busbw = algbw x its per-collective factor). The table splits each
prediction into its latency part (the model at zero bytes) and its bandwidth part, so a miss can be read
as one or the other.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "published_collectives.toml"
TOLERANCE = 0.25
"""The goal: within 25% of each published point."""

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
DEFINITIONS = ("busbw", "algbw")
LINKS = ("node", "network")
_REQUIRED = {"name": str, "source": str, "quote": str, "hardware": str, "kind": str, "group_size": int,
             "devices_per_node": int, "bytes_per_device": int}


class DataError(ValueError):
    """A point of the data file that cannot be used (names the point and the field)."""


def _bus_factor(kind: str, n: int) -> float:
    """nccl-tests' busbw / algbw for `kind` over `n` ranks (doc/PERFORMANCE.md of nccl-tests)."""
    if kind == "all-reduce":
        return 2 * (n - 1) / n
    if kind in ("all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (n - 1) / n
    return 1.0


def _check(point: dict, index: int, presets: set[str]) -> None:
    label = f"point {index + 1} ({point.get('name', 'unnamed')!r})"
    for key, typ in _REQUIRED.items():
        value = point.get(key)
        if not isinstance(value, typ) or isinstance(value, bool) or (typ is str and not value.strip()):
            raise DataError(f"{label}: {key} must be a non-empty {typ.__name__}, got {value!r}")
    if point["hardware"] not in presets:
        raise DataError(f"{label}: hardware {point['hardware']!r} is not a preset; valid: {', '.join(sorted(presets))}")
    if point["kind"] not in KINDS:
        raise DataError(f"{label}: kind {point['kind']!r}; valid: {', '.join(KINDS)}")
    for key in ("group_size", "devices_per_node", "bytes_per_device"):
        if point[key] <= 0:
            raise DataError(f"{label}: {key} must be positive, got {point[key]}")
    if "measured_s" not in point and "measured_bandwidth" not in point:
        raise DataError(f"{label}: needs measured_s or measured_bandwidth")
    for key in ("measured_s", "measured_bandwidth"):
        if key in point and not (isinstance(point[key], (int, float)) and not isinstance(point[key], bool)
                                 and math.isfinite(point[key]) and point[key] > 0):
            raise DataError(f"{label}: {key} must be a positive number, got {point[key]!r}")
    if "measured_bandwidth" in point and point.get("bandwidth_definition") not in DEFINITIONS:
        raise DataError(f"{label}: bandwidth_definition {point.get('bandwidth_definition')!r}; "
                        f"valid: {', '.join(DEFINITIONS)}")
    if "link" in point and point["link"] not in LINKS:
        raise DataError(f"{label}: link {point['link']!r}; valid: {', '.join(LINKS)}")


def load_points(path: Path | str = DATA) -> list[dict]:
    """The [[point]] tables of the data file, each checked (DataError names the first bad one)."""
    from moe_jax.hardware.presets import hardware_names

    with open(path, "rb") as f:
        points = tomllib.load(f).get("point", [])
    if not points:
        raise DataError(f"{path}: no [[point]] tables")
    presets = set(hardware_names())
    for i, point in enumerate(points):
        _check(point, i, presets)
    return points


def measured_seconds(point: dict) -> float:
    """The published time of one call: measured_s, else derived from the published bandwidth."""
    if "measured_s" in point:
        return float(point["measured_s"])
    algbw = point["measured_bandwidth"]
    if point["bandwidth_definition"] == "busbw":
        algbw /= _bus_factor(point["kind"], point["group_size"])
    return point["bytes_per_device"] / algbw


def _tier(point: dict) -> str:
    """The link tier the measured library used: the point's `link`, else node when the group fits in one."""
    return point.get("link") or ("node" if point["group_size"] <= point["devices_per_node"] else "network")


def predict_seconds(point: dict, hw, nbytes: float | None = None) -> tuple[float, str]:
    """The model's seconds for one call of the point's collective on preset `hw` (or at `nbytes`), and the
    algorithm and tiers it assumed (`moe_jax.perf.collectives.collective_seconds`).

    The group is laid out as the measured system was: `devices_per_node` per node (hierarchical when the
    group spans several nodes), or one per node where the point says the library used the network tier
    throughout (its `link`).
    """
    from moe_jax.perf.collectives import Span, collective_seconds

    nbytes = point["bytes_per_device"] if nbytes is None else nbytes
    n = point["group_size"]
    per_node = 1 if point.get("link") == "network" else min(n, point["devices_per_node"])
    seconds, algo = collective_seconds(point["kind"], nbytes, Span(n, math.ceil(n / per_node), per_node), hw)
    return float(seconds), algo


def predictions(points: list[dict]) -> list[dict]:
    """One row per point: measured and predicted seconds, the prediction's latency part (the model at zero
    bytes) and bandwidth part, ratio = predicted / measured, and whether it is within TOLERANCE."""
    from moe_jax.hardware.presets import get_hardware

    rows = []
    for point in points:
        hw = get_hardware(point["hardware"])
        measured = measured_seconds(point)
        predicted, algo = predict_seconds(point, hw)
        latency = predict_seconds(point, hw, 0.0)[0]
        ratio = predicted / measured
        rows.append({"name": point["name"], "hardware": point["hardware"], "kind": point["kind"],
                     "group_size": point["group_size"], "bytes": point["bytes_per_device"], "tier": _tier(point),
                     "measured_s": measured, "predicted_s": predicted, "latency_s": latency,
                     "bandwidth_s": predicted - latency, "ratio": ratio, "algorithm": algo,
                     "within": abs(ratio - 1) <= TOLERANCE})
    return rows


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f}"


def summary(rows: list[dict]) -> dict:
    """Median and worst |predicted / measured - 1|, and how many points are within TOLERANCE."""
    errors = [abs(r["ratio"] - 1) for r in rows]
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    return {"median": statistics.median(errors), "worst": abs(worst["ratio"] - 1), "worst_name": worst["name"],
            "within": sum(r["within"] for r in rows), "points": len(rows)}


_COLUMNS = ("point", "hardware", "kind", "group", "bytes", "measured us", "predicted us", "latency / bandwidth us",
            "pred / meas", "within 25%", "model's algorithm")


def _cells(r: dict) -> tuple[str, ...]:
    return (r["name"], r["hardware"], r["kind"], str(r["group_size"]), _bytes(r["bytes"]), _us(r["measured_s"]),
            _us(r["predicted_s"]), f"{_us(r['latency_s'])} / {_us(r['bandwidth_s'])}", f"{r['ratio']:.2f}",
            "yes" if r["within"] else "no", r["algorithm"])


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (the RESULTS.md section)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _print(rows: list[dict], stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Collective time: moe-jax time model against published measurements")
    for col in _COLUMNS:
        table.add_column(col, justify="right" if col not in ("point", "hardware", "kind", "model's algorithm")
                         else "left", overflow="fold")
    for r in rows:
        table.add_row(*_cells(r), style=None if r["within"] else "red")
    console = Console(width=220)
    console.print(table)
    console.print(f"median |error| {stats['median']:.0%}, worst {stats['worst']:.0%} ({stats['worst_name']}); "
                  f"{stats['within']} of {stats['points']} points within {TOLERANCE:.0%}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the published points (TOML)")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    rows = predictions(load_points(args.data))
    stats = summary(rows)
    _print(rows, stats)
    if not args.no_append:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import append

        append("Collective time against published measurements", markdown(rows), (
            f"data: bench/{args.data.name} (sources, quotes and how each number was read are in the file)",
            "measured = the published time, or bytes / algbw with algbw = busbw / its nccl-tests factor; "
            "predicted = the time model on the named preset, the group laid out as the measured system was; "
            "latency / bandwidth = the prediction at zero bytes and the rest",
            f"median |predicted / measured - 1| {stats['median']:.0%}, worst {stats['worst']:.0%} "
            f"({stats['worst_name']}); {stats['within']} of {stats['points']} within {TOLERANCE:.0%}"))


if __name__ == "__main__":
    main()
