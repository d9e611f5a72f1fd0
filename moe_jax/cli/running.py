"""Commands that run the sharded model on devices: verify (against one device) and run (timed)."""

from __future__ import annotations

import sys

import click

from moe_jax.cli.app import cli, out
from moe_jax.cli.options import (
    RUN_WORKLOAD,
    VERIFY_WORKLOAD,
    apply_dispatch,
    apply_dtypes,
    buffer_option,
    capacity_option,
    choice,
    cluster_from,
    cluster_options,
    dispatch_option,
    dtype_option,
    json_flag,
    kv_dtype_option,
    output_options,
    seed_option,
    strategy_option,
    workload_options,
)
from moe_jax.cli.outputs import emit, json_file, output_path, write_npy
from moe_jax.config import get_model
from moe_jax.errors import MoeJaxError
from moe_jax.files import check_distinct, dumps
from moe_jax.names import Backend
from moe_jax.parallel.mesh import Strategy
from moe_jax.reporting import tables


@cli.command()
@click.option("--model", "model_name", default="tiny", show_default=True, help="Model preset.")
@strategy_option("EP2-TP2-DP2", "Strategy name or TOML file.")
@workload_options(VERIFY_WORKLOAD)
@seed_option
@dispatch_option()
@json_flag()
def verify(model_name, strategy_spec, batch, prompt_len, gen_len, seed, dispatch, as_json):
    """Run a model sharded on fake CPU devices and compare it with one device (f32, ample capacity)."""
    from moe_jax.costs.compile import Workload
    from moe_jax.parallel.devices import request_cpu_devices
    from moe_jax.parallel.mesh import validate
    from moe_jax.programs.guards import check_extents, check_run_memory
    from moe_jax.runtime.verify import exact_config

    cfg = apply_dispatch(get_model(model_name), dispatch)
    strategy = Strategy.load(strategy_spec)
    workload = Workload(batch, prompt_len, gen_len)              # the documented size limits
    validate(strategy, cfg, batch=batch)
    check_extents(cfg, batch, prompt_len, workload.cache_len)
    # compared where the comparison is exact: f32, and capacity for every token so that the reference and the
    # sharded program (whose token groups differ) drop nothing; both run on this host
    cfg = exact_config(cfg)
    check_run_memory(cfg, strategy, batch, workload.cache_len, platform=Backend.CPU)
    check_run_memory(cfg, Strategy(), batch, workload.cache_len, platform=Backend.CPU)
    request_cpu_devices(strategy.num_devices)
    from moe_jax.runtime.verify import verify_sharding

    v = verify_sharding(cfg, strategy, batch=batch, prompt_len=prompt_len, gen_len=gen_len, seed=seed)
    if as_json:
        click.echo(dumps({**v.__dict__, "passed": v.passed}, indent=2))
    else:
        tables.print_verification(out, cfg.name, v)
    if not v.passed:
        sys.exit(1)


@cli.command("run")
@click.option("--model", "model_name", help="Model preset or Hugging Face checkpoint directory "
                                               "(default: the --weights checkpoint, else tiny).")
@strategy_option("EP2-TP2-DP2", "Strategy name or TOML file.", mesh=True)
@workload_options(RUN_WORKLOAD)
@click.option("--weights", "weights_dir", help="Load a safetensors checkpoint (default: random weights).")
@click.option("--prompt-file", help='JSON {"prompt": [[ids...], ...]}; batch and prompt length come from it.')
@dtype_option
@kv_dtype_option
@click.option("--hardware", "hardware_spec", help="Predict for this hardware and report the error.")
@click.option("--backend", type=choice((Backend.CPU, Backend.REAL)), default=str(Backend.CPU), show_default=True,
              help="cpu: emulated CPU devices (functional check); real: the devices jax sees.")
@seed_option
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True, help="Timed prefill runs.")
@output_options("Write the result as JSON here ('-' for stdout).")
@click.option("--save-logits", "logits_path",
              help="Write the prefill logits of every prompt position [B, S, V] here (.npy, float32); one extra "
                   "prefill built with full logits (the timed one returns the last position's).")
@click.option("--progress", "show_progress", is_flag=True, help="Print each step to stderr (every process).")
@dispatch_option()
@buffer_option
@capacity_option
@cluster_options
def run_cmd(model_name, strategy_spec, batch, prompt_len, gen_len, weights_dir, prompt_file, dtype, kv_dtype,
            hardware_spec, backend, seed, repeats, json_path, logits_path, show_progress, dispatch, dropless_buffer,
            capacity_factor, coordinator, num_processes, process_id, timeout):
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
    cfg = apply_dispatch(get_model(model_name or weights_dir or "tiny"), dispatch, dropless_buffer, capacity_factor)
    cfg = apply_dtypes(cfg, dtype, kv_dtype)
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
    json_file(json_path)                         # checked before the run, written after it
    logits_file = output_path(logits_path, "--save-logits")
    check_distinct({"--json": json_file(json_path), "--save-logits": logits_file})
    cluster = cluster_from(coordinator, num_processes, process_id, timeout,
                           cpu_devices=strategy.num_devices if backend == Backend.CPU else None,
                           progress=show_progress)
    with cluster:
        cluster.agree({"model": cfg.summary(), "strategy": strategy.name, "workload": workload.to_dict(),
                       "seed": seed, "backend": backend, "weights": weights_dir, "prompt": _digest(prompt),
                       "hardware": hw.name if hw else None, "repeats": repeats})
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
        write_npy(logits_file, result.prefill_logits)
    emit(result.to_dict(), json_path, lambda: tables.print_run(out, result))


def _digest(prompt) -> str | None:
    """A prompt's sha256 (processes compare it, not the tokens themselves: a prompt may be large)."""
    if prompt is None:
        return None
    import hashlib
    import json

    return "sha256:" + hashlib.sha256(json.dumps(prompt).encode()).hexdigest()[:16]
