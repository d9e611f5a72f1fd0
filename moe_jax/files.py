"""Reading the user's files with clear errors, and writing ours atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
import tomllib
from pathlib import Path

from moe_jax.errors import MoeJaxError


def read_toml(path: str | Path, what: str, error=MoeJaxError) -> dict:
    """Parse a TOML file; an unreadable or malformed file raises `error` naming it as `what`."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {str(p)!r} is not valid TOML: {e}") from None


def read_json(path: str | Path, what: str, error=MoeJaxError):
    """Parse a JSON file; an unreadable or malformed file raises `error` naming it as `what`."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what} {str(p)!r} is not valid JSON: {e}") from None


def finite(data):
    """`data` with every non-finite float (inf, nan) replaced by None: JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def dumps(data, **kw) -> str:
    """Strict JSON text (parsers that reject bare Infinity/NaN read it): non-finite numbers become null."""
    return json.dumps(finite(data), allow_nan=False, default=str, **kw)


MARK = "moe-jax"
"""Written into every file moe-jax derives from a name the user gave (chart metadata, report header)."""


def check_derived(paths) -> None:
    """Refuse to overwrite a derived output (a chart or report next to the user's --markdown) that moe-jax
    did not write: it may be the user's own file."""
    for p in map(Path, paths):
        if p.exists():
            try:
                head = p.read_bytes()[:4096]
            except OSError as e:
                raise MoeJaxError(f"cannot read {str(p)!r}: {e.strerror or e}") from None
            if MARK.encode() not in head:
                raise MoeJaxError(f"{str(p)!r} exists and was not written by moe-jax; it would be overwritten. "
                                  "Move it or choose another --markdown name")


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write via a temporary file in the same directory and rename: never half a file, even if interrupted.

    `text` may be bytes (written as they are)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777                      # keep an existing file's permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask                                    # a new file gets the usual ones
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
