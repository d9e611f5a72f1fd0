"""The Markdown reports: one analysed strategy (the seed's sections, every figure computed, each check with
its numbers), and a plan's (the best strategy's report, then how it compares with the baseline and with the
other dispatch method).

`markdown(analysis)` renders one strategy's report; `plan_markdown(result, chart)` and
`baseline_markdown(result, chart)` a plan's; the charts they name are drawn by `moe_jax.reporting.charts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_jax.files import MARKDOWN_MARK
from moe_jax.names import Backend, Dispatch
from moe_jax.reporting.architecture import architecture_markdown
from moe_jax.reporting.rows import RANKED_COLUMNS, comparison_rows, dispatch_cells, ranked_cells
from moe_jax.units import gb as _gb
from moe_jax.units import human_bytes as _bytes
from moe_jax.units import ms as _ms

if TYPE_CHECKING:                       # the analysis (and jax) is imported only by the commands that compile
    from moe_jax.perf.analysis import Analysis

_COMPILERS = {"cpu": "XLA:CPU", "gpu": "XLA:GPU", "tpu": "XLA:TPU"}


def compiled_by(a: Analysis) -> str:
    """One line naming the compiler that produced the numbers, and whether it is the hardware's own."""
    c, cost = a.cost.compiled_for, a.cost
    name = _COMPILERS.get(cost.backend, f"the {cost.backend} backend's compiler")
    where = f"{cost.target}, {cost.topology}" if cost.topology else cost.target
    if cost.backend == Backend.REAL:
        return f"{name} on real devices ({where})"
    if c.get("stand_in"):
        return f"{name} as a stand-in for {a.hardware.name} ({where}), because {c['reason']}"
    own = "deviceless" if cost.backend in (Backend.GPU, Backend.TPU) else "emulated"
    proxy = any("has no target description of its own" in x for x in c.get("caveats", []))
    mine = (f" (a stand-in target for {a.hardware.name}, same compiler)" if proxy else
            " (the hardware's own compiler)" if cost.backend in (Backend.GPU, Backend.TPU) else "")
    return f"{name}, {own}, for {where}{mine}"


def _terms(t) -> str:
    """How a phase's time is made: its terms, and the schedule's overlap when it was simulated."""
    text = (f"compute {_ms(t.compute_s)} + HBM {_ms(t.memory_s)}"
            + (f" + per-op overhead {_ms(t.overhead_s)}" if t.overhead_s else "")
            + f" + communication {_ms(t.comm_s)}")
    if t.scheduled_s is not None:
        text += (f"; over the compiled schedule {_ms(t.scheduled_s)} ({_ms(t.exposed_comm_s)} of the communication "
                 "not hidden behind compute)")
    if t.call_s:
        text += f"; + the host's call of the program {_ms(t.call_s)} (calibrated)"
    if t.fresh_s:
        text += f"; + its fresh buffers' first touch {_ms(t.fresh_s)} (calibrated)"
    return text + f"; floor {_ms(t.floor_s)}"


def _pp_splits(cfg) -> str:
    """What pp splits: the MoE layers (the dense first layers run ahead of the pipeline, on every stage)."""
    if cfg.moe_interleave > 1:
        return f"{cfg.num_layers} layers ({cfg.moe_layers} groups of {cfg.moe_interleave - 1} dense then one MoE)"
    if not cfg.first_dense_layers:
        return f"{cfg.num_layers} layers"
    return f"{cfg.moe_layers} MoE layers (the {cfg.first_dense_layers} dense first layers are on every stage)"


