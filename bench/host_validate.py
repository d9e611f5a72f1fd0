"""The time model held against measurements on this host: calibrate, then run and predict the same programs.

1. `moe-jax calibrate` measures this machine (matmul and memory curves timed inside a program, the
   cost of one tiny op, the host's cost of calling a program), written to a hardware TOML.
2. For each case (models: the tiny preset and a 0.5B-parameter MoE built here, several batches and
   prompt lengths), a fresh process with one CPU device runs `moe_jax.runtime.run.run` with
   ``backend="real"``: it measures TTFT (median of the timed prefills) and TPOT (median of the decode
   steps after the first), and predicts both from the program it compiled, timed on the calibrated
   hardware (`moe_jax.perf.timemodel`).
3. The table: measured, predicted, error, and the terms of each prediction (compute, memory, per-op
   overhead, program call), so that a case that is off names the term that is.

Goal (issue #18): median |error| <= 15% and worst <= 30%, for TTFT and for TPOT.

    python bench/host_validate.py                 # calibrates (about 2 minutes), then the cases
    python bench/host_validate.py --hardware F    # an existing calibration
    python bench/host_validate.py --quick --no-append   # the tests' form: quick calibration, two small cases

The machine must be otherwise idle: every other process on its cores is in the measured times.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append, run_child  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

MOE_05B = dict(name="moe-0.5b", family="tiny", num_layers=8, d_model=1024, num_heads=16, num_kv_heads=4,
               head_dim=64, vocab_size=32000, num_experts=16, top_k=2, expert_ffn=1024, router_norm_topk=True,
               rope_theta=1e4, norm_eps=1e-6)
"""About 0.5B parameters (16 experts of 3 x 1024 x 1024 in each of 8 layers, a 32k vocabulary): 1 GB in bf16."""

CASES = (("tiny", 1, 64), ("tiny", 8, 256), ("tiny", 32, 128), ("moe-0.5b", 1, 128), ("moe-0.5b", 4, 256),
         ("moe-0.5b", 16, 64))
QUICK_CASES = (("tiny", 1, 32), ("tiny", 4, 64))
PROCESS_CASES = (("EP2-TP1-PP1-DP1", 4, 64), ("EP1-TP2-PP1-DP1", 4, 64), ("EP2-TP1-PP1-DP1", 16, 128))
"""Two processes with one CPU device each: the tiny model split over them (collectives across processes)."""

CHILD = r"""
import json, sys
from moe_jax.parallel.devices import request_cpu_devices
request_cpu_devices(1)
from moe_jax.config import ModelConfig, get_model
from moe_jax.costs.compile import Workload
from moe_jax.hardware.presets import get_hardware
from moe_jax.parallel.mesh import Strategy
from moe_jax.runtime.run import run
p = json.loads(sys.argv[1])
cfg = ModelConfig(**p["config"]) if p["config"] else get_model(p["model"])
hw = get_hardware(p["hardware"])
r = run(cfg, Strategy(), Workload(p["batch"], p["prompt_len"], p["gen_len"]), hardware=hw, backend="real",
        repeats=p["repeats"], max_steps=p["steps"], predict=True)
terms = {ph: {k: r.predicted[f"{ph}_time"][k] for k in
              ("compute_s", "memory_s", "overhead_s", "comm_s", "call_s", "fresh_s", "scheduled_s", "floor_s",
                  "total_s")}
         for ph in ("prefill", "decode")}
by_category = {}
if p["profile"]:          # each op measured (jax.profiler) beside its prediction, summed by kind of op
    import jax, jax.numpy as jnp, numpy as np
    from moe_jax.parallel.mesh import build_mesh
    from moe_jax.perf.analysis import analyze
    from moe_jax.perf.timemodel import phase_timing
    from moe_jax.programs.sharded import ShardedModel
    from moe_jax.runtime.oprofile import compare_ops, measure_ops
    B, S, G = p["batch"], p["prompt_len"], p["gen_len"]
    sm = ShardedModel(cfg, Strategy(), build_mesh(Strategy(), jax.devices()[:1]))
    params, tokens = sm.init_params(0), sm.put_tokens(np.zeros((B, S), np.int32))
    out = jax.block_until_ready(sm.prefill(params, tokens, sm.init_cache(B, S + G)))
    tok = sm.put_tokens(np.zeros((B, 1), np.int32))
    state = {"cache": jax.block_until_ready(sm.decode(params, tok, jnp.int32(S), out.cache)).cache, "pos": S + 1}
    def decode_once():
        step = jax.block_until_ready(sm.decode(params, tok, jnp.int32(state["pos"]), state["cache"]))
        state["cache"], state["pos"] = step.cache, state["pos"] + 1
    caches = [jax.block_until_ready(sm.init_cache(B, S + G)) for _ in range(3)]
    measured = {"prefill": measure_ops(lambda: jax.block_until_ready(sm.prefill(params, tokens, caches.pop()))),
                "decode": measure_ops(decode_once)}
    a = analyze(cfg, Strategy(), hw, Workload(B, S, G), backend="real")
    for ph in ("prefill", "decode"):
        cost = a.cost.phases[ph]
        times = {k: v[0] for k, v in phase_timing(cost, hw, None, cfg.dtype)[0].items()}
        by_category[ph] = [c.__dict__ for c in compare_ops(cost.ops, times, measured[ph])]
