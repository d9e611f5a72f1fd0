"""One strategy as the planner sees it: its estimate, then (for the shortlist) its compiled figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from moe_jax.names import Objective


@dataclass(frozen=True)
class Figures:
    """Memory and latency of one strategy from the analytic estimate."""

    fits: bool
    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    memory_bytes: int

    def to_dict(self) -> dict:
        """JSON-ready (the plan's ``estimate`` object)."""
        return asdict(self)


@dataclass
class Candidate:
    """One searched strategy, ranked on its compiled figures when it was compiled, else on its estimate.

    The headline figures (`fits` … `throughput_per_device`) start as the estimate's and are replaced by the
    compiled program's (`record_compiled`); `estimate` keeps the estimate. A baseline outside the search
    starts with no figures at all and always gets compiled ones.
    """

    strategy: str
    """The strategy's name (``EP2-TP2-PP1-DP2``)."""
    devices: int
    fits: bool = False
    feasible: bool = False
    """Fits in memory and meets the SLOs."""
    memory_bytes: int | None = None
    """Peak per device."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    throughput_tok_s: float | None = None
    throughput_per_device: float | None = None
    compiled: bool = False
    estimate: Figures | None = None
    cached: bool = False
    """The compiled figures came from the cache."""
    estimate_vs_compiled: dict[str, float] | None = None
    """``ttft_s`` / ``tpot_s``: estimate / compiled − 1, for a compiled candidate with an estimate."""

    @classmethod
    def estimated(cls, strategy: str, devices: int, figures: Figures, *, feasible: bool) -> Candidate:
        """A candidate ranked on its estimate."""
        return cls(strategy, devices, fits=figures.fits, feasible=feasible, memory_bytes=figures.memory_bytes,
                   ttft_s=figures.ttft_s, tpot_s=figures.tpot_s, throughput_tok_s=figures.throughput_tok_s,
                   throughput_per_device=figures.throughput_tok_s / devices, estimate=figures)

    def record_compiled(self, analysis: dict, *, meets_slo: bool) -> None:
        """Take the figures of the compiled program (`moe_jax.perf.analysis` JSON): they rank it from now on."""
        a = analysis
        self.compiled, self.fits, self.feasible = True, a["fits"], a["fits"] and meets_slo
        # a program without a decode (or prefill) time ranks last on that time, not first
        self.ttft_s = a["ttft_s"] or float("inf")
        self.tpot_s = a["tpot_s"] or float("inf")
        self.throughput_tok_s = a["throughput_tok_s"] or 0.0
        self.memory_bytes = a["memory"]["total"]
        self.throughput_per_device = self.throughput_tok_s / self.devices
        if self.estimate and a["tpot_s"]:
            self.estimate_vs_compiled = {k: getattr(self.estimate, k) / a[k] - 1 for k in ("ttft_s", "tpot_s")
                                         if a[k]}

    @property
    def tpot_estimate_error(self) -> float | None:
        """Estimated TPOT / compiled TPOT − 1; None unless compiled and estimated."""
        return (self.estimate_vs_compiled or {}).get("tpot_s")

    def to_dict(self) -> dict:
        """The plan JSON's candidate object: the keys the dict candidates had, absent ones left out."""
        d = {"strategy": self.strategy, "devices": self.devices, "fits": self.fits, "feasible": self.feasible}
        if self.estimate is not None or self.compiled:      # a baseline outside the search has no figures before
            d.update(memory_bytes=self.memory_bytes, ttft_s=self.ttft_s, tpot_s=self.tpot_s,
                     throughput_tok_s=self.throughput_tok_s, throughput_per_device=self.throughput_per_device)
        d.update(compiled=self.compiled, estimate=self.estimate.to_dict() if self.estimate else None)
        if self.cached:
            d["cached"] = True
        if self.estimate_vs_compiled is not None:
            d["estimate_vs_compiled"] = self.estimate_vs_compiled
        return d


def rank_key(objective: Objective) -> Callable[[Candidate], tuple]:
    """Sort key: feasible first, then best by the objective (``COST``: fewest devices, then throughput)."""
    metric = {
        Objective.THROUGHPUT: lambda c: (-c.throughput_tok_s,),
        Objective.TTFT: lambda c: (c.ttft_s,),
        Objective.TPOT: lambda c: (c.tpot_s,),
        Objective.COST: lambda c: (c.devices, -c.throughput_tok_s),
    }[Objective(objective)]
    return lambda c: (not c.feasible, *metric(c))
