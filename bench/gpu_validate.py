"""Predictions against measurements on one NVIDIA GPU: measure there, predict anywhere, compare.

Two halves, which can run on different machines:

- **measure** (on the GPU): for each case (seed-30b, qwen3-30b-a3b, mixtral-8x7b with random
  bf16 weights; batch 1, 8 and 64; prompt 2048; capacity, and qwen3 again dropless) run the
  sharded model with `run --backend real`: TTFT over repeated prefills, TPOT over decode steps;
  then trace one more prefill and a few decode steps with ``jax.profiler`` (each kernel's
  device time). `moe-jax calibrate` measures the GPU itself (a hardware TOML). Cases run in
  order of value until a deadline, each appended to ``measured.jsonl`` as it finishes, so a
  lease that ends early keeps what was measured.
- **predict** (anywhere: the deviceless CUDA compile needs no GPU): each measured case is
  predicted by `analyze` on the deviceless ``gpu`` backend with the preset's figures and with
  the calibrated TOML, and RESULTS-gpu.md gets predicted, measured and the error per case.

Goal (#18): TPOT within 5%, TTFT within 10%.

    python bench/gpu_validate.py                       # both halves, on the GPU machine
    python bench/gpu_validate.py --measure-to DIR      # the GPU half: DIR/measured.jsonl, DIR/<gpu>.toml, traces
    python bench/gpu_validate.py --predict-from DIR    # the other half, on any machine
    python bench/gpu_validate.py --dry-run             # tiny model on CPU, the same code path (CI runs this)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))          # the GPU machine runs the checkout as it is, without installing it

CASES = (("qwen3-30b-a3b", "capacity", 1), ("qwen3-30b-a3b", "capacity", 64), ("qwen3-30b-a3b", "capacity", 8),
         ("mixtral-8x7b", "capacity", 8), ("seed-30b", "capacity", 8), ("qwen3-30b-a3b", "dropless", 8),
         ("mixtral-8x7b", "capacity", 1), ("seed-30b", "capacity", 1), ("qwen3-30b-a3b", "dropless", 64),
         ("mixtral-8x7b", "capacity", 64), ("seed-30b", "capacity", 64))
"""(model, dispatch, batch), most valuable first: a lease that ends early has measured these in this order."""
DRY_CASES = (("tiny", "capacity", 1), ("tiny", "capacity", 8), ("tiny", "dropless", 8))
CASE_BUDGET_S = 60.0
"""A case starts only when this much of the deadline is left (compile, weights, two prefills, decode steps)."""


def _preset_for(device) -> str:
    from moe_jax.runtime.calibrate import preset_for_device

    return preset_for_device(getattr(device, "device_kind", "")) or "h200"


def measure_case(model: str, dispatch: str, batch: int, prompt_len: int, gen_len: int, steps: int,
                 profile_dir: Path | None) -> dict:
    """Run one case on the devices jax sees; the measured record (or the reason it could not run)."""
    from moe_jax.config import get_model
    from moe_jax.costs.compile import Workload
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.runtime.run import run

    cfg = get_model(model).replace(dispatch=dispatch)
    workload = Workload(batch, prompt_len, gen_len)
    rec = {"model": model, "dispatch": dispatch, "batch": batch, "workload": workload.to_dict(), "steps": steps}
    start = time.perf_counter()
    try:
        r = run(cfg, Strategy(), workload, repeats=2, max_steps=steps, predict=False, profile_dir=profile_dir)
    except Exception as e:          # out of memory on the device is a result for this case
        rec["skip"] = f"run failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return rec
    rec["notes"] = r.notes
    rec.update(ttft_samples=r.ttft.samples, tpot_samples=r.tpot.samples, ttft=r.ttft.median, tpot=r.tpot.median,
               dropped_fraction=r.dropped["fraction"], device_kind=r.device_kind,
               profile=str(profile_dir) if profile_dir else None, wall_s=time.perf_counter() - start)
    return rec


def measure(out_dir: Path, cases, prompt_len: int, gen_len: int, steps: int, deadline_s: float,
            calibrate_quick: bool, profile: bool, calibrate: bool = True) -> None:
    """The GPU half: every case that fits the deadline, then calibration, each written as it finishes."""
    import jax

    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "measured.jsonl"
    start = time.perf_counter()
    device = jax.devices()[0]
    meta = {"meta": True, "device_kind": getattr(device, "device_kind", device.platform),
            "platform": device.platform, "jax": jax.__version__, "machine": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "prompt_len": prompt_len,
            "gen_len": gen_len, "steps": steps, "preset": _preset_for(device)}
    try:
        import flax
        meta["flax"] = flax.__version__
    except ImportError:
        pass
    with log.open("a") as f:
        f.write(json.dumps(meta) + "\n")
    calibrated = not calibrate
    for i, (model, dispatch, batch) in enumerate(cases):
        left = deadline_s - (time.perf_counter() - start)
        if not calibrated and i == 3:             # after the three qwen3 capacity cases: the GPU's own figures
            calibrated = _calibrate(out_dir, meta["preset"], calibrate_quick, left)
            left = deadline_s - (time.perf_counter() - start)
        if left < CASE_BUDGET_S:
            print(f"skipped {model} {dispatch} b{batch}: {left:.0f} s left of the deadline", flush=True)
            continue
        where = out_dir / "traces" / f"{model}-{dispatch}-b{batch}" if profile else None
        dumped = _dumped()
        rec = measure_case(model, dispatch, batch, prompt_len, gen_len, steps, where)
        rec["hlo"] = _new_dumps(dumped, out_dir)
        gc.collect()                               # the case's weights go before the next case's arrive
        print(json.dumps(rec), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    if not calibrated:
        _calibrate(out_dir, meta["preset"], calibrate_quick, deadline_s - (time.perf_counter() - start))


def _dump_dir() -> Path | None:
    """Where XLA dumps the compiled programs (``--xla_dump_to`` in XLA_FLAGS), None when it does not."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_dump_to="):
            return Path(flag.split("=", 1)[1])
    return None


