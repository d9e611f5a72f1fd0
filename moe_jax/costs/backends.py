"""Which compiler produces the numbers: the hardware's own, or a stated stand-in.

``auto`` (the default of analyze, plan and run's prediction) picks the compiler of the
hardware being planned:

- an NVIDIA preset compiles deviceless for its CUDA target description (``gpu``), through
  jax's CUDA plugin (``pip install 'moe-jax[gpu]'``, about 130 MB; no GPU needed);
- a TPU preset compiles deviceless for a TPU topology (``tpu``) through libtpu;
- anything else (a chip with no compiler here, or a compiler that is not installed) falls
  back to XLA:CPU on fake devices (``cpu``), and the choice says why and what is known to
  be off in its numbers.

``cpu``, ``tpu``, ``gpu`` and ``real`` stay explicit choices.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import Hardware
from moe_jax.names import BACKEND_CHOICES, Backend

BACKENDS = tuple(Backend)
"""Compilers a program can be built with."""
CHOICES = BACKEND_CHOICES
"""What a user may ask for."""
TARGETS = Path(__file__).resolve().parent.parent / "hardware" / "targets"
"""Shipped GPU target descriptions (GpuTargetConfigProto text), one per chip."""

_CPU_CAVEAT = (
    "XLA:CPU stand-in for {hw}: argument sizes (weights, KV cache, tokens) are exact, but temporaries come from "
    "XLA:CPU's own program (its fusion, layouts and buffer reuse differ from the {kind} compiler's) and it may emit "
    "other collectives than {kind} XLA; no memory limit is enforced by this compiler")


@dataclass(frozen=True)
class Compiler:
    """The compiler chosen for one hardware: what runs, what was asked, and why."""

    backend: str
    """cpu, tpu, gpu or real."""
    requested: str
    """What the user asked for (auto or one of BACKENDS)."""
    gpu_target: Path | None = None
    """The CUDA target description compiled for (gpu backend)."""
    reason: str = ""
    """Why this compiler (said when auto fell back to the cpu stand-in)."""
    caveats: tuple[str, ...] = field(default=())
    """What is known to be off in this compiler's numbers for the hardware planned."""

    @property
    def stand_in(self) -> bool:
        """True when the numbers do not come from the planned hardware's own compiler."""
        return bool(self.reason)

    def to_dict(self) -> dict:
        """JSON-ready (the analyze report's ``compiled_for``)."""
        return {"backend": self.backend, "requested": self.requested,
                "gpu_target": self.gpu_target.stem if self.gpu_target else None,
                "stand_in": self.stand_in, "reason": self.reason, "caveats": list(self.caveats)}


def gpu_compiler_installed() -> bool:
    """jax's CUDA plugin (deviceless CUDA compiles) can be imported."""
    return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None or \
        importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def tpu_compiler_installed() -> bool:
    """libtpu (deviceless TPU compiles) can be imported."""
    return importlib.util.find_spec("libtpu") is not None


def shipped_targets() -> list[str]:
    """Names of the GPU target descriptions that ship with moe-jax."""
    return sorted(p.stem for p in TARGETS.glob("*.txtpb"))


def gpu_target_path(name: str | Path) -> Path:
    """A shipped target by name (``h100``) or a ``.txtpb`` file."""
    text = str(name)
    if text.endswith(".txtpb") or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise MoeJaxError(f"GPU target description {text!r} is not a file; shipped targets: "
                              f"{', '.join(shipped_targets())}")
        return path
    path = TARGETS / f"{text.lower()}.txtpb"
    if not path.is_file():
        raise MoeJaxError(f"no GPU target description for {text!r}; shipped: {', '.join(shipped_targets())}, "
                          "or name a .txtpb file (GpuTargetConfigProto text)")
    return path


