"""Commands that compile and predict: analyze (one strategy) and plan (search every strategy for a device count)."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from moe_jax.cli.app import cli, out
from moe_jax.cli.options import (
    SEED_WORKLOAD,
    apply_dispatch,
    apply_dtypes,
    backend_option,
    buffer_option,
    capacity_option,
    choice,
    cluster_from,
    cluster_options,
    disaggregated_options,
    dispatch_option,
    dtype_option,
    hardware_option,
    headroom_option,
    kv_dtype_option,
    model_option,
    output_options,
    positive,
    slo_option,
    strategy_option,
    workload_options,
)
from moe_jax.cli.outputs import check_outputs, dump_hlo, emit, json_file, output_path
from moe_jax.config import get_model
from moe_jax.errors import MoeJaxError
from moe_jax.files import write_atomic
from moe_jax.names import Backend, Objective
from moe_jax.parallel.mesh import Strategy
from moe_jax.reporting import tables

DERIVED = (".memory.png", ".baseline.md", ".baseline.memory.png", ".pareto.png", ".sweep.png")
"""The files `plan --markdown NAME.md` writes beside it."""


@cli.command()
@model_option
@strategy_option(mesh=True)
@hardware_option("Hardware preset (see `moe-jax hardware`) or a TOML file.")
@workload_options(SEED_WORKLOAD)
@backend_option("Which compiler: auto (the hardware's own: a deviceless CUDA target for NVIDIA presets, a TPU "
                "topology for TPU presets; XLA:CPU as a stated stand-in where that compiler is not here), cpu "
                "(fake CPU devices), tpu, gpu, or real (the devices jax sees).")
@click.option("--topology", help="TPU topology for the tpu compile (default: the smallest that holds the devices).")
@output_options("Write the analysis as JSON to this file ('-' for stdout).",
                "Write the Markdown report here (and the memory chart beside it).")
@click.option("--dump-hlo", "dump_dir", help="Write each phase's optimized HLO and raw statistics to this directory.")
@click.option("--trace", "trace_path", help="Write the predicted timeline of prefill and decode (the compiled "
              "schedule, a track per stream) as a Chrome / Perfetto trace JSON file.")
@dispatch_option()
@buffer_option
@capacity_option
@headroom_option
@dtype_option
@kv_dtype_option
@cluster_options
def analyze(model_name, strategy_spec, hardware_spec, batch, prompt_len, gen_len, backend, topology, json_path,
            md_path, dump_dir, trace_path, dispatch, dropless_buffer, capacity_factor, headroom, dtype, kv_dtype,
            coordinator, num_processes, process_id, timeout):
    """Compile a strategy, read its cost, predict its latency; exit 0 if it fits, 3 if it does not."""
    from moe_jax.costs.compile import Workload
    from moe_jax.planner.capacity import capacity, check_headroom

    check_headroom(headroom)
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.parallel.devices import MAX_CPU_DEVICES, request_cpu_devices
    from moe_jax.parallel.mesh import validate

    cfg = apply_dtypes(apply_dispatch(get_model(model_name), dispatch, dropless_buffer, capacity_factor), dtype,
                       kv_dtype)
    strategy = Strategy.load(strategy_spec)
    hw = get_hardware(hardware_spec)
    workload = Workload(batch, prompt_len, gen_len)
    validate(strategy, cfg, batch=batch)
    json_file(json_path)                         # checked before compiling, written after it
    md_file = output_path(md_path, "--markdown")
    trace_file = output_path(trace_path, "--trace")
    derived = check_outputs(json_path, md_file, {".memory.png": "the memory chart"}, {"--trace": trace_file})
    cluster = cluster_from(coordinator, num_processes, process_id, timeout)
    if cluster.spec is not None and backend != Backend.REAL:
        raise MoeJaxError(f"--backend {backend} compiles in one process; a multi-process analyze "
                          "(--coordinator) needs --backend real")
    from moe_jax.costs.backends import resolve

    compiler = resolve(hw, backend)
    if compiler.backend == Backend.CPU:
        n = strategy.num_devices
        request_cpu_devices(n if n <= MAX_CPU_DEVICES else n // strategy.dp)
    elif compiler.backend != Backend.REAL:
        request_cpu_devices(1)        # a deviceless compile: jax starts on the CPU, no accelerator probed
    from moe_jax.perf.analysis import analyze as run_analysis
    from moe_jax.reporting.charts import memory_chart
    from moe_jax.reporting.markdown import markdown

    kw = {"topology": topology} if topology else {}
    with cluster:
        cluster.agree({"model": cfg.summary(), "strategy": strategy.name, "workload": workload.to_dict(),
                       "hardware": hw.to_dict(), "backend": backend, "topology": topology})
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
    from moe_jax.reporting.serving import capacity_markdown, print_capacity

    data = a.to_dict()
    cap = capacity(data, headroom=headroom)
    data["max_concurrency"] = cap.to_dict() if cap else None
    caps = [data["max_concurrency"]] if cap else []
    emit(data, json_path, lambda: (tables.print_analysis(out, a), print_capacity(out, caps)))
    if md_file:
        chart = derived[".memory.png"]
        made = memory_chart(a, chart)
        write_atomic(md_file, markdown(a, chart.name if made else None) + capacity_markdown(caps))
    if dump_dir:
        dump_hlo(a, dump_dir)
    if trace_file:
        from moe_jax.files import dumps
        from moe_jax.perf.timemodel import program_trace

        write_atomic(trace_file, dumps(program_trace(a.cost, hw, cfg.dtype)))
    sys.exit(0 if a.fits else 3)


@cli.command()
@model_option
@click.option("--devices", type=int, required=True, callback=positive, help="Devices to split the model over.")
@hardware_option("Hardware preset or TOML file.")
@workload_options(SEED_WORKLOAD)
@click.option("--objective", type=choice(Objective), default=str(Objective.THROUGHPUT), show_default=True,
              help="cost: the fewest devices (up to --devices) that fit and meet the SLOs.")
@slo_option("--slo-ttft", "TTFT")
@slo_option("--slo-tpot", "TPOT")
@click.option("--sweep", is_flag=True, help="Also sweep every strategy across batch sizes (dp x 2^k up to its "
              "capacity): the Pareto front of tokens/s per device against tokens/s per user is compiled, drawn "
              "(NAME.sweep.png beside --markdown) and reported; with SLOs, the best point meeting them is picked.")
@click.option("--sweep-max-batch", type=int, callback=positive,
              help="Largest batch the sweep tries (default: each strategy's estimated capacity).")
@headroom_option
@click.option("--baseline", "baseline_spec", help="A strategy to compare with the best (name or TOML file).")
@click.option("--top", type=click.IntRange(1, 64), default=8, show_default=True, help="Candidates to compile.")
@backend_option("Which compiler (as for analyze): auto is the hardware's own, or the stated cpu stand-in.")
@click.option("--topology", help="TPU topology for the tpu compile (default: the smallest per strategy).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Compile worker processes.")
@click.option("--cache", "cache_dir", default=".moe-jax-cache", show_default=True,
              help="Directory of cached compiled results ('' to disable).")
@output_options("Write the plan as JSON here ('-' for stdout).",
                "Write the best strategy's report here (baseline and plots beside it).")
@dispatch_option(both=True)
@buffer_option
@capacity_option
@click.option("--emit", "emit_dir", help="Write what runs the chosen strategy into this directory: run.sh (the "
              "`moe-jax run` command), maxtext.yml (MaxText ici/dcn parallelism), vllm.sh and sglang.sh (their "
              "launch flags, with what does not carry over), README.md.")
@click.option("--force", is_flag=True, help="Let --emit replace the files it writes in an existing directory.")
@disaggregated_options
@dtype_option
@kv_dtype_option
def plan(model_name, devices, hardware_spec, batch, prompt_len, gen_len, objective, slo_ttft, slo_tpot, sweep,
         sweep_max_batch, headroom, baseline_spec, top, backend, topology, workers, cache_dir, json_path, md_path,
         dispatch, dropless_buffer, capacity_factor, emit_dir, force, disaggregated, rate, dtype, kv_dtype):
    """Search every (ep, tp, pp, dp) for a device count, compile the best, and recommend one."""
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moe_jax.costs.compile import Workload
    from moe_jax.hardware.presets import get_hardware
    from moe_jax.planner.charts import pareto_plot
    from moe_jax.planner.search import plan as run_plan
    from moe_jax.reporting.charts import memory_chart_from
    from moe_jax.reporting.markdown import baseline_markdown, plan_markdown

    cfg = apply_dtypes(apply_dispatch(get_model(model_name), dispatch, dropless_buffer, capacity_factor), dtype,
                       kv_dtype)
    hw = get_hardware(hardware_spec)
    workload = Workload(batch, prompt_len, gen_len)
    baseline = Strategy.load(baseline_spec) if baseline_spec else None
    if baseline is not None:
        from moe_jax.parallel.mesh import validate

        validate(baseline, cfg, batch=batch)
    from moe_jax.planner.capacity import attach_capacity, check_headroom

    check_headroom(headroom)
    if rate is not None and not disaggregated:
        raise MoeJaxError(f"--rate {rate:g} sizes the pools of --disaggregated; add --disaggregated")
    from moe_jax.planner.disaggregated import check_rate

    check_rate(rate)
    json_file(json_path)                         # checked before the search, written after it
    from moe_jax.reporting.launch import check_emit_dir, spec_from_plan, write_launch

    emit_to = check_emit_dir(emit_dir, force) if emit_dir else None
    md_file = output_path(md_path, "--markdown")
    derived = check_outputs(json_path, md_file, {suffix: f"the derived {suffix}" for suffix in DERIVED})
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
            from moe_jax.planner.dispatch import compare_dispatch

            compare_dispatch(result, progress=progress)
        swept = None
        if sweep:
            from moe_jax.planner.sweep import run_sweep

            swept = run_sweep(result.spec, headroom=headroom, max_batch=sweep_max_batch, progress=progress)
            result.sweep = swept.to_dict()
        if disaggregated:
            from moe_jax.planner.disaggregated import plan_disaggregated

            result.disaggregated = plan_disaggregated(result.spec, result, rate=rate, progress=progress).to_dict()
        attach_capacity(result, headroom, others=swept.analyses if swept else None)
    from moe_jax.reporting import serving

    if result.sweep and md_file:
        result.sweep["chart"] = serving.sweep_chart(result.sweep, derived[".sweep.png"]).name

    def show():
        tables.print_plan(out, result)
        serving.print_capacity(out, [result.capacity[c.strategy] for c in result.candidates
                                     if c.strategy in result.capacity])
        if result.sweep:
            serving.print_sweep(out, result.sweep)
        if result.disaggregated:
            from moe_jax.reporting.disaggregated import print_disaggregated

            print_disaggregated(out, result.disaggregated)

    emit(result.to_dict(), json_path, show)
    if md_file:
        if result.best:
            chart = derived[".memory.png"]
            made = memory_chart_from(result.compiled[result.best]["analysis"], chart)
            write_atomic(md_file, plan_markdown(result, chart.name if made else None))
        if result.baseline:
            chart = derived[".baseline.memory.png"]
            made = memory_chart_from(result.compiled[result.baseline]["analysis"], chart)
            write_atomic(derived[".baseline.md"], baseline_markdown(result, chart.name if made else None))
        pareto_plot(result, derived[".pareto.png"])
    if emit_to is not None:
        launch = spec_from_plan(result, model=model_name, hardware=hardware_spec)
        if launch is None:
            click.echo(f"--emit: nothing written to {str(emit_to)!r}: no strategy was chosen", err=True)
        else:
            write_launch(emit_to, launch, force)
            click.echo(f"--emit: wrote the launch files for {launch.strategy.name} to {str(emit_to)!r}", err=True)
    sys.exit(0 if result.best else 3)