def _dumped() -> set[Path]:
    where = _dump_dir()
    return set(where.glob("*after_optimizations.txt")) if where and where.is_dir() else set()


def _new_dumps(before: set[Path], out_dir: Path) -> dict[str, str]:
    """The optimized HLO of the case's prefill and decode that XLA dumped while it ran, as paths relative to
    `out_dir` where they lie inside it."""
    found = {}
    for f in sorted(_dumped() - before, key=lambda f: f.stat().st_mtime):
        for phase in ("prefill", "decode"):
            if f"_{phase}." in f.name:
                found[phase] = str(f.relative_to(out_dir)) if f.is_relative_to(out_dir) else str(f)
    return found


def op_tables(out_dir: Path, rec: dict, hw) -> dict[str, list[dict]]:
    """For each phase whose compiled HLO and kernel trace the measurement kept: the traced kernels joined to the
    program's ops by name and summed by category, measured against predicted (`moe_jax.runtime.oprofile`):
    which term of a prediction is off."""
    import glob

    from moe_jax.costs.walk import walk
    from moe_jax.perf.timemodel import op_seconds
    from moe_jax.runtime.oprofile import compare_ops, device_kernel_seconds
    from moe_jax.runtime.run import PROFILED_DECODE_STEPS

    traces = glob.glob(str(out_dir / "traces" / f"{rec['model']}-{rec['dispatch']}-b{rec['batch']}" / "**" /
                           "perfetto_trace.json.gz"), recursive=True)
    tables = {}
    for phase, calls in (("prefill", 1), ("decode", PROFILED_DECODE_STEPS)):
        hlo = rec.get("hlo", {}).get(phase)
        if not traces or not hlo or not (out_dir / hlo).is_file():
            continue
        ops = walk((out_dir / hlo).read_text(), {"dp": 1, "pp": 1, "ep": 1, "tp": 1}).ops
        predicted = {op.name: op_seconds(op, hw)[0] for op in ops if not op.collective}
        measured = device_kernel_seconds(traces[0], f"jit__{phase}", calls)
        tables[phase] = [c.__dict__ for c in compare_ops(ops, predicted, measured, unjoined=True)]
    return tables


