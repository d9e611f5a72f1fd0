"""What FP8 weights buy in the compiled program: decode and prefill bytes, TPOT, TTFT and temporaries.

seed-30b on one device (batch 8, prompt 2048, generate 256), compiled with the hardware's own compiler
(deviceless H200; TPU v5p where libtpu is installed) in three ways:

- bf16: the weights in bf16;
- fp8, dequantized reads: FP8 weights dequantized where each layer reads them and multiplied as bf16
  (how `moe_jax.model.quant` first ran: `moe_jax.model.layers.weight_einsum` told nothing of the FP8 values);
- fp8: `weight_einsum` multiplies the FP8 values as stored and scales the output (the program now).

On TPU each layer's fusion re-tiles the windows it reads of the stacked FP8 weights (T(32,128) to T(8,128), nested
one fusion deeper): counted as one layer's read (`moe_jax.costs.walk`; before, the whole stack per layer: 6.98x).

    .venv/bin/python bench/fp8_program.py [--hardware h200,tpu-v5p] [--no-append]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("bf16", "fp8, dequantized reads", "fp8")

_CHILD = r"""
import json, sys
case = json.loads(sys.argv[1])
from moe_jax.parallel.devices import request_cpu_devices
request_cpu_devices(1)
from moe_jax import Strategy, Workload, get_model
from moe_jax.perf.analysis import analyze
from moe_jax.hardware.presets import get_hardware
from moe_jax.costs.hlo import largest_results
import moe_jax.model.layers as layers
cfg = get_model(case["model"])
if case["mode"] != "bf16":
    cfg = cfg.replace(weight_dtype="float8_e4m3fn")
if case["mode"] == "fp8, dequantized reads":
    layers.fp8_source = lambda w: None           # every matmul multiplies the dequantized weight
a = analyze(cfg, Strategy.parse("EP1-TP1-PP1-DP1"), get_hardware(case["hardware"]), Workload(8, 2048, 256))
pre, dec = a.cost.phases["prefill"], a.cost.phases["decode"]
print("RESULT " + json.dumps({
    "backend": a.cost.backend, "weights": dec.memory.weights, "decode": dec.hbm_bytes, "prefill": pre.hbm_bytes,
    "decode_temps": dec.memory.temporaries, "prefill_temps": pre.memory.temporaries,
    "largest": largest_results(dec.hlo_text, 1)[0][0],
    "tpot": a.prediction.tpot_s if a.prediction else None, "ttft": a.prediction.ttft_s if a.prediction else None}))
"""


def _row(hw: str, mode: str, r: dict, base: dict | None) -> str:
    """One table row from a compile's numbers `r` (ratios to the bf16 compile's, `base`, where there is one)."""
    def ratio(key: str) -> str:
        return f" ({r[key] / base[key]:.2f}x)" if base else ""

    def ms(key: str) -> str:
        return f"{r[key] * 1e3:.2f}" if r[key] is not None else "-"

    return (f"| {hw} | {mode} | {r['backend']} | {r['weights'] / 1e9:.2f} | {r['decode'] / 1e9:.2f}{ratio('decode')} | "
            f"{r['prefill'] / 1e9:.1f}{ratio('prefill')} | {ms('tpot')} | {ms('ttft')} | "
            f"{r['decode_temps'] / 1e9:.2f} | {r['largest'] / 1e9:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="h200,tpu-v5p", help="comma-separated hardware presets")
    ap.add_argument("--model", default="seed-30b")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per compile")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    from results import run_child

    table = ["| hardware | weights | compiler | weights GB | decode HBM GB (x bf16) | prefill HBM GB (x bf16) | "
             "TPOT ms | TTFT ms | decode temporaries GB | largest decode buffer GB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for hw in args.hardware.split(","):
        base = None
        for mode in MODES:
            r = run_child(_CHILD, {"model": args.model, "hardware": hw, "mode": mode}, args.timeout)
            if "error" in r:
                table.append(f"| {hw} | {mode} | error: {r['error'][:120]} |" + " |" * 7)
                print(table[-1], flush=True)
                continue
            base = r if mode == "bf16" else base
            table.append(_row(hw, mode, r, base))
            print(table[-1], flush=True)
    text = "\n".join(table)
    print(text)
    if not args.no_append:
        from results import append

        append("FP8 weights in the compiled program", text, (
            f"{args.model} on one device, batch 8, prompt 2048, generate 256; deviceless compiles for the preset "
            "named; 'fp8, dequantized reads' is the program before weight_einsum read FP8 values as stored "
            "(reproduced by withholding moe_jax.model.quant.fp8_source)",))


if __name__ == "__main__":
    main()