def resolve(hw: Hardware, requested: str = "auto") -> Compiler:
    """The compiler for `hw`: its own for ``auto``, else the one asked for (checked to be usable)."""
    if requested not in CHOICES:
        raise MoeJaxError(f"unknown backend {requested!r}; valid: {', '.join(CHOICES)}")
    if requested == Backend.GPU:
        if hw.kind != "gpu":
            raise MoeJaxError(f"--backend gpu compiles for a CUDA target; {hw.name!r} is a {hw.kind.upper()} "
                              "(use --backend tpu or auto)")
        path = gpu_target_path(hw.compile_target or "h200")
        return Compiler(Backend.GPU, requested, path, caveats=_proxy_caveat(hw, path))
    if requested != "auto":
        return Compiler(requested, requested, caveats=_caveats(requested, hw))
    if hw.kind == "tpu":
        if tpu_compiler_installed():
            return Compiler(Backend.TPU, requested)
        return _fallback(hw, "libtpu is not installed (pip install 'moe-jax[tpu]')")
    if not hw.compile_target:
        return _fallback(hw, f"{hw.name} names no compiler target")
    if hw.vendor != "nvidia":
        return _fallback(hw, f"no {hw.vendor.upper()} compiler is available to moe-jax (it compiles for CUDA "
                             "and TPU targets)")
    path = gpu_target_path(hw.compile_target)
    if not gpu_compiler_installed():
        return _fallback(hw, "jax's CUDA plugin is not installed (pip install 'moe-jax[gpu]', about 130 MB)")
    return Compiler(Backend.GPU, requested, path, caveats=_proxy_caveat(hw, path))


def _proxy_caveat(hw: Hardware, path: Path) -> tuple[str, ...]:
    """Said when the target description is another GPU's (its memory is not the hardware's)."""
    text = path.read_text()
    memory = re.search(r"device_memory_size:\s*(\d+)", text)
    name = re.search(r'device_description_str:\s*"([^"]*)"', text)
    if memory is None or int(memory.group(1)) == int(hw.memory_bytes):
        return ()
    return (f"{hw.name} has no target description of its own: compiled for the {name.group(1) if name else path.stem} "
            f"target ({int(memory.group(1)) / 1e9:.1f} GB), the nearest shipped; memory is checked against "
            f"{hw.name}'s {hw.memory_bytes / 1e9:.1f} GB and time uses {hw.name}'s figures",)


def _fallback(hw: Hardware, why: str) -> Compiler:
    return Compiler(Backend.CPU, "auto", reason=why, caveats=_caveats(Backend.CPU, hw))


def _caveats(backend: str, hw: Hardware) -> tuple[str, ...]:
    if backend != Backend.CPU:
        return ()
    return (_CPU_CAVEAT.format(hw=hw.name, kind="TPU" if hw.kind == "tpu" else "GPU"),)


TPU_MIN_CHIPS = 4
"""libtpu refuses topologies below one host's chip bounds (2x2x1)."""


def tpu_topology(hw: Hardware, devices: int) -> str:
    """The smallest TPU topology of `hw`'s generation that holds `devices` chips (e.g. v5p:2x2x2 for 6).

    A strategy compiles on the first `devices` devices of it; libtpu needs at least one
    host's 2x2 chips, and slices are powers of two along each axis.
    """
    gen = hw.compile_target
    if hw.kind != "tpu" or not gen:
        raise MoeJaxError(f"the tpu backend needs a TPU hardware preset (tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e); "
                          f"got {hw.name!r}")
    if devices > hw.devices_per_node:
        raise MoeJaxError(f"{devices} TPU chips exceed one {hw.name} slice of {hw.devices_per_node}; compile one "
                          "data-parallel replica or name a multi-slice --topology")
    shape = [2, 2] if gen in ("v5e", "v6e") else [2, 2, 1]      # one host's chips
    chips = max(TPU_MIN_CHIPS, 1 << max(0, math.ceil(math.log2(devices))))
    while math.prod(shape) < chips:           # double the shortest axis, the last of equals first
        i = max(range(len(shape)), key=lambda j: (-shape[j], j))
        shape[i] *= 2
    return f"{gen}:{'x'.join(map(str, shape))}"
