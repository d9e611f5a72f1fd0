"""The planner's cache of compiled results: one checksummed JSON file per compile, keyed by what the compile
depends on (moe-jax's own code included), holding the compiled statistics (`CostReport`) and never a prediction.

The hardware enters a plan twice: in the compile (a deviceless GPU or TPU compile is for that target) and in the
time model (peak FLOP/s, bandwidths, links), applied after the compiled statistics are read. The cpu backend's
compile does not depend on the hardware, so its key leaves the hardware out: a plan for another ``--hardware``
on a warm cache compiles nothing and only re-runs the time model.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import types
import typing
import zlib
from importlib import metadata
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import CPU_ANALYSIS_OPTIONS, Workload
from moe_jax.costs.types import CostReport
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import Hardware
from moe_jax.names import Backend
from moe_jax.parallel.mesh import Strategy

COST_FORMAT = "moe-jax.cost/1"
"""The layout of a cached `CostReport` (`encode_cost`)."""


def cache_key(cfg: ModelConfig, strategy: Strategy, workload: Workload, backend: str, hw: Hardware,
              topology: str | None) -> str:
    """sha256 of everything a compiled program depends on: model, strategy, workload, the compiler (resolved from
    `backend` and `hw`, with its options and GPU target), the TPU topology, jax and moe-jax's code.

    The hardware itself is part of the key only when the compile is for it (gpu, tpu, real): the cpu backend
    compiles the same program for every hardware, which enters only the time model afterwards."""
    from moe_jax.costs.backends import resolve

    versions = {pkg: metadata.version(pkg) for pkg in ("jax", "jaxlib", "flax")}
    versions["moe-jax"] = code_digest()           # an edited checkout never reads another code's entries
    compiler = resolve(hw, backend)
    on_cpu = compiler.backend == Backend.CPU
    target = compiler.gpu_target.read_text() if compiler.gpu_target else None
    blob = json.dumps({"format": COST_FORMAT, "model": cfg.summary(), "strategy": strategy.name,
                       "workload": workload.to_dict(), "backend": compiler.backend,
                       "options": CPU_ANALYSIS_OPTIONS if on_cpu else None, "gpu_target": target,
                       "topology": topology, "hardware": None if on_cpu else hw.to_dict(), "versions": versions},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of moe-jax's own source and target files: what a compiled result depends on besides its inputs."""
    root = Path(__file__).resolve().parent.parent   # the moe_jax package
    h = hashlib.sha256()
    for path in sorted(list(root.rglob("*.py")) + list(root.rglob("*.txtpb"))):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def check_cache_dir(directory: Path) -> None:
    """Fail before any compile when the cache cannot be used: a file where the folder should be, or a folder
    that cannot be created or written (a whole search must not be lost to its cache)."""
    if directory.exists() and not directory.is_dir():
        raise MoeJaxError(f"--cache {str(directory)!r} is a file, not a directory; name a directory or '' to "
                          "disable the cache")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeJaxError(f"--cache {str(directory)!r} cannot be created: {e.strerror or e}; name another "
                          "directory or '' to disable the cache") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MoeJaxError(f"--cache {str(directory)!r} is not writable; name another directory or '' to disable "
                          "the cache")


def xla_cache_dir(directory: Path) -> Path:
    """Where jax's persistent compilation cache lives inside the planner's cache directory."""
    return directory / "xla"


def cache_load(directory: Path, key: str) -> dict | None:
    """A cached result, or None when absent, truncated, corrupt or for another key."""
    path = directory / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
        payload = entry["payload"]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        if entry.get("key") != key or entry.get("sha256") != digest:
            return None
        return payload
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cache_store(directory: Path, key: str, payload: dict) -> None:
    """Write atomically (temporary file, then rename): an interrupted search leaves no partial entry."""
    from moe_jax.files import write_atomic

    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    write_atomic(directory / f"{key}.json", json.dumps({"key": key, "sha256": digest, "payload": payload}))


def load_cost(directory: Path, key: str) -> CostReport | None:
    """The cached compiled statistics for `key`, or None when absent, damaged or in another layout."""
    payload = cache_load(directory, key)
    if payload is None or payload.get("format") != COST_FORMAT:
        return None
    try:
        return decode_cost(payload["cost"])
    except (KeyError, TypeError, ValueError, zlib.error):
        return None


def store_cost(directory: Path, key: str, cost: CostReport) -> None:
    """Cache the compiled statistics of one program pair (`load_cost` reads them back)."""
    cache_store(directory, key, {"format": COST_FORMAT, "strategy": cost.strategy, "cost": encode_cost(cost)})


# --- the CostReport as JSON, exactly ---------------------------------------------------------------------

def encode_cost(cost: CostReport) -> dict:
    """`cost` as JSON-ready values that `decode_cost` turns back into an equal `CostReport`: every field (per-op
    costs and the optimized HLO, which the time model's schedule simulation reads, included; the HLO compressed)."""
    data = dataclasses.asdict(cost)
    for phase in data["phases"].values():
        text = phase.pop("hlo_text")
        phase["hlo_text_zlib"] = base64.b64encode(zlib.compress(text.encode(), 1)).decode("ascii")
    return data


def decode_cost(data: dict) -> CostReport:
    """The `CostReport` that `encode_cost` wrote."""
    data = {**data, "phases": {name: _with_hlo(phase) for name, phase in data["phases"].items()}}
    return _build(CostReport, data)


def _with_hlo(phase: dict) -> dict:
    phase = dict(phase)
    phase["hlo_text"] = zlib.decompress(base64.b64decode(phase.pop("hlo_text_zlib"))).decode()
    return phase


def _build(kind, value):
    """`value` (from JSON) as an instance of the annotation `kind`: dataclasses, optionals, lists, dicts."""
    if value is None:
        return None
    if dataclasses.is_dataclass(kind):
        hints = _hints(kind)
        names = {f.name for f in dataclasses.fields(kind) if f.init}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"{kind.__name__} has no field {sorted(unknown)[0]!r}")
        return kind(**{name: _build(hints[name], v) for name, v in value.items()})
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return _build(inner[0], value) if len(inner) == 1 else value
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_build(item, v) for v in value]
    if origin is dict:
        _, item = typing.get_args(kind)
        return {k: _build(item, v) for k, v in value.items()}
    return value


@functools.cache
def _hints(kind) -> dict:
    return typing.get_type_hints(kind)
