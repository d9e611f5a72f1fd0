"""Cells the terminal and the Markdown report both show for a plan: best against baseline, dispatch methods.

`result` is a `moe_jax.planner.result.PlanResult` (read, not imported: the planner is a later stage).
"""

from __future__ import annotations

from moe_jax.units import gb


def comparison_rows(result) -> list[tuple[str, str, str, str]]:
    """(metric, best, baseline, baseline relative to best) with both numbers; empty without a best and a baseline."""
    if not (result.best and result.baseline):
        return []
    b = result.compiled[result.best]["analysis"]
    base = result.compiled[result.baseline]["analysis"]
    rows = []
    for label, key, fmt, per_device in (("throughput per device (tok/s)", "throughput_tok_s", "{:,.1f}", True),
                                        ("TPOT (ms)", "tpot_s", "{:,.3f}", False),
                                        ("TTFT (ms)", "ttft_s", "{:,.1f}", False)):
        x, y = b[key], base[key]
        if x is None or y is None:
            continue
        if per_device:
            x, y = x / b["strategy"]["devices"], y / base["strategy"]["devices"]
        scale = 1 if per_device else 1e3
        rows.append((label, fmt.format(x * scale), fmt.format(y * scale), f"{y / x:.2f}x the best"))
    mb, mbase = b["memory"]["total"], base["memory"]["total"]
    if mb and mbase:
        rows.append(("memory per device (GB)", f"{mb / 1e9:.2f}", f"{mbase / 1e9:.2f}", f"{mbase / mb:.2f}x the best"))
    return rows


RANKED_COLUMNS = ("rank", "strategy", "devices", "fits", "TTFT", "TPOT", "tok/s", "tok/s/device", "memory/device",
                  "source", "estimate vs compiled (TPOT)")
"""The columns of a plan's ranked table (`ranked_cells`)."""


def ranked_cells(result, rank: int, r) -> tuple[str, ...]:
    """One ranked candidate `r` of a plan (`moe_jax.planner.candidate.Candidate`) as the cells of
    `RANKED_COLUMNS`: compiled rows rank on compiled numbers, estimate rows on the estimate."""
    diff = r.tpot_estimate_error
    return (str(rank), r.strategy + (" (baseline)" if r.strategy == result.baseline else ""), str(r.devices),
            "yes" if r.fits else "no", f"{r.ttft_s * 1e3:,.1f} ms", f"{r.tpot_s * 1e3:,.2f} ms",
            f"{r.throughput_tok_s:,.0f}", f"{r.throughput_per_device:,.1f}", gb(r.memory_bytes),
            ("compiled" + (" (cached)" if r.cached else "")) if r.compiled else "estimate",
            "" if diff is None else f"{diff:+.0%}")


def dispatch_cells(m: dict) -> tuple[str, ...] | None:
    """One method of a dispatch comparison: TTFT ms, TPOT ms, tok/s, GB per device, prefill matmul FLOPs per
    device; None if it does not fit."""
    if not m["fits"]:
        return None
    return (f"{m['ttft_s'] * 1e3:,.1f}", f"{m['tpot_s'] * 1e3:,.3f}", f"{m['throughput_tok_s']:,.0f}",
            f"{m['memory_bytes'] / 1e9:,.2f}", f"{m['prefill_matmul_flops']:.3e}")
