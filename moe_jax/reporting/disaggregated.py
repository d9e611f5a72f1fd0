"""Disaggregated serving in the reports: the two pools, the KV transfer and the comparison with the aggregated
deployment, in the terminal and in Markdown.

Everything here reads the JSON form (`moe_jax.planner.disaggregated.Disaggregated.to_dict`): reporting sits
below the planner and never imports it.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moe_jax.units import human_bytes as _bytes

POOL_COLUMNS = ("pool", "strategy", "devices per replica", "replicas", "devices", "requests/s per replica",
                "pool requests/s", "TTFT (ms)", "TPOT (ms)", "per device")
COMPARISON_COLUMNS = ("metric", "disaggregated", "aggregated")


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:,.4g}"


def pool_rows(d: dict) -> list[tuple[str, ...]]:
    """The prefill and decode pools' rows (compiled figures), as the terminal and the Markdown show them."""
    pools, rows = d["pools"], []
    for phase in ("prefill", "decode"):
        c = d[phase]
        f = c["compiled"] or c["estimate"]
        per_device = (f"{c['prompts_per_s_per_device']:,.4g} prompts/s" if phase == "prefill" else
                      f"{c['tokens_per_s_per_device']:,.4g} decode tok/s")
        rows.append((phase, c["strategy"], f"{c['devices']:,}", f"{pools[phase + '_replicas']:,}",
                     f"{pools[phase + '_devices']:,}", f"{c['requests_per_s']:,.4g}",
                     f"{pools[phase + '_rate']:,.4g}", _ms(f["ttft_s"]), _ms(f["tpot_s"]), per_device))
    return rows


def kv_text(d: dict) -> str:
    """How the KV transfer was timed, with its inputs."""
    k = d["kv_transfer"]
    overhead = f", {k['call_overhead_s'] * 1e6:g} us per call" if k["call_overhead_s"] else ""
    full = k["prompt_len"] * k["kv_bytes_per_token"]
    size = f"{k['prompt_len']:,} prompt tokens x {k['kv_bytes_per_token']:,} B = {_bytes(k['bytes_per_request'])}"
    if k["bytes_per_request"] != full:
        size = (f"{_bytes(k['bytes_per_request'])} ({k['prompt_len']:,} prompt tokens x {k['kv_bytes_per_token']:,} B "
                f"= {_bytes(full)}, less the positions before the sliding/chunked layers' rings: they keep only "
                "their last window)")
    return (f"KV transfer per request: {size}, from {k['prefill_shards']:g} prefill shards to "
            f"{k['decode_shards']:g} decode shards, at most {_bytes(k['bytes_per_link'])} on one link; "
            f"{k['tier']} tier ({k['link']}, "
            f"{k['bandwidth'] / 1e9:,.4g} GB/s x {k['efficiency']:.0%} efficiency, {k['latency_s'] * 1e6:g} us "
            f"latency{overhead}): {k['seconds'] * 1e3:,.4g} ms added to the TTFT ({k['algorithm']}); {k['why']}. "
            f"The whole prefill batch's caches at once would take {k['batch_seconds'] * 1e3:,.4g} ms.")


def sizing_text(d: dict) -> str:
    """How the pools were sized."""
    p, w = d["pools"], d["workload"]
    base = (f"Each replica of n devices serves {w['batch']:,} x n / {d['devices']:,} sequences (the aggregated "
            f"plan's per device) of {w['prompt_len']:,} prompt + {w['gen_len']:,} generated tokens; a prefill replica "
            f"serves batch / TTFT requests/s, a decode replica batch / (gen_len x TPOT). ")
    if d["mode"] == "rate":
        return base + (f"Sized for {d['rate']:g} requests/s: {p['prefill_replicas']:,} prefill and "
                       f"{p['decode_replicas']:,} decode replicas (ceil(rate / replica rate)), {p['devices']:,} "
                       f"devices, serving up to {p['served_rate']:,.4g} requests/s ({p['limited_by']} limits).")
    return base + (f"Sized for {d['devices']:,} devices: x prefill and y decode replicas with "
                   f"x·{p['prefill_replica_devices']} + y·{p['decode_replica_devices']} <= {d['devices']:,}, the most "
                   f"requests/s min(x·r_P, y·r_D): x = {p['prefill_replicas']:,}, y = {p['decode_replicas']:,}, "
                   f"{p['served_rate']:,.4g} requests/s ({p['limited_by']} limits; {p['idle_devices']:,} devices "
                   "idle).")


