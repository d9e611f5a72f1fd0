"""What a search found: the ranked candidates, the compiled programs, the best and the baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_jax.names import Objective
from moe_jax.planner.candidate import Candidate
from moe_jax.planner.spec import SearchSpec

PLAN_SCHEMA = "moe-jax.plan/1"


@dataclass
class PlanResult:
    """What `plan` found."""

    spec: SearchSpec
    """What was searched."""
    candidates: list[Candidate]
    """Every strategy searched, ranked: estimate and (for the compiled ones) compiled figures."""
    compiled: dict[str, dict] = field(default_factory=dict)
    """Strategy name → {"analysis": analyze JSON, "markdown": report} (the cache's payload)."""
    best: str | None = None
    baseline: str | None = None
    seconds: float = 0.0
    searched_device_counts: list[int] = field(default_factory=list)
    message: str = ""
    estimate_bias: float | None = None
    """Median (estimated TPOT / compiled TPOT − 1) over the compiled candidates: how far the
    uncompiled rows' estimates are likely off on this backend."""
    dispatch_comparison: dict | None = None
    """The best strategy compiled with each expert dispatch method (`compare_dispatch`)."""
    capacity: dict[str, dict] = field(default_factory=dict)
    """Strategy name → its `moe_jax.planner.capacity.Capacity` (JSON), for each compiled strategy."""
    headroom: float | None = None
    """The share of device memory the capacity keeps free (None: capacity not computed)."""
    sweep: dict | None = None
    """The load sweep (`moe_jax.planner.sweep.Sweep.to_dict`), with ``plan --sweep``."""
    disaggregated: dict | None = None
    """Disaggregated prefill and decode pools (`moe_jax.planner.disaggregated.Disaggregated.to_dict`), with
    ``plan --disaggregated``."""

    @property
    def objective(self) -> Objective:
        return self.spec.objective

    @property
    def devices(self) -> int:
        return self.spec.devices

    def to_dict(self) -> dict:
        """The plan JSON: best and baseline in the analyze schema, candidates, counts, seconds."""
        return {
            "schema": PLAN_SCHEMA, "objective": self.objective, "devices": self.devices,
            "best": self._analysis(self.best), "baseline": self._analysis(self.baseline),
            "candidates": [c.to_dict() for c in self.candidates], "searched": len(self.candidates),
            "compiled": sum(1 for c in self.candidates if c.compiled),
            "searched_device_counts": self.searched_device_counts, "seconds": self.seconds,
            "message": self.message, "estimate_bias_tpot": self.estimate_bias,
            "dispatch_comparison": self.dispatch_comparison,
            "max_concurrency": self.capacity, "headroom": self.headroom, "sweep": self.sweep,
            "disaggregated": self.disaggregated,
        }

    def _analysis(self, name: str | None) -> dict | None:
        """A compiled strategy's analyze JSON, with its ``max_concurrency`` when the capacity was computed."""
        if not name:
            return None
        a = self.compiled[name]["analysis"]
        return {**a, "max_concurrency": self.capacity.get(name)} if self.headroom is not None else a
