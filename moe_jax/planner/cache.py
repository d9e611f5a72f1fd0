"""The planner's cache of compiled results: one checksummed JSON file per key, keyed by everything
that changes a compiled analysis (moe-jax's own code included)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import Hardware
from moe_jax.parallel.mesh import Strategy


def cache_key(cfg: ModelConfig, strategy: Strategy, workload: Workload, backend: str, hw: Hardware,
              topology: str | None) -> str:
    """sha256 of everything that changes a compiled analysis."""
    from moe_jax.costs.backends import resolve

    versions = {pkg: metadata.version(pkg) for pkg in ("jax", "jaxlib", "flax")}
    versions["moe-jax"] = code_digest()           # an edited checkout never reads another code's entries
    compiler = resolve(hw, backend)
    target = compiler.gpu_target.read_text() if compiler.gpu_target else None
    blob = json.dumps({"model": cfg.summary(), "strategy": strategy.name, "workload": workload.to_dict(),
                       "backend": backend, "compiler": compiler.to_dict(), "gpu_target": target,
                       "topology": topology, "hardware": hw.to_dict(), "versions": versions},
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