def comparison_rows(d: dict) -> list[tuple[str, str, str]]:
    """(metric, disaggregated, aggregated) rows of the comparison; empty without one."""
    c = d.get("comparison")
    if not c:
        return []
    x, y = c["disaggregated"], c["aggregated"] or {}

    def cell(f: dict, key: str, fmt) -> str:
        return fmt(f[key]) if f.get(key) is not None else "n/a"

    rows = [("strategy", f"{d['prefill']['strategy']} (prefill) + {d['decode']['strategy']} (decode)",
             y.get("strategy", "none fits") + (f" x {y['copies']}" if y.get("copies", 1) > 1 else ""))]
    for metric, key, fmt in (("devices", "devices", lambda v: f"{v:,}"),
                             ("requests/s", "requests_per_s", lambda v: f"{v:,.4g}"),
                             ("TTFT (ms)", "ttft_s", _ms), ("TPOT (ms)", "tpot_s", _ms),
                             ("tokens/s per device", "tokens_per_s_per_device", lambda v: f"{v:,.4g}")):
        rows.append((metric, cell(x, key, fmt), cell(y, key, fmt)))
    return rows


def print_disaggregated(out: Console, d: dict) -> None:
    """The disaggregated deployment (JSON form): pools, KV transfer, comparison and which wins."""
    if d["pools"] is None:
        out.print(f"[red]disaggregated: {d['message']}[/red]")
        return
    sized = f"for {d['rate']:g} requests/s" if d["rate"] else f"on {d['devices']:,} devices"
    table = Table(title=f"Disaggregated serving ({sized}, compiled)")
    for col in POOL_COLUMNS:
        table.add_column(col)
    for row in pool_rows(d):
        table.add_row(*row)
    out.print(table)
    out.print(sizing_text(d))
    out.print(kv_text(d))
    rows = comparison_rows(d)
    if rows:
        table = Table(title="Disaggregated against the best aggregated deployment (both compiled)")
        for col in COMPARISON_COLUMNS:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        out.print(table)
        out.print(f"[bold]{d['comparison']['statement']}[/bold]")
    if d["message"]:
        out.print(f"[yellow]{d['message']}[/yellow]")


def disaggregated_markdown(d: dict | None) -> str:
    """The "Disaggregated serving" section of a plan's report; empty without one."""
    if not d:
        return ""
    lines = ["", "## Disaggregated serving", ""]
    if d["pools"] is None:
        return "\n".join(lines + [d["message"]]) + "\n"
    lines += [f"Prefill and decode on separate pools, each its own strategy: prefill ranked by prompts/s per device"
              f"{' (TTFT SLO first)' if d['slo_ttft_s'] else ''}, decode by decode tokens/s per device"
              f"{' (TPOT SLO first)' if d['slo_tpot_s'] else ''}, over replicas of "
              f"{', '.join(map(str, d['replica_sizes']))} devices ({d['estimated']['prefill']:,} strategies fit); "
              "figures from the compiled programs.", "",
              "| " + " | ".join(POOL_COLUMNS) + " |", "|---|---|" + "---:|" * (len(POOL_COLUMNS) - 2)]
    lines += ["| " + " | ".join(r) + " |" for r in pool_rows(d)]
    lines += ["", sizing_text(d), "", kv_text(d)]
    rows = comparison_rows(d)
    if rows:
        lines += ["", "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|---|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", f"**{d['comparison']['statement']}**"]
    if d["message"]:
        lines += ["", d["message"]]
    return "\n".join(lines) + "\n"
