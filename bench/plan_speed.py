"""Time the planner on the three searches of issue 21, each with a cold cache, then warm, on the cpu backend.

- seed: seed-30b on 1024 seed-gpu devices, every strategy, the top 8 compiled (goal: cold under 20 s on 2 cores);
  then the same search for another --hardware (h100) on the warm cache: the cpu compile does not depend on the
  hardware, so it compiles nothing and only re-runs the time model;
- cost: the seed workload with --objective cost (goal: cold under 30 s);
- 4096: qwen3-235b-a22b on 4096 h200 devices (goal: cold under 60 s).

Each row is the median of --repeat runs (a cold run gets a fresh cache directory each time); "CPU s" is the user
and system time of the planner and its workers, which other processes on the machine disturb less than the wall
clock. "compiled now" counts the strategies compiled by that run (the rest came from the cache), "of which the
cache held" those among them that the cold run had already compiled (0: nothing recompiled; another hardware
may rank a strategy into its top 8 that the first search did not compile, and that one is new). Prints a table
and appends it, with the command, the machine and its load average, to bench/RESULTS.md.

The runs use a copy of the moe_jax package taken at the start: the cache is keyed on the code's content, so an
edit to the checkout during the benchmark (another session working in it) would turn a warm run cold.

    .venv/bin/python bench/plan_speed.py [--repeat 3] [--workers 2] [--cases seed,cost,4096] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "seed": ["--model", "seed-30b", "--devices", "1024", "--hardware", "seed-gpu"],
    "cost": ["--model", "seed-30b", "--devices", "1024", "--hardware", "seed-gpu", "--objective", "cost"],
    "4096": ["--model", "qwen3-235b-a22b", "--devices", "4096", "--hardware", "h200"],
}
OTHER_HARDWARE = "h100"
"""The seed search's hardware on the warm cache: the cpu compile does not depend on it, so nothing compiles."""
GOALS = {"seed": 20.0, "cost": 30.0, "4096": 60.0}
"""Cold-cache wall-clock goals in seconds on 2 cores (issue 21, item 8)."""


ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from moe_jax.cli import main; sys.argv[0] = 'moe-jax'; main()"


def run(args, case_args: list[str], cache: Path, out: Path, hardware: str | None = None) -> tuple[float, float, dict]:
    """One `moe-jax plan` from the package copy: (wall seconds, CPU seconds of it and its workers, the plan JSON)."""
    if hardware:
        at = case_args.index("--hardware")
        case_args = [*case_args[:at + 1], hardware, *case_args[at + 2:]]
    cmd = [sys.executable, "-c", CLI, "plan", *case_args, "--backend", "cpu", "--top", str(args.top),
           "--workers", str(args.workers), "--cache", str(cache), "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(args.source)           # the copy, ahead of the editable install's finder
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.source)   # not the checkout
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 3):
        sys.exit(f"plan failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, json.loads(out.read_text())


def compiled_names(data: dict) -> set[str]:
    """The strategies a plan JSON holds compiled figures for."""
    return {c["strategy"] for c in data["candidates"] if c["compiled"]}


def row(label: str, runs: list[tuple[float, float, dict]], held: list[set[str]] | None = None) -> dict:
    """The median run's figures; `held`: per run, the strategies its warm cache already held."""
    data = runs[0][2]
    best = data["best"]["strategy"]["name"] if data["best"] else "none"
    now = [{c["strategy"] for c in d["candidates"] if c["compiled"] and not c.get("cached")} for _, _, d in runs]
    compiled_now = len(now[0])
    recompiled = "–" if held is None else str(max(len(n & h) for n, h in zip(now, held, strict=True)))
    return {"label": label, "wall": statistics.median(r[0] for r in runs), "cpu": statistics.median(r[1] for r in runs),
            "walls": [r[0] for r in runs], "searched": data["searched"], "compiled": data["compiled"],
            "compiled_now": compiled_now, "recompiled": recompiled, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the median is reported")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.source = Path(tmp) / "src"
        shutil.copytree(ROOT / "moe_jax", args.source / "moe_jax", ignore=shutil.ignore_patterns("__pycache__"))
        for case in args.cases.split(","):
            case_args = CASES[case]
            cold, warm, other = [], [], []
            for i in range(args.repeat):
                cache, out = Path(tmp) / f"{case}-{i}", Path(tmp) / "plan.json"
                cold.append(run(args, case_args, cache, out))
                warm.append(run(args, case_args, cache, out))
                if case == "seed":          # h100: the same eight strategies rank first, on other figures
                    other.append(run(args, case_args, cache, out, hardware=OTHER_HARDWARE))
            held = [compiled_names(d) for _, _, d in cold]
            rows.append(row(f"{case}: cold cache", cold))
            rows.append(row(f"{case}: warm cache", warm, held))
            if other:
                rows.append(row(f"{case}: --hardware {OTHER_HARDWARE} on the warm cache", other, held))
            for r in rows[-(3 if other else 2):]:
                print(f"{r['label']}: {r['wall']:.1f} s wall (runs {', '.join(f'{w:.1f}' for w in r['walls'])}), "
                      f"{r['cpu']:.1f} s CPU, {r['searched']} searched, {r['compiled']} compiled "
                      f"({r['compiled_now']} now, {r['recompiled']} the cache held), best {r['best']}", flush=True)
    table = ["| run | wall (s), median | CPU (s) | strategies searched | compiled | compiled now | of which the cache "
             "held | best |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    table += [f"| {r['label']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['searched']} | {r['compiled']} | "
              f"{r['compiled_now']} | {r['recompiled']} | {r['best']} |" for r in rows]
    text = "\n".join(table)
    print(text)
    if not args.no_append:
        from results import append

        goals = "; ".join(f"{c} cold under {GOALS[c]:.0f} s" for c in args.cases.split(","))
        append(f"plan_speed: issue 21's searches, top {args.top}, {args.workers} workers, cpu backend, "
               f"median of {args.repeat}", text,
               (f"goals on 2 cores: {goals}",
                f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min); other "
                "processes shared the cores when it is above 0"))


if __name__ == "__main__":
    main()
