"""Time the full seed-scenario search: 1024 devices, compile the top 8, cpu backend, cold cache then warm.

Prints a table and appends it, with the command and the machine, to bench/RESULTS.md.
Goal: the cold search under 60 s on 2 cores.

    .venv/bin/python bench/plan_speed.py [--top 8] [--workers 2]
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


def run(args, cache: str, out: Path) -> tuple[float, dict]:
    cli = Path(sys.executable).with_name("moe-jax")
    cmd = [str(cli), "plan", "--model", "seed-30b", "--devices", "1024", "--hardware", "seed-gpu",
           "--top", str(args.top), "--workers", str(args.workers), "--cache", cache, "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):
        sys.exit(f"plan failed:\n{done.stderr[-2000:]}")
    return seconds, json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = str(Path(tmp) / "cache"), Path(tmp) / "plan.json"
        rows = []
        for label in ("cold cache", "warm cache"):
            seconds, data = run(args, cache, out)
            best = data["best"]["strategy"]["name"] if data["best"] else "none"
            rows.append((label, seconds, data["searched"], data["compiled"], best))
            print(f"{label}: {seconds:.1f} s wall, {data['searched']} searched, {data['compiled']} compiled, "
                  f"best {best}", flush=True)
    table = ["| run | wall (s) | strategies searched | compiled | best |", "|---|---:|---:|---:|---|"]
    table += [f"| {label} | {s:.1f} | {n} | {c} | {b} |" for label, s, n, c, b in rows]
    text = "\n".join(table)
    print(text)
    if not args.no_append:
        from results import append

        append(f"plan_speed: seed-30b on 1024 seed-gpu, top {args.top}, {args.workers} workers, cpu backend", text,
               ("goal: cold search under 60 s on 2 cores",))


if __name__ == "__main__":
    main()