def _calibrate(out_dir: Path, preset: str, quick: bool, left_s: float) -> bool:
    """`moe-jax calibrate` of this device beside the preset, written as ``<preset>-calibrated.toml``."""
    if left_s < 90 and not quick:
        print(f"calibration skipped: {left_s:.0f} s left", flush=True)
        return True
    from moe_jax.hardware.calibration import write_hardware_toml
    from moe_jax.runtime.calibrate import calibrate, calibrated_hardware

    t = time.perf_counter()
    try:
        hw_cal = calibrated_hardware(calibrate(quick=quick), base=None if quick else preset)
    except Exception as e:
        print(f"calibration failed: {type(e).__name__}: {e}", flush=True)
        return True
    where = out_dir / f"{hw_cal.name}.toml"
    write_hardware_toml(hw_cal, hw_cal.calibration, where, overwrite=True)
    print(f"calibrated in {time.perf_counter() - t:.0f} s: {where}", flush=True)
    return True


def read_measured(out_dir: Path) -> tuple[dict, list[dict]]:
    """The measurement's metadata and its case records (the last record of each case wins)."""
    meta, rows = {}, {}
    for line in (out_dir / "measured.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("meta"):
            meta = rec
        else:
            rows[(rec["model"], rec["dispatch"], rec["batch"])] = rec
    return meta, list(rows.values())


def predict(out_dir: Path, backend: str, hardware: list) -> tuple[dict, list[dict]]:
    """Each measured case predicted by `analyze` on `backend` for each hardware; (meta, records with predictions)."""
    from moe_jax.config import get_model
    from moe_jax.costs.compile import Workload
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.perf.analysis import analyze

    meta, rows = read_measured(out_dir)
    for rec in rows:
        if "skip" in rec:
            continue
        cfg = get_model(rec["model"]).replace(dispatch=rec["dispatch"])
        w = rec["workload"]
        workload = Workload(w["batch"], w["prompt_len"], w["gen_len"])
        rec["predicted"] = {}
        for hw in hardware:
            t = time.perf_counter()
            try:
                a = analyze(cfg, Strategy(), hw, workload, backend=backend)
            except Exception as e:
                rec["predicted"][hw.name] = f"analyze failed: {str(e).splitlines()[0][:100]}"
                continue
            p = a.prediction
            if p is not None and "mfu" not in rec:
                # measured utilisation: the prediction's useful FLOPs and bytes a step must read, over the
                # measured times (MBU counts the weights a step reads, the experts its tokens touch, not all)
                rec["mfu"], rec["mbu"] = p.mfu * p.ttft_s / rec["ttft"], p.mbu * p.tpot_s / rec["tpot"]
            rec["predicted"][hw.name] = None if p is None else {
                "ttft": p.ttft_s, "tpot": p.tpot_s, "compiled_for": a.cost.compiled_for,
                "terms": {"prefill": (p.prefill.compute_s, p.prefill.memory_s, p.prefill.comm_s),
                          "decode": (p.decode.compute_s, p.decode.memory_s, p.decode.comm_s)}}
            if hw is hardware[0]:
                rec["ops"] = op_tables(out_dir, rec, hw)
            print(f"{rec['model']} {rec['dispatch']} b{rec['batch']} on {hw.name}: predicted in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
    return meta, rows


def report(meta: dict, rows: list[dict], hardware: list, backend: str, command: str, dry_run: bool) -> list[str]:
    """RESULTS-gpu.md: one row per (case, hardware) and the capacity-against-dropless table."""
    lines = [f"# GPU validation: predicted against measured{' (dry run: tiny model on CPU)' if dry_run else ''}",
             "", f"- measured on: {meta.get('device_kind')} ({meta.get('machine')}), jax {meta.get('jax')}, "
             f"flax {meta.get('flax', '?')}, {meta.get('date')}",
             f"- predicted on: {platform.node()}, the deviceless `{backend}` backend, "
             f"jax {_jax_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- command: `{command}`",
             f"- workload: prompt {meta.get('prompt_len')}, TTFT the median of 2 prefills, TPOT the median of "
             f"{meta.get('steps', 0) - 1} decode steps (the first compiles); one device, random bf16 weights",
             *[f"- {hw.name}: calibrated before `moe-jax calibrate` took the cost of a loop iteration off its looped "
               "samples (XLA:GPU drives loops from the host, ~10 us an iteration): its small ops are overstated"
               for hw in hardware if hw.calibration is not None
               and "samples_loop_iteration" not in hw.calibration.meta],
             "", "| model | dispatch | batch | hardware | TTFT measured | TTFT predicted | error | TPOT measured | "
             "TPOT predicted | error | MFU | MBU | decode terms (compute/memory/comm ms) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rec in rows:
        head = f"| {rec['model']} | {rec['dispatch']} | {rec['batch']} |"
        if "skip" in rec:
            lines.append(f"{head} - | {rec['skip']} | | | | | | | | |")
            continue
        for hw in hardware:
            p = rec["predicted"].get(hw.name)
            measured = (f"{rec['ttft'] * 1e3:.2f} ms", f"{rec['tpot'] * 1e3:.3f} ms")
            if not isinstance(p, dict):
                lines.append(f"{head} {hw.name} | {measured[0]} | {p} | | {measured[1]} | | | | | |")
                continue
            terms = "/".join(f"{t * 1e3:.2f}" for t in p["terms"]["decode"])
            lines.append(f"{head} {hw.name} | {measured[0]} | {p['ttft'] * 1e3:.2f} ms | "
                         f"{(p['ttft'] - rec['ttft']) / rec['ttft']:+.0%} | {measured[1]} | {p['tpot'] * 1e3:.3f} ms | "
                         f"{(p['tpot'] - rec['tpot']) / rec['tpot']:+.0%} | {rec['mfu']:.1%} | {rec['mbu']:.1%} | "
                         f"{terms} |")
    return lines + _dispatch_table(rows) + _op_report(rows, hardware[0].name)


def _op_report(rows, hw_name: str) -> list[str]:
    """Each traced call's kernels against the time model's ops, by category (what `op_tables` found)."""
    cases = [r for r in rows if r.get("ops")]
    if not cases:
        return []
    out = ["", f"## Which term is off: traced kernels against the predicted ops ({hw_name})", "",
           "One more prefill and each of the next decode steps traced by jax.profiler after the timed runs; each "
           "kernel joined by name to the op of the compiled program it runs (the compile that ran, dumped by XLA), "
           "the op predicted from the same program text. Kernels no op names (cuBLAS, the memcpy of a layer's "
           "slice copy) are measured apart; their prediction sits in their op's category.", "",
           "| model | batch | phase | category | ops | measured | predicted | GB |",
           "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in cases:
        for phase, table in r["ops"].items():
            for c in table:
                out.append(f"| {r['model']} | {r['batch']} | {phase} | {c['category']} | {c['ops']} | "
                           f"{c['measured_s'] * 1e3:.2f} ms | {c['predicted_s'] * 1e3:.2f} ms | "
                           f"{c['bytes'] / 1e9:.2f} |")
    return out


def _jax_version() -> str:
    import jax

    return jax.__version__


def _dispatch_table(rows) -> list[str]:
    """Capacity against dropless, measured in the same run, for every (model, batch) measured both ways."""
    by = {(r["model"], r["batch"], r["dispatch"]): r for r in rows if "skip" not in r}
    pairs = [(m, b) for m, b, d in by if d == "dropless" and (m, b, "capacity") in by]
    if not pairs:
        return []
    out = ["", "## Capacity against dropless dispatch (measured)", "",
           "| model | batch | TTFT capacity | TTFT dropless | dropless / capacity | TPOT capacity | TPOT dropless | "
           "dropless / capacity |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, b in pairs:
        c, d = by[(m, b, "capacity")], by[(m, b, "dropless")]
        out.append(f"| {m} | {b} | {c['ttft'] * 1e3:.2f} ms | {d['ttft'] * 1e3:.2f} ms | {d['ttft'] / c['ttft']:.2f} | "
                   f"{c['tpot'] * 1e3:.3f} ms | {d['tpot'] * 1e3:.3f} ms | {d['tpot'] / c['tpot']:.2f} |")
    return out


def _parse_cases(text: str, ap: argparse.ArgumentParser) -> list[tuple[str, str, int]]:
    """``MODEL:DISPATCH:BATCH,...`` as cases; a malformed one stops with argparse's usage error (status 2)."""
    from moe_jax.config import get_model
    from moe_jax.errors import MoeJaxError

    cases = []
    for c in text.split(","):
        parts = c.split(":")
        if len(parts) != 3 or parts[1] not in ("capacity", "dropless") or not parts[2].isdigit():
            ap.error(f"--cases: {c!r} is not MODEL:DISPATCH:BATCH (DISPATCH capacity or dropless, BATCH a number)")
        try:
            get_model(parts[0])
        except MoeJaxError as e:
            ap.error(f"--cases: {e}")
        cases.append((parts[0], parts[1], int(parts[2])))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, both halves")
    ap.add_argument("--measure-to", type=Path, help="the GPU half only: measurements into this folder")
    ap.add_argument("--predict-from", type=Path, help="the other half only: predict a folder's measurements")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-gpu.md")
    ap.add_argument("--steps", type=int, default=6, help="decode steps run per case (the first compiles)")
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds the GPU half may take")
    ap.add_argument("--no-profile", action="store_true", help="skip the jax.profiler trace of each case")
    ap.add_argument("--no-calibrate", action="store_true", help="skip `moe-jax calibrate` of the GPU")
    ap.add_argument("--cases", help="MODEL:DISPATCH:BATCH,... instead of the default list, in this order")
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        dry = args.measure_to or args.out.with_suffix(".d")
        if "--xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):      # the programs, for the op tables
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dry / 'hlo'} "
                                       "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*_(prefill|decode)").strip()
    import jax

    from moe_jax.hardware.presets import get_hardware

    work = args.predict_from or args.measure_to or (args.out.parent / "gpu_measured")
    if args.dry_run:
        work = dry
        (work / "measured.jsonl").unlink(missing_ok=True)
        measure(work, DRY_CASES, 64, 16, 4, args.deadline, calibrate_quick=True, profile=not args.no_profile)
    elif args.predict_from is None:
        if jax.devices()[0].platform != "gpu":
            sys.exit(f"no GPU: jax sees {jax.devices()[0].platform}; use --dry-run, or --predict-from a folder")
        cases = CASES if not args.cases else _parse_cases(args.cases, ap)
        measure(work, cases, 2048, 128, args.steps, args.deadline, calibrate_quick=False,
                profile=not args.no_profile, calibrate=not args.no_calibrate)
    if args.measure_to is not None and not args.dry_run:
        return
    meta, _ = read_measured(work)
    calibrated = [get_hardware(p) for p in sorted(work.glob("*.toml"))]
    # a dry run measures the CPU: only its own calibration describes it
    hardware = calibrated if args.dry_run and calibrated else [get_hardware(meta.get("preset", "h200")), *calibrated]
    backend = "cpu" if args.dry_run else "gpu"
    meta, rows = predict(work, backend, hardware)
    command = "python bench/gpu_validate.py" + (" --dry-run" if args.dry_run else
                                                f" --predict-from {args.predict_from}" if args.predict_from else "")
    lines = report(meta, rows, hardware, backend, command, args.dry_run)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
