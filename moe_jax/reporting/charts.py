"""Charts for the reports (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moe_jax.files import MARK, write_atomic

if TYPE_CHECKING:
    from moe_jax.perf.analysis import Analysis


def memory_chart(a: Analysis, path: str | Path) -> Path | None:
    """Stacked bar of per-device memory (weights, KV cache, activations, I/O) against capacity."""
    return memory_chart_from(a.to_dict(), path)


def memory_chart_from(data: dict, path: str | Path) -> Path | None:
    """`memory_chart` from an analysis in its JSON form (the planner keeps only that); None when the program
    did not fit (there is no breakdown to draw)."""
    mem = data["memory"]
    if mem["total"] is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("weights", mem["weights"]), ("KV cache", mem["kv_cache"]), ("activations", mem["activations"]),
             ("inputs/outputs", max(0, mem["outputs_and_inputs"]))]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for (label, value), color in zip(parts, ("#4c72b0", "#dd8452", "#55a868", "#8172b3"), strict=False):
        ax.barh([0], [value / 1e9], left=[left / 1e9], color=color, label=f"{label} {value / 1e9:.2f} GB")
        left += value
    capacity = data["hardware"]["memory_bytes"]
    ax.axvline(capacity / 1e9, color="black", linestyle="--", label=f"capacity {capacity / 1e9:.0f} GB")
    ax.set_yticks([])
    ax.set_xlabel("GB per device")
    ax.set_title(f"{data['model']['name']}, {data['strategy']['name']} on {data['hardware']['name']} "
                 f"({data['backend']} compile)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
    fig.tight_layout()
    path = save_png(fig, path)
    plt.close(fig)
    return path


def save_png(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG through the atomic writer, marked as moe-jax's
    (`moe_jax.files.MARK` in the PNG's Software chunk: what `check_derived` looks for)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": MARK})
    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path
