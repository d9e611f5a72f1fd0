"""Reading optimized HLO text: the collectives a compiled program performs and the mesh axes they span.

Replica groups print in three forms, all handled:
- explicit: ``replica_groups={{0,1},{2,3}}``
- iota: ``replica_groups=[4,2]<=[2,2,2]T(0,2,1)`` (iota over the bracketed dims, transposed, reshaped)
- mesh: ``replica_groups=mesh['axis_0'=4,'axis_1'=2] device_ids=([2,4]T(1,0)) {'axis_0'}``
  (devices laid out on the named mesh; a group is the devices along the braced axes)
Async pairs count once: ``*-start`` is counted, ``*-done`` skipped.
Device numbers are partition ids: positions in the mesh's flattened device array.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                    "ragged-all-to-all", "collective-broadcast")

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
                 r"(?P<kind>" + "|".join(sorted(COLLECTIVE_KINDS, key=len, reverse=True)) +
                 r")(?P<start>-start)?\(")
_IOTA = re.compile(r"\[(?P<out>[\d,]+)\]<=\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?")
_MESH = re.compile(r"mesh\[(?P<axes>[^\]]*)\](?:,?\s*device_ids=\((?P<ids>[^)]*\)?)\))?\s*\{(?P<sel>[^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    kind: str
    """all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, ..."""
    name: str
    """HLO instruction name."""
    shape: str
    """Result shape text as printed."""
    groups: tuple[tuple[int, ...], ...]
    """Replica groups (partition ids); for collective-permute, the (source, target) pairs."""
    op_name: str
    """The jax op_name metadata (names the named_scope the op came from), '' if absent."""


def _iota_groups(text: str) -> list[list[int]]:
    m = _IOTA.fullmatch(text.strip())
    if not m:
        raise ValueError(f"unrecognised iota replica groups {text!r}")
    out = [int(x) for x in m["out"].split(",")]
    dims = [int(x) for x in m["dims"].split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m["perm"]:
        ids = ids.transpose([int(x) for x in m["perm"].split(",")])
    return ids.reshape(out).tolist()


def _mesh_groups(m: re.Match) -> list[list[int]]:
    sizes = [int(part.split("=")[1]) for part in m["axes"].split(",") if part.strip()]
    names = [part.split("=")[0].strip().strip("'") for part in m["axes"].split(",") if part.strip()]
    n = int(np.prod(sizes))
    ids = np.arange(n)
    if m["ids"]:
        ids_text = m["ids"].strip()
        if ids_text.startswith("["):
            dims_perm = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", ids_text)
            dims = [int(x) for x in dims_perm[1].split(",")]
            ids = np.arange(n).reshape(dims)
            if dims_perm[2]:
                ids = ids.transpose([int(x) for x in dims_perm[2].split(",")])
        else:
            ids = np.array([int(x) for x in re.findall(r"\d+", ids_text)])
    ids = ids.reshape(sizes)
    selected = [names.index(s.strip().strip("'")) for s in m["sel"].split(",") if s.strip()]
    rest = [i for i in range(len(sizes)) if i not in selected]
    group = int(np.prod([sizes[i] for i in selected]))
    return ids.transpose(rest + selected).reshape(-1, group).tolist()


def parse_replica_groups(line: str) -> list[list[int]]:
    """Replica groups of one HLO instruction line ([] when the line has none: all devices)."""
    if "source_target_pairs=" in line:
        body = line.split("source_target_pairs=", 1)[1]
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", body.split("}}", 1)[0] + "}")]
    if "replica_groups=" not in line:
        return []
    body = line.split("replica_groups=", 1)[1]
    if body.startswith("mesh["):
        m = _MESH.match(body)
        if not m:
            raise ValueError(f"unrecognised mesh replica groups in {line.strip()[:200]!r}")
        return _mesh_groups(m)
    if body.startswith("["):
        return _iota_groups(re.match(r"\S+?(?=,\s|\s|$)", body)[0])
    if body.startswith("{}"):
        return []
    text = body[: body.index("}}") + 2] if "}}" in body else body.split(",", 1)[0]
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", text)]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in optimized HLO text (async ones counted at their start)."""
    found = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        op_name = _OP_NAME.search(line)
        groups = tuple(tuple(g) for g in parse_replica_groups(line))
        found.append(Collective(m["kind"], m["name"], m["shape"], groups, op_name[1] if op_name else ""))
    return found


def group_axes(group, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes along which the devices of one replica group differ.

    mesh_shape: axis name → size in mesh order (e.g. Strategy.mesh_shape). For a
    collective-permute pair, the axes the hop crosses.
    """
    coords = np.array(np.unravel_index(np.asarray(group), tuple(mesh_shape.values()))).T  # [n, axes]
    varying = (coords != coords[:1]).any(axis=0)
    return tuple(name for name, v in zip(mesh_shape, varying) if v)


def collective_axes(c: Collective, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Union of the mesh axes spanned by a collective's groups (all axes when it has no groups)."""
    if not c.groups:
        return tuple(a for a, n in mesh_shape.items() if n > 1)
    axes = set()
    for g in c.groups:
        axes.update(group_axes(g, mesh_shape))
    return tuple(a for a in mesh_shape if a in axes)
