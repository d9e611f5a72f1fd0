"""How long one collective call takes: each kind by its own algorithm, on the link tiers its group spans.

Inputs per call: the payload per device S (what the cost walk counts: result bytes; operand
bytes for reduce-scatter; the local buffer for an all-to-all), the group's size n and how it
sits on the machine (`Span`: m nodes with up to p members each). Per link tier (`LinkTier`):
line-rate bandwidth B, a fixed cost o per call, and two protocols, as NCCL has: a low-latency
one (α per step, a fraction e_s of B) and a bulk one (α_b per step, a fraction e of B; for an
all-reduce on a switch that reduces, NVLink SHARP, its own fraction). A call takes the fastest
of the algorithms and protocols the library chooses between. The constants of each preset are
fitted to published measurements named in it (bench/collectives_published.py holds the
model against every one).

Inside one tier (m = 1, or p = 1 across nodes), with bw = eB for the protocol:

- all-gather, reduce-scatter: ring, ``o + (n−1)α + S(n−1)/n / bw``.
- all-reduce: a ring, ``o + 2(n−1)α + 2S(n−1)/n / bw``, or a (double binary) tree,
  ``o + 2⌈log2 n⌉α + 2S / bw``: small messages pay log n latencies, large ones the ring's bytes.
- all-to-all and ragged all-to-all: a pairwise exchange, every peer at once (not a ring):
  ``o + α + (n−1)·c_peer + S(n−1)/n / bw``.
- collective-permute: one message, ``o + α + S / bw``; collective-broadcast: a pipelined tree,
  ``o + ⌈log2 n⌉α + S / bw``.

A group spanning m > 1 nodes with p > 1 members in each is hierarchical, its stages pipelined
(each stage's latency is paid in turn; their byte transfers overlap, the slowest decides):

- all-reduce: reduce-scatter and all-gather inside the node (p) beside an all-reduce across
  nodes (m) of S/p; or, when faster (small messages), one tree over all n on the network tier;
- all-gather, reduce-scatter: across nodes (m) of S/p beside inside the node (p) of S;
- all-to-all: the (n−p)/n of the buffer bound for other nodes leaves through the network
  while the (p−1)/n for node peers crosses the node link, at the same time:
  ``o_net + α_net + (n−1)·c_peer + max(S(n−p)/n / bw_net, S(p−1)/n / bw_node)``.

A calibrated hardware file (`moe-jax calibrate`) may carry a measured fit
(latency + bytes / bandwidth) per kind, tier and group size; a call inside one tier uses the
fit of its kind and tier at the nearest measured group size instead of the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_jax.hardware.presets import Hardware, LinkTier

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
         "collective-broadcast")


@dataclass(frozen=True)
class Span:
    """How one replica group sits on the machine."""

    size: int
    """n: members of the group."""
    nodes: int
    """m: distinct nodes the members sit in."""
    per_node: int
    """p: the most members in any one node."""

    @property
    def tiers(self) -> str:
        """'node' (one node), 'network' (one member per node) or 'hierarchical'."""
        if self.nodes <= 1:
            return "node"
        return "network" if self.per_node <= 1 else "hierarchical"


def group_span(group: list[int], hw: Hardware, physical_order: list[int] | None = None,
               size: int | None = None) -> Span:
    """The `Span` of a replica group of partition ids (physical_order maps each to its topology index;
    nodes are runs of ``hw.devices_per_node`` consecutive indices). Without a group, `size` members in one
    node when they fit."""
    if not group:
        n = size or 1
        return Span(n, math.ceil(n / hw.devices_per_node), min(n, hw.devices_per_node))
    where = (lambda d: physical_order[d]) if physical_order else (lambda d: d)
    counts: dict[int, int] = {}
    for d in group:
        node = where(d) // hw.devices_per_node
        counts[node] = counts.get(node, 0) + 1
    return Span(size or len(group), len(counts), max(counts.values()))


def _log2(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def _protocols(link: LinkTier, kind: str) -> list[tuple[str, float, float]]:
    """(name, seconds per step, bytes/s) of each protocol the library may pick on `link` for `kind`."""
    bulk_eff = link.all_reduce_efficiency if kind == "all-reduce" and link.all_reduce_efficiency else link.efficiency
    found = [("bulk", link.bulk_latency_s or link.latency_s, link.bandwidth * bulk_eff)]
    if link.small_efficiency:
        found.append(("low-latency", link.latency_s, link.bandwidth * link.small_efficiency))
    return found


def _candidates(kind: str, nbytes: float, n: int, link: LinkTier) -> list[tuple[float, str]]:
    o, found = link.call_overhead_s, []
    for proto, a, bw in _protocols(link, kind):
        if kind in ("all-gather", "reduce-scatter"):
            found.append((o + (n - 1) * a + nbytes * (n - 1) / n / bw, f"ring, {proto}"))
        elif kind == "all-reduce":
            found.append((o + 2 * (n - 1) * a + 2 * nbytes * (n - 1) / n / bw, f"ring, {proto}"))
            found.append((o + 2 * _log2(n) * a + 2 * nbytes / bw, f"tree, {proto}"))
        elif kind in ("all-to-all", "ragged-all-to-all"):
            found.append((o + a + (n - 1) * link.per_peer_s + nbytes * (n - 1) / n / bw, f"pairwise, {proto}"))
        elif kind == "collective-permute":
            found.append((o + a + nbytes / bw, f"send/recv, {proto}"))
        else:                                                          # collective-broadcast
            found.append((o + _log2(n) * a + nbytes / bw, f"tree, {proto}"))
    return found


def one_tier(kind: str, nbytes: float, n: int, link: LinkTier) -> tuple[float, str]:
    """Seconds of one call of `kind` over `n` members on a single link tier, and the algorithm and protocol
    (the fastest of those the library chooses between)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "collective-permute":
        n = max(n, 2)
    if n <= 1:
        return 0.0, "none"
    return min(_candidates(kind, nbytes, n, link))