print("RESULT " + json.dumps({"ttft": r.ttft.median, "tpot": r.tpot.median, "ttft_pred": r.predicted["ttft_s"],
                              "tpot_pred": r.predicted["tpot_s"], "terms": terms,
                              "params": cfg.params_total, "by_category": by_category}))
"""


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("moe-jax")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moe_jax.cli"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def calibrate(path: Path, quick: bool) -> None:
    """`moe-jax calibrate` into `path` (one CPU device, this process's host)."""
    cmd = _cli() + ["calibrate", "--output", str(path), "--force", "--devices", "1"] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800, env=_env())
    if done.returncode != 0:
        sys.exit(f"calibrate failed:\n{done.stderr[-3000:]}")


def together(argv: list[str], processes: int, timeout: float = 1800) -> list[tuple[int, str, str]]:
    """`moe-jax ARGV` in `processes` processes joined as one cluster on this host (one CPU device each):
    (exit status, stdout, stderr) of each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_cli() + argv + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                               str(processes), "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
             for i in range(processes)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def measure_processes(hardware: Path, mesh: str, batch: int, prompt_len: int, gen_len: int, tmp: Path) -> dict:
    """One case run by two processes with one device each (every collective crosses processes): process 0's
    measured and predicted TTFT and TPOT, and the decode prediction's terms."""
    out = tmp / f"run-{mesh}-{batch}-{prompt_len}.json"
    done = together(["run", "--model", "tiny", "--mesh", mesh, "--batch", str(batch), "--prompt-len",
                     str(prompt_len), "--gen-len", str(gen_len), "--backend", "real", "--hardware", str(hardware),
                     "--json", str(out)], 2)
    if any(code != 0 for code, _, _ in done):
        return {"error": " | ".join(err.strip().splitlines()[-1] for code, _, err in done if code and err.strip())}
    data = json.loads(out.read_text())
    terms = {ph: {k: data["predicted"][f"{ph}_time"][k] for k in
                  ("compute_s", "memory_s", "overhead_s", "comm_s", "call_s", "fresh_s", "scheduled_s", "floor_s",
                  "total_s")}
             for ph in ("prefill", "decode")}
    return {"ttft": data["measured"]["ttft_s"], "tpot": data["measured"]["tpot_s"],
            "ttft_pred": data["predicted"]["ttft_s"], "tpot_pred": data["predicted"]["tpot_s"], "terms": terms}


def measure(model: str, batch: int, prompt_len: int, hardware: Path, *, gen_len: int, steps: int,
            repeats: int, profile: bool = False) -> dict:
    """One case in a fresh process: measured and predicted TTFT and TPOT, and the prediction's terms (with
    `profile`, also every op measured and summed by category beside its prediction)."""
    payload = {"model": model, "config": MOE_05B if model == MOE_05B["name"] else None, "batch": batch,
               "prompt_len": prompt_len, "gen_len": gen_len, "steps": steps, "repeats": repeats,
               "hardware": str(hardware), "profile": profile}
    return run_child(CHILD, payload, timeout=1800)


def largest_term(terms: dict) -> str:
    """The term that makes most of a prediction (where to look when it is off)."""
    parts = {"compute": terms["compute_s"], "memory": terms["memory_s"], "per-op overhead": terms["overhead_s"],
             "program call": terms["call_s"], "communication": terms["comm_s"],
             "fresh buffers": terms.get("fresh_s", 0.0)}
    name = max(parts, key=parts.get)
    total = sum(parts.values()) or 1.0
    return f"{name} {parts[name] / total:.0%}"


