"""Per-device fit on the hardware's own compiler against the XLA:CPU stand-in, side by side in one run.

For each case the same program (model, strategy, workload) is compiled twice: with XLA:CPU on
fake devices (the stand-in) and with the planned hardware's own compiler (a deviceless CUDA
target for NVIDIA presets, a deviceless TPU topology for TPU presets). The table gives the
per-device peak of each (the larger of prefill and decode), their ratio, the fit verdict each
would give, and compile seconds per phase. Then `plan --objective cost` for the seed workload
with the default (auto) compiler: how many devices, which compiler, how long.

    .venv/bin/python bench/fit_cases.py [--only NAME,...] [--no-plan] [--no-append]

Each compile runs in its own process (a fresh jax with as many fake CPU devices as the case
needs); a case that fails is reported as such, not dropped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SEED = dict(batch=128, prompt_len=2048, gen_len=256)
CASES = [
    *(dict(name=f"qwen3-30b-a3b 1x h200 b{b}", model="qwen3-30b-a3b", strategy="EP1", hardware="h200",
           batch=b, prompt_len=2048, gen_len=128) for b in (1, 8, 64)),
    *(dict(name=f"mixtral-8x7b 1x h200 b{b}", model="mixtral-8x7b", strategy="EP1", hardware="h200",
           batch=b, prompt_len=2048, gen_len=128) for b in (1, 8, 64)),
    dict(name="seed-30b 8x seed-gpu TP8", model="seed-30b", strategy="TP8", hardware="seed-gpu", **SEED),
    dict(name="seed-30b 8x seed-gpu EP8", model="seed-30b", strategy="EP8", hardware="seed-gpu", **SEED),
    dict(name="seed scenario 1024x seed-gpu", model="seed-30b", strategy="EP64-TP8-PP2-DP1", hardware="seed-gpu",
         **SEED),
    dict(name="qwen3-30b-a3b 4x tpu-v5p EP4", model="qwen3-30b-a3b", strategy="EP4", hardware="tpu-v5p",
         batch=4, prompt_len=2048, gen_len=128),
]

_CHILD = r"""
import json, sys, time
case, backend = json.loads(sys.argv[1]), sys.argv[2]
from moe_jax.costs.backends import resolve
from moe_jax.parallel.devices import MAX_CPU_DEVICES, request_cpu_devices
from moe_jax.hardware.presets import get_hardware
from moe_jax.parallel.mesh import Strategy
s, hw = Strategy.parse(case["strategy"]), get_hardware(case["hardware"])
if backend == "cpu":
    request_cpu_devices(s.num_devices if s.num_devices <= MAX_CPU_DEVICES else s.num_devices // s.dp)
else:
    request_cpu_devices(1)
from moe_jax.perf.analysis import analyze
from moe_jax.costs.compile import Workload
from moe_jax.config import get_model
start = time.perf_counter()
a = analyze(get_model(case["model"]), s, hw, Workload(case["batch"], case["prompt_len"], case["gen_len"]),
            backend=backend)
phases = {n: {"peak": p.memory.peak if p.memory else None, "temporaries": p.memory.temporaries if p.memory else None,
              "seconds": p.compile_seconds, "fits": p.fits} for n, p in a.cost.phases.items()}
print("RESULT " + json.dumps({"backend": a.cost.backend, "target": a.cost.target, "topology": a.cost.topology,
                              "peak": a.memory["total"], "fits": a.fits, "confirmed": a.fit_confirmed,
                              "phases": phases,
                              "weights": a.memory["weights"], "kv": a.memory["kv_cache"],
                              "seconds": time.perf_counter() - start}))
"""


def compile_case(case: dict, backend: str, timeout: float) -> dict:
    """Analyse one case with one compiler in a fresh process; {'error': ...} when it fails."""
    from results import run_child

    return run_child(_CHILD, case, timeout, backend)


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:,.2f}"


def _phase_seconds(r: dict) -> str:
    if "error" in r:
        return "-"
    return " / ".join(f"{p['seconds']:.1f}" for p in r["phases"].values())


def _verdict(r: dict) -> str:
    if "error" in r:
        return "error"
    return ("fits" if r["fits"] else "does not fit") + ("" if r["confirmed"] else " (unconfirmed)")


def row(case: dict, timeout: float) -> tuple[str, dict]:
    """One table row: cpu against the hardware's own compiler."""
    from moe_jax.costs.backends import resolve
    from moe_jax.hardware.presets import get_hardware

    native = resolve(get_hardware(case["hardware"]), "auto")
    own = native.backend if not native.stand_in else None
    cpu = compile_case(case, "cpu", timeout)
    other = compile_case(case, own, timeout) if own else {"error": native.reason}
    ratio = (f"{cpu['peak'] / other['peak']:.2f}" if "error" not in cpu and "error" not in other
             and cpu["peak"] and other["peak"] else "-")
    where = other.get("topology") or other.get("error", "")
    line = (f"| {case['name']} | {case['strategy']} | {case['batch']} | {_gb(cpu.get('peak'))} | "
            f"{_gb(other.get('peak'))} | {ratio} | {_verdict(cpu)} | {_verdict(other)} | "
            f"{own or '-'}: {other.get('target', '')} {where} | {_phase_seconds(cpu)} | {_phase_seconds(other)} |")
    if "error" in cpu:
        line += f" cpu: {cpu['error']}"
    return line, {"cpu": cpu, own or "native": other}


def plan_row(timeout: float) -> str:
    """`plan --objective cost` for the seed workload with the default compiler."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        start = time.perf_counter()
        cmd = [str(ROOT / ".venv/bin/moe-jax"), "plan", "--model", "seed-30b", "--devices", "1024", "--hardware",
               "seed-gpu", "--batch", "128", "--prompt-len", "2048", "--gen-len", "256", "--objective", "cost",
               "--cache", "", "--json", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return f"| plan --objective cost (seed workload) | over {timeout:.0f} s | | | |"
        seconds = time.perf_counter() - start
        if not out.exists():
            return f"| plan --objective cost (seed workload) | failed: {proc.stderr.strip()[-160:]} | | | |"
        data = json.loads(out.read_text())
    best = data.get("best") or {}
    compiled = (best.get("compiled_for") or {})
    return (f"| plan --objective cost (seed workload, seed-gpu) | {best.get('strategy', {}).get('name', 'none')} | "
            f"{best.get('strategy', {}).get('devices', '-')} | {compiled.get('backend', '-')} "
            f"({best.get('target', '')}) | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (substring match)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per compile")
    ap.add_argument("--no-plan", action="store_true")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    cases = [c for c in CASES if not args.only or any(o in c["name"] for o in args.only.split(","))]
    table = ["| case | strategy | batch | cpu peak GB | own-compiler peak GB | cpu / own | cpu verdict | "
             "own verdict | own compiler | cpu compile s (prefill / decode) | own compile s |",
             "|---|---|---:|---:|---:|---:|---|---|---|---:|---:|"]
    for case in cases:
        line, _ = row(case, args.timeout)
        table.append(line)
        print(line, flush=True)
    plan = []
    if not args.no_plan:
        plan = ["| search | best | devices | compiler | seconds |", "|---|---|---:|---|---:|", plan_row(args.timeout)]
        print(plan[-1], flush=True)
    text = "\n".join(table) + ("\n\n" + "\n".join(plan) if plan else "")
    print(text)
    if not args.no_append:
        from results import append

        append("Fit on the hardware's own compiler against the XLA:CPU stand-in", text, (
            "prompt 2048, gen 128 for qwen3 / mixtral, 2048 / 256 and batch 128 for seed-30b; peak = arguments + "
            "outputs + temporaries - aliased of the larger phase, per device; own compiler = deviceless CUDA target "
            "for NVIDIA presets (seed-gpu compiles as H100), deviceless TPU topology for tpu-v5p",))


if __name__ == "__main__":
    main()
