"""calibrate: microbenchmarks on the devices jax sees, written as a hardware TOML for --hardware."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from moe_jax.cli.app import cli, out
from moe_jax.cli.options import cluster_from, cluster_options, positive, this_command
from moe_jax.errors import MoeJaxError
from moe_jax.names import DTYPE_BY_SHORT, DTYPES


def parse_dtypes(text: str) -> tuple[str, ...]:
    """``bfloat16,float32`` (or the short names bf16, f32) → dtype names; a bad one is a MoeJaxError."""
    names = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name = DTYPE_BY_SHORT[part].name if part in DTYPE_BY_SHORT else part
        if name not in DTYPES:
            raise MoeJaxError(f"--dtypes: unknown dtype {part!r}; valid: {', '.join(DTYPES)} "
                              f"(or {', '.join(DTYPE_BY_SHORT)})")
        if name not in names:
            names.append(name)
    if not names:
        raise MoeJaxError(f"--dtypes {text!r} names no dtype; valid: {', '.join(DTYPES)}")
    return tuple(names)


@cli.command()
@click.option("--output", "output_path_", required=True, help="Hardware TOML to write (use it with --hardware).")
@click.option("--base", help="Preset whose peaks and links the calibration refines (default: the preset matching "
                             "the device kind, else a host description built from the measurements).")
@click.option("--quick", is_flag=True, help="A few small sizes only (seconds; for tests and a first look).")
@click.option("--dtypes", default="bfloat16,float32", show_default=True, help="Matmul dtypes, comma-separated.")
@click.option("--max-bytes", type=int, callback=positive,
              help="Largest memory array and collective message in bytes (default: by backend and device memory).")
@click.option("--devices", type=int, callback=positive,
              help="Emulate this many CPU devices (XLA:CPU in one process) instead of the devices jax finds.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@cluster_options
def calibrate(output_path_, base, quick, dtypes, max_bytes, devices, force, coordinator, num_processes, process_id,
              timeout):
    """Measure matmul, memory, op overhead and collectives on this machine; write a hardware TOML.

    With --coordinator, --num-processes and --process-id every process runs this command: collectives
    over devices of several processes measure the network tier, and process 0 writes the file
    (--devices is then the total of emulated CPU devices, shared out between the processes).
    """
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moe_jax.cli.outputs import output_path
    from moe_jax.hardware.calibration import write_hardware_toml
    from moe_jax.hardware.presets import get_hardware

    names = parse_dtypes(dtypes)
    path = output_path(output_path_, "--output")
    if path.exists() and not force:
        raise MoeJaxError(f"--output {output_path_!r} exists; add --force to replace it, or choose another path")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MoeJaxError(f"--output {output_path_!r} exists and is not a regular file; choose another path")
    base_hw = get_hardware(base) if base else None           # an unknown preset fails before any measurement
    # the cluster (if any) is joined and the fake CPU devices requested before jax starts its backend
    cluster = cluster_from(coordinator, num_processes, process_id, timeout, cpu_devices=devices)
    with cluster:
        cluster.agree({"quick": quick, "dtypes": list(names), "max_bytes": max_bytes, "devices": devices,
                       "base": base})
        from moe_jax.runtime.calibrate import calibrate as measure

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=False,
                      disable=not cluster.is_leader) as bar:
            tasks = {}

            def progress(kind, text, done, total):
                cluster.beat(f"calibrate {kind}: {text}")
                if kind not in tasks:
                    tasks[kind] = bar.add_task(kind, total=total)
                bar.update(tasks[kind], description=f"{kind}: {text}", completed=done, total=total)

            cal = measure(dtypes=names, quick=quick, max_bytes=max_bytes, progress=progress,
                          command=this_command())
    if not cluster.is_leader:
        return                                                # process 0 reports and writes the file
    from moe_jax.runtime.calibrate import calibrated_hardware, preset_for_device

    if base_hw is None and devices is None:
        match = preset_for_device(cal.meta["device_kind"])
        base_hw = get_hardware(match) if match else None
    hw = calibrated_hardware(cal, base_hw)
    write_hardware_toml(hw, cal, Path(path), overwrite=force)
    print_calibration(out, hw)
    out.print(f"wrote {path} (use it with --hardware {path})")


def print_calibration(console, hw) -> None:
    """The fitted figures of a calibrated `Hardware`: curves, overhead, collective fits, and the figures derived."""
    cal = hw.calibration
    t = Table(title=f"calibration: {cal.meta.get('device_count', '?')} x {cal.meta.get('device_kind', '?')} "
                    f"({cal.meta.get('backend', '?')}), {cal.meta.get('date', '')}")
    for col in ("measurement", "smallest", "largest", "best"):
        t.add_column(col, justify="left" if col == "measurement" else "right")
    for dtype, curve in cal.matmul.items():
        (s0, t0), (s1, t1) = curve.points[0], curve.points[-1]
        t.add_row(f"matmul {dtype}", f"{s0:.3g} FLOP in {t0 * 1e6:.1f} µs", f"{s1 / t1 / 1e9:.1f} GFLOP/s",
                  f"{curve.peak_throughput / 1e9:.1f} GFLOP/s")
    for name, curve in (("stream copy", cal.memory), ("read-reduce", cal.read_reduce)):
        (s0, t0), (s1, t1) = curve.points[0], curve.points[-1]
        t.add_row(name, f"{s0 / 1024:.0f} KiB in {t0 * 1e6:.1f} µs", f"{s1 / t1 / 1e9:.1f} GB/s",
                  f"{curve.peak_throughput / 1e9:.1f} GB/s")
    t.add_row("op overhead", "", "", f"{cal.op_overhead_s * 1e6:.2f} µs")
    if cal.fresh_buffer is not None:
        (s0, t0), (s1, t1) = cal.fresh_buffer.points[0], cal.fresh_buffer.points[-1]
        t.add_row("fresh buffer (per call)", f"{s0 / 1024:.0f} KiB in {t0 * 1e6:.1f} µs",
                  f"{s1 / 2**20:.0f} MiB in {t1 * 1e3:.2f} ms", f"{t1 / s1 * 1e9:.3f} ns/B at the largest")
    console.print(t)
    if cal.collectives:
        c = Table(title="collectives: seconds = latency + bytes per device / bandwidth")
        for col in ("kind", "tier", "group", "latency", "bandwidth", "samples"):
            c.add_column(col, justify="left" if col in ("kind", "tier") else "right")
        for f in cal.collectives:
            c.add_row(f.kind, f.tier, str(f.group_size), f"{f.latency_s * 1e6:.1f} µs", f"{f.bandwidth / 1e9:.2f} GB/s",
                      str(len(f.samples)))
        console.print(c)
    for note in cal.meta.get("notes", []):
        console.print(f"note: {note}")
    console.print(f"hardware {hw.name}: peak {hw.peak_flops / 1e12:.3g} TFLOP/s x {hw.flops_efficiency:.0%}, "
                  f"memory {hw.hbm_bandwidth / 1e9:.1f} GB/s x {hw.hbm_efficiency:.0%}, "
                  f"{hw.memory_bytes / 1e9:.1f} GB per device, {hw.devices_per_node} per node")
