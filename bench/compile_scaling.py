"""Compile time and peak host memory against device count for the seed model (cpu backend).

Each device count runs in its own process (the fake CPU device count is fixed when jax
starts). Prints a table and appends it, with the command and the machine, to
bench/RESULTS.md.

    .venv/bin/python bench/compile_scaling.py [--devices 8,64,256,1024,2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STRATEGIES = {8: "EP8", 64: "EP64", 256: "EP64-TP4", 1024: "EP64-TP8-PP2", 2048: "EP64-TP8-PP2-DP2"}

CHILD = """
import json, resource, sys, time
from moe_jax.parallel.devices import request_cpu_devices
n, strategy = int(sys.argv[1]), sys.argv[2]
request_cpu_devices(n)
from moe_jax.costs.compile import Workload, compile_program
from moe_jax.config import get_model
from moe_jax.parallel.mesh import Strategy
t = time.perf_counter()
p = compile_program(get_model("seed-30b"), Strategy.parse(strategy), Workload(128, 2048, 256))
print(json.dumps({"total_s": time.perf_counter() - t,
                  "prefill_s": p.phases["prefill"].compile_seconds, "decode_s": p.phases["decode"].compile_seconds,
                  "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="8,64,256,1024,2048", help="comma-separated device counts")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    counts = [int(x) for x in args.devices.split(",")]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    rows = []
    for n in counts:
        strategy = STRATEGIES.get(n)
        if strategy is None:
            sys.exit(f"no seed strategy for {n} devices; choose from {sorted(STRATEGIES)}")
        done = subprocess.run([sys.executable, "-c", CHILD, str(n), strategy], capture_output=True, text=True,
                              env=env)
        if done.returncode:
            sys.exit(f"{n} devices failed:\n{done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((n, strategy, r))
        print(f"{n:>5} {strategy:<18} prefill {r['prefill_s']:6.1f} s  decode {r['decode_s']:6.1f} s  "
              f"peak RSS {r['rss_gb']:.2f} GB", flush=True)
    table = ["| devices | strategy | prefill compile (s) | decode compile (s) | total incl. tracing (s) "
             "| peak host RSS (GB) |",
             "|---:|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {s} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | {r['total_s']:.1f} | {r['rss_gb']:.2f} |"
              for n, s, r in rows]
    text = "\n".join(table)
    print(text)
    if not args.no_append:
        from results import append

        append("compile_scaling: seed-30b, batch 128, prompt 2048, gen 256, cpu backend", text)


if __name__ == "__main__":
    main()
