"""Plan the model families people deploy on H200s: DeepSeek-V3 on 64, 128 and 256 devices and gpt-oss-120b on
1, 2, 4 and 8 (issue #20's demonstration), prompt 2048, 256 generated, batch 256; gpt-oss-120b also with FP8
weights (`--dtype fp8`: its released checkpoint is MXFP4, so bf16 weights alone do not fit one H200).

Each case is one `moe-jax plan` (a fresh process, the hardware's own compiler: the deviceless H200 compile when
jax's CUDA plugin is installed, else the stated cpu stand-in), its best strategies compiled; the table shows the
best strategy's compiled memory per device, whether it fits, its predicted TTFT / TPOT, tokens/s per device and
the concurrency a replica holds at this context. `--batch` is the whole deployment's (a strategy with dp
replicas gives each batch / dp). Appends the table to bench/RESULTS.md.

    .venv/bin/python bench/families.py [--top 2] [--cases deepseek-v3:64,gpt-oss-120b:1] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = (("deepseek-v3", 64, "bf16"), ("deepseek-v3", 128, "bf16"), ("deepseek-v3", 256, "bf16"),
         *(("gpt-oss-120b", n, dtype) for dtype in ("bf16", "fp8") for n in (1, 2, 4, 8)))


def plan_case(model: str, devices: int, dtype: str, args, tmp: Path) -> dict:
    """One `moe-jax plan` in its own process: the plan JSON, or {'error': ...}."""
    out = tmp / f"{model}-{devices}-{dtype}.json"
    cli = Path(sys.executable).with_name("moe-jax")
    cmd = [str(cli), "plan", "--model", model, "--devices", str(devices), "--hardware", "h200",
           "--batch", str(args.batch), "--prompt-len", "2048", "--gen-len", "256", "--top", str(args.top),
           "--workers", "1", "--dtype", dtype, "--cache", str(tmp / "cache"), "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    seconds = time.perf_counter() - start
    if not out.exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200], "seconds": seconds}
    return {**json.loads(out.read_text()), "seconds": seconds}


def row(model: str, devices: int, dtype: str, plan: dict) -> str:
    """One table row from a plan JSON."""
    best = plan.get("best")
    if not best:
        why = plan.get("error") or plan.get("message") or "no strategy fits"
        return f"| {model} | {devices} | {dtype} | - | - | - | - | - | - | - | - | {why} |"
    mem = best["memory"]
    per_device = best["throughput_tok_s"] / devices
    conc = (best.get("max_concurrency") or {}).get("per_replica")
    return (f"| {model} | {devices} | {dtype} | {best['strategy']['name']} | {best['backend']} "
            f"| {mem['total'] / 1e9:.1f} "
            f"| {'yes' if best['fits'] else 'no'} | {best['ttft_s'] * 1e3:.1f} | {best['tpot_s'] * 1e3:.2f} "
            f"| {per_device:,.0f} | {conc if conc is not None else '-'} | {plan['seconds']:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=2, help="strategies compiled per case")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    ap.add_argument("--cases", help="model:devices:dtype,... (default: all eleven)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    cases = CASES if not args.cases else [(m, int(n), d) for m, n, d in (c.split(":") for c in args.cases.split(","))]
    table = ["| model | H200s | weights | best strategy | compiler | compiled peak GB/device | fits | TTFT ms "
             "| TPOT ms | tokens/s/device | sequences per replica | plan time |",
             "|---|---:|---|---|---|---:|---|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model, devices, dtype in cases:
            plan = plan_case(model, devices, dtype, args, Path(tmp))
            table.append(row(model, devices, dtype, plan))
            print(table[-1], flush=True)
    text = "\n".join(table)
    print(text)
    if not args.no_append:
        from results import append

        append(f"families: deepseek-v3 and gpt-oss-120b planned on H200s (2048/256, batch {args.batch})", text,
               (f"top {args.top} compiled per case; batch is the deployment's (batch / dp per replica); "
                "TTFT/TPOT from the time model on the compiled programs",))


if __name__ == "__main__":
    main()
