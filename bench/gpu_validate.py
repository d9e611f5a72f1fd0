"""Predictions against measurements on one NVIDIA GPU: run, analyze (real and deviceless), compare.

For each model that fits on the one device (seed-30b, qwen3-30b-a3b, mixtral-8x7b with
random bf16 weights) at batch 1, 8 and 64, prompt 2048, 128 generated tokens: measure
TTFT and a few decode steps (TPOT), derive MFU (prefill) and MBU (decode), and predict
the same program with `analyze` on the `real` backend and on the deviceless `gpu`
target, with the preset's figures, and on the `real` backend with this GPU's own
calibration (`moe-jax calibrate`, run first and written beside the results as a
hardware TOML). Writes bench/RESULTS-gpu.md (predicted, measured, error per case). Goal: TPOT
error under 10%, TTFT under 15%. Then qwen3-30b-a3b at batch 8 and 64 again with dropless
dispatch: capacity against dropless, measured side by side.

    python bench/gpu_validate.py            # on the GPU machine (installs moe-jax without touching jax)
    python bench/gpu_validate.py --dry-run  # tiny model on CPU, same code path (CI runs this)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("seed-30b", "qwen3-30b-a3b", "mixtral-8x7b")
BATCHES = (1, 8, 64)
DISPATCH_CASES = (("qwen3-30b-a3b", 8), ("qwen3-30b-a3b", 64))
"""Measured a second time with dropless dispatch (the first pass uses each model's capacity dispatch)."""


def ensure_installed() -> None:
    """Install moe-jax and its light dependencies without reinstalling jax, flax, optax or chex."""
    try:
        import rich  # noqa: F401

        import moe_jax  # noqa: F401
        return
    except ImportError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "click", "rich", "matplotlib", "safetensors"],
                   check=True)


