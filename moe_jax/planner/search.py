"""The planner: every (ep, tp, pp, dp) for a device count, ranked analytically, the best compiled.

1. Enumerate every factorisation of N into ep · tp · pp · dp that `moe_jax.parallel.mesh.validate`
   accepts for the model and batch.
2. Estimate each with `moe_jax.costs.analytic` fed to the same time model as compiled costs.
3. Rank by the objective (feasible first: fits in memory and meets the SLOs), compile the
   top K with the cost analyzer in worker processes (`moe_jax.planner.workers`), and re-rank on
   compiled numbers. Compiled results are cached on disk (`moe_jax.planner.cache`), keyed by
   everything that changes them.

The search's inputs travel as one `SearchSpec`; each strategy is a `Candidate`; the answer a `PlanResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.costs.types import CostReport
from moe_jax.errors import MoeJaxError, StrategyError
from moe_jax.hardware.presets import Hardware
from moe_jax.names import AUTO, Objective
from moe_jax.parallel.mesh import Strategy, divisors, validate
from moe_jax.planner.cache import check_cache_dir
from moe_jax.planner.candidate import Candidate, Figures, rank_key
from moe_jax.planner.result import PlanResult
from moe_jax.planner.spec import SearchSpec
from moe_jax.planner.workers import Progress, compile_all

OBJECTIVES = tuple(Objective)
MAX_DEVICES = 1 << 20
"""Largest device count the planner searches (a million accelerators)."""


def enumerate_strategies(cfg: ModelConfig, devices: int, batch: int) -> list[Strategy]:
    """Every valid (ep, tp, pp, dp) whose product is `devices`."""
    found = []
    for ep in divisors(devices):
        for tp in divisors(devices // ep):
            for pp in divisors(devices // (ep * tp)):
                s = Strategy(ep=ep, tp=tp, pp=pp, dp=devices // (ep * tp * pp))
                try:
                    validate(s, cfg, batch=batch)
                except StrategyError:
                    continue
                found.append(s)
    return found


@dataclass
class Estimate:
    """Analytic prediction for one strategy."""

    strategy: Strategy
    fits: bool
    memory_total: int
    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    meets_slo: bool = True

    @property
    def feasible(self) -> bool:
        return self.fits and self.meets_slo


def estimate(cfg: ModelConfig, strategy: Strategy, hw: Hardware, workload: Workload,
             placement_cache: dict | None = None) -> Estimate:
    """Analytic memory and latency of one strategy (no compile).

    placement_cache: a dict kept across calls for one model; it holds each strategy's parameter shards, which
    do not depend on the workload (the load sweep estimates each strategy at many batches)."""
    from moe_jax.costs.analytic import analytic_report, estimate_phase
    from moe_jax.perf.timemodel import predict
    from moe_jax.programs.placement import Placement, describe, param_shards

    if placement_cache is None:
        p = describe(cfg, strategy, batch=workload.batch, cache_len=workload.cache_len)
    else:
        validate(strategy, cfg, batch=workload.batch)
        if strategy.name not in placement_cache:
            placement_cache[strategy.name] = param_shards(cfg, strategy)
        p = Placement(cfg, strategy, placement_cache[strategy.name], workload.batch, workload.cache_len)
    weights, kv = p.weight_bytes_per_device, p.kv_cache_bytes_per_device
    phases = {ph: estimate_phase(cfg, strategy, workload, ph, weights, kv) for ph in ("prefill", "decode")}
    report = CostReport(cfg.name, strategy.name, strategy.name, workload.to_dict(), "analytic", "estimate",
                        strategy.num_devices, phases, [], analytic_report(cfg, strategy, workload, weights, phases))
    pred = predict(report, hw, workload.batch, workload.gen_len, cfg.dtype)
    total = max(ph.memory.peak for ph in phases.values())
    return Estimate(strategy, total <= hw.memory_bytes, total, pred.ttft_s, pred.tpot_s, pred.throughput_tok_s)


def rank_estimates(cfg: ModelConfig, devices: int, hw: Hardware, workload: Workload, *,
                   objective: Objective = Objective.THROUGHPUT, slo_ttft: float | None = None,
                   slo_tpot: float | None = None, progress: Progress | None = None) -> list[Candidate]:
    """Every strategy for `devices` estimated and ranked (feasible first, then by the objective)."""
    rows = []
    for s in enumerate_strategies(cfg, devices, workload.batch):
        e = estimate(cfg, s, hw, workload)
        e.meets_slo = ((slo_ttft is None or e.ttft_s <= slo_ttft) and (slo_tpot is None or e.tpot_s <= slo_tpot))
        figures = Figures(e.fits, e.ttft_s, e.tpot_s, e.throughput_tok_s, e.memory_total)
        rows.append(Candidate.estimated(s.name, devices, figures, feasible=e.feasible))
    if progress:
        progress("estimate", f"estimated {len(rows)} strategies on {devices} devices", 1, 1)
    return sorted(rows, key=rank_key(objective))


def fewest_devices(cfg: ModelConfig, devices: int, hw: Hardware, workload: Workload, *, start: int = 1,
                   slo_ttft: float | None = None, slo_tpot: float | None = None
                   ) -> tuple[int | None, list[Candidate]]:
    """The smallest device count from `start` up to `devices` with an estimated-feasible strategy.

    Returns (count or None, the ranked estimates of every count tried).
    """
    tried = []
    for n in range(start, devices + 1):
        rows = rank_estimates(cfg, n, hw, workload, objective=Objective.COST, slo_ttft=slo_ttft, slo_tpot=slo_tpot)
        tried += rows
        if any(r.feasible for r in rows):
            return n, tried
    return None, tried


def plan(cfg: ModelConfig, devices: int, hw: Hardware, workload: Workload, *,
         objective: Objective | str = Objective.THROUGHPUT, slo_ttft: float | None = None,
         slo_tpot: float | None = None, baseline: Strategy | None = None, top: int = 8, backend: str = AUTO,
         topology: str | None = None, cache_dir: Path | str | None = None, workers: int = 2,
         progress: Progress | None = None) -> PlanResult:
    """Search, estimate, compile the best `top`, and rank; `progress(kind, text, done, total)` reports."""
    start = time.perf_counter()
    if objective not in OBJECTIVES:
        raise MoeJaxError(f"unknown objective {objective!r}; valid: {', '.join(Objective)}")
    if devices < 1 or devices > MAX_DEVICES:
        raise MoeJaxError(f"--devices {devices} must be between 1 and {MAX_DEVICES:,}")
    from moe_jax.programs.guards import check_extents

    check_extents(cfg, workload.batch, workload.prompt_len, workload.cache_len)
    spec = SearchSpec(cfg, devices, hw, workload, objective=Objective(objective), slo_ttft=slo_ttft,
                      slo_tpot=slo_tpot, baseline=baseline, top=top, backend=backend, topology=topology,
                      cache_dir=Path(cache_dir) if cache_dir else None, workers=workers)
    if spec.cache_dir:
        check_cache_dir(spec.cache_dir)
    if spec.objective == Objective.COST:
        return _plan_fewest(spec, progress=progress, start=start)
    rows = rank_estimates(cfg, devices, hw, workload, objective=spec.objective, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                          progress=progress)
    return _compile_and_rank(spec, rows=rows, pool=rows, progress=progress, start=start)


MAX_COST_ESCALATIONS = 4
"""--objective cost: device counts whose top candidates are compiled before giving up."""


def _plan_fewest(spec: SearchSpec, *, progress: Progress | None, start: float) -> PlanResult:
    """Smallest estimated-feasible device count first; if none of its compiled candidates is feasible
    (estimates are optimistic), the next count, up to MAX_COST_ESCALATIONS counts."""
    rows, n, result = [], 0, None
    for _ in range(MAX_COST_ESCALATIONS):
        n, tried = fewest_devices(spec.cfg, spec.devices, spec.hw, spec.workload, start=n + 1,
                                  slo_ttft=spec.slo_ttft, slo_tpot=spec.slo_tpot)
        rows += tried
        if progress:
            progress("estimate", f"estimated {len(rows)} strategies up to {n or spec.devices} devices", 1, 1)
        if n is None:
            break
        # rows accumulates over the escalations: its candidates keep the compiled figures of earlier counts
        pool = [r for r in rows if r.devices == n]
        result = _compile_and_rank(spec, rows=rows, pool=pool, progress=progress, start=start)
        if result.best:
            return result
    if not rows:
        raise MoeJaxError(f"no valid strategy for {spec.cfg.name} on up to {spec.devices} devices with batch "
                          f"{spec.workload.batch}")
    if result is None:
        result = _compile_and_rank(spec, rows=rows, pool=[], progress=progress, start=start)
    return result


def _compile_and_rank(spec: SearchSpec, *, rows: list[Candidate], pool: list[Candidate],
                      progress: Progress | None, start: float) -> PlanResult:
    """Compile the best `spec.top` of `pool` (and the baseline), record their compiled figures on `rows`
    (every candidate searched; the baseline is appended when the search did not produce it) and rank them."""
    cfg, hw, baseline = spec.cfg, spec.hw, spec.baseline
    if not rows:
        raise MoeJaxError(f"no valid strategy for {cfg.name} on {spec.devices} devices with batch "
                          f"{spec.workload.batch}: check that the device count has divisors matching experts, "
                          "heads, layers and batch")
    searched_counts = sorted({r.devices for r in rows})
    pool = sorted(pool, key=rank_key(spec.objective))
    chosen = [r.strategy for r in pool[:spec.top] if r.feasible] or [r.strategy for r in pool[:spec.top]]
    names = list(dict.fromkeys(chosen + ([baseline.name] if baseline else [])))
    by_name = {r.strategy: r for r in rows}
    if baseline and baseline.name not in by_name:
        validate(baseline, cfg, batch=spec.workload.batch)
        by_name[baseline.name] = Candidate(baseline.name, baseline.num_devices)
        rows.append(by_name[baseline.name])

    result = PlanResult(spec, rows, searched_device_counts=searched_counts)
    result.compiled, cached = compile_all(spec, names, progress=progress)
    for name, entry in result.compiled.items():
        a, r = entry["analysis"], by_name[name]
        r.cached = r.cached or name in cached
        r.record_compiled(a, meets_slo=spec.meets_slo(a["ttft_s"] or 1e30, a["tpot_s"] or 1e30))
    key = rank_key(spec.objective)
    result.candidates = sorted(rows, key=lambda x: (not x.compiled, *key(x)))
    compiled_ok = [r for r in result.candidates if r.compiled and r.feasible
                   and (baseline is None or r.strategy != baseline.name or r.strategy in chosen)]
    result.best = compiled_ok[0].strategy if compiled_ok else None
    result.baseline = baseline.name if baseline else None
    if result.best is None:
        short = min((r for r in rows if r.memory_bytes), key=lambda r: r.memory_bytes, default=None)
        result.message = ("nothing feasible: no strategy fits and meets the SLOs" + (
            f"; the smallest memory need is {short.strategy} at {short.memory_bytes / 1e9:.2f} GB per device, "
            f"{(short.memory_bytes - hw.memory_bytes) / 1e9:.2f} GB over {hw.memory_bytes / 1e9:.0f} GB"
            if short and short.memory_bytes > hw.memory_bytes else ""))
    ratios = sorted(r.tpot_estimate_error for r in rows if r.tpot_estimate_error is not None)
    if ratios:
        result.estimate_bias = ratios[len(ratios) // 2]
    result.seconds = time.perf_counter() - start
    return result
