"""The plan's Pareto chart."""

from __future__ import annotations

from pathlib import Path

from moe_jax.planner.result import PlanResult
from moe_jax.reporting.charts import save_png


def pareto_plot(result: PlanResult, path: str | Path) -> Path:
    """Throughput per device against TPOT for every candidate; compiled and feasible ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in result.candidates:
        if not c.estimate:
            continue
        est = c.estimate
        ax.scatter(est.tpot_s * 1e3, est.throughput_tok_s / c.devices, s=14,
                   color="#4c72b0" if c.fits else "#c44e52", alpha=0.35, marker="o" if c.feasible else "x")
    for c in result.candidates:
        if c.compiled and c.tpot_s != float("inf"):
            ax.scatter(c.tpot_s * 1e3, c.throughput_per_device, s=60, facecolors="none",
                       edgecolors="black" if c.feasible else "#c44e52", linewidths=1.2)
            ax.annotate(c.strategy, (c.tpot_s * 1e3, c.throughput_per_device), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    for name, marker, label in ((result.best, "*", "best"), (result.baseline, "D", "baseline")):
        c = next((x for x in result.candidates if x.strategy == name), None)
        if c and c.compiled and c.tpot_s != float("inf"):
            ax.scatter(c.tpot_s * 1e3, c.throughput_per_device, s=160, marker=marker, color="#dd8452",
                       label=f"{label}: {name}", zorder=5)
    ax.scatter([], [], color="#4c72b0", alpha=0.5, label="estimate, fits")
    ax.scatter([], [], color="#c44e52", marker="x", label="estimate, does not fit / misses SLO")
    ax.scatter([], [], facecolors="none", edgecolors="black", label="compiled")
    ax.set_xscale("log")
    ax.set_xlabel("TPOT (ms, log)")
    ax.set_ylabel("decode tokens/s per device")
    ax.set_title(f"{len(result.candidates)} strategies, objective {result.objective}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_png(fig, path)
    plt.close(fig)
    return path