def markdown(a: Analysis, chart: str | None = "memory.png") -> str:
    """The Markdown report for one analysed strategy (`chart`: file name of the memory chart, if any)."""
    from moe_jax.perf.analysis import unconfirmed_fit_note

    d = a.to_dict()
    cfg, s, hw, w, f = a.cfg, a.strategy, a.hardware, a.workload, a.placement.facts()
    p, mem = a.prediction, a.memory
    out = [MARKDOWN_MARK, f"# {cfg.name} on {s.num_devices} x {hw.name}: {s.name}", ""]
    verdict = ("fits in device memory" if a.fits else "does NOT fit in device memory") if a.fit_confirmed else \
        f"unconfirmed: {unconfirmed_fit_note(a)}"
    out += [f"**Verdict:** {verdict}; {sum(c.passed for c in a.checks)} of {len(a.checks)} "
            "checks pass. This report analyses one given strategy; it is not compared with a search. "
            f"Numbers compiled by {compiled_by(a)}.", ""]

    out += ["## Strategy", "",
            f"- Strategy: **{s.name}** on {s.num_devices} devices (mesh dp x pp x ep x tp = "
            f"{s.dp} x {s.pp} x {s.ep} x {s.tp})",
            f"- Model: {cfg.name}: {cfg.params_total / 1e9:.2f}B parameters ({cfg.params_active / 1e9:.2f}B active "
            f"per token), {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}, {cfg.dtype}"
            + (f" (weights {cfg.param_dtype})" if cfg.param_dtype != cfg.dtype else "")
            + (f" (KV cache {cfg.cache_dtype})" if cfg.cache_dtype != cfg.dtype else "") + ", "
            f"{cfg.dispatch} dispatch" + (f" (capacity factor {cfg.capacity_factor})"
                                          if cfg.dispatch == Dispatch.CAPACITY else ""),
            f"- Workload: batch {w.batch} sequences, prompt {w.prompt_len} tokens, {w.gen_len} generated "
            f"(KV cache of {w.cache_len} positions)",
            f"- Compiled by **{compiled_by(a)}**; every memory, FLOP, byte and collective figure below is read "
            "from that compiled program", ""]
    out += [f"- Note: {n}" for n in a.cost.notes] + ([""] if a.cost.notes else [])
    out += architecture_markdown(cfg)

    kv = (f"1 of {cfg.num_kv_heads} (one head shared by {f.get('kv_head_copies', s.tp // cfg.num_kv_heads)} "
          "devices: tp > KV heads)" if f["kv_heads_replicated_over_tp"]
          else f"{f['kv_heads_per_device']} of {cfg.num_kv_heads}")
    out += ["## Parallel dimensions: what each device holds", "",
            "| dimension | size | splits | per device |", "|---|---:|---|---|",
            f"| EP (experts) | {s.ep} | {cfg.num_experts} experts | {f['experts_per_device_per_layer']} expert(s) "
            f"per layer |",
            f"| TP (tensor) | {s.tp} | {cfg.num_heads} query heads, {cfg.num_kv_heads} KV heads, expert width "
            f"{cfg.expert_ffn}, vocabulary | {f['query_heads_per_device']} query heads, {kv} KV heads, "
            f"{f['expert_ffn_columns_per_device']} of {cfg.expert_ffn} FFN columns |",
            f"| PP (pipeline) | {s.pp} | {_pp_splits(cfg)} | {f['layers_per_stage']} layers |",
            f"| DP (replicas) | {s.dp} | batch {w.batch} | {f['sequences_per_replica']} sequences per replica |",
            "",
            f"Each device holds **{f['expert_fraction_per_device']}** in each of its stage's "
            f"{cfg.moe_layers // s.pp} MoE layers, {f['vocab_rows_per_device']} of {cfg.vocab_size} vocabulary rows, "
            "and "
            f"attends over **{f['sequences_per_device']} sequence(s)** (the batch is split {f['batch_split']} ways "
            "over dp x ep outside the MoE block).", ""]

    out += ["## Hardware", "",
            f"- {hw.name}: {_gb(hw.memory_bytes)} HBM, {hw.peak_flops / 1e12:,.0f} TFLOP/s bf16 dense, "
            f"{hw.hbm_bandwidth / 1e12:.2f} TB/s HBM (source: {hw.source})",
            f"- Achievable: {hw.flops_efficiency:.0%} of peak FLOP/s, {hw.hbm_efficiency:.0%} of HBM bandwidth",
            f"- Links: {hw.node_link.name}, {hw.node_link.bandwidth / 1e9:.0f} GB/s per device inside a node of "
            f"{hw.devices_per_node}; {hw.network_link.name}, {hw.network_link.bandwidth / 1e9:.0f} GB/s across nodes"]
    if hw.assumptions:
        out.append(f"- Assumed: {hw.assumptions}")
    out.append("")

    out += ["## Memory per device", "", "| component | per device | source |", "|---|---:|---|"]
    if mem["total"] is None:
        out += [f"| compiled program | does not fit | {a.checks[0].detail} |"]
    else:
        out += [f"| weights | {_gb(mem['weights'])} | parameter arguments of the compiled program |",
                f"| KV cache | {_gb(mem['kv_cache'])} | cache arguments |",
                f"| activations | {_gb(mem['activations'])} | compiler temporaries ({mem['peak_phase']}) |",
                f"| inputs and outputs | {_gb(mem['outputs_and_inputs'])} | tokens, logits, returned cache "
                "(less aliased) |",
                f"| **total (peak)** | **{_gb(mem['total'])}** | {mem['source']} |",
                f"| capacity | {_gb(hw.memory_bytes)} | {hw.name} |",
                f"| utilisation | {mem['utilization']:.1%} | total / capacity |"]
    out += ["", f"![memory per device]({chart})" if chart and mem["total"] is not None else "", ""]

    out += ["## Load balance", "", "| metric | value | how |", "|---|---:|---|",
            f"| experts per device per layer | {f['experts_per_device_per_layer']} | {cfg.num_experts} / ep {s.ep} |",
            f"| expert FFN columns per device | {f['expert_ffn_columns_per_device']} | {cfg.expert_ffn} / tp {s.tp} |",
            f"| layers per stage | {f['layers_per_stage']} | {cfg.stack_layers} / pp {s.pp}"
            + (f" + {cfg.first_dense_layers} dense on every stage" if cfg.first_dense_layers else "") + " |",
            f"| sequences per replica | {f['sequences_per_replica']} | batch {w.batch} / dp {s.dp} |",
            f"| sequences per device (attention) | {f['sequences_per_device']} | batch {w.batch} / "
            f"{f['batch_split']} |"]
    for phase in ("prefill", "decode"):
        sched = f.get(f"pipeline_{phase}")
        if sched:
            out.append(f"| pipeline {phase} | {sched['microbatches']} microbatches, bubble "
                       f"{sched['bubble_fraction']:.0%} | (pp-1)/(M+pp-1) over {sched['ticks']} ticks; "
                       f"{_bytes(sched['handoff_bytes_per_tick'])} per hand-off |")
    out.append("")

    out += ["## Performance", ""]
    if p is None:
        out += ["Not predicted: the program did not compile within device memory.", ""]
    else:
        out += ["| metric | value | from |", "|---|---:|---|",
                f"| TTFT (prefill of the batch) | {_ms(p.ttft_s)} | compiled prefill: {_terms(p.prefill)} |",
                f"| TPOT (one decode step) | {_ms(p.tpot_s)} | compiled decode: {_terms(p.decode)} |",
                f"| decode throughput | {p.throughput_tok_s:,.0f} tokens/s | batch {w.batch} / TPOT |",
                f"| request latency | {_ms(p.request_latency_s)} | TTFT + {w.gen_len} x TPOT |",
                f"| MFU (prefill) | {p.mfu:.1%} | useful FLOPs / ({s.num_devices} devices x "
                f"{hw.peak_flops / 1e12:,.0f} TFLOP/s peak x TTFT) |",
                f"| MBU (decode) | {p.mbu:.1%} | (weights a step reads + local KV cache) / "
                f"({hw.hbm_bandwidth / 1e12:.2f} TB/s peak x TPOT) |",
                f"| no-overlap bound | TTFT {_ms(p.prefill.no_overlap_s)}, TPOT {_ms(p.decode.no_overlap_s)} | "
                "compute + HBM + communication |",
                f"| full-overlap bound | TTFT {_ms(p.prefill.full_overlap_s)}, TPOT {_ms(p.decode.full_overlap_s)} | "
                "max(compute + HBM, communication) |", ""]
        for name, t in (("Prefill", p.prefill), ("Decode", p.decode)):
            if t.comm_breakdown:
                out += [f"{name} communication by collective and mesh axis:", "",
                        "| collective | mesh axes | link | calls | bytes per device | time | share of step |",
                        "|---|---|---|---:|---:|---:|---:|"]
                out += [f"| {c['kind']} | {'x'.join(c['axes']) or 'all'} | {c['link']} | {c['calls']} | "
                        f"{_bytes(c['bytes'])} | {_ms(c['seconds'])} | {c['share']:.1%} |" for c in t.comm_breakdown]
                ragged = [c for c in a.cost.phases[name.lower()].collective_summary() if "worst_bytes" in c]
                if ragged:
                    out += ["", "Ragged all-to-alls (dropless) are timed at their expected bytes (uniform routing); "
                            "the most they can move, when one shard receives every row, is " + ", ".join(
                                f"{_bytes(c['worst_bytes'])} ({c['phase']})" for c in ragged) + " per device."]
                out.append("")
        out += ["Assumptions: " + "; ".join(p.assumptions) + ".", ""]
        pre = d["analytic"]["prefill"]
        if pre.get("compiled_over_analytic"):
            out += [f"Cross-check: the compiled prefill performs {pre['compiled_matmul_total']:.3e} matmul FLOPs over "
                    f"the {a.cost.devices} compiled devices ({a.cost.compiled_strategy}); for the same work the model "
                    f"needs {pre['useful']:.3e} (2 x layer parameters x tokens + the output head once per sequence) + "
                    f"{pre['attention']:.3e} attention + {pre['capacity_overhead']:.3e} capacity-dispatch overhead "
                    f"= {pre['total']:.3e} (ratio {pre['compiled_over_analytic']:.2f}).", ""]

    out += ["## Validation", "", "| check | result | numbers |", "|---|---|---|"]
    out += [f"| {c.name} | {'PASS' if c.passed else 'FAIL'} | {c.detail} |" for c in a.checks]
    out += ["", "## Recommendations", ""]
    out += [f"{i}. {r}" for i, r in enumerate(a.recommendations, 1)] or ["None."]
    out.append("")
    return "\n".join(out)


