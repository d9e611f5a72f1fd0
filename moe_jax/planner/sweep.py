"""The load sweep (`plan --sweep`): every strategy across batch sizes, the Pareto front, the SLO pick.

1. Each strategy of the device count is estimated (`moe_jax.planner.search.estimate`) at batches
   dp · 2^k (powers of two when dp is one), from dp up to the largest whose estimated memory fits the
   device's memory less the headroom (its estimated capacity), or `max_batch`.
2. The estimate ranks the whole sweep: the Pareto front of decode tokens/s per device against tokens/s per
   user (1 / TPOT) is taken over every fitting point's estimate (a point is on it when no other point is at
   least as good on both and better on one).
3. The front's points are compiled (at most `top` of them, spread along it; the planner's compile path and
   cache, `moe_jax.planner.workers.compile_all`): each keeps its estimate and gains its compiled figures.
4. The pick: points meeting the SLOs (TTFT, TPOT) on their estimate, most tokens/s per device first, are
   compiled in turn (up to `PICK_ROUNDS` compiles beyond the front's) until one meets them on its compiled
   figures too; that point is chosen. Without SLOs the point with the most estimated tokens/s per device is
   chosen (and compiled). When no point meets them, the point closest to them (smallest worst ratio of figure
   to SLO, compiled figures where it has them) is named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import MAX_BATCH, Workload
from moe_jax.errors import MoeJaxError
from moe_jax.hardware.presets import Hardware
from moe_jax.parallel.mesh import Strategy, kv_copies
from moe_jax.planner.capacity import DEFAULT_HEADROOM, capacity, check_headroom, farthest
from moe_jax.planner.spec import SearchSpec
from moe_jax.planner.workers import Progress, compile_all

PICK_ROUNDS = 4
"""Points the SLO pick may compile, beyond the front's, looking for one whose compiled figures meet the SLOs."""


@dataclass(frozen=True)
class PointFigures:
    """Memory and latency of one strategy at one batch (estimated or compiled)."""

    fits: bool
    """Within the usable memory (device memory less the headroom)."""
    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    memory_bytes: int

    def per_device(self, devices: int) -> float:
        """Decode tokens/s per device."""
        return self.throughput_tok_s / devices

    @property
    def per_user(self) -> float:
        """Tokens/s one sequence sees: 1 / TPOT (0 without a decode time)."""
        return 1.0 / self.tpot_s if 0 < self.tpot_s < float("inf") else 0.0

    def meets(self, slo_ttft: float | None, slo_tpot: float | None) -> bool:
        """Fits and is within both SLOs (seconds; None: no limit)."""
        return self.fits and (slo_ttft is None or self.ttft_s <= slo_ttft) and (
            slo_tpot is None or self.tpot_s <= slo_tpot)

    def miss(self, slo_ttft: float | None, slo_tpot: float | None) -> float:
        """The worst figure / SLO ratio (≤ 1 when both are met): how far these figures are from the SLOs."""
        ratios = [x / y for x, y in ((self.ttft_s, slo_ttft), (self.tpot_s, slo_tpot)) if y is not None]
        return max(ratios, default=0.0)

    def to_dict(self, devices: int) -> dict:
        """JSON-ready, with tokens/s per device and per user."""
        return {**dataclasses.asdict(self), "tokens_per_s_per_device": self.per_device(devices),
                "tokens_per_s_per_user": self.per_user}


@dataclass
class SweepPoint:
    """One strategy at one batch: its estimate (which ranks it), and its compiled figures once compiled."""

    strategy: str
    devices: int
    batch: int
    estimate: PointFigures
    compiled: PointFigures | None = None
    on_front: bool = False

    @property
    def per_device(self) -> float:
        """Estimated decode tokens/s per device."""
        return self.estimate.per_device(self.devices)

    @property
    def per_user(self) -> float:
        """Estimated tokens/s per user (1 / TPOT)."""
        return self.estimate.per_user

    @property
    def best_known(self) -> PointFigures:
        """The compiled figures when there are some, else the estimate."""
        return self.compiled or self.estimate

    def record_compiled(self, analysis: dict, usable: int) -> None:
        """Take the compiled program's figures (analyze JSON)."""
        a, total = analysis, analysis["memory"]["total"]
        self.compiled = PointFigures(bool(a["fits"]) and total is not None and total <= usable,
                                     a["ttft_s"] or float("inf"), a["tpot_s"] or float("inf"),
                                     a["throughput_tok_s"] or 0.0, total or 0)

    def to_dict(self) -> dict:
        """JSON-ready: strategy, batch, whether on the front, the estimate and the compiled figures (or None)."""
        return {"strategy": self.strategy, "devices": self.devices, "batch": self.batch, "on_front": self.on_front,
                "estimate": self.estimate.to_dict(self.devices),
                "compiled": self.compiled.to_dict(self.devices) if self.compiled else None}


