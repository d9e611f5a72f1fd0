"""Decode-step kernels on one GPU, measured side by side: weights and KV cache read in place against gemms.

On the GPU, moe-jax can write a decode step's small products as a multiply and a reduction that read a weight
(or the KV cache) where it is stored (`Kernels.in_place_weight_einsum`, `Kernels.in_place_decode_attention`,
up to `Kernels.max_in_place_rows` rows per matrix), instead of a gemm that XLA feeds with a copy of the layer's
slice. Which is faster is a property of the hardware's kernels, so it is measured here: for each model and
batch, one set of random bf16 weights, and for each variant of the kernels a decode step compiled and timed
(the median of `--steps` steps, each blocking on its logits, against a cache of prompt + 128 positions), with
one more step traced by ``jax.profiler`` (each kernel's device time).

    python bench/gpu_decode_kernels.py --out DIR              # on the GPU machine: DIR/decode_kernels.json, traces
    python bench/gpu_decode_kernels.py --report DIR           # anywhere: the table, appended to bench/RESULTS.md
    python bench/gpu_decode_kernels.py --dry-run --out DIR    # the tiny model on CPU, the same code path
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "in place <=16 rows, attention in place": {"max_in_place_rows": 16, "in_place_decode_attention": True},
    "in place <=16 rows, attention gemm": {"max_in_place_rows": 16, "in_place_decode_attention": False},
    "in place <=8 rows, attention gemm": {"max_in_place_rows": 8, "in_place_decode_attention": False},
    "in place <=4 rows, attention gemm": {"max_in_place_rows": 4, "in_place_decode_attention": False},
    "in place <=2 rows, attention gemm": {"max_in_place_rows": 2, "in_place_decode_attention": False},
    "in place 1 row, attention gemm": {"max_in_place_rows": 1, "in_place_decode_attention": False},
    "in place 1 row, attention in place": {"max_in_place_rows": 1, "in_place_decode_attention": True},
    "gemm only": {"max_in_place_weight": False, "in_place_decode_attention": False},
}
"""Each variant's `Kernels` fields (``max_in_place_weight: False`` turns the in-place weight products off)."""
CASES = (("qwen3-30b-a3b", (1, 8, 64)), ("mixtral-8x7b", (8,)))


def time_variant(cfg, mesh, params, batch: int, cache_len: int, variant: dict, steps: int,
                 trace_dir: Path | None) -> dict:
    """Compile one decode step with `variant`'s kernels and time `steps` steps (each blocking)."""
    import jax
    import jax.numpy as jnp

    from moe_jax.model.execution import Kernels
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.programs.sharded import ShardedModel

    fields = dict(variant)
    weight = fields.pop("max_in_place_weight", True)
    kernels = replace(Kernels.of_mesh(mesh), **fields)
    if not weight:
        kernels = replace(kernels, in_place_weight_einsum=False)
    sm = ShardedModel(cfg, Strategy(), mesh, kernels=kernels)
    cache = sm.init_cache(batch, cache_len)
    token = sm.put_tokens(jnp.ones((batch, 1), jnp.int32))
    pos = cache_len - steps - 3
    start = time.perf_counter()
    step = sm.decode(params, token, jnp.int32(pos), cache)
    jax.block_until_ready(step.logits)
    compile_s = time.perf_counter() - start
    cache, samples = step.cache, []
    for i in range(steps):
        start = time.perf_counter()
        step = sm.decode(params, token, jnp.int32(pos + 1 + i), cache)
        jax.block_until_ready(step.logits)
        samples.append(time.perf_counter() - start)
        cache = step.cache
    kernels_s = None
    if trace_dir is not None:
        kernels_s = _device_seconds(lambda: jax.block_until_ready(
            sm.decode(params, token, jnp.int32(pos + steps + 1), cache).logits), trace_dir)
    return {"compile_s": compile_s, "tpot_samples": samples, "tpot": statistics.median(samples),
            "device_kernels_s": kernels_s}


