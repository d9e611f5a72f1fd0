"""Fake CPU devices: XLA reads their count once, when jax starts its backend, so set it first."""

from __future__ import annotations

import os
import re
import sys

from moe_jax.compat import backend_started
from moe_jax.errors import MoeJaxError
from moe_jax.names import Backend

MAX_CPU_DEVICES = 2048
"""The CPU backend compiles for at most this many devices in one process."""

_FLAG = "--xla_force_host_platform_device_count"


def request_cpu_devices(n: int) -> None:
    """Ask for `n` fake CPU devices. Must run before jax initialises its backend.

    Replaces any device count already in XLA_FLAGS and keeps the other flags. If jax's
    backend is already running, it must have at least `n` CPU devices (the first `n` are
    used; the count cannot change inside a process).
    """
    if n < 1 or n > MAX_CPU_DEVICES:
        raise MoeJaxError(f"{n} fake CPU devices requested; the CPU backend supports 1 to {MAX_CPU_DEVICES} "
                          "in one process")
    if backend_started():
        import jax

        have = jax.device_count()
        if have < n and jax.default_backend() == Backend.CPU:
            raise MoeJaxError(f"jax already started with {have} CPU devices; {n} are needed. Start a new "
                              f"process with XLA_FLAGS={_FLAG}={n}")
        return
    flags = re.sub(rf"{_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules:                 # imported (e.g. to join a cluster) but not started: jax read
        import jax  # JAX_PLATFORMS at import, so set its config instead

        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
