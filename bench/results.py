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
