"""Reading the user's files with clear errors, and writing ours atomically."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
import tomllib
from pathlib import Path

from moe_jax.errors import MoeJaxError

MAX_INPUT_BYTES = 64 << 20
"""The largest input file moe-jax reads (strategy, hardware TOML, config.json, prompt JSON): 64 MiB."""
MAX_NESTING = 64
"""The deepest nesting of tables/arrays accepted in those files (real ones nest fewer than 10 deep)."""


def read_bounded(path: str | Path, what: str, error=MoeJaxError, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    Opened without blocking and checked before reading, so a FIFO, a device (``/dev/zero``),
    a directory or a socket is refused at once, and a file that grows past `limit` while read
    stops at the limit instead of exhausting memory.
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {str(p)!r} is not a regular file ({_kind(st.st_mode)}); give a file path")
        if st.st_size > limit:
            raise error(f"{what} {str(p)!r} is {st.st_size:,} bytes; the limit is {limit:,}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{what} {str(p)!r} is larger than the limit of {limit:,} bytes")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def nesting_depth(data) -> int:
    """How deep dicts and lists nest in `data` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list | tuple):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list | tuple))
    return deepest


def _parsed(data, p: Path, what: str, error):
    depth = nesting_depth(data)
    if depth > MAX_NESTING:
        raise error(f"{what} {str(p)!r} nests {depth} levels deep; at most {MAX_NESTING} are accepted")
    return data


def read_toml(path: str | Path, what: str, error=MoeJaxError) -> dict:
    """Parse a TOML file (bounded, regular files only); an unreadable or malformed file raises `error` naming it."""
    p = Path(path)
    raw = read_bounded(p, what, error)
    try:
        return _parsed(tomllib.loads(raw.decode()), p, what, error)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {str(p)!r} is not valid TOML: {e}") from None
    except RecursionError:
        raise error(f"{what} {str(p)!r} nests too deeply; at most {MAX_NESTING} levels are accepted") from None


def read_json(path: str | Path, what: str, error=MoeJaxError, limit: int = MAX_INPUT_BYTES):
    """Parse a JSON file (bounded, regular files only); an unreadable or malformed file raises `error` naming it."""
    p = Path(path)
    raw = read_bounded(p, what, error, limit)
    try:
        return _parsed(json.loads(raw.decode()), p, what, error)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what} {str(p)!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{what} {str(p)!r} nests too deeply; at most {MAX_NESTING} levels are accepted") from None


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
"""The provenance mark of a file moe-jax derives from a name the user gave: a PNG's ``Software`` text
chunk equal to it exactly (charts), or a first line equal to `MARKDOWN_MARK` (derived Markdown)."""
MARKDOWN_MARK = "<!-- written by moe-jax -->"


def png_software(head: bytes) -> str | None:
    """The value of a PNG's ``Software`` tEXt chunk among the chunks in `head`, None if it has none."""
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(head):
        length = int.from_bytes(head[pos:pos + 4], "big")
        kind = head[pos + 4:pos + 8]
        body = head[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            key, value = body.split(b"\0", 1)
            if key == b"Software":
                return value.decode("latin-1")
        if kind in (b"IDAT", b"IEND"):
            return None                                         # text chunks come before the image data
        pos += 12 + length
    return None


def written_by_us(head: bytes) -> bool:
    """Whether a file that starts with `head` carries moe-jax's provenance mark exactly."""
    if head.startswith(b"\x89PNG"):
        return png_software(head) == MARK
    return head.split(b"\n", 1)[0].rstrip(b"\r") == MARKDOWN_MARK.encode()


def check_derived(paths) -> None:
    """Refuse to overwrite a derived output (a chart or report next to the user's --markdown) that moe-jax
    did not write: it may be the user's own file. Only an exact provenance mark counts (`written_by_us`)."""
    for p in map(Path, paths):
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise MoeJaxError(f"{str(p)!r} exists and is not a regular file; moe-jax writes its derived outputs "
                              "only as new or regular files. Move it or choose another --markdown name")
        if p.exists():
            try:
                with open(p, "rb") as f:
                    head = f.read(65536)                        # the mark is at the start: read no more
            except OSError as e:
                raise MoeJaxError(f"cannot read {str(p)!r}: {e.strerror or e}") from None
            if not written_by_us(head):
                raise MoeJaxError(f"{str(p)!r} exists and was not written by moe-jax; it would be overwritten. "
                                  "Move it or choose another --markdown name")


def check_distinct(outputs: dict[str, str | Path | None]) -> None:
    """Refuse two outputs on the same file (one would silently replace the other): `outputs` maps each
    option (``--json``) to its path; None entries are skipped. Paths are compared after resolving links."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise MoeJaxError(f"{option} and {seen[key]} both write {str(path)!r}; give each output its own file")
        seen[key] = option


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write via a temporary file in the same directory and rename: never half a file, even if interrupted.

    `text` may be bytes (written as they are). The target must be new or a regular file (a symlink,
    a directory or a device is refused: renaming over a link would not write where it points, and
    writing through it could land outside the output folder). A failure to write (read-only
    filesystem, full disk, no permission) is a `MoeJaxError` naming the path, and leaves no
    temporary file behind.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MoeJaxError(f"cannot write {str(path)!r}: it exists and is not a regular file "
                          "(moe-jax writes outputs only as new or regular files)")
    try:
        mode = path.stat().st_mode & 0o7777                      # keep an existing file's permissions
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask                                    # a new file gets the usual ones
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise MoeJaxError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        try:
            os.unlink(tmp)
        except OSError:
            pass