def _device_seconds(fn, where: Path) -> float | None:
    """Seconds of device kernels during one call of `fn`, from a ``jax.profiler`` trace (the events of the
    trace's ``/device:`` processes; None when it has none, as on CPU)."""
    import tempfile

    import jax

    from moe_jax.runtime.oprofile import perfetto_traces, quiet_profile_options, read_trace

    with tempfile.TemporaryDirectory(dir=where) as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=quiet_profile_options()):
            fn()
        found = perfetto_traces(tmp)
        if not found:
            return None
        events = read_trace(found[0])
    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    total = sum(e["dur"] for e in events if e.get("ph") == "X" and e.get("pid") in devices) * 1e-6
    return total or None


def measure(out: Path, cases, steps: int, prompt_len: int, gen_len: int, trace: bool,
            deadline_s: float = float("inf"), variants: dict | None = None) -> None:
    """Every (model, batch, variant) until `deadline_s` has passed, written to DIR/decode_kernels.json as it goes."""
    import jax

    from moe_jax.config import get_model
    from moe_jax.parallel.mesh import Strategy, build_mesh
    from moe_jax.programs.sharded import ShardedModel

    variants = variants or VARIANTS
    out.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    device = jax.devices()[0]
    results = {"device_kind": getattr(device, "device_kind", device.platform), "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": steps,
               "cache_len": prompt_len + gen_len, "rows": []}
    for model, batches in cases:
        if time.perf_counter() - begun > deadline_s:
            print(f"deadline: {model} not measured", flush=True)
            continue
        cfg = get_model(model)
        mesh = build_mesh(Strategy(), jax.devices()[:1])
        params = ShardedModel(cfg, Strategy(), mesh).init_params(0)
        for batch in batches:
            for name, variant in variants.items():
                row = {"model": model, "batch": batch, "variant": name}
                if time.perf_counter() - begun > deadline_s:
                    continue
                try:
                    row.update(time_variant(cfg, mesh, params, batch, prompt_len + gen_len, variant, steps,
                                            out if trace else None))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                (out / "decode_kernels.json").write_text(json.dumps(results, indent=1))
                gc.collect()
        del params
        gc.collect()


def report(out: Path) -> list[str]:
    data = json.loads((out / "decode_kernels.json").read_text())
    lines = [f"### Decode kernels on {data['device_kind']}: in place against gemm (measured)", "",
             f"- command: `python bench/gpu_decode_kernels.py` on {data['device_kind']}, jax {data['jax']}, "
             f"{data['date']}; TPOT the median of {data['steps']} decode steps (each blocking on its logits), "
             f"cache {data['cache_len']} positions, random bf16 weights; device time = the kernels of one traced step",
             "", "| model | batch | variant | TPOT | device time | compile |", "|---|---:|---|---:|---:|---:|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['error']} | | |")
            continue
        dev = f"{r['device_kernels_s'] * 1e3:.2f} ms" if r.get("device_kernels_s") else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['tpot'] * 1e3:.2f} ms | {dev} | "
                     f"{r['compile_s']:.1f} s |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="measure into this folder")
    ap.add_argument("--report", type=Path, help="print the table of a folder's measurements and append it to "
                                                 "bench/RESULTS.md")
    ap.add_argument("--dry-run", action="store_true", help="the tiny model on CPU")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--variants", help="variant names separated by semicolons (default: all)")
    ap.add_argument("--batches", help="comma-separated batches (default: each model's)")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no case starts")
    args = ap.parse_args()
    if args.report:
        lines = report(args.report)
        print("\n".join(lines))
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        return
    if args.out is None:
        ap.error("--out DIR or --report DIR")
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        measure(args.out, (("tiny", (1, 8)),), 3, 64, 16, trace=True)
    else:
        variants = {n: VARIANTS[n] for n in args.variants.split(";")} if args.variants else None
        cases = CASES if not args.batches else tuple(
            (m, tuple(b for b in map(int, args.batches.split(",")) if b in bs) or bs) for m, bs in CASES)
        measure(args.out, cases, args.steps, 2048, 128, trace=True, deadline_s=args.deadline, variants=variants)
    print("\n".join(report(args.out)))


if __name__ == "__main__":
    main()
