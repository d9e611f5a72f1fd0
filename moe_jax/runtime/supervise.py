"""A multi-process run's work in a child process, so that jax's runtime cannot end it with an abort.

When the coordinator of a jax cluster (process 0) dies, or reports a failed peer, the C++
coordination client of every other process ends its process at once with a check failure:
SIGABRT, exit status 134 and a native stack trace, before Python can say anything. No
Python handler runs on that path. So each process of a multi-process run does its work in a
child (the same command, marked with `SUPERVISED_ENV`) and stays a small parent that:

- passes the child's stdout through untouched (reports, ``--json -``);
- passes its stderr through line by line, holding back the jax runtime's native log lines
  (absl format, e.g. ``F1130 12:00:00.000000 1234 client.cc:99] ...``) and what follows a
  fatal one;
- when the child was aborted by the runtime, prints one message naming the cause and exits
  with `CLUSTER_EXIT_STATUS` (4), as for any lost peer; otherwise prints what it held back
  and exits with the child's status;
- forwards SIGINT and SIGTERM to the child; on Linux the child asks to die with its parent
  (`adopt`: ``PR_SET_PDEATHSIG``), so killing the command never leaves its work running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

SUPERVISED_ENV = "MOE_JAX_SUPERVISED"
"""Set in the supervised child, to its parent's pid: the child does the work instead of starting another."""

NATIVE_LOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+\S+:\d+\]")
"""A line of the native runtime's log (absl format: severity, date, time, thread, file:line])."""
FATAL = re.compile(rb"^F\d{4} |^\*\*\* Check failure stack trace|^\*\*\* SIG")
"""The start of the runtime's fatal report: everything after it is the native stack."""


def supervised() -> bool:
    """Whether this process is a supervised child."""
    return bool(os.environ.get(SUPERVISED_ENV))


def adopt() -> None:
    """In the supervised child: be killed when the supervising parent dies (Linux), and stop at once if it
    is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    parent = os.environ.get(SUPERVISED_ENV, "")
    if parent.isdigit() and os.getppid() != int(parent):
        os._exit(128 + signal.SIGKILL)                              # the parent died before we were adopted


def run_supervised(command: list[str], who: str, lost_status: int) -> int:
    """Run `command` (this same moe-jax invocation) as the supervised child; the exit status to leave with.

    who: this process's place in the cluster (``process 1 of 2``), for the message; lost_status: the
    status of a run that lost its coordinator or a peer.
    """
    env = {**os.environ, SUPERVISED_ENV: str(os.getpid())}
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    forwarded = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            forwarded[sig] = signal.signal(sig, lambda s, _frame: child.send_signal(s))
        except ValueError:                      # not the main thread: leave the handlers alone
            pass
    held: list[bytes] = []
    fatal: bytes | None = None
    err = getattr(sys.stderr, "buffer", None)
    try:
        for line in iter(child.stderr.readline, b""):
            if fatal is None and FATAL.match(line):
                fatal = line
            if fatal is not None or NATIVE_LOG.match(line):
                held.append(line)
                continue
            _write(err, line)
        status = child.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    if status in (-signal.SIGABRT, 128 + signal.SIGABRT) and fatal is not None:
        cause = NATIVE_LOG.sub(b"", fatal).strip().decode(errors="replace")[:300]
        _write(err, (f"moe-jax: error: {who}: the jax runtime ended this process ({cause}): the cluster's "
                     "coordinator (process 0) is gone or reported a lost peer; stopping this process\n").encode())
        return lost_status
    for line in held:
        _write(err, line)
    return status if status >= 0 else 128 - status


def _write(stream, data: bytes) -> None:
    try:
        if stream is not None:
            stream.write(data)
            stream.flush()
        else:
            sys.stderr.write(data.decode(errors="replace"))
            sys.stderr.flush()
    except (OSError, ValueError):              # stderr closed: nothing more to say
        pass