@dataclass
class Sweep:
    """What the sweep found."""

    points: list[SweepPoint]
    front: list[SweepPoint]
    """The Pareto front of the estimates, most tokens/s per device first."""
    headroom: float
    usable_bytes: int
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    chosen: SweepPoint | None = None
    """The best point meeting the SLOs on its compiled figures (without SLOs: the most tokens/s per device)."""
    closest: SweepPoint | None = None
    """When nothing meets the SLOs: the point nearest to them."""
    message: str = ""
    capacity: dict[str, dict] = field(default_factory=dict)
    """Strategy → its compiled capacity (`moe_jax.planner.capacity`), from its compiled batches."""
    estimated_capacity: dict[str, int] = field(default_factory=dict)
    """Strategy → the largest swept batch whose estimate fits."""
    chart: str | None = None
    """The plot's file name, once drawn."""
    analyses: dict[tuple[str, int], dict] = field(default_factory=dict, repr=False)
    """(strategy, batch) → analyze JSON of every compiled point (not in the JSON: the plan holds them)."""

    def to_dict(self) -> dict:
        """The plan JSON's ``sweep`` object."""
        return {
            "headroom": self.headroom, "usable_bytes": self.usable_bytes, "slo_ttft_s": self.slo_ttft,
            "slo_tpot_s": self.slo_tpot, "strategies": len({p.strategy for p in self.points}),
            "points": [p.to_dict() for p in self.points], "front": [p.to_dict() for p in self.front],
            "compiled": sum(p.compiled is not None for p in self.points),
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "closest": self.closest.to_dict() if self.closest else None, "message": self.message,
            "max_concurrency": self.capacity, "estimated_capacity": self.estimated_capacity, "chart": self.chart,
        }


def sweep_strategy(cfg: ModelConfig, strategy: Strategy, hw: Hardware, workload: Workload, usable: int, *,
                   max_batch: int | None = None, placement_cache: dict | None = None) -> list[SweepPoint]:
    """`strategy` estimated at batches dp · 2^k up to its estimated capacity (or `max_batch`), each point that
    fits `usable` bytes per device."""
    from moe_jax.planner.search import estimate
    from moe_jax.programs.guards import check_extents

    points, batch = [], strategy.dp
    limit = min(MAX_BATCH, max_batch or MAX_BATCH)
    while batch <= limit:
        try:
            check_extents(cfg, batch, workload.prompt_len, workload.cache_len, kv_copies(cfg, strategy))
        except MoeJaxError:
            break                                        # arrays past what XLA indexes: no larger batch compiles
        e = estimate(cfg, strategy, hw, Workload(batch, workload.prompt_len, workload.gen_len), placement_cache)
        if e.memory_total > usable:
            break
        points.append(SweepPoint(strategy.name, strategy.num_devices, batch,
                                 PointFigures(True, e.ttft_s, e.tpot_s, e.throughput_tok_s, e.memory_total)))
        batch *= 2
    return points


