"""Capacity against dropless dispatch, side by side in one run: compiled cost and, for a small model, CPU time.

Part 1 (compiled): qwen3-30b-a3b on EP8 at batch 8 and 64, prompt 2048, with capacity
dispatch, strict dropless (worst-case buffer) and dropless with the buffer bounded at 2x
the expected rows: per-device matmul FLOPs and HBM bytes of prefill and decode, peak
memory, the ragged all-to-all's expected and worst-case bytes, and TTFT / TPOT
predicted; on the cpu backend (8 fake devices, for h200) and, when libtpu is installed,
on a deviceless TPU v5p:2x2x2 (for tpu-v5p), where dropless compiles to the native
ragged all-to-all and grouped-matmul kernel. Part 2 (measured): the tiny model's sharded prefill and decode step timed
on the 8 emulated CPU devices, median of repeated runs, both methods in the same process
(the devices share 2 cores: a relative number, not a GPU claim). The GPU measurement of
the same comparison is in bench/gpu_validate.py.

    .venv/bin/python bench/dispatch_compare.py [--batches 8,64] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


METHODS = (("capacity", None), ("dropless", None), ("dropless", 2.0))


def compiled_rows(batches, backend: str) -> list[str]:
    from moe_jax.config import get_model
    from moe_jax.costs.compile import Workload
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.perf.analysis import analyze

    hw = get_hardware("h200" if backend == "cpu" else "tpu-v5p")
    kw = {"topology": "v5p:2x2x2"} if backend == "tpu" else {}
    strategy = Strategy.parse("EP8")
    rows = []
    for batch in batches:
        for dispatch, buffer in METHODS:
            cfg = get_model("qwen3-30b-a3b").replace(dispatch=dispatch, dropless_buffer=buffer)
            a = analyze(cfg, strategy, hw, Workload(batch, 2048, 128), backend=backend, **kw)
            pre, dec = a.cost.phases["prefill"], a.cost.phases["decode"]
            ragged = [c for c in pre.collective_summary() if "worst_bytes" in c]
            exchange = (f"{sum(c['bytes'] for c in ragged) / 1e9:.2f} / "
                        f"{sum(c['worst_bytes'] for c in ragged) / 1e9:.2f}"
                        if ragged else "-")
            p = a.prediction
            name = dispatch if buffer is None else f"{dispatch} (buffer {buffer:g}x)"
            rows.append(f"| {backend} | {batch} | {name} | {pre.matmul_flops:.3e} | {pre.hbm_bytes / 1e9:.1f} | "
                        f"{dec.hbm_bytes / 1e9:.2f} | {a.memory['total'] / 1e9:.1f} | {exchange} | "
                        f"{p.ttft_s * 1e3:.1f} | {p.tpot_s * 1e3:.2f} |")
            print(rows[-1], flush=True)
    return rows


def measured_rows(repeats: int) -> list[str]:
    import jax
    import jax.numpy as jnp

    from moe_jax.config import get_model
    from moe_jax.parallel.mesh import Strategy
    from moe_jax.programs.sharded import ShardedModel
    from moe_jax.runtime.run import time_call

    rows = []
    for batch, length in ((8, 256), (64, 64)):
        times = {}
        for dispatch in ("capacity", "dropless"):
            sm = ShardedModel(get_model("tiny").replace(dispatch=dispatch), Strategy.parse("EP4-TP2"))
            params = sm.init_params(0)
            tokens = sm.put_tokens(jax.random.randint(jax.random.key(1), (batch, length), 0, 256))
            cache = sm.init_cache(batch, length + 1)
            pre = time_call(sm.prefill, params, tokens, cache, repeats=repeats)
            step_tokens = sm.put_tokens(jnp.zeros((batch, 1), jnp.int32))
            dec = time_call(sm.decode, params, step_tokens, jnp.int32(length), sm.init_cache(batch, length + 1),
                            repeats=repeats)
            times[dispatch] = (pre.median, dec.median)
        c, d = times["capacity"], times["dropless"]
        rows.append(f"| tiny | {batch} x {length} | {c[0] * 1e3:.1f} | {d[0] * 1e3:.1f} | {d[0] / c[0]:.2f} | "
                    f"{c[1] * 1e3:.2f} | {d[1] * 1e3:.2f} | {d[1] / c[1]:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    from moe_jax.parallel.devices import request_cpu_devices

    request_cpu_devices(8)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    part1 = ["| backend | batch | dispatch | prefill matmul FLOPs / device | prefill HBM GB | decode HBM GB | "
             "peak GB | ragged exchange GB expected / worst (prefill) | TTFT ms | TPOT ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    batches = [int(b) for b in args.batches.split(",")]
    part1 += compiled_rows(batches, "cpu")
    try:
        import libtpu  # noqa: F401
        part1 += compiled_rows(batches, "tpu")
    except ImportError:
        print("libtpu not installed: no TPU rows", file=sys.stderr)
    part2 = ["| model | batch x prompt | prefill capacity ms | prefill dropless ms | ratio | decode capacity ms | "
             "decode dropless ms | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    part2 += measured_rows(args.repeats)
    table = "\n".join(part1) + "\n\n" + "\n".join(part2)
    print(table)
    if not args.no_append:
        from results import append

        append("Capacity against dropless dispatch", table, (
            "part 1: qwen3-30b-a3b on EP8, prompt 2048, compiled on the cpu backend (8 fake devices, predicted "
            "for h200) and on a deviceless TPU v5p:2x2x2 (predicted for tpu-v5p); part 2: tiny model on EP4-TP2, "
            "8 emulated CPU devices sharing the host's cores, median of "
            f"{args.repeats} runs after a warm-up, both methods in the same process",))


if __name__ == "__main__":
    main()