def table(rows: list[dict]) -> tuple[str, dict]:
    """The Markdown table and the summary (median and worst |error| per metric)."""
    lines = ["| case | batch | prompt | TTFT measured | predicted | error | prefill's largest term | "
             "TPOT measured | predicted | error | decode's largest term |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    errors = {"ttft": [], "tpot": []}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['prompt_len']} | failed: {r['error'][:100]} "
                         "| | | | | | | |")
            continue
        e_ttft = (r["ttft_pred"] - r["ttft"]) / r["ttft"]
        e_tpot = (r["tpot_pred"] - r["tpot"]) / r["tpot"]
        errors["ttft"].append(abs(e_ttft))
        errors["tpot"].append(abs(e_tpot))
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt_len']} | {r['ttft'] * 1e3:.2f} ms | "
                     f"{r['ttft_pred'] * 1e3:.2f} ms | {e_ttft:+.0%} | {largest_term(r['terms']['prefill'])} | "
                     f"{r['tpot'] * 1e3:.3f} ms | {r['tpot_pred'] * 1e3:.3f} ms | {e_tpot:+.0%} | "
                     f"{largest_term(r['terms']['decode'])} |")
    summary = {k: {"median": statistics.median(v), "worst": max(v)} for k, v in errors.items() if v}
    return "\n".join(lines), summary


def category_table(rows: list[dict]) -> str:
    """Per case and phase, measured against predicted seconds by category of op (the profiled cases)."""
    lines = ["| model | batch | prompt | phase | category | ops | measured | predicted | predicted / measured |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for phase, cats in (r.get("by_category") or {}).items():
            for c in cats:
                ratio = f"{c['predicted_s'] / c['measured_s']:.2f}" if c["measured_s"] else "not traced"
                lines.append(f"| {r['model']} | {r['batch']} | {r['prompt_len']} | {phase} | {c['category']} | "
                             f"{c['ops']} | {c['measured_s'] * 1e3:.3f} ms | {c['predicted_s'] * 1e3:.3f} ms | "
                             f"{ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", help="a calibrated hardware TOML (default: calibrate this host first)")
    ap.add_argument("--quick", action="store_true", help="quick calibration and two small cases (tests)")
    ap.add_argument("--no-append", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per case (the first compiles)")
    ap.add_argument("--processes", action="store_true",
                    help="also two processes with one device each: calibrate their link, run split cases")
    ap.add_argument("--profile", action="store_true",
                    help="also measure every op (jax.profiler) and compare it with its prediction by category")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        hardware = Path(args.hardware) if args.hardware else Path(tmp) / "host.toml"
        if not args.hardware:
            print("calibrating this host ...", flush=True)
            calibrate(hardware, args.quick)
        rows = []
        for model, batch, prompt_len in (QUICK_CASES if args.quick else CASES):
            r = measure(model, batch, prompt_len, hardware, gen_len=args.steps + 2, steps=args.steps,
                        repeats=2 if args.quick else 3, profile=args.profile)
            rows.append({"model": model, "batch": batch, "prompt_len": prompt_len, **r})
            print(json.dumps(rows[-1]), flush=True)
        if args.processes:
            print("calibrating two processes ...", flush=True)
            two = Path(tmp) / "host-2proc.toml"
            done = together(["calibrate", "--output", str(two), "--force", "--devices", "2"]
                            + (["--quick"] if args.quick else []), 2)
            if any(code != 0 for code, _, _ in done):
                sys.exit("two-process calibrate failed:\n" + "\n".join(err[-2000:] for _, _, err in done))
            for mesh, batch, prompt_len in PROCESS_CASES[:1] if args.quick else PROCESS_CASES:
                r = measure_processes(two, mesh, batch, prompt_len, args.steps + 2, Path(tmp))
                rows.append({"model": f"tiny {mesh} x 2 processes", "batch": batch, "prompt_len": prompt_len, **r})
                print(json.dumps(rows[-1]), flush=True)
    text, summary = table(rows)
    if args.profile:
        text += "\n\nEach op measured (jax.profiler; profiling adds to each) against its prediction, by kind:\n\n" + \
            category_table(rows)
    print(text)
    line = "; ".join(f"{k.upper()} median |error| {v['median']:.0%}, worst {v['worst']:.0%}"
                     for k, v in summary.items())
    print(line)
    if not args.no_append:
        append("Host validation: predicted against measured on this machine (calibrated time model)", text,
               (f"{len(rows)} cases, one CPU device, {time.perf_counter() - start:.0f} s; prediction from the "
                "program that ran, timed on this host's calibration (bench/host_validate.py)", line,
                "goal (issue #18): median |error| <= 15%, worst <= 30%, for TTFT and TPOT"))
    return summary


if __name__ == "__main__":
    main()