def pareto_front(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """The points whose estimate fits and no other fitting estimate matches or beats on both tokens/s per
    device and per user (one of equal twins kept), most tokens/s per device first."""
    front, best_user = [], -1.0
    for p in sorted((p for p in points if p.estimate.fits), key=lambda p: (-p.per_device, -p.per_user)):
        if p.per_user > best_user:
            front.append(p)
            best_user = p.per_user
    return front


def spread(front: Sequence[SweepPoint], k: int) -> list[SweepPoint]:
    """At most `k` points of `front`, evenly spaced along it, both ends kept."""
    if len(front) <= k:
        return list(front)
    if k == 1:
        return [front[0]]
    return [front[round(i * (len(front) - 1) / (k - 1))] for i in range(k)]


def ranked_for_slo(points: Sequence[SweepPoint], slo_ttft: float | None, slo_tpot: float | None
                   ) -> list[SweepPoint]:
    """The points whose estimate meets the SLOs, most estimated tokens/s per device first."""
    return sorted((p for p in points if p.estimate.meets(slo_ttft, slo_tpot)),
                  key=lambda p: (-p.per_device, -p.per_user))


def closest_point(points: Sequence[SweepPoint], slo_ttft: float | None, slo_tpot: float | None
                  ) -> SweepPoint | None:
    """The fitting point nearest the SLOs (smallest worst figure / SLO ratio; compiled figures where it has them)."""
    fitting = [p for p in points if p.best_known.fits]
    return min(fitting, key=lambda p: (p.best_known.miss(slo_ttft, slo_tpot), -p.per_device), default=None)


def compile_points(spec: SearchSpec, points: Sequence[SweepPoint], usable: int, *,
                   progress: Progress | None = None) -> dict[tuple[str, int], dict]:
    """Compile `points` through the planner's compile path and cache, one `compile_all` per batch; record
    their compiled figures. Returns (strategy, batch) → analyze JSON."""
    analyses = {}
    todo = [p for p in points if p.compiled is None]
    for batch in sorted({p.batch for p in todo}):
        at = [p for p in todo if p.batch == batch]
        bspec = dataclasses.replace(spec, workload=Workload(batch, spec.workload.prompt_len, spec.workload.gen_len),
                                    baseline=None)
        report = (lambda kind, text, done, total, b=batch: progress(f"sweep {kind}", f"batch {b}: {text}", done,
                                                                     total)) if progress else None
        payloads, _ = compile_all(bspec, [p.strategy for p in at], progress=report)
        for p in at:
            analyses[(p.strategy, batch)] = payloads[p.strategy]["analysis"]
            p.record_compiled(analyses[(p.strategy, batch)], usable)
    return analyses


def run_sweep(spec: SearchSpec, *, headroom: float = DEFAULT_HEADROOM, max_batch: int | None = None,
              progress: Progress | None = None) -> Sweep:
    """Sweep every strategy of `spec.devices` across batch sizes (see the module docstring)."""
    from moe_jax.planner.search import enumerate_strategies

    headroom = check_headroom(headroom)
    if max_batch is not None and max_batch < 1:
        raise MoeJaxError(f"--sweep-max-batch {max_batch} must be at least 1")
    cfg, hw, workload = spec.cfg, spec.hw, spec.workload
    usable = hw.memory_bytes - int(hw.memory_bytes * headroom)
    strategies = enumerate_strategies(cfg, spec.devices, None)
    if not strategies:
        raise MoeJaxError(f"no valid strategy for {cfg.name} on {spec.devices} devices to sweep")
    points, estimated, cache = [], {}, {}
    for i, s in enumerate(strategies, 1):
        mine = sweep_strategy(cfg, s, hw, workload, usable, max_batch=max_batch, placement_cache=cache)
        points += mine
        if mine:
            estimated[s.name] = mine[-1].batch
        if progress:
            progress("sweep", f"{s.name}: {len(mine)} batch sizes fit", i, len(strategies))
    sweep = Sweep(points, pareto_front(points), headroom, usable, spec.slo_ttft, spec.slo_tpot,
                  estimated_capacity=estimated)
    if not sweep.front:
        sweep.message = (f"no strategy fits {cfg.name} on {spec.devices} devices within "
                         f"{usable / 1e9:.2f} GB per device ({headroom:.0%} headroom kept) at any batch")
        return sweep
    for p in sweep.front:
        p.on_front = True
    analyses = compile_points(spec, spread(sweep.front, spec.top), usable, progress=progress)
    extra = 0
    for p in ranked_for_slo(points, spec.slo_ttft, spec.slo_tpot):
        if p.compiled is None:
            if extra == PICK_ROUNDS:
                break
            analyses.update(compile_points(spec, [p], usable, progress=progress))
            extra += 1
        if p.compiled.meets(spec.slo_ttft, spec.slo_tpot):
            sweep.chosen = p
            break
    if sweep.chosen is None:
        sweep.closest = closest_point(points, spec.slo_ttft, spec.slo_tpot)
        sweep.message = no_point_message(sweep.closest, spec.slo_ttft, spec.slo_tpot, tried=extra)
    sweep.analyses = analyses
    largest = {}
    for (name, batch), a in analyses.items():
        if batch >= largest.get(name, (0, None))[0]:
            largest[name] = (batch, a)
    for name, (batch, a) in sorted(largest.items()):
        c = capacity(a, headroom=headroom, other=farthest(analyses, name, batch))
        if c is not None:
            sweep.capacity[name] = c.to_dict()
    return sweep


def no_point_message(closest: SweepPoint | None, slo_ttft: float | None, slo_tpot: float | None, *,
                     tried: int = 0) -> str:
    """Why the sweep chose nothing: the SLOs, and the point closest to them."""
    limits = " and ".join(f"{n} <= {v * 1e3:g} ms" for n, v in (("TTFT", slo_ttft), ("TPOT", slo_tpot))
                          if v is not None) or "the memory"
    if closest is None:
        return f"no swept point fits, so none meets {limits}"
    f = closest.best_known
    how = "compiled" if closest.compiled else "estimated"
    also = f" ({tried} more points whose estimate met them were compiled and missed)" if tried else ""
    return (f"no swept point meets {limits}{also}; the closest is {closest.strategy} at batch {closest.batch} "
            f"({how}: TTFT {f.ttft_s * 1e3:.3g} ms, TPOT {f.tpot_s * 1e3:.3g} ms, "
            f"{f.per_device(closest.devices):.4g} tok/s per device)")
