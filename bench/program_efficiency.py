"""How close the compiled program is to the hardware's limit: bytes and FLOPs against what the model needs.

For each (model, hardware, strategy, batch, dispatch) the program is compiled with the
hardware's own compiler (deviceless H200 or TPU v5p) and read back:

- decode HBM bytes per step against the bytes a step must move (the weights it touches:
  every local expert for capacity dispatch, the experts the batch is expected to route to
  for dropless and for capacity where it gathers its experts (one token per group, no ep);
  plus the local KV cache);
- prefill matmul FLOPs against the model's useful FLOPs (2 x active parameters x tokens +
  attention, per device);
- the largest buffers each program creates (a weight-sized one in decode is a copy of the
  weights) and the per-device peak;
- predicted TTFT / TPOT against their floors, and TensorRT-LLM's figures for the same case
  where the issue quotes them.

    .venv/bin/python bench/program_efficiency.py [--only NAME,...] [--no-append]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

QWEN = dict(model="qwen3-30b-a3b", prompt_len=2048, gen_len=128)
CASES = [
    *(dict(name=f"qwen3 1xH200 b{b} {d}", hardware="h200", strategy="EP1", batch=b, dispatch=d, **QWEN,
           trt=trt) for b, trt in ((1, (42.5, 4.22)), (64, (1628, 20.0))) for d in ("capacity", "dropless")),
    dict(name="mixtral 1xH200 b8", model="mixtral-8x7b", hardware="h200", strategy="EP1", batch=8,
         dispatch="capacity", prompt_len=2048, gen_len=128, trt=(578, 23.9)),
    *(dict(name=f"qwen3 8xH200 TP8 b64 {d}", model="qwen3-30b-a3b", hardware="h200", strategy="TP8", batch=64,
           dispatch=d, prompt_len=2048, gen_len=256, trt=(814, 7.40)) for d in ("capacity", "dropless")),
    *(dict(name=f"qwen3 4xv5p EP4 b4 {d}", hardware="tpu-v5p", strategy="EP4", batch=4, dispatch=d, **QWEN,
           trt=None) for d in ("capacity", "dropless")),
]
GOALS = {"qwen3 1xH200 b1": (40, 2.5), "qwen3 1xH200 b64": (1500, 19.5), "qwen3 8xH200 TP8 b64": (800, 7.0)}
"""TTFT / TPOT goals (ms) of the program-efficiency issue."""

_CHILD = r"""
import json, sys
case = json.loads(sys.argv[1])
from moe_jax.parallel.devices import request_cpu_devices
request_cpu_devices(1)
from moe_jax import Strategy, Workload, get_model
from moe_jax.perf.analysis import analyze
from moe_jax.hardware.presets import get_hardware
from moe_jax.costs.hlo import largest_results
cfg = get_model(case["model"]).replace(dispatch=case["dispatch"])
a = analyze(cfg, Strategy.parse(case["strategy"]), get_hardware(case["hardware"]),
            Workload(case["batch"], case["prompt_len"], case["gen_len"]))
out = {"backend": a.cost.backend, "target": a.cost.target, "fits": a.fits, "peak": a.memory["total"]}
if a.prediction:
    pre, dec = a.cost.phases["prefill"], a.cost.phases["decode"]
    n = a.cost.devices
    out.update(decode_bytes=dec.hbm_bytes, need=a.cost.analytic.decode_weights_read.bytes + dec.memory.kv_cache,
               weights=dec.memory.weights, prefill_flops=pre.matmul_flops,
               useful=a.cost.analytic.prefill.model_flops / n,
               largest={p: largest_results(a.cost.phases[p].hlo_text, 1)[0][:2] for p in ("prefill", "decode")},
               ttft=a.prediction.ttft_s, tpot=a.prediction.tpot_s,
               ttft_floor=a.prediction.prefill.floor_s, tpot_floor=a.prediction.decode.floor_s)
print("RESULT " + json.dumps(out))
"""


def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}" if x >= 0.01 else f"{x * 1e3:,.2f}"


def row(case: dict, timeout: float) -> str:
    """One table row for `case`, compiled in a fresh process."""
    from results import run_child

    r = run_child(_CHILD, case, timeout)
    head = f"| {case['name']} | {case['dispatch']} |"
    if "error" in r:
        return f"{head} error: {r['error']} |" + " |" * 9
    trt = case.get("trt")
    trt_text = f"{trt[0]:,.0f} / {trt[1]:.2f}" if trt else "-"
    goal = next((f"{g[0]:,.0f} / {g[1]}" for k, g in GOALS.items() if case["name"].startswith(k)), "-")
    if "ttft" not in r:
        return f"{head} {r['backend']} | does not fit: peak {r['peak'] or 0:,.0f} B |" + " |" * 7 + f" {trt_text} |"
    largest = " / ".join(f"{r['largest'][p][0] / 1e9:.2f} ({r['largest'][p][1]})" for p in ("prefill", "decode"))
    return (f"{head} {r['backend']} | {r['peak'] / 1e9:.1f} ({'fits' if r['fits'] else 'does not fit'}) | "
            f"{r['decode_bytes'] / r['need']:.2f}x of {r['need'] / 1e9:.1f} GB | "
            f"{r['prefill_flops'] / r['useful']:.2f}x | {largest} | {_ms(r['ttft'])} / {_ms(r['ttft_floor'])} | "
            f"{_ms(r['tpot'])} / {_ms(r['tpot_floor'])} | {goal} | {trt_text} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (substring match)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    cases = [c for c in CASES if not args.only or any(o in c["name"] for o in args.only.split(","))]
    table = ["| case | dispatch | compiler | peak GB per device | decode HBM bytes / needed | prefill matmul FLOPs / "
             "useful | largest buffer GB, prefill / decode | TTFT ms / floor | TPOT ms / floor | goal TTFT / TPOT ms | "
             "TRT-LLM TTFT / TPOT ms |", "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for case in cases:
        table.append(row(case, args.timeout))
        print(table[-1], flush=True)
    text = "\n".join(table)
    print(text)
    if not args.no_append:
        from results import append

        append("Program efficiency on the hardware's own compiler", text, (
            "deviceless compiles for the preset named (h200: CUDA target; tpu-v5p: TPU topology), predicted with "
            "the same preset; needed decode bytes = weights a step must touch + local KV cache; useful prefill "
            "FLOPs = 2 x active parameters x tokens + attention as the model computes it, per device; TRT-LLM "
            "figures as quoted in the program-efficiency issue (a public measured-kernel model)",))


if __name__ == "__main__":
    main()
