"""The files the commands write: checked before the work starts, written atomically after it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from moe_jax.errors import MoeJaxError
from moe_jax.files import check_derived, check_distinct, dumps, write_atomic


def output_path(value: str | None, what: str) -> Path | None:
    """A writable output file path: its directory must exist (nothing is created silently)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise MoeJaxError(f"{what} {value!r} is a directory; give a file name")
    if not path.parent.exists():
        raise MoeJaxError(f"{what} {value!r}: directory {str(path.parent)!r} does not exist")
    return path


def json_file(json_path: str | None) -> Path | None:
    """The file --json names, checked; None for none or for '-' (stdout)."""
    return None if json_path in (None, "-") else output_path(json_path, "--json")


def check_outputs(json_path: str | None, md_file: Path | None, derived: dict[str, str],
                  others: dict[str, Path | None] | None = None) -> dict[str, Path]:
    """Before the work: the files derived from --markdown's name (`derived` maps each suffix to how a message
    names it) may be replaced only if moe-jax wrote them, and no two outputs (with `others`, by option) share a
    path. Returns each derived file's path by suffix (none without --markdown)."""
    paths = {suffix: md_file.with_name(md_file.stem + suffix) for suffix in derived} if md_file else {}
    check_derived(paths.values())
    check_distinct({"--json": json_file(json_path), "--markdown": md_file,
                    **{label: paths.get(suffix) for suffix, label in derived.items()}, **(others or {})})
    return paths


def emit(data: dict, json_path: str | None, show: Callable[[], None]) -> None:
    """The JSON on stdout for ``--json -``, else `show()` (the terminal form); then the JSON file --json names."""
    if json_path == "-":
        click.echo(dumps(data, indent=2))
    else:
        show()
    path = json_file(json_path)
    if path:
        write_atomic(path, dumps(data, indent=2))


def write_npy(path, array) -> None:
    """`array` as float32 .npy, written atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float32))
    write_atomic(path, buf.getvalue())


def dump_hlo(a, directory: str) -> None:
    """Each phase's optimized HLO text and raw statistics of an `Analysis`, into `directory` (--dump-hlo)."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeJaxError(f"--dump-hlo {directory!r}: cannot create it: {e.strerror or e}") from None
    for name, phase in a.cost.phases.items():
        if phase.hlo_text:
            write_atomic(d / f"{name}.hlo.txt", phase.hlo_text)
        stats = {"memory": None if phase.memory is None else phase.memory.__dict__,
                 "xla_cost_analysis": phase.xla_cost, "walk": {"flops": phase.flops, "hbm_bytes": phase.hbm_bytes,
                                                               "transcendentals": phase.transcendentals},
                 "compile_seconds": phase.compile_seconds, "error": phase.error}
        write_atomic(d / f"{name}.stats.json", dumps(stats, indent=2))
