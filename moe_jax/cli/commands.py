"""The ``moe-jax`` command line: parse arguments, call the library, print.

Every error a user can cause exits with status 2 and one message naming the bad value;
no traceback. jax is imported only inside commands that need it, after the fake CPU
device count is set.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from moe_jax.config import get_model, preset_names
from moe_jax.costs.backends import CHOICES as BACKEND_CHOICES
from moe_jax.errors import MoeJaxError
from moe_jax.names import DTYPE_BY_SHORT
from moe_jax.parallel.mesh import Strategy
from moe_jax.units import gb as _gb
from moe_jax.units import human_bytes as _bytes
from moe_jax.units import mb as _mb

# Tables keep their columns when printed to a file or a pipe (rich would otherwise assume 80).
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _b(n: int) -> str:
    return f"{n / 1e9:.2f}B"


def _positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"{value} must be at least 1")
    return value


def _dispatch_option(both: bool = False):
    """--dispatch: the expert path (the model's own setting when not given)."""
    choices = ["capacity", "dropless"] + (["both"] if both else [])
    return click.option("--dispatch", type=click.Choice(choices),
                        help="Expert dispatch: capacity (GShard slots, overflow dropped) or dropless (sorted "
                             "tokens, grouped matmul, ragged all-to-all)" +
                             ("; both: search with the model's, then compile the best strategy with each" if both
                              else "") + ". Default: the model's (capacity for presets).")


_buffer_option = click.option(
    "--dropless-buffer", type=float, help="Dropless with ep > 1: bound each shard's receive buffer to this many "
    "times the expected rows (rows past it are dropped and counted). Default: the worst case, nothing dropped.")


def _with_dispatch(cfg, dispatch, buffer: float | None = None):
    if dispatch not in (None, "both"):
        cfg = cfg.replace(dispatch=dispatch)
    if buffer is not None:
        if cfg.dispatch != "dropless" and dispatch != "both":
            raise MoeJaxError(f"--dropless-buffer {buffer:g} applies to dropless dispatch; add --dispatch dropless")
        cfg = cfg.replace(dropless_buffer=buffer)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moe-jax")
def cli():
    """moe-jax: find and prove the parallel strategy (ep, tp, pp, dp) for serving a MoE model."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(as_json):
    """List the model presets with their parameter counts (computed from each config)."""
    cfgs = [get_model(n) for n in preset_names()]
    if as_json:
        click.echo(_dumps([c.summary() for c in cfgs], indent=2))
        return
    table = Table(title="Model presets (parameter counts computed from the configs)")
    for col in ("name", "layers", "d_model", "heads q/kv (hd)", "experts / top-k", "expert FFN",
                "total", "active", "weights (bf16)"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for c in cfgs:
        table.add_row(c.name, str(c.num_layers), str(c.d_model),
                      f"{c.num_heads}/{c.num_kv_heads} ({c.head_dim})", f"{c.num_experts} / {c.top_k}",
                      str(c.expert_ffn), _b(c.params_total), _b(c.params_active), _gb(c.params_total * 2))
    out.print(table)


_model_opt = click.option("--model", "model_name", default="seed-30b", show_default=True,
                          help=f"Model preset ({', '.join(preset_names())}).")
_strategy_opt = click.option("--strategy", "strategy_spec", default="EP64-TP8-PP2-DP1", show_default=True,
                             help="Strategy name like EP64-TP8-PP2-DP1, or a TOML file (see meshes/).")


def _cluster_opts(fn):
    """--coordinator, --num-processes, --process-id, --timeout: one mesh over several processes."""
    for option in reversed([
        click.option("--coordinator", help="HOST:PORT of process 0 in a multi-process run (jax.distributed), or "
                                           "'auto' to let jax read SLURM / Open MPI / TPU pod settings "
                                           "[env MOE_JAX_COORDINATOR]."),
        click.option("--num-processes", help="Processes in the run; their devices form one mesh "
                                             "[env MOE_JAX_NUM_PROCESSES]."),
        click.option("--process-id", help="This process, 0 to N-1; process 0 reports [env MOE_JAX_PROCESS_ID]."),
        click.option("--timeout", help="Seconds to wait for peers (joining, each step, shutting down) before "
                                       "exiting with status 4 [env MOE_JAX_TIMEOUT; default 300]."),
    ]):
        fn = option(fn)
    return fn


def _cluster(coordinator, num_processes, process_id, timeout, *, cpu_devices=None, progress=False):
    """The `Cluster` this process belongs to (one process when no cluster is named)."""
    from moe_jax.runtime.distributed import Cluster, resolve

    return Cluster(resolve(coordinator, num_processes, process_id, timeout), cpu_devices=cpu_devices,
                   progress=progress)


@cli.command()
@_model_opt
@_strategy_opt
@click.option("--devices", type=int, callback=_positive, help="Device count the strategy must use.")
@click.option("--batch", type=int, default=128, show_default=True, callback=_positive,
              help="Sequences served together.")
@click.option("--prompt-len", type=int, default=2048, show_default=True, callback=_positive,
              help="Prompt tokens per sequence.")
@click.option("--gen-len", type=int, default=256, show_default=True, callback=_positive,
              help="Generated tokens per sequence (the KV cache holds prompt + generated).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def describe(model_name, strategy_spec, devices, batch, prompt_len, gen_len, as_json):
    """Validate a strategy for a model and show exactly what each device holds."""
    from moe_jax.parallel.mesh import validate
    from moe_jax.programs.placement import describe as describe_placement

    cfg = get_model(model_name)
    strategy = Strategy.load(strategy_spec)
    validate(strategy, cfg, batch=batch, num_devices=devices)
    placement = describe_placement(cfg, strategy, batch=batch, cache_len=prompt_len + gen_len,
                                   prompt_len=prompt_len)
    if as_json:
        data = placement.to_dict()
        data["workload"] = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}
        click.echo(_dumps(data, indent=2))
        return
    _print_placement(placement, prompt_len, gen_len)


def _print_placement(p, prompt_len: int, gen_len: int) -> None:
    cfg, s, f = p.cfg, p.strategy, p.facts()
    out.print(f"[bold]{cfg.name}[/bold]: {_b(cfg.params_total)} parameters ({cfg.params_total:,}), "
              f"{_b(cfg.params_active)} active per token; {_gb(p.weight_bytes_total)} of {cfg.dtype} weights")
    out.print(f"[bold]{s.name}[/bold] on {s.num_devices} devices, mesh (dp, pp, ep, tp) = "
              f"({s.dp}, {s.pp}, {s.ep}, {s.tp}); validated: ep | {cfg.num_experts} experts, "
              f"tp | {cfg.num_heads} heads, pp | {cfg.num_layers} layers, dp | batch {p.batch}")
    out.print(f"Workload: batch {p.batch}, prompt {prompt_len} tokens, {gen_len} generated "
              f"(KV cache of {prompt_len + gen_len} positions)\n")

    shard = Table(title="What one device holds")
    shard.add_column("item")
    shard.add_column("per device", justify="right")
    shard.add_column("how", justify="left")
    kv_how = (f"all {cfg.num_kv_heads} (tp={s.tp} > {cfg.num_kv_heads} KV heads: replicated over tp)"
              if f["kv_heads_replicated_over_tp"] else f"{cfg.num_kv_heads} / tp={s.tp}")
    rows = [
        ("layers", str(f["layers_per_stage"]), f"{cfg.num_layers} / pp={s.pp}"),
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
         "2 x " + " x ".join(map(str, f["kv_cache_shape_per_device"])) + f" x {cfg.dtype_bytes} B [L, B, T, K, Dh]"),
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


@cli.command()
@click.option("--model", "model_name", default="tiny", show_default=True, help="Model preset.")
@click.option("--strategy", "strategy_spec", default="EP2-TP2-DP2", show_default=True,
              help="Strategy name or TOML file.")
@click.option("--batch", type=int, default=8, show_default=True, callback=_positive)
@click.option("--prompt-len", type=int, default=16, show_default=True, callback=_positive)
@click.option("--gen-len", type=int, default=4, show_default=True, callback=_positive)
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
@_dispatch_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(model_name, strategy_spec, batch, prompt_len, gen_len, seed, dispatch, as_json):
    """Run a model sharded on fake CPU devices and compare it with one device (f32, ample capacity)."""
    from moe_jax.costs.compile import Workload
    from moe_jax.parallel.devices import request_cpu_devices
    from moe_jax.parallel.mesh import validate
    from moe_jax.programs.guards import check_extents, check_run_memory

    cfg = _with_dispatch(get_model(model_name), dispatch)
    strategy = Strategy.load(strategy_spec)
    workload = Workload(batch, prompt_len, gen_len)              # the documented size limits
    validate(strategy, cfg, batch=batch)
    check_extents(cfg, batch, prompt_len, workload.cache_len)
    # the sharded run and the one-device reference, both in f32 on this host
    check_run_memory(cfg.replace(dtype="float32"), strategy, batch, workload.cache_len, platform="cpu")
    check_run_memory(cfg.replace(dtype="float32"), Strategy(), batch, workload.cache_len, platform="cpu")
    request_cpu_devices(strategy.num_devices)
    from moe_jax.runtime.verify import verify_sharding

    # f32 for a tight comparison; capacity E/k gives every expert room for all tokens of a group,
    # so the reference and the sharded program (whose token groups differ) drop nothing.
    cfg = cfg.replace(dtype="float32", capacity_factor=cfg.num_experts / cfg.top_k)
    v = verify_sharding(cfg, strategy, batch=batch, prompt_len=prompt_len, gen_len=gen_len, seed=seed)
    if as_json:
        click.echo(_dumps({**v.__dict__, "passed": v.passed}, indent=2))
    else:
        out.print(f"{cfg.name} {v.strategy}: batch {batch}, prompt {prompt_len}, {gen_len} decode steps, "
                  f"max |logit| {v.logit_scale:.3g}")
        out.print(f"  sharded forward vs 1 device: max |diff| {v.forward_max_abs:.2e}")
        out.print(f"  sharded prefill vs 1 device: max |diff| {v.prefill_max_abs:.2e}")
        out.print(f"  sharded decode  vs 1 device: max |diff| {v.decode_max_abs:.2e}")
        out.print(("[green]PASS[/green]" if v.passed else "[red]FAIL[/red]") +
                  f" (tolerance {v.tolerance:g} x max(1, max |logit|))")
    if not v.passed:
        sys.exit(1)


@cli.command("hardware")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hardware_cmd(as_json):
    """List the hardware presets with their figures and sources."""
    from moe_jax.hardware.presets import get_hardware, hardware_names

    hws = [get_hardware(n) for n in hardware_names()]
    if as_json:
        click.echo(_dumps([h.to_dict() for h in hws], indent=2))
        return
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


def _output_path(value: str | None, what: str):
    """A writable output file path: its directory must exist (nothing is created silently)."""
    from pathlib import Path

    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise MoeJaxError(f"{what} {value!r} is a directory; give a file name")
    if not path.parent.exists():
        raise MoeJaxError(f"{what} {value!r}: directory {str(path.parent)!r} does not exist")
    return path


def _dumps(data, **kw) -> str:
    from moe_jax.files import dumps

    return dumps(data, **kw)


def _write_atomic(path, text: str) -> None:
    from moe_jax.files import write_atomic

    write_atomic(path, text)


@cli.command()
@_model_opt
@click.option("--mesh", "--strategy", "strategy_spec", default="EP64-TP8-PP2-DP1", show_default=True,
              help="Strategy name like EP64-TP8-PP2-DP1, or a TOML file (see meshes/).")
@click.option("--hardware", "hardware_spec", default="seed-gpu", show_default=True,
              help="Hardware preset (see `moe-jax hardware`) or a TOML file.")
@click.option("--batch", type=int, default=128, show_default=True, callback=_positive)
@click.option("--prompt-len", type=int, default=2048, show_default=True, callback=_positive)
@click.option("--gen-len", type=int, default=256, show_default=True, callback=_positive)
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Which compiler: auto (the hardware's own: a deviceless CUDA target for NVIDIA presets, a TPU "
                   "topology for TPU presets; XLA:CPU as a stated stand-in where that compiler is not here), cpu "
                   "(fake CPU devices), tpu, gpu, or real (the devices jax sees).")
@click.option("--topology", help="TPU topology for the tpu compile (default: the smallest that holds the devices).")
@click.option("--json", "json_path", help="Write the analysis as JSON to this file ('-' for stdout).")
@click.option("--markdown", "md_path", help="Write the Markdown report here (and the memory chart beside it).")
@click.option("--dump-hlo", "dump_dir", help="Write each phase's optimized HLO and raw statistics to this directory.")
@_dispatch_option()
@_buffer_option
@_cluster_opts
def analyze(model_name, strategy_spec, hardware_spec, batch, prompt_len, gen_len, backend, topology, json_path,
            md_path, dump_dir, dispatch, dropless_buffer, coordinator, num_processes, process_id, timeout):
    """Compile a strategy, read its cost, predict its latency; exit 0 if it fits, 3 if it does not."""
    from moe_jax.costs.compile import Workload
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.parallel.devices import MAX_CPU_DEVICES, request_cpu_devices
    from moe_jax.parallel.mesh import validate

    cfg = _with_dispatch(get_model(model_name), dispatch, dropless_buffer)
    strategy = Strategy.load(strategy_spec)
    hw = get_hardware(hardware_spec)
    workload = Workload(batch, prompt_len, gen_len)
    validate(strategy, cfg, batch=batch)
    json_file = None if json_path in (None, "-") else _output_path(json_path, "--json")
    md_file = _output_path(md_path, "--markdown")
    if md_file:
        from moe_jax.files import check_derived

        check_derived([md_file.with_name(md_file.stem + ".memory.png")])
    cluster = _cluster(coordinator, num_processes, process_id, timeout)
    if cluster.spec is not None and backend != "real":
        raise MoeJaxError(f"--backend {backend} compiles in one process; a multi-process analyze "
                          "(--coordinator) needs --backend real")
    from moe_jax.costs.backends import resolve

    compiler = resolve(hw, backend)
    if compiler.backend == "cpu":
        n = strategy.num_devices
        request_cpu_devices(n if n <= MAX_CPU_DEVICES else n // strategy.dp)
    elif compiler.backend != "real":
        request_cpu_devices(1)        # a deviceless compile: jax starts on the CPU, no accelerator probed
    from moe_jax.perf.analysis import analyze as run_analysis
    from moe_jax.reporting.markdown import markdown, memory_chart

    kw = {"topology": topology} if topology else {}
    with cluster:
        cluster.check_devices(strategy.num_devices)
        cluster.beat("compiling prefill and decode")
        if cluster.is_leader:
            with out.status(f"compiling prefill and decode of {cfg.name} {strategy.name} with the "
                            f"{compiler.backend} compiler..."):
                a = run_analysis(cfg, strategy, hw, workload, backend=backend, **kw)
        else:
            a = run_analysis(cfg, strategy, hw, workload, backend=backend, **kw)
    if not cluster.is_leader:
        return                                   # process 0 reports; the others stay quiet
    data = a.to_dict()
    if json_path == "-":
        click.echo(_dumps(data, indent=2))
    else:
        _print_analysis(a)
    if json_file:
        _write_atomic(json_file, _dumps(data, indent=2))
    if md_file:
        chart = md_file.with_name(md_file.stem + ".memory.png")
        made = memory_chart(a, chart)
        _write_atomic(md_file, markdown(a, chart.name if made else None))
    if dump_dir:
        _dump_hlo(a, dump_dir)
    sys.exit(0 if a.fits else 3)


@cli.command()
@_model_opt
@click.option("--devices", type=int, required=True, callback=_positive, help="Devices to split the model over.")
@click.option("--hardware", "hardware_spec", default="seed-gpu", show_default=True,
              help="Hardware preset or TOML file.")
@click.option("--batch", type=int, default=128, show_default=True, callback=_positive)
@click.option("--prompt-len", type=int, default=2048, show_default=True, callback=_positive)
@click.option("--gen-len", type=int, default=256, show_default=True, callback=_positive)
@click.option("--objective", type=click.Choice(["throughput", "ttft", "tpot", "cost"]), default="throughput",
              show_default=True, help="cost: the fewest devices (up to --devices) that fit and meet the SLOs.")
@click.option("--slo-ttft", type=float, help="Largest acceptable TTFT in seconds.")
@click.option("--slo-tpot", type=float, help="Largest acceptable TPOT in seconds.")
@click.option("--baseline", "baseline_spec", help="A strategy to compare with the best (name or TOML file).")
@click.option("--top", type=click.IntRange(1, 64), default=8, show_default=True, help="Candidates to compile.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Which compiler (as for analyze): auto is the hardware's own, or the stated cpu stand-in.")
@click.option("--topology", help="TPU topology for the tpu compile (default: the smallest per strategy).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Compile worker processes.")
@click.option("--cache", "cache_dir", default=".moe-jax-cache", show_default=True,
              help="Directory of cached compiled results ('' to disable).")
@click.option("--json", "json_path", help="Write the plan as JSON here ('-' for stdout).")
@click.option("--markdown", "md_path",
              help="Write the best strategy's report here (baseline and plots beside it).")
@_dispatch_option(both=True)
@_buffer_option
def plan(model_name, devices, hardware_spec, batch, prompt_len, gen_len, objective, slo_ttft, slo_tpot,
         baseline_spec, top, backend, topology, workers, cache_dir, json_path, md_path, dispatch, dropless_buffer):
    """Search every (ep, tp, pp, dp) for a device count, compile the best, and recommend one."""
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moe_jax.costs.compile import Workload
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.planner.search import pareto_plot
    from moe_jax.planner.search import plan as run_plan
    from moe_jax.reporting.markdown import memory_chart_from

    cfg = _with_dispatch(get_model(model_name), dispatch, dropless_buffer)
    hw = get_hardware(hardware_spec)
    workload = Workload(batch, prompt_len, gen_len)
    baseline = Strategy.load(baseline_spec) if baseline_spec else None
    if baseline is not None:
        from moe_jax.parallel.mesh import validate

        validate(baseline, cfg, batch=batch)
    for name, value in (("--slo-ttft", slo_ttft), ("--slo-tpot", slo_tpot)):
        if value is not None and not value > 0:
            raise MoeJaxError(f"{name} {value} must be a positive number of seconds")
    json_file = None if json_path in (None, "-") else _output_path(json_path, "--json")
    md_file = _output_path(md_path, "--markdown")
    if md_file:
        from moe_jax.files import check_derived

        check_derived([md_file.with_name(f"{md_file.stem}{suffix}") for suffix in
                       (".memory.png", ".baseline.md", ".baseline.memory.png", ".pareto.png")])
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bar:
        tasks = {}

        def progress(kind, text, done, total):
            if kind not in tasks:
                tasks[kind] = bar.add_task(kind, total=total)
            bar.update(tasks[kind], description=f"{kind}: {text}", completed=done, total=total)

        result = run_plan(cfg, devices, hw, workload, objective=objective, slo_ttft=slo_ttft, slo_tpot=slo_tpot,
                          baseline=baseline, top=top, backend=backend, topology=topology,
                          cache_dir=Path(cache_dir) if cache_dir else None, workers=workers, progress=progress)
        if dispatch == "both":
            from moe_jax.planner.search import compare_dispatch

            compare_dispatch(result, cfg, hw, workload, backend=backend, topology=topology,
                             cache_dir=Path(cache_dir) if cache_dir else None, progress=progress)
    data = result.to_dict()
    if json_path == "-":
        click.echo(_dumps(data, indent=2))
    else:
        _print_plan(result, hw)
    if json_file:
        _write_atomic(json_file, _dumps(data, indent=2))
    if md_file:
        stem = md_file.stem
        if result.best:
            chart = md_file.with_name(f"{stem}.memory.png")
            made = memory_chart_from(result.compiled[result.best]["analysis"], chart)
            _write_atomic(md_file, result.compiled[result.best]["markdown"].replace(
                "memory.png", chart.name if made else "memory.png") + _comparison_md(result) + _dispatch_md(result))
        if result.baseline:
            chart = md_file.with_name(f"{stem}.baseline.memory.png")
            made = memory_chart_from(result.compiled[result.baseline]["analysis"], chart)
            _write_atomic(md_file.with_name(f"{stem}.baseline.md"), result.compiled[result.baseline]["markdown"]
                          .replace("memory.png", chart.name if made else "memory.png"))
        pareto_plot(result, md_file.with_name(f"{stem}.pareto.png"))
    sys.exit(0 if result.best else 3)


def _comparison_rows(result) -> list[tuple[str, str, str, str]]:
    """(metric, best, baseline, baseline relative to best) with both numbers."""
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


def _comparison_md(result) -> str:
    rows = _comparison_rows(result)
    if not rows:
        return ""
    lines = ["", f"## Compared with the baseline {result.baseline}", "",
             f"| metric | best ({result.best}) | baseline ({result.baseline}) | baseline / best |",
             "|---|---:|---:|---:|"]
    lines += [f"| {m} | {x} | {y} | {r} |" for m, x, y, r in rows]
    return "\n".join(lines) + "\n"


def _print_plan(result, hw) -> None:
    table = Table(title=f"{result.to_dict()['searched']} strategies searched, {result.to_dict()['compiled']} "
                        f"compiled, objective {result.objective} ({result.seconds:.1f} s)")
    for col in ("rank", "strategy", "devices", "fits", "TTFT", "TPOT", "tok/s", "tok/s/device", "memory/device",
                "source", "estimate vs compiled (TPOT)"):
        table.add_column(col)
    for i, r in enumerate(result.candidates[:20], 1):
        diff = r.get("estimate_vs_compiled", {}).get("tpot_s")
        table.add_row(str(i), r["strategy"] + (" (baseline)" if r["strategy"] == result.baseline else ""),
                      str(r["devices"]), "yes" if r["fits"] else "no",
                      f"{r['ttft_s'] * 1e3:,.1f} ms", f"{r['tpot_s'] * 1e3:,.2f} ms",
                      f"{r['throughput_tok_s']:,.0f}", f"{r['throughput_per_device']:,.1f}",
                      _gb(r.get("memory_bytes")), "compiled" + (" (cached)" if r.get("cached") else "")
                      if r["compiled"] else "estimate", "" if diff is None else f"{diff:+.0%}")
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
    for m, x, y, r in _comparison_rows(result):
        out.print(f"  {m}: best {x}, baseline {y} ({r})")
    if result.dispatch_comparison:
        c = result.dispatch_comparison
        out.print(f"{c['strategy']} with each dispatch method (compiled):")
        for line in _dispatch_lines(c):
            out.print("  " + line)


def _dispatch_cells(m: dict) -> tuple[str, ...] | None:
    """TTFT ms, TPOT ms, tok/s, GB per device, prefill matmul FLOPs per device; None if it does not fit."""
    if not m["fits"]:
        return None
    return (f"{m['ttft_s'] * 1e3:,.1f}", f"{m['tpot_s'] * 1e3:,.3f}", f"{m['throughput_tok_s']:,.0f}",
            f"{m['memory_bytes'] / 1e9:,.2f}", f"{m['prefill_matmul_flops']:.3e}")


def _dispatch_lines(c: dict) -> list[str]:
    lines = []
    for method, m in c["methods"].items():
        cells = _dispatch_cells(m)
        lines.append(f"{method}: does not fit" if cells is None else
                     "{}: TTFT {} ms, TPOT {} ms, {} tok/s, {} GB per device, prefill matmul {} FLOPs per "
                     "device".format(method, *cells))
    return lines


def _dispatch_md(result) -> str:
    c = result.dispatch_comparison
    if not c:
        return ""
    rows = ["", f"## Dispatch methods on {c['strategy']}", "",
            f"The search ran with {c['searched_with']} dispatch; the same strategy compiled with each method:", "",
            "| dispatch | TTFT (ms) | TPOT (ms) | tok/s | memory per device (GB) | prefill matmul FLOPs per device |",
            "|---|---:|---:|---:|---:|---:|"]
    for method, m in c["methods"].items():
        cells = _dispatch_cells(m) or ("does not fit", "", "", "", "")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


@cli.command("run")
@click.option("--model", "model_name", help="Model preset or Hugging Face checkpoint directory "
                                               "(default: the --weights checkpoint, else tiny).")
@click.option("--mesh", "--strategy", "strategy_spec", default="EP2-TP2-DP2", show_default=True,
              help="Strategy name or TOML file.")
@click.option("--batch", type=int, default=8, show_default=True, callback=_positive)
@click.option("--prompt-len", type=int, default=32, show_default=True, callback=_positive)
@click.option("--gen-len", type=int, default=8, show_default=True, callback=_positive)
@click.option("--weights", "weights_dir", help="Load a safetensors checkpoint (default: random weights).")
@click.option("--prompt-file", help='JSON {"prompt": [[ids...], ...]}; batch and prompt length come from it.')
@click.option("--dtype", type=click.Choice(list(DTYPE_BY_SHORT)), help="Override the weights' dtype.")
@click.option("--hardware", "hardware_spec", help="Predict for this hardware and report the error.")
@click.option("--backend", type=click.Choice(["cpu", "real"]), default="cpu", show_default=True,
              help="cpu: emulated CPU devices (functional check); real: the devices jax sees.")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True, help="Timed prefill runs.")
@click.option("--json", "json_path", help="Write the result as JSON here ('-' for stdout).")
@click.option("--save-logits", "logits_path",
              help="Write the prefill logits of every prompt position [B, S, V] here (.npy, float32); one extra "
                   "prefill built with full logits (the timed one returns the last position's).")
@click.option("--progress", "show_progress", is_flag=True, help="Print each step to stderr (every process).")
@_dispatch_option()
@_buffer_option
@_cluster_opts
def run_cmd(model_name, strategy_spec, batch, prompt_len, gen_len, weights_dir, prompt_file, dtype, hardware_spec,
            backend, seed, repeats, json_path, logits_path, show_progress, dispatch, dropless_buffer, coordinator,
            num_processes, process_id, timeout):
    """Run the sharded model: prefill, greedy decode, measured TTFT/TPOT against the prediction.

    With --coordinator, --num-processes and --process-id (or their MOE_JAX_* variables, or a
    SLURM / Open MPI launcher) every process runs this command; their devices form one mesh
    and process 0 reports. With --backend cpu each process emulates its share of the mesh.
    """
    from pathlib import Path

    from moe_jax.costs.compile import Workload
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.parallel.mesh import validate
    from moe_jax.runtime.run import read_prompt_file

    if weights_dir and not Path(weights_dir).is_dir():
        raise MoeJaxError(f"--weights {weights_dir!r} is not a directory")
    cfg = _with_dispatch(get_model(model_name or weights_dir or "tiny"), dispatch, dropless_buffer)
    if dtype:
        cfg = cfg.replace(dtype=DTYPE_BY_SHORT[dtype].name)
    strategy = Strategy.load(strategy_spec)
    prompt = read_prompt_file(prompt_file) if prompt_file else None
    if prompt is not None:
        batch, prompt_len = len(prompt), len(prompt[0])
        bad = [t for row in prompt for t in row if not 0 <= t < cfg.vocab_size]
        if bad:
            raise MoeJaxError(f"prompt token {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    workload = Workload(batch, prompt_len, gen_len)
    validate(strategy, cfg, batch=batch)
    from moe_jax.programs.guards import check_extents

    check_extents(cfg, batch, prompt_len, workload.cache_len)
    hw = get_hardware(hardware_spec) if hardware_spec else None
    json_file = None if json_path in (None, "-") else _output_path(json_path, "--json")
    logits_file = _output_path(logits_path, "--save-logits")
    cluster = _cluster(coordinator, num_processes, process_id, timeout,
                       cpu_devices=strategy.num_devices if backend == "cpu" else None, progress=show_progress)
    with cluster:
        cluster.check_devices(strategy.num_devices)
        import jax

        from moe_jax.programs.guards import check_run_memory
        from moe_jax.runtime.run import run

        check_run_memory(cfg, strategy, batch, workload.cache_len, platform=jax.local_devices()[0].platform,
                         devices=jax.local_devices())

        result = run(cfg, strategy, workload, weights=weights_dir, prompt=prompt, seed=seed, hardware=hw,
                     backend=backend, repeats=repeats, keep_logits=logits_file is not None, progress=cluster.beat)
    if not cluster.is_leader:
        return                                   # process 0 reports; the others stay quiet
    if logits_file is not None:
        _write_npy(logits_file, result.prefill_logits)
    data = result.to_dict()
    if json_path == "-":
        click.echo(_dumps(data, indent=2))
    else:
        from moe_jax.units import ms as _ms

        procs = f" in {result.processes} processes" if result.processes > 1 else ""
        out.print(f"{cfg.name} {strategy.name} on {result.device_kind}{procs}: batch {batch}, prompt {prompt_len}, "
                  f"generated {gen_len}")
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
    if json_file:
        _write_atomic(json_file, _dumps(data, indent=2))


def _write_npy(path, array) -> None:
    """`array` as float32 .npy, written atomically."""
    import io

    import numpy as np

    from moe_jax.files import write_atomic

    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float32))
    write_atomic(path, buf.getvalue())


def _dump_hlo(a, directory: str) -> None:
    from pathlib import Path

    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeJaxError(f"--dump-hlo {directory!r}: cannot create it: {e.strerror or e}") from None
    for name, phase in a.cost.phases.items():
        if phase.hlo_text:
            _write_atomic(d / f"{name}.hlo.txt", phase.hlo_text)
        stats = {"memory": None if phase.memory is None else phase.memory.__dict__,
                 "xla_cost_analysis": phase.xla_cost, "walk": {"flops": phase.flops, "hbm_bytes": phase.hbm_bytes,
                                                               "transcendentals": phase.transcendentals},
                 "compile_seconds": phase.compile_seconds, "error": phase.error}
        _write_atomic(d / f"{name}.stats.json", _dumps(stats, indent=2))


def _print_analysis(a) -> None:
    from moe_jax.reporting.markdown import compiled_by
    from moe_jax.units import ms as _ms

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
    from moe_jax.perf.analysis import unconfirmed_fit_note

    if not a.fit_confirmed:
        out.print(f"[yellow]{unconfirmed_fit_note(a)}[/yellow]")
        return
    out.print("[green]fits[/green]" if a.fits else "[red]does not fit[/red]")


def main(argv=None) -> None:
    """Console-script entry point: user errors → message on stderr, exit status 2."""
    try:
        cli.main(args=argv, prog_name="moe-jax", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except MoeJaxError as e:
        click.echo(f"moe-jax: error: {e}", err=True)
        sys.exit(getattr(e, "exit_status", 2))
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