def _with_chart(report: str, chart: str | None) -> str:
    """A stored report (rendered naming ``memory.png``) naming the chart drawn for it instead."""
    return report if chart is None else report.replace("memory.png", chart)


def plan_markdown(result, chart: str | None) -> str:
    """A plan's report: the best strategy's (naming its memory chart `chart`, if one was drawn), then the
    comparison with the baseline and the dispatch methods when the plan has them.

    `result` is a `moe_jax.planner.result.PlanResult` with a best strategy."""
    return (_with_chart(result.compiled[result.best]["markdown"], chart) + ranked_markdown(result)
            + comparison_markdown(result) + dispatch_markdown(result) + serving_markdown(result))


def serving_markdown(result) -> str:
    """A plan's capacity section (its compiled strategies, in rank order), its load sweep and its disaggregated
    deployment, when it has them."""
    from moe_jax.reporting.serving import capacity_markdown, sweep_markdown

    caps = [result.capacity[c.strategy] for c in result.candidates if c.strategy in (result.capacity or {})]
    from moe_jax.reporting.disaggregated import disaggregated_markdown

    sweep = result.sweep
    return (capacity_markdown(caps) + (sweep_markdown(sweep, sweep.get("chart")) if sweep else "")
            + disaggregated_markdown(getattr(result, "disaggregated", None)))


