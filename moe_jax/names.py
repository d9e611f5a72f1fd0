"""One source for each name moe-jax uses as a mode or a key: the enums and the dtype table.

The enums are `StrEnum`s: each member equals its string (``Dispatch.CAPACITY == "capacity"``),
so the JSON, the CLI and configs written before keep their spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Dispatch(StrEnum):
    """How an MoE layer sends tokens to experts."""

    CAPACITY = "capacity"
    """Fixed-capacity slots per expert and token group; overflow is dropped (rows gathered into slots and back)."""
    DROPLESS = "dropless"
    """Sort by expert, exchange the rows (ragged all-to-all), grouped matmul: nothing dropped."""
    DENSE = "dense"
    """Every token through every expert, weighted by its top-k gates: the reference."""


class Backend(StrEnum):
    """Which compiler produces a program."""

    CPU = "cpu"
    """XLA:CPU on fake host devices."""
    TPU = "tpu"
    """A deviceless TPU topology through libtpu."""
    GPU = "gpu"
    """A deviceless CUDA target through jax's CUDA plugin."""
    REAL = "real"
    """The devices jax sees."""


AUTO = "auto"
"""`--backend auto`: the hardware's own compiler when installed, else XLA:CPU."""
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *Backend)


class Phase(StrEnum):
    """The two programs of serving."""

    PREFILL = "prefill"
    DECODE = "decode"


class Objective(StrEnum):
    """What the planner ranks strategies by."""

    THROUGHPUT = "throughput"
    TTFT = "ttft"
    TPOT = "tpot"
    COST = "cost"


class Axis(StrEnum):
    """The physical mesh axes, in mesh order (outermost first)."""

    DP = "dp"
    PP = "pp"
    EP = "ep"
    TP = "tp"


MESH_AXES: tuple[str, ...] = tuple(Axis)


@dataclass(frozen=True)
class DType:
    """One floating-point dtype under each of its names."""

    name: str
    """numpy / jax / config name (``bfloat16``)."""
    hlo: str
    """The element type in HLO text (``bf16``)."""
    bytes: int
    short: str
    """The CLI spelling (``--dtype bf16``)."""


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("bfloat16", "bf16", 2, "bf16"),
    DType("float16", "f16", 2, "f16"),
    DType("float32", "f32", 4, "f32"),
    DType("float8_e4m3fn", "f8e4m3fn", 1, "fp8"),
)}
"""Model dtypes by config name."""

FP8 = "float8_e4m3fn"
"""OCP FP8 E4M3 (no infinities; largest finite 448): the 8-bit dtype weights and the KV cache may be stored in.
It is a storage dtype only: activations compute in one of `COMPUTE_DTYPES`."""

COMPUTE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")
"""Dtypes activations (and norms, router, embedding) may compute in."""

DTYPE_BY_SHORT: dict[str, DType] = {d.short: d for d in DTYPES.values()}
"""The same, by CLI spelling."""
