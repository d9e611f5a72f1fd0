"""Serving figures in the reports: the capacity (max concurrency) and the load sweep, in the terminal, in
Markdown and as a chart.

Everything here reads the JSON forms (`moe_jax.planner.capacity.Capacity.to_dict`,
`moe_jax.planner.sweep.Sweep.to_dict`): reporting sits below the planner and never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moe_jax.units import human_bytes as _bytes

CAPACITY_COLUMNS = ("strategy", "max concurrency", "per dp replica", "limiting phase", "fixed per device",
                    "per sequence per device", "KV per sequence", "from compiles at")


def capacity_cells(c: dict) -> tuple[str, ...]:
    """One capacity's row, as the terminal and the Markdown show it."""
    source = (f"batches {c['other_batch']:,}, {c['compiled_batch']:,} (slope)" if c.get("other_batch")
              else f"batch {c['compiled_batch']:,} (per sequence)")
    return (c["strategy"], f"{c['max_concurrency']:,}" + (" (cap)" if c.get("capped") else ""),
            f"{c['per_replica']:,}", c["limiting_phase"], _bytes(c["fixed_bytes"]), _bytes(c["per_sequence_bytes"]),
            _bytes(c["kv_per_sequence_bytes"]), source)


def capacity_note(c: dict) -> str:
    """How the capacities were computed: memory, headroom, context, the two methods."""
    return (f"Capacity at a context of {c['context_len']:,} tokens ({c['prompt_len']:,} prompt + {c['gen_len']:,} "
            f"generated): ({_bytes(c['memory_bytes'])} − {c['headroom']:.0%} headroom ({_bytes(c['headroom_bytes'])}) "
            "− fixed bytes) / bytes per sequence, for the phase that holds fewer, rounded down to a multiple of dp. "
            "The bytes come from the compiled programs' memory: from one batch, every temporary is taken to grow "
            "with the batch (per sequence: a lower bound); from two batches, bytes per sequence are the slope of "
            "the peak between them. The KV cache per sequence comes from the cache layout; (cap): the memory holds "
            "more than the largest batch moe-jax compiles.")


def print_capacity(out: Console, caps: Sequence[dict]) -> None:
    """The capacity of each strategy in `caps` (JSON form) as a table, with how it was computed."""
    if not caps:
        return
    table = Table(title="Capacity: concurrent sequences the devices hold")
    for col in CAPACITY_COLUMNS:
        table.add_column(col)
    for c in caps:
        table.add_row(*capacity_cells(c))
    out.print(table)
    out.print(capacity_note(caps[0]))


def capacity_markdown(caps: Sequence[dict]) -> str:
    """The "Capacity" section of a report; empty without capacities."""
    if not caps:
        return ""
    lines = ["", "## Capacity (max concurrency)", "", "| " + " | ".join(CAPACITY_COLUMNS) + " |",
             "|---|" + "---:|" * (len(CAPACITY_COLUMNS) - 1)]
    lines += ["| " + " | ".join(capacity_cells(c)) + " |" for c in caps]
    lines += ["", capacity_note(caps[0])]
    return "\n".join(lines) + "\n"


FRONT_COLUMNS = ("strategy", "batch", "est. tok/s per device", "est. tok/s per user", "tok/s per device",
                 "tok/s per user", "TTFT (ms)", "TPOT (ms)", "memory per device")
"""The front's table: the estimate that ranked each point, then its compiled figures."""


def front_cells(p: dict) -> tuple[str, ...]:
    """One sweep point's row: estimate, then compiled figures ("not compiled" when it was not)."""
    e, c = p["estimate"], p["compiled"]
    cells = (p["strategy"], f"{p['batch']:,}", f"{e['tokens_per_s_per_device']:,.1f}",
             f"{e['tokens_per_s_per_user']:,.1f}")
    if c is None:
        return (*cells, "not compiled", "", "", "", _bytes(e["memory_bytes"]) + " (est.)")
    return (*cells, f"{c['tokens_per_s_per_device']:,.1f}", f"{c['tokens_per_s_per_user']:,.1f}",
            f"{c['ttft_s'] * 1e3:,.3f}", f"{c['tpot_s'] * 1e3:,.3f}",
            _bytes(c["memory_bytes"]) + ("" if c["fits"] else " (over)"))


def slo_text(sweep: dict) -> str:
    """The SLOs as words ("no SLO" without them)."""
    parts = [f"{n} <= {v * 1e3:g} ms" for n, v in (("TTFT", sweep["slo_ttft_s"]), ("TPOT", sweep["slo_tpot_s"]))
             if v is not None]
    return " and ".join(parts) or "no SLO"


def sweep_summary(sweep: dict) -> str:
    """One line: what the sweep chose (on its compiled figures), or why it chose nothing."""
    p = sweep["chosen"]
    if p is None:
        return sweep["message"]
    c = p["compiled"]
    return (f"sweep pick ({slo_text(sweep)}): {p['strategy']} at batch {p['batch']:,}, "
            f"{c['tokens_per_s_per_device']:,.1f} tok/s per device, {c['tokens_per_s_per_user']:,.1f} tok/s per "
            f"user (compiled: TTFT {c['ttft_s'] * 1e3:,.3f} ms, TPOT {c['tpot_s'] * 1e3:,.3f} ms)")