def case(cfg, hw, batch, prompt_len, gen_len, steps, backends):
    from moe_jax.costs.compile import Workload
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.perf.analysis import analyze
    from moe_jax.runtime.run import run

    workload = Workload(batch, prompt_len, gen_len)
    needed = cfg.params_total * cfg.dtype_bytes + batch * workload.cache_len * cfg.kv_bytes_per_token
    row = {"model": cfg.name, "batch": batch, "dispatch": cfg.dispatch}
    if needed > hw.memory_bytes:
        row["skip"] = f"needs {needed / 1e9:.0f} GB of weights + KV > {hw.memory_bytes / 1e9:.0f} GB"
        return row
    try:
        r = run(cfg, Strategy(), workload, hardware=None, repeats=2, max_steps=steps, predict=False)
    except Exception as e:  # out of memory on the device is a result for this case
        row["skip"] = f"run failed: {str(e).splitlines()[0][:120]}"
        return row
    row["ttft"], row["tpot"] = r.ttft.median, r.tpot.median
    from moe_jax.costs.analytic import analytic_flops

    useful = analytic_flops(cfg, workload, "prefill").useful     # the head once per sequence, as served
    row["mfu"] = useful / (hw.peak_flops * r.ttft.median)
    row["mbu"] = (cfg.params_total * cfg.dtype_bytes + batch * workload.cache_len * cfg.kv_bytes_per_token) / (
        hw.hbm_bandwidth * r.tpot.median)
    for label in backends:
        backend, hw_used = (label, hw) if isinstance(label, str) else (label[0], label[1])
        label = backend if isinstance(label, str) else f"{backend} on {hw_used.name}"
        try:
            a = analyze(cfg, Strategy(), hw_used, workload, backend=backend)
        except Exception as e:
            row[label] = f"analyze failed: {str(e).splitlines()[0][:100]}"
            continue
        p = a.prediction
        row[label] = None if p is None else {
            "ttft": p.ttft_s, "tpot": p.tpot_s,
            "terms": {"prefill": (p.prefill.compute_s, p.prefill.memory_s, p.prefill.comm_s),
                      "decode": (p.decode.compute_s, p.decode.memory_s, p.decode.comm_s)}}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, same code path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-gpu.md"))
    ap.add_argument("--steps", type=int, default=6, help="decode steps timed per case")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip `moe-jax calibrate` of this GPU (its predictions are shown beside the preset's)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        ensure_installed()
    import jax

    from moe_jax.config import get_model
    from moe_jax.hardware.presets import get_hardware

    device = jax.devices()[0]
    if args.dry_run:
        cfg_list, hw, backends = [get_model("tiny")], get_hardware("h200"), ("cpu",)
        batches, prompt_len, gen_len = (1, 8), 64, 16
        dispatch_cases = (("tiny", 8),)
    else:
        if device.platform != "gpu":
            sys.exit(f"no GPU: jax sees {device.platform}; use --dry-run")
        kind = device.device_kind.lower()
        hw = get_hardware("h200" if "h200" in kind else "h100" if "h100" in kind else "b200" if "b200" in kind
                          else "a100-80g")
        cfg_list, backends = [get_model(m) for m in MODELS], ("real", "gpu")
        batches, prompt_len, gen_len = BATCHES, 2048, 128
        dispatch_cases = DISPATCH_CASES
    if not args.no_calibrate:       # this device measured first (moe-jax calibrate), predicted on beside the preset
        from moe_jax.hardware.calibration import write_hardware_toml
        from moe_jax.runtime.calibrate import calibrate, calibrated_hardware

        hw_cal = calibrated_hardware(calibrate(quick=args.dry_run), base=None if args.dry_run else hw)
        where = Path(args.out).with_name(f"{hw_cal.name}.toml")
        write_hardware_toml(hw_cal, hw_cal.calibration, where, overwrite=True)
        print(f"calibrated: {where}", flush=True)
        backends = (*backends, ("real", hw_cal))
    start = time.perf_counter()
    rows = []
    for cfg in cfg_list:
        for b in batches:
            row = case(cfg, hw, b, prompt_len, gen_len, args.steps, backends)
            rows.append(row)
            print(row, flush=True)
    for name, b in dispatch_cases:
        row = case(get_model(name).replace(dispatch="dropless"), hw, b, prompt_len, gen_len, args.steps, backends)
        rows.append(row)
        print(row, flush=True)
    lines = [f"# GPU validation: predicted against measured ({'dry run: tiny model on CPU' if args.dry_run else ''})",
             "", f"- device: {getattr(device, 'device_kind', device.platform)}; hardware preset {hw.name}; "
             f"jax {jax.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{time.perf_counter() - start:.0f} s",
             f"- command: `python bench/gpu_validate.py{' --dry-run' if args.dry_run else ''}`",
             f"- workload: prompt {prompt_len}, {gen_len} generated ({args.steps} decode steps timed); one device",
             "", "| model | dispatch | batch | backend | TTFT measured | TTFT predicted | error | TPOT measured | "
             "TPOT predicted | error | MFU | MBU | decode terms (compute/memory/comm ms) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if "skip" in row:
            lines.append(f"| {row['model']} | {row['dispatch']} | {row['batch']} | - | {row['skip']} | | | | | | | | |")
            continue
        for label in backends:
            backend = label if isinstance(label, str) else f"{label[0]} on {label[1].name}"
            p = row.get(backend)
            if not isinstance(p, dict):
                lines.append(f"| {row['model']} | {row['dispatch']} | {row['batch']} | {backend} | "
                             f"{row['ttft'] * 1e3:.2f} ms | {p} | | "
                             f"{row['tpot'] * 1e3:.3f} ms | | | | | |")
                continue
            terms = "/".join(f"{t * 1e3:.2f}" for t in p["terms"]["decode"])
            lines.append(
                f"| {row['model']} | {row['dispatch']} | {row['batch']} | {backend} | {row['ttft'] * 1e3:.2f} ms | "
                f"{p['ttft'] * 1e3:.2f} ms | "
                f"{(p['ttft'] - row['ttft']) / row['ttft']:+.0%} | {row['tpot'] * 1e3:.3f} ms | "
                f"{p['tpot'] * 1e3:.3f} ms | "
                f"{(p['tpot'] - row['tpot']) / row['tpot']:+.0%} | {row['mfu']:.1%} | {row['mbu']:.1%} | {terms} |")
    lines += _dispatch_table(rows)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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


if __name__ == "__main__":
    main()
