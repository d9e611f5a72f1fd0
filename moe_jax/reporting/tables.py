"""What the commands print on a terminal: rich tables and summary lines.

Each `print_*` writes to the `rich.console.Console` it is given (the CLI's); the Markdown
forms of the same figures are in `moe_jax.reporting.markdown`.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moe_jax.config.model import MAX_SIZE
from moe_jax.reporting.markdown import compiled_by
from moe_jax.reporting.rows import RANKED_COLUMNS, comparison_rows, dispatch_cells, ranked_cells
from moe_jax.units import gb as _gb
from moe_jax.units import human_bytes as _bytes
from moe_jax.units import mb as _mb
from moe_jax.units import ms as _ms


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B"


def _kv_per_token(cfg) -> str:
    """KV cache bytes per token; with sliding or chunked layers (rings of R positions) also what a token past R
    adds (the full layers' share)."""
    ring = cfg.local_cache_len(MAX_SIZE)                   # the ring at any context past it
    if not ring:
        return _bytes(cfg.kv_bytes_per_token)
    past = cfg.kv_bytes(ring + 1) - cfg.kv_bytes(ring)
    return f"{_bytes(cfg.kv_bytes_per_token)} ({_bytes(past)} past {ring:,})"


def print_models(out: Console, cfgs) -> None:
    """The model presets (`ModelConfig`s) with their parameter counts."""
    table = Table(title="Model presets (parameter counts computed from the configs)")
    for col in ("name", "layers", "d_model", "heads q/kv (hd)", "experts / top-k", "expert FFN",
                "total", "active", "weights as stored", "KV per token"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for c in cfgs:
        table.add_row(c.name, str(c.num_layers), str(c.d_model),
                      f"{c.num_heads}/{c.num_kv_heads} ({c.head_dim})", f"{c.num_experts} / {c.top_k}",
                      str(c.expert_ffn), _billions(c.params_total), _billions(c.params_active),
                      f"{_gb(c.weight_bytes)} ({c.param_dtype})", _kv_per_token(c))
    out.print(table)


def print_hardware(out: Console, hws) -> None:
    """The hardware presets (`Hardware`s) with their figures and sources."""
    table = Table(title="Hardware presets (dense bf16; link bandwidth per device, one direction)")
    for col in ("name", "HBM", "TFLOP/s", "HBM TB/s", "achievable", "node", "in-node link", "across nodes",
                "source"):
        table.add_column(col)
    for h in hws:
        table.add_row(h.name, _gb(h.memory_bytes), f"{h.peak_flops / 1e12:,.0f}", f"{h.hbm_bandwidth / 1e12:.2f}",
                      f"{h.flops_efficiency:.0%} / {h.hbm_efficiency:.0%}", str(h.devices_per_node),
                      f"{h.node_link.name} {h.node_link.bandwidth / 1e9:.0f} GB/s",
                      f"{h.network_link.name} {h.network_link.bandwidth / 1e9:.0f} GB/s",
                      h.source + (f" [assumed: {h.assumptions}]" if h.assumptions else ""))
    out.print(table)


def print_placement(out: Console, p, prompt_len: int, gen_len: int) -> None:
    """What each device holds under a strategy (`moe_jax.programs.placement.Placement`), for a workload of
    `prompt_len` prompt and `gen_len` generated tokens."""
    cfg, s, f = p.cfg, p.strategy, p.facts()
    out.print(f"[bold]{cfg.name}[/bold]: {_billions(cfg.params_total)} parameters ({cfg.params_total:,}), "
              f"{_billions(cfg.params_active)} active per token; {_gb(p.weight_bytes_total)} of {cfg.param_dtype} "
              "weights")
    out.print(f"[bold]{s.name}[/bold] on {s.num_devices} devices, mesh (dp, pp, ep, tp) = "
              f"({s.dp}, {s.pp}, {s.ep}, {s.tp}); validated: ep | {cfg.num_experts} experts, "
              f"tp | {cfg.num_heads} heads, pp | {cfg.moe_layers} {'MoE ' if cfg.first_dense_layers else ''}"
              + (f"groups of {cfg.moe_interleave} layers, " if cfg.moe_interleave > 1 else "layers, ") +
              f"dp | batch {p.batch}")
    out.print(f"Workload: batch {p.batch}, prompt {prompt_len} tokens, {gen_len} generated "
              f"(KV cache of {prompt_len + gen_len} positions)\n")
    print_architecture(out, cfg)

    shard = Table(title="What one device holds")
    shard.add_column("item")
    shard.add_column("per device", justify="right")
    shard.add_column("how", justify="left")
    kv_how = (f"1 of {cfg.num_kv_heads} (tp={s.tp} > {cfg.num_kv_heads} KV heads: one head shared by "
              f"{f.get('kv_head_copies', s.tp // cfg.num_kv_heads)} devices, those whose query heads read it)"
              if f["kv_heads_replicated_over_tp"] else f"{cfg.num_kv_heads} / tp={s.tp}")
    rows = [
        ("layers", str(f["layers_per_stage"]), _stage_layers(cfg, s.pp)),
        ("experts per layer", str(f["experts_per_device_per_layer"]), f"{cfg.num_experts} / ep={s.ep}"),
        ("expert FFN columns", str(f["expert_ffn_columns_per_device"]), f"{cfg.expert_ffn} / tp={s.tp}"),
        ("query heads", str(f["query_heads_per_device"]), f"{cfg.num_heads} / tp={s.tp}"),
        ("KV heads", str(f["kv_heads_per_device"]), kv_how),
        ("vocabulary rows", str(f["vocab_rows_per_device"]),
         f"{cfg.vocab_size} / {f['vocab_split']} (embedding and head split over pp x tp when it divides)"),
        ("sequences per replica", str(f["sequences_per_replica"]), f"batch {p.batch} / dp={s.dp}"),
        ("sequences in attention", str(f["sequences_per_device"]),
         f"batch {p.batch} / {f['batch_split']} (dp x ep, as far as the batch divides)"),
        ("weights", _mb(f["weight_bytes_per_device"]),
         f"sum of the shards below (whole model / devices would be {_mb(p.weight_bytes_total / s.num_devices)}: "
         "replicated attention, norms and router make it more)"),
        ("KV cache", _mb(f["kv_cache_bytes_per_device"]),
         _cache_how(cfg, f["kv_cache_shape_per_device"], f.get("ring_len", 0), s.pp)),
    ]
    for phase in ("prefill", "decode"):
        sched = f.get(f"pipeline_{phase}")
        if sched:
            rows.append((f"pipeline ({phase})", f"{sched['microbatches']} microbatches",
                         f"{sched['ticks']} ticks, bubble (pp-1)/(M+pp-1) = {sched['bubble_fraction']:.0%}; "
                         f"{_bytes(sched['handoff_bytes_per_tick'])} handed to the next stage per tick"))
    for row in rows:
        shard.add_row(*row)
    out.print(shard)

    params = Table(title="Parameter shards (stacked over layers; specs from the logical-axis rules)")
    for col in ("parameter", "global shape", "logical axes", "mesh axes", "shard shape", "per device"):
        params.add_column(col, justify="right" if col == "per device" else "left")
    for r in p.params:
        spec = ", ".join("-" if e is None else (e if isinstance(e, str) else "x".join(e)) for e in r.spec)
        params.add_row(r.path, "x".join(map(str, r.shape)), ", ".join(r.axes), spec,
                       "x".join(map(str, r.local_shape)), _mb(r.bytes_per_device))
    out.print(params)


def _stage_layers(cfg, pp: int) -> str:
    """How a stage's layer count is made: pp splits the MoE layers; each stage also holds every dense first layer."""
    if not cfg.first_dense_layers:
        return f"{cfg.num_layers} / pp={pp}"
    return f"{cfg.moe_layers} MoE layers / pp={pp} + the {cfg.first_dense_layers} dense first layer(s) on every stage"


def _cache_how(cfg, shape: list[int], ring: int = 0, pp: int = 1) -> str:
    """The KV cache arrays one device holds, from the keys' (or MLA latent's) local shape: the full layers' (or,
    when every layer keeps a ring, the rings'), and with `ring` R > 0 the sliding/chunked layers' rings."""
    dims = " x ".join(map(str, shape))
    dense = f" + the {cfg.first_dense_layers} dense layers' own arrays" if cfg.first_dense_layers else ""
    if cfg.attention == "mla":
        return (f"latent {dims} [L, B, 1, T, R] + RoPE key of {cfg.qk_rope_head_dim} per position and layer, "
                f"x {cfg.kv_dtype_bytes} B{dense}")
    if not ring:
        return f"2 x {dims} x {cfg.kv_dtype_bytes} B [L, B, K, T, Dh]{dense}"
    local = cfg.local_layers
    if local == cfg.stack_layers:
        return f"2 x {dims} x {cfg.kv_dtype_bytes} B [L, B, K, R, Dh] (every layer a ring of its last {ring:,})"
    rings = " x ".join(map(str, [local // pp, *shape[1:3], ring, shape[4]]))
    return (f"2 x {dims} x {cfg.kv_dtype_bytes} B [Lf, B, K, T, Dh] (full layers) + 2 x {rings} x "
            f"{cfg.kv_dtype_bytes} B [Ll, B, K, R, Dh] (sliding/chunked layers' rings of their last {ring:,})")


def print_architecture(out: Console, cfg) -> None:
    """The model's architecture in words (`moe_jax.reporting.architecture`): attention, KV cache per token,
    experts, routing, dense layers, dtypes."""
    from moe_jax.reporting.architecture import architecture

    table = Table(title=f"Architecture ({cfg.family})")
    table.add_column("feature")
    table.add_column("from the config", justify="left")
    for name, text in architecture(cfg):
        table.add_row(name, text)
    out.print(table)


def print_verification(out: Console, model: str, v) -> None:
    """The sharded-vs-one-device differences of a `moe_jax.runtime.verify.Verification` of `model`, and the
    verdict."""
    out.print(f"{model} {v.strategy}: batch {v.batch}, prompt {v.prompt_len}, {v.gen_len} decode steps, "
              f"max |logit| {v.logit_scale:.3g}")
    out.print(f"  sharded forward vs 1 device: max |diff| {v.forward_max_abs:.2e}")
    out.print(f"  sharded prefill vs 1 device: max |diff| {v.prefill_max_abs:.2e}")
    out.print(f"  sharded decode  vs 1 device: max |diff| {v.decode_max_abs:.2e}")
    out.print(("[green]PASS[/green]" if v.passed else "[red]FAIL[/red]") +
              f" (tolerance {v.tolerance:g} x max(1, max |logit|))")


def print_run(out: Console, result) -> None:
    """A measured run (`moe_jax.runtime.run.RunResult`): TTFT and TPOT against the prediction, first tokens,
    notes."""
    w = result.workload
    procs = f" in {result.processes} processes" if result.processes > 1 else ""
    out.print(f"{result.model} {result.strategy} on {result.device_kind}{procs}: batch {w['batch']}, prompt "
              f"{w['prompt_len']}, generated {w['gen_len']}")
    m, p, err = result.measured, result.predicted, result.error
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        timing = result.ttft if key == "ttft_s" else result.tpot
        line = (f"  {label}: measured {_ms(m[key])} (median of {len(timing.samples)}, spread "
                f"{_ms(timing.spread[0])} to {_ms(timing.spread[1])})")
        if p:
            line += f", predicted {_ms(p[key])} on {p['hardware']} ({err[key]:+.0%})"
        out.print(line)
    out.print(f"  first tokens: {result.tokens[0][:8]}")
    for note in result.notes:
        out.print(f"note: {note}")


def print_analysis(out: Console, a) -> None:
    """One analysed strategy (`moe_jax.perf.analysis.Analysis`): compiler, memory, latency, checks,
    recommendations and the fit verdict."""
    cfg, s, hw, w, mem, p = a.cfg, a.strategy, a.hardware, a.workload, a.memory, a.prediction
    out.print(f"[bold]{cfg.name}[/bold] {s.name} on {s.num_devices} x {hw.name}; batch {w.batch}, prompt "
              f"{w.prompt_len}, generate {w.gen_len}")
    out.print(f"compiled by: {compiled_by(a)}")
    for note in a.cost.notes:
        out.print(f"note: {note}")
    if mem["total"] is not None:
        out.print(f"memory per device: weights {_gb(mem['weights'])} + KV {_gb(mem['kv_cache'])} + activations "
                  f"{_gb(mem['activations'])} -> peak {_gb(mem['total'])} of {_gb(hw.memory_bytes)} "
                  f"({mem['utilization']:.1%})")
    if p is not None:
        out.print(f"TTFT {_ms(p.ttft_s)}   TPOT {_ms(p.tpot_s)}   throughput {p.throughput_tok_s:,.0f} tok/s   "
                  f"request {_ms(p.request_latency_s)}   MFU {p.mfu:.1%}   MBU {p.mbu:.1%}")
    table = Table(title="checks")
    table.add_column("check")
    table.add_column("result")
    table.add_column("numbers")
    for c in a.checks:
        table.add_row(c.name, "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]", c.detail)
    out.print(table)
    for i, r in enumerate(a.recommendations, 1):
        out.print(f"{i}. {r}")
    if not a.fit_confirmed:
        from moe_jax.perf.analysis import unconfirmed_fit_note

        out.print(f"[yellow]{unconfirmed_fit_note(a)}[/yellow]")
        return
    out.print("[green]fits[/green]" if a.fits else "[red]does not fit[/red]")


def print_plan(out: Console, result) -> None:
    """A plan (`moe_jax.planner.result.PlanResult`): the ranked candidates (first 20), the best and how it was
    compiled, the comparison with the baseline and the dispatch methods when the plan has them."""
    table = Table(title=f"{result.to_dict()['searched']} strategies searched, {result.to_dict()['compiled']} "
                        f"compiled, objective {result.objective} ({result.seconds:.1f} s)")
    for col in RANKED_COLUMNS:
        table.add_column(col)
    for i, r in enumerate(result.candidates[:20], 1):
        table.add_row(*ranked_cells(result, i, r))
    out.print(table)
    if result.estimate_bias is not None:
        out.print(f"Compiled rows rank on compiled numbers; estimate rows were not compiled. On this backend the "
                  f"estimates ran {result.estimate_bias:+.0%} (median) against the compiled TPOT, so read "
                  "estimate rows with that bias in mind.")
    if result.best:
        best = result.compiled[result.best]["analysis"]
        out.print(f"best: [bold]{result.best}[/bold] (compiled by {best['compiled_for'].get('backend', '?')} for "
                  f"{best['target']})")
        if not best.get("fit_confirmed", True):
            out.print("[yellow]fit verdicts rest on an XLA:CPU stand-in's temporaries, not the hardware's own "
                      f"compiler: {'; '.join(best['compiled_for'].get('caveats', []))}[/yellow]")
    else:
        out.print(f"[red]{result.message}[/red]")
    for m, x, y, r in comparison_rows(result):
        out.print(f"  {m}: best {x}, baseline {y} ({r})")
    if result.dispatch_comparison:
        c = result.dispatch_comparison
        out.print(f"{c['strategy']} with each dispatch method (compiled):")
        for line in dispatch_lines(c):
            out.print("  " + line)


def dispatch_lines(c: dict) -> list[str]:
    """One line per method of a plan's dispatch comparison (`PlanResult.dispatch_comparison`)."""
    lines = []
    for method, m in c["methods"].items():
        cells = dispatch_cells(m)
        lines.append(f"{method}: does not fit" if cells is None else
                     "{}: TTFT {} ms, TPOT {} ms, {} tok/s, {} GB per device, prefill matmul {} FLOPs per "
                     "device".format(method, *cells))
    return lines