def _fitted(kind: str, nbytes: float, n: int, tier: str, hw: Hardware) -> tuple[float, str] | None:
    cal = getattr(hw, "calibration", None)
    if cal is None or n <= 1:
        return None
    fit = cal.collective("all-to-all" if kind == "ragged-all-to-all" else kind, tier, n)
    if fit is None:
        return None
    note = "measured" if fit.group_size == n else f"measured at {fit.group_size} devices"
    return fit.seconds(nbytes), note


def _pipelined(stages: list[tuple[str, float, int, LinkTier]]) -> float:
    """Stages of a hierarchical collective as the library pipelines them: every stage's latency is paid in
    turn, while their byte transfers overlap (the slowest decides)."""
    latency = [one_tier(kind, 0.0, n, link)[0] for kind, _, n, link in stages]
    moving = [one_tier(kind, nbytes, n, link)[0] - lat for (kind, nbytes, n, link), lat in zip(stages, latency,
                                                                                             strict=True)]
    return sum(latency) + max(moving)


def collective_seconds(kind: str, nbytes: float, span: Span, hw: Hardware) -> tuple[float, str]:
    """Seconds of one call of a collective with payload `nbytes` per device over the group `span`, and
    the algorithm (with its tiers) the time assumes."""
    n, m, p = span.size, span.nodes, span.per_node
    if span.tiers != "hierarchical":
        tier = "node" if span.tiers == "node" else "network"
        link = hw.node_link if tier == "node" else hw.network_link
        fitted = _fitted(kind, nbytes, n, tier, hw)
        if fitted is not None:
            return fitted[0], f"{fitted[1]} ({tier})"
        seconds, algo = one_tier(kind, nbytes, n, link)
        return seconds, f"{algo} ({link.name})"
    node, net = hw.node_link, hw.network_link
    if kind == "all-reduce":
        staged = _pipelined([("reduce-scatter", nbytes, p, node), ("all-gather", nbytes, p, node),
                             ("all-reduce", nbytes / p, m, net)])
        flat = one_tier("all-reduce", nbytes, n, net)                  # small messages: one tree over every member
        if flat[0] < staged:
            return flat[0], f"{flat[1]} over {n} ({net.name})"
        return staged, (f"hierarchical: reduce-scatter and all-gather x{p} ({node.name}) beside all-reduce x{m} "
                        f"({net.name})")
    if kind in ("all-gather", "reduce-scatter"):
        t = _pipelined([(kind, nbytes / p, m, net), (kind, nbytes, p, node)])
        return t, f"hierarchical: {kind} x{m} ({net.name}) beside x{p} ({node.name})"
    if kind in ("all-to-all", "ragged-all-to-all"):
        off = nbytes * (n - p) / n / (net.bandwidth * net.efficiency)
        on = nbytes * (p - 1) / n / (node.bandwidth * node.efficiency)
        return (net.call_overhead_s + net.latency_s + (n - 1) * net.per_peer_s + max(off, on),
                f"pairwise: {m} nodes over {net.name}, {p} per node over {node.name}, at once")
    seconds, algo = one_tier(kind, nbytes, n, net)                    # permute / broadcast: the slower tier
    return seconds, f"{algo} ({net.name})"


def collective_time(kind: str, nbytes: float, group_size: int, link: LinkTier) -> float:
    """Seconds of one call over `group_size` members on one link tier (`one_tier` without the algorithm)."""
    return one_tier(kind, nbytes, group_size, link)[0]


__all__ = ["KINDS", "Span", "group_span", "one_tier", "collective_seconds", "collective_time"]
