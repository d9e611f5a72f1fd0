"""What one search is asked: the model, the devices, the hardware, the workload and how to rank and compile.

Built once by `moe_jax.planner.search.plan` and handed, unchanged, to every step of the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_jax.config import ModelConfig
from moe_jax.costs.compile import Workload
from moe_jax.hardware.presets import Hardware
from moe_jax.names import AUTO, Objective
from moe_jax.parallel.mesh import Strategy


@dataclass(frozen=True)
class SearchSpec:
    """The inputs of one strategy search."""

    cfg: ModelConfig
    devices: int
    """The device count searched (for ``Objective.COST``: the most the search may use)."""
    hw: Hardware
    workload: Workload
    objective: Objective = Objective.THROUGHPUT
    slo_ttft: float | None = None
    """Seconds; None: no limit."""
    slo_tpot: float | None = None
    """Seconds; None: no limit."""
    baseline: Strategy | None = None
    """A strategy compiled and reported beside the best, whatever its rank."""
    top: int = 8
    """How many of the best-estimated strategies are compiled."""
    backend: str = AUTO
    """A `moe_jax.names.BACKEND_CHOICES` name."""
    topology: str | None = None
    cache_dir: Path | None = None
    """Where compiled results are cached; None: no cache."""
    workers: int = 2
    """Compile worker processes."""

    def meets_slo(self, ttft_s: float, tpot_s: float) -> bool:
        """Whether a TTFT and a TPOT (seconds) are within the SLOs."""
        return (self.slo_ttft is None or ttft_s <= self.slo_ttft) and (self.slo_tpot is None or tpot_s <= self.slo_tpot)