def print_sweep(out: Console, sweep: dict) -> None:
    """The sweep's Pareto front as a table, then its pick."""
    table = Table(title=f"Load sweep: {len(sweep['points'])} points of {sweep['strategies']} strategies, Pareto "
                        f"front of {len(sweep['front'])} ({sweep['compiled']} compiled), {sweep['headroom']:.0%} "
                        "memory headroom")
    for col in FRONT_COLUMNS:
        table.add_column(col)
    for p in sweep["front"]:
        table.add_row(*front_cells(p))
    out.print(table)
    out.print(sweep_summary(sweep) if sweep["chosen"] else f"[red]{sweep['message']}[/red]")


def sweep_markdown(sweep: dict, chart: str | None) -> str:
    """The "Load sweep" section of a plan's report (naming its chart `chart`, if one was drawn)."""
    lines = ["", "## Load sweep", "",
             f"{sweep['strategies']} strategies estimated at batch sizes dp·2^k up to each one's capacity "
             f"({len(sweep['points'])} points that fit {_bytes(sweep['usable_bytes'])} per device, "
             f"{sweep['headroom']:.0%} headroom kept); the Pareto front of decode tokens/s per device against "
             f"tokens/s per user (1 / TPOT) has {len(sweep['front'])} points, {sweep['compiled']} points compiled.",
             ""]
    if chart:
        lines += [f"![load sweep]({chart})", ""]
    lines += ["| " + " | ".join(FRONT_COLUMNS) + " |", "|---|" + "---:|" * (len(FRONT_COLUMNS) - 2) + "---|"]
    lines += ["| " + " | ".join(front_cells(p)) + " |" for p in sweep["front"]]
    lines += ["", sweep_summary(sweep)]
    return "\n".join(lines) + "\n"


def sweep_chart(sweep: dict, path: str | Path) -> Path:
    """Tokens/s per device against tokens/s per user: every strategy a line over its batch sizes (estimates),
    the estimate's Pareto front highlighted, the compiled figures of compiled points marked (joined to their
    estimate), the TPOT SLO as a vertical line, points whose estimate misses the TTFT SLO crossed, the pick
    starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_jax.reporting.charts import save_png

    def xy(figures: dict) -> tuple[float, float]:
        return figures["tokens_per_s_per_user"], figures["tokens_per_s_per_device"]

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    on_front = {p["strategy"] for p in sweep["front"]}
    by_strategy: dict[str, list[dict]] = {}
    for p in sweep["points"]:
        by_strategy.setdefault(p["strategy"], []).append(p)
    colors = plt.get_cmap("tab10")
    shown = 0
    for name, pts in by_strategy.items():
        xs, ys = zip(*(xy(p["estimate"]) for p in sorted(pts, key=lambda p: p["batch"])), strict=True)
        if name in on_front:                     # front strategies in colour and named; the rest grey
            ax.plot(xs, ys, marker=".", lw=1.2, color=colors(shown % 10), label=name)
            shown += 1
        else:
            ax.plot(xs, ys, marker=".", lw=0.6, color="#bbbbbb", alpha=0.6)
    front = sorted(sweep["front"], key=lambda p: p["estimate"]["tokens_per_s_per_user"])
    if front:
        xs, ys = zip(*(xy(p["estimate"]) for p in front), strict=True)
        ax.plot(xs, ys, color="black", lw=2.4, alpha=0.35, zorder=3, label="Pareto front (estimate)")
    compiled = [p for p in sweep["points"] if p["compiled"]]
    for p in compiled:
        (x0, y0), (x1, y1) = xy(p["estimate"]), xy(p["compiled"])
        ax.plot([x0, x1], [y0, y1], color="black", lw=0.5, ls=":", zorder=3)
    if compiled:
        xs, ys = zip(*(xy(p["compiled"]) for p in compiled), strict=True)
        ax.scatter(xs, ys, s=50, facecolors="none", edgecolors="black", zorder=4, label="compiled")
    ttft, tpot = sweep["slo_ttft_s"], sweep["slo_tpot_s"]
    if tpot is not None:
        ax.axvline(1 / tpot, color="#c44e52", ls="--", lw=1, label=f"TPOT SLO {tpot * 1e3:g} ms")
    if ttft is not None:
        late = [xy(p["estimate"]) for p in sweep["points"] if p["estimate"]["ttft_s"] > ttft]
        if late:
            xs, ys = zip(*late, strict=True)
            ax.scatter(xs, ys, marker="x", s=18, color="#c44e52", zorder=4,
                       label=f"misses TTFT SLO {ttft * 1e3:g} ms (estimate)")
    if sweep["chosen"]:
        c = sweep["chosen"]
        x, y = xy(c["compiled"])
        ax.scatter([x], [y], marker="*", s=220, color="#dd8452", zorder=5,
                   label=f"pick: {c['strategy']} batch {c['batch']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (1 / TPOT, log)")
    ax.set_ylabel("decode tokens/s per device (log)")
    ax.set_title(f"Load sweep: {len(by_strategy)} strategies, {slo_text(sweep)}", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    path = save_png(fig, path)
    plt.close(fig)
    return path