def ranked_markdown(result, top: int = 20) -> str:
    """The "Strategies searched" section of a plan's report: the ranked candidates (the first `top`), as the
    terminal shows them."""
    d = result.to_dict()
    lines = ["", f"## Strategies searched: {d['searched']}, {d['compiled']} compiled, objective {result.objective}",
             "", "| " + " | ".join(RANKED_COLUMNS) + " |", "|" + "---|" * len(RANKED_COLUMNS)]
    lines += ["| " + " | ".join(ranked_cells(result, i, r)) + " |" for i, r in enumerate(result.candidates[:top], 1)]
    if len(result.candidates) > top:
        lines.append(f"\n{len(result.candidates) - top} more in the JSON (`candidates`).")
    if result.estimate_bias is not None:
        lines.append(f"\nCompiled rows rank on compiled numbers; estimate rows were not compiled (on this backend the "
                     f"estimates ran {result.estimate_bias:+.0%}, median, against the compiled TPOT).")
    return "\n".join(lines) + "\n"


def baseline_markdown(result, chart: str | None) -> str:
    """The report of a plan's baseline strategy (naming its memory chart `chart`, if one was drawn)."""
    return _with_chart(result.compiled[result.baseline]["markdown"], chart)


def comparison_markdown(result) -> str:
    """The "Compared with the baseline" section of a plan's report; empty without a baseline."""
    rows = comparison_rows(result)
    if not rows:
        return ""
    lines = ["", f"## Compared with the baseline {result.baseline}", "",
             f"| metric | best ({result.best}) | baseline ({result.baseline}) | baseline / best |",
             "|---|---:|---:|---:|"]
    lines += [f"| {m} | {x} | {y} | {r} |" for m, x, y, r in rows]
    return "\n".join(lines) + "\n"


def dispatch_markdown(result) -> str:
    """The "Dispatch methods" section of a plan's report; empty unless the plan compared them."""
    c = result.dispatch_comparison
    if not c:
        return ""
    rows = ["", f"## Dispatch methods on {c['strategy']}", "",
            f"The search ran with {c['searched_with']} dispatch; the same strategy compiled with each method:", "",
            "| dispatch | TTFT (ms) | TPOT (ms) | tok/s | memory per device (GB) | prefill matmul FLOPs per device |",
            "|---|---:|---:|---:|---:|---:|"]
    for method, m in c["methods"].items():
        cells = dispatch_cells(m) or ("does not fit", "", "", "", "")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
