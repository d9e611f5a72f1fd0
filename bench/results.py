"""Appending a benchmark's table to bench/RESULTS.md with the command and the machine."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def append(title: str, table: str, notes: tuple[str, ...] = ()) -> None:
    """Add a section: title, the command that ran, the machine, any notes, then the table."""
    import jax

    lines = [f"\n## {title}\n",
             f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"jax {jax.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             *(f"- {n}" for n in notes), "", table, ""]
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines))


def run_child(code: str, payload: dict, timeout: float, *args: str) -> dict:
    """Run `code` in a fresh Python (its own jax and fake-device count) with `payload` as JSON in argv[1];
    the dict it prints on a line starting ``RESULT ``, or {'error': ...} when it fails or times out."""
    import json
    import subprocess

    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload), *args], capture_output=True,
                              text=True, timeout=timeout, cwd=RESULTS.parent.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:160]}
